"""The unCLIP autoregressive prior (Ramesh et al. 2022, §2.2, App. C): caption -> z_i codes.

z_i is modelled as the sequence of its K quantised principal components (`data/pca_codes.py`),
predicted one after the other by a causal transformer over

    [text tokens (L) | z_t | dot token | c_1 ... c_K]                 (L + 2 + K positions)

- Text tokens: the frozen CLIP text tower's final hidden states ([B, L, text_width], cached with
  the data set, as for the diffusion prior) projected to the text encoder's width and, with
  `text_encoder_depth > 0`, run through a bidirectional transformer (the paper's separate text
  encoder, 2048 x 24 there), then projected to the decoder's width. Tokens after the caption's
  EOT are hidden from every query by a key padding mask.
- z_t: the CLIP text embedding, projected. The dot token is the quantised z_i . z_t
  (`pca_codes.encode_dot`); c_j is the bucket of the j-th principal component. Both are embedded
  by tables of `num_buckets` rows (one for the dot token, one shared by every code; the learned
  positions tell the components apart).
- Each position predicts the next token: z_t's output the dot token, the dot token's c_1, c_j's
  c_{j+1}, through one head of `num_buckets` logits (float32). c_K's output is unused.
- Classifier-free guidance: where `drop_text` is True the caption becomes ONE learned null token
  (`layers.drop_to_null_token`) and z_t a learned null z_t, as in the diffusion prior; the dot
  token and the codes are never dropped.
- Learned positions, pre-LN blocks (`layers.Transformer`), a final LayerNorm before the head.

Decoding with a KV cache (`encode_prefix`, `decode_step`): the caption and z_t are encoded once;
each step then runs ONE new token against a static-size cache of every earlier position (a key
mask marks the filled slots), so the compiled sampling loop has fixed shapes.

Param tree: text_proj, text_encoder/(layers | layers_i), text_ln (with an encoder), text_to_decoder,
z_t_proj, null_text_token, null_z_t, dot_embed, code_embed, position_embedding,
transformer/(layers | layers_i), ln_final, head.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn

from unclip_jax.models.layers import (Dtype, Embed, LayerNorm, Transformer, config_kwargs,
                                      drop_to_null_token, get_activation, get_remat_policy,
                                      partitioned)

Array = jax.Array

NUM_CONDITION_TOKENS = 2  # z_t and the dot token


class ARPrior(nn.Module):
    """Causal-transformer AR prior: (caption, z_t, dot token, codes) -> next-token logits.

    `embed_dim` D (CLIP), `text_width` / `text_length` the cached text hidden states',
    `num_components` K and `num_buckets` B the codebook's. `width` / `depth` / `num_heads` are the
    (latent) decoder's; `text_encoder_*` the optional text encoder's (depth 0: none, the hidden
    states are projected straight to `width`). Other fields as `models.prior.DiffusionPrior`.
    """
    embed_dim: int
    text_width: int
    text_length: int
    num_components: int
    num_buckets: int
    width: int
    depth: int
    num_heads: int
    text_encoder_width: int = 0  # 0: width
    text_encoder_depth: int = 0
    text_encoder_heads: int = 0  # 0: num_heads
    mlp_ratio: float = 4.0
    activation: str = "gelu"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = True
    remat_policy: str = "nothing_saveable"
    attention_implementation: str | None = None
    head_dim: int | None = None
    matmul_dtype: Dtype | None = None

    @property
    def sequence_length(self) -> int:
        """L text tokens + z_t + the dot token + K codes."""
        return self.text_length + NUM_CONDITION_TOKENS + self.num_components

    @property
    def prefix_length(self) -> int:
        """Positions encoded once per caption: the text tokens and z_t."""
        return self.text_length + 1

    def _check_config(self):
        for name in ("num_components", "width", "depth", "num_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ARPrior.{name} must be positive, got {getattr(self, name)}")
        if self.num_buckets < 2:
            raise ValueError(f"ARPrior.num_buckets must be at least 2, got {self.num_buckets}")
        if self.head_dim is None and self.width % self.num_heads:
            raise ValueError(f"ARPrior.width {self.width} is not divisible by num_heads {self.num_heads}")
        get_activation(self.activation)
        get_remat_policy(self.remat_policy)

    def _dense(self, features, names, bias_names, name, dtype=None):
        return nn.Dense(features, dtype=self.dtype if dtype is None else dtype,
                        param_dtype=self.param_dtype,
                        kernel_init=partitioned(nn.initializers.lecun_normal(), names),
                        bias_init=partitioned(nn.initializers.zeros, bias_names), name=name)

    def _stack(self, depth, num_heads, causal, name, head_dim=None):
        return Transformer(depth=depth, num_heads=num_heads, mlp_ratio=self.mlp_ratio,
                           activation=self.activation, causal=causal, dtype=self.dtype,
                           param_dtype=self.param_dtype, scan_layers=self.scan_layers,
                           remat_policy=self.remat_policy,
                           attention_implementation=self.attention_implementation,
                           head_dim=head_dim, matmul_dtype=self.matmul_dtype, name=name)

    def setup(self):
        self._check_config()
        enc_width = self.text_encoder_width or self.width
        self.text_proj = self._dense(enc_width, (None, "embed"), ("embed",), "text_proj")
        if self.text_encoder_depth:
            self.text_encoder = self._stack(self.text_encoder_depth,
                                            self.text_encoder_heads or self.num_heads, False,
                                            "text_encoder")
            self.text_ln = LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="text_ln")
        self.text_to_decoder = self._dense(self.width, ("mlp", "embed"), ("embed",), "text_to_decoder")
        self.z_t_proj = self._dense(self.width, (None, "embed"), ("embed",), "z_t_proj")
        token = partitioned(nn.initializers.normal(0.02), ("embed",))
        self.null_text_token = self.param("null_text_token", token, (enc_width,), self.param_dtype)
        self.null_z_t = self.param("null_z_t", token, (self.width,), self.param_dtype)
        self.dot_embed = Embed(self.num_buckets, self.width, dtype=self.dtype,
                               param_dtype=self.param_dtype, name="dot_embed")
        self.code_embed = Embed(self.num_buckets, self.width, dtype=self.dtype,
                                param_dtype=self.param_dtype, name="code_embed")
        self.position_embedding = self.param(
            "position_embedding", partitioned(nn.initializers.normal(0.01), (None, "embed")),
            (self.sequence_length, self.width), self.param_dtype)
        self.transformer = self._stack(self.depth, self.num_heads, True, "transformer", self.head_dim)
        self.ln_final = LayerNorm(dtype=jnp.float32, param_dtype=self.param_dtype, name="ln_final")
        self.head = self._dense(self.num_buckets, ("embed", "vocab"), ("vocab",), "head", jnp.float32)

    def _check_inputs(self, z_t, text_hidden, text_mask, drop_text, tokens=None):
        d, length, batch = self.embed_dim, self.text_length, z_t.shape[0]
        if z_t.shape != (batch, d):
            raise ValueError(f"z_t has shape {tuple(z_t.shape)}; expected [batch, embed_dim={d}]")
        if text_hidden.shape != (batch, length, self.text_width):
            raise ValueError(f"text_hidden has shape {tuple(text_hidden.shape)}; expected "
                             f"{(batch, length, self.text_width)} [batch, text_length, text_width]")
        if text_mask is not None and text_mask.shape != (batch, length):
            raise ValueError(f"text_mask has shape {tuple(text_mask.shape)}; expected {(batch, length)}")
        if drop_text is not None and drop_text.shape != (batch,):
            raise ValueError(f"drop_text has shape {tuple(drop_text.shape)}; expected ({batch},)")
        if tokens is not None and tokens.shape != (batch, 1 + self.num_components):
            raise ValueError(f"tokens has shape {tuple(tokens.shape)}; expected [batch, 1 + "
                             f"num_components] = {(batch, 1 + self.num_components)} (dot token, codes)")

    def _positions(self, start, stop):
        return jnp.asarray(self.position_embedding[start:stop], self.dtype)[None]

    def _prefix(self, z_t, text_hidden, text_mask, drop_text):
        """[text..., z_t] tokens [B, L + 1, width] (with positions) and their key mask."""
        batch, length = z_t.shape[0], self.text_length
        mask = jnp.ones((batch, length), bool) if text_mask is None else text_mask.astype(bool)
        text = self.text_proj(text_hidden.astype(self.dtype))
        z_t_token = self.z_t_proj(z_t.astype(self.dtype))
        if drop_text is not None:
            drop = drop_text.astype(bool)
            text, mask = drop_to_null_token(text, mask, drop, self.null_text_token)
            z_t_token = jnp.where(drop[:, None], jnp.asarray(self.null_z_t, self.dtype)[None], z_t_token)
        if self.text_encoder_depth:
            text = self.text_ln(self.text_encoder(text, mask))
        text = self.text_to_decoder(text)
        x = jnp.concatenate([text, z_t_token[:, None]], axis=1) + self._positions(0, length + 1)
        x = nn.with_logical_constraint(x.astype(self.dtype), ("act_batch", "act_length", "act_embed"))
        return x, jnp.concatenate([mask, jnp.ones((batch, 1), bool)], axis=1)

    def _embed_tokens(self, tokens, start: int):
        """Token ids [B, n] at sequence indices start.. of [dot, c_1, ...] (0: the dot token)."""
        codes = self.code_embed(tokens)
        if start == 0:  # The dot token has its own table.
            codes = codes.at[:, 0].set(self.dot_embed(tokens[:, 0]))
        return codes

    def _logits(self, x):
        return nn.with_logical_constraint(self.head(self.ln_final(x)), ("act_batch", "act_length", "act_vocab"))

    def __call__(self, z_t: Array, text_hidden: Array, text_mask: Array | None, tokens: Array,
                 drop_text: Array | None = None) -> Array:
        """Teacher-forced next-token logits.

        z_t [B, D]; text_hidden [B, L, text_width]; text_mask bool [B, L] (None: all real);
        tokens int [B, 1 + K]: the dot token then the K codes; drop_text bool [B] (None: never).
        Returns float32 logits [B, 1 + K, num_buckets]: row 0 predicts the dot token, row j the
        code c_j (from the positions before it).
        """
        self._check_inputs(z_t, text_hidden, text_mask, drop_text, tokens)
        prefix, mask = self._prefix(z_t, text_hidden, text_mask, drop_text)
        inputs = tokens[:, :-1]  # c_K is never an input.
        x = self._embed_tokens(inputs, 0) + self._positions(self.prefix_length, self.sequence_length - 1)
        x = jnp.concatenate([prefix, x.astype(self.dtype)], axis=1)
        mask = jnp.concatenate([mask, jnp.ones(inputs.shape, bool)], axis=1)
        h = self.transformer(x, mask)
        return self._logits(h[:, self.text_length:])  # From z_t's position on.

    def encode_prefix(self, z_t: Array, text_hidden: Array, text_mask: Array | None = None,
                      drop_text: Array | None = None) -> dict[str, Any]:
        """The caption part of the sequence, computed once: a static-size KV cache.

        Returns {"kv": (keys, values), each [depth, B, L + 1 + K, heads, head_dim] with the prefix
        in the first L + 1 slots (the rest zeros, filled by `decode_step`); "mask": bool
        [B, L + 1 + K], True for filled real slots; "logits": float32 [B, num_buckets], the dot
        token's distribution}.
        """
        self._check_inputs(z_t, text_hidden, text_mask, drop_text)
        prefix, mask = self._prefix(z_t, text_hidden, text_mask, drop_text)
        h, kv = self.transformer(prefix, mask, return_kv=True)
        free = self.num_components  # Slots for the dot token and c_1 .. c_{K-1}.
        pad = lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, free), (0, 0), (0, 0)))  # noqa: E731
        mask = jnp.concatenate([mask, jnp.zeros((mask.shape[0], free), bool)], axis=1)
        return {"kv": jax.tree.map(pad, kv), "mask": mask, "logits": self._logits(h[:, -1:])[:, 0]}

    def decode_step(self, cache: Mapping[str, Any], token: Array, index: Array) -> tuple[Array, dict]:
        """Runs token [B] at sequence index `index` of [dot, c_1, ...] (0: the dot token) against
        the cache; returns (logits float32 [B, num_buckets] of the next token, the cache with this
        token's keys and values written to slot L + 1 + index)."""
        slot = self.prefix_length + index
        emb = jnp.where(index == 0, self.dot_embed(token), self.code_embed(token))
        pos = jax.lax.dynamic_slice_in_dim(jnp.asarray(self.position_embedding, self.dtype), slot, 1)
        x = (emb[:, None] + pos[None]).astype(self.dtype)
        mask = jnp.concatenate([cache["mask"], jnp.ones((x.shape[0], 1), bool)], axis=1)
        h, (k, v) = self.transformer(x, mask, cache["kv"], return_kv=True)
        keys, values = cache["kv"]
        keys = jax.lax.dynamic_update_slice_in_dim(keys, k.astype(keys.dtype), slot, axis=2)
        values = jax.lax.dynamic_update_slice_in_dim(values, v.astype(values.dtype), slot, axis=2)
        filled = cache["mask"] | (jnp.arange(cache["mask"].shape[1]) == slot)[None]
        return self._logits(h)[:, 0], {"kv": (keys, values), "mask": filled}


_REQUIRED = ("width", "depth", "num_heads")
_OPTIONAL = ("text_encoder_width", "text_encoder_depth", "text_encoder_heads", "head_dim",
             "mlp_ratio", "activation", "scan_layers", "remat_policy", "attention_implementation")


def ar_prior_from_config(cfg: Any, *, embed_dim: int, text_width: int, text_length: int,
                         num_components: int, num_buckets: int) -> ARPrior:
    """Builds an `ARPrior` from a config block whose fields share the module's names (as
    `models.prior.prior_from_config`: dtype / param_dtype / matmul_dtype names, 0 = default)."""
    kwargs = config_kwargs(cfg, _REQUIRED, _OPTIONAL, what="AR prior")
    return ARPrior(embed_dim=int(embed_dim), text_width=int(text_width), text_length=int(text_length),
                   num_components=int(num_components), num_buckets=int(num_buckets), **kwargs)
