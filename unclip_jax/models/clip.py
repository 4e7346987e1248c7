"""CLIP (Radford et al. 2021): a ViT image tower and a causal text tower mapped into one space.

The structure mirrors Hugging Face `CLIPModel` (pre-LN transformers, class-token pooling for images,
EOT pooling for text, bias-free projections, learned `logit_scale`) so that published checkpoints
can be imported by a name mapping:

    vision_model/{patch_embedding, class_embedding, position_embedding, ln_pre, encoder, ln_post}
    text_model/{token_embedding, position_embedding, encoder, ln_final}
    visual_projection, text_projection, logit_scale

(HF: `pre_layrnorm` = `ln_pre`, `post_layernorm` = `ln_post`, `final_layer_norm` = `ln_final`; the
encoder layers use HF's names, see `unclip_jax.models.layers`.)
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from unclip_jax import cpu
from unclip_jax.models.layers import (Dtype, Embed, LayerNorm, Transformer, as_dtype,
                                      get_activation, partitioned)

Array = jax.Array

EOT_POOLING_MODES = ("argmax", "eot_id")


def l2_normalize(x: Array, axis: int = -1, eps: float = 1e-12) -> Array:
    """Divides `x` by its L2 norm along `axis`, in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=axis, keepdims=True), eps))


class VisionTransformer(nn.Module):
    """CLIP image tower. images [B, H, W, 3] -> pooled class token after `ln_post`, [B, width]."""
    image_size: int
    patch_size: int
    width: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    activation: str = "quick_gelu"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"
    matmul_dtype: Dtype | None = None  # operand dtype of the transformer's projections (layers.matmul)

    @nn.compact
    def __call__(self, images: Array) -> Array:
        expected = (self.image_size, self.image_size, 3)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images have shape {tuple(images.shape)}; expected [batch, "
                             f"{self.image_size}, {self.image_size}, 3] (image_size={self.image_size})")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size "
                             f"{self.patch_size}")
        scale = self.width ** -0.5
        x = nn.Conv(self.width, (self.patch_size, self.patch_size),
                    strides=(self.patch_size, self.patch_size), padding="VALID", use_bias=False,
                    dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=partitioned(nn.initializers.lecun_normal(),
                                            (None, None, "conv_in", "embed")),
                    name="patch_embedding")(images.astype(self.dtype))
        batch = x.shape[0]
        x = x.reshape(batch, -1, self.width)  # [B, num_patches, width], row-major over the grid
        class_embedding = self.param(
            "class_embedding", partitioned(nn.initializers.normal(scale), ("embed",)),
            (self.width,), self.param_dtype)
        cls = jnp.broadcast_to(jnp.asarray(class_embedding, self.dtype), (batch, 1, self.width))
        x = jnp.concatenate([cls, x], axis=1)
        position_embedding = self.param(
            "position_embedding", partitioned(nn.initializers.normal(scale), (None, "embed")),
            (x.shape[1], self.width), self.param_dtype)
        x = x + jnp.asarray(position_embedding, self.dtype)[None]
        x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
        x = LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="ln_pre")(x)
        x = Transformer(depth=self.depth, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                        activation=self.activation, causal=False, dtype=self.dtype,
                        param_dtype=self.param_dtype, scan_layers=self.scan_layers,
                        remat_policy=self.remat_policy, matmul_dtype=self.matmul_dtype,
                        name="encoder")(x)
        return LayerNorm(dtype=jnp.float32, param_dtype=self.param_dtype, name="ln_post")(x[:, 0])


class TextTransformer(nn.Module):
    """CLIP text tower (causal). tokens int [B, L] -> (pooled [B, width], hidden [B, L, width]).

    Both outputs are after `ln_final` and in float32; `pooled` is the hidden state at the EOT token.
    """
    vocab_size: int
    context_length: int
    width: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    activation: str = "quick_gelu"
    eot_pooling: str = "argmax"
    eot_token_id: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"
    matmul_dtype: Dtype | None = None  # operand dtype of the transformer's projections (layers.matmul)

    def eot_positions(self, tokens: Array) -> Array:
        """Index of the EOT token in each row of tokens [B, L] -> int32 [B].

        "argmax": position of the largest id (OpenAI CLIP, where EOT has the highest id; the first
        one wins when padding repeats it). "eot_id": first position equal to `eot_token_id`
        (position 0 when a row has none, as in Hugging Face).
        """
        if self.eot_pooling == "argmax":
            return jnp.argmax(tokens, axis=-1).astype(jnp.int32)
        if self.eot_pooling == "eot_id":
            eot = self.vocab_size - 1 if self.eot_token_id is None else self.eot_token_id
            return jnp.argmax(tokens == eot, axis=-1).astype(jnp.int32)
        raise ValueError(f"unknown eot_pooling {self.eot_pooling!r}; expected one of "
                         f"{EOT_POOLING_MODES}")

    @nn.compact
    def __call__(self, tokens: Array) -> tuple[Array, Array]:
        if tokens.ndim != 2 or tokens.shape[1] != self.context_length:
            raise ValueError(f"tokens have shape {tuple(tokens.shape)}; expected [batch, "
                             f"{self.context_length}] (context_length={self.context_length})")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be integer ids, got dtype {tokens.dtype}")
        x = Embed(self.vocab_size, self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                  name="token_embedding")(tokens)
        position_embedding = self.param(
            "position_embedding", partitioned(nn.initializers.normal(0.01), (None, "embed")),
            (self.context_length, self.width), self.param_dtype)
        x = x + jnp.asarray(position_embedding, self.dtype)[None]
        x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
        x = Transformer(depth=self.depth, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                        activation=self.activation, causal=True, dtype=self.dtype,
                        param_dtype=self.param_dtype, scan_layers=self.scan_layers,
                        remat_policy=self.remat_policy, matmul_dtype=self.matmul_dtype,
                        name="encoder")(x)
        hidden = LayerNorm(dtype=jnp.float32, param_dtype=self.param_dtype, name="ln_final")(x)
        eot = self.eot_positions(tokens)
        pooled = jnp.take_along_axis(hidden, eot[:, None, None], axis=1)[:, 0]
        return pooled, hidden


class CLIP(nn.Module):
    """Contrastive image/text model: `__call__(images, tokens) -> (z_i, z_t, logit_scale)`.

    images: float [B, image_size, image_size, 3], already normalised; tokens: int [B, context_length].
    Parameters are stored in `param_dtype`, activations computed in `dtype`; outputs are float32.
    """
    embed_dim: int = 512
    image_size: int = 224
    patch_size: int = 32
    vision_width: int = 768
    vision_depth: int = 12
    vision_heads: int = 12
    vocab_size: int = 49408
    context_length: int = 77
    text_width: int = 512
    text_depth: int = 12
    text_heads: int = 8
    mlp_ratio: float = 4.0
    activation: str = "quick_gelu"
    eot_pooling: str = "argmax"  # "argmax" (OpenAI / HF legacy) or "eot_id" (current HF)
    eot_token_id: int | None = None  # None: vocab_size - 1, the OpenAI convention
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"
    # Operand dtype (float32 accumulation) of every transformer projection, forward and
    # backward (see layers.matmul). None: `dtype`.
    matmul_dtype: Dtype | None = None

    def setup(self):
        if self.eot_pooling not in EOT_POOLING_MODES:
            raise ValueError(f"unknown eot_pooling {self.eot_pooling!r}; expected one of "
                             f"{EOT_POOLING_MODES}")
        get_activation(self.activation)
        common = dict(mlp_ratio=self.mlp_ratio, activation=self.activation, dtype=self.dtype,
                      param_dtype=self.param_dtype, scan_layers=self.scan_layers,
                      remat_policy=self.remat_policy, matmul_dtype=self.matmul_dtype)
        if self.has_vision:
            self.vision_model = VisionTransformer(
                image_size=self.image_size, patch_size=self.patch_size, width=self.vision_width,
                depth=self.vision_depth, num_heads=self.vision_heads, **common)
        self.text_model = TextTransformer(
            vocab_size=self.vocab_size, context_length=self.context_length, width=self.text_width,
            depth=self.text_depth, num_heads=self.text_heads, eot_pooling=self.eot_pooling,
            eot_token_id=self.eot_token_id, **common)
        projection = dict(use_bias=False, dtype=jnp.float32, param_dtype=self.param_dtype,
                          kernel_init=partitioned(nn.initializers.lecun_normal(), ("embed", None)))
        if self.has_vision:
            self.visual_projection = nn.Dense(self.embed_dim, **projection)
        self.text_projection = nn.Dense(self.embed_dim, **projection)
        if self.has_vision:
            self.logit_scale = self.param(
                "logit_scale", partitioned(nn.initializers.constant(math.log(1 / 0.07)), ()), (),
                self.param_dtype)

    @property
    def has_vision(self) -> bool:
        """False for a text encoder alone (`vision_depth=0`, e.g. Karlo's `text_encoder/`): no
        image tower, no visual projection, no logit scale; `encode_image` and `__call__` refuse."""
        return self.vision_depth > 0

    def _check_vision(self):
        if not self.has_vision:
            raise ValueError("this CLIP is a text encoder alone (vision_depth=0): it cannot embed "
                             "images; import a CLIP with its image tower for that")

    def encode_image(self, images: Array, normalize: bool = True) -> Array:
        """images float [B, image_size, image_size, 3] -> z_i float32 [B, embed_dim].

        L2-normalised unless `normalize=False` (then it equals HF `get_image_features`).
        """
        self._check_vision()
        z_i = self.visual_projection(self.vision_model(images))
        return l2_normalize(z_i) if normalize else z_i.astype(jnp.float32)

    def encode_text(self, tokens: Array, return_hidden: bool = False, normalize: bool = True):
        """tokens int [B, context_length] -> z_t float32 [B, embed_dim] (L2-normalised unless
        `normalize=False`); with `return_hidden` also the `ln_final` hidden states
        float32 [B, context_length, text_width]: `(z_t, hidden)`."""
        pooled, hidden = self.text_model(tokens)
        z_t = self.text_projection(pooled)
        z_t = l2_normalize(z_t) if normalize else z_t.astype(jnp.float32)
        return (z_t, hidden) if return_hidden else z_t

    def __call__(self, images: Array, tokens: Array) -> tuple[Array, Array, Array]:
        """Returns (z_i [B, embed_dim], z_t [B, embed_dim], logit_scale []), all float32;
        z_i and z_t L2-normalised, logit_scale = exp(param) clipped at 100."""
        self._check_vision()
        z_i = self.encode_image(images)
        z_t = self.encode_text(tokens)
        logit_scale = jnp.minimum(jnp.exp(jnp.asarray(self.logit_scale, jnp.float32)), 100.0)
        return z_i, z_t, logit_scale


def clip_model_from_config(cfg: Any, vocab_size: int, eot_token_id: int, *,
                           eot_pooling: str | None = None,
                           context_length: int | None = None) -> CLIP:
    """Builds a `CLIP` from a config block whose fields share the module's names.

    Required: embed_dim, image_size, patch_size, vision_width, vision_depth, vision_heads,
    text_width, text_depth, text_heads. Optional (module defaults otherwise): context_length,
    mlp_ratio, activation, eot_pooling (default "eot_id", always right given `eot_token_id`),
    dtype/param_dtype/matmul_dtype (names like "bfloat16"; "" matmul_dtype = dtype; "auto": see
    `unclip_jax.cpu.matmul_dtype`), scan_layers,
    remat_policy. Other fields are ignored.
    The keyword arguments (e.g. the tokenizer's `eot_pooling` and `context_length`) override the
    config.
    """
    required = ("embed_dim", "image_size", "patch_size", "vision_width", "vision_depth",
                "vision_heads", "text_width", "text_depth", "text_heads")
    missing = [name for name in required if name not in cfg]
    if missing:
        raise ValueError(f"CLIP config is missing required fields {missing}")
    kwargs = {name: cfg[name] for name in required}
    for name in ("context_length", "mlp_ratio", "activation", "scan_layers", "remat_policy"):
        if name in cfg and cfg[name] is not None:
            kwargs[name] = cfg[name]
    for name in ("dtype", "param_dtype"):
        if name in cfg and cfg[name] is not None:
            kwargs[name] = as_dtype(cfg[name])
    matmul = cpu.matmul_dtype(cfg["matmul_dtype"]) if "matmul_dtype" in cfg else None
    if matmul:
        kwargs["matmul_dtype"] = as_dtype(matmul)
    if eot_pooling is None:
        eot_pooling = cfg["eot_pooling"] if "eot_pooling" in cfg and cfg["eot_pooling"] else "eot_id"
    kwargs["eot_pooling"] = eot_pooling
    if context_length is not None:
        kwargs["context_length"] = int(context_length)
    return CLIP(vocab_size=int(vocab_size), eot_token_id=int(eot_token_id), **kwargs)
