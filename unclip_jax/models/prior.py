"""The unCLIP diffusion prior (Ramesh et al. 2022, §2.2, App. C): caption -> CLIP image embedding.

A decoder-only causal transformer over the sequence

    [text tokens (L) | z_t | timestep | noised z_i | learned query]        (L + 4 positions)

whose output at the final (query) position, projected to the CLIP embedding size, predicts the
*clean* image embedding z_i (x0), not the noise.

- Text tokens are the frozen CLIP text tower's final hidden states ([B, L, text_width], cached with
  the data set) projected to `width`; tokens after the caption's EOT are hidden from every query by
  a key padding mask (`text_mask`, True = real token), on top of the causal mask.
- The timestep token is the sinusoidal embedding of the original (unrespaced) diffusion step t
  followed by a two-layer SiLU MLP, as in ADM. With `num_timesteps != 1000` the step is rescaled by
  `1000 / num_timesteps` first, so the embedding frequencies stay those of a 1000-step model.
- Classifier-free guidance: where `drop_text` is True the caption is replaced by ONE learned null
  token at the first text position (the other L - 1 text positions are masked out as keys) and z_t
  by a learned null z_t token. Both are learned in the model's width (after the input projections).
  The unconditional model is thus a real model that sees [null token, null z_t, t, z_i, query]; the
  noised z_i, the timestep and the query are never dropped. Masking the dropped text keeps every
  query row with at least one visible key (position 0), so no softmax row is empty.
- Learned position embeddings for the L + 4 positions; a final LayerNorm before the output
  projection (the blocks are pre-LN). The output is float32.

Param tree: text_proj, z_t_proj, z_i_proj, time_embed_fc1, time_embed_fc2, null_text_token,
null_z_t, query, position_embedding, transformer/(layers | layers_i), ln_final, out_proj
(+ clip_mean, clip_std with `embedding_stats`; without null_text_token, null_z_t when
`null_conditioning=False`).

Options for imported priors (defaults: this project's prior as above). Kakao Brain's Karlo, the
public unCLIP (diffusers' `PriorTransformer`, see `unclip_jax/convert/karlo_prior.py`), is the same
architecture - the same token order [text | z_t | t | z_i | query] with learned positions, the same
sinusoid (cos half first, frequencies 10000^(-k / (width / 2))) and linear-SiLU-linear timestep
MLP, pre-LN blocks with exact-erf GELU MLPs (ratio 4) and LayerNorm eps 1e-5, a final LayerNorm and
the projection of the last (query) token - with three differences, each an option here:
- `null_conditioning=False`: no learned null tokens. Karlo's classifier-free guidance feeds the
  empty caption ("") through the CLIP text tower as the unconditional input (tokens, mask, z_t and
  hidden states, all real), so `drop_text` is refused: pass the empty caption's encoding instead.
- `embedding_stats=True`: params `clip_mean`, `clip_std` [embed_dim]. The model works on
  standardised image embeddings: its input z_i_t and its prediction are (z_i - clip_mean) / clip_std.
  They are not used by `__call__`; `denormalize_embedding` maps a sampled x0 back to a CLIP image
  embedding (x0 * clip_std + clip_mean, diffusers' `post_process_latents`, which the unCLIP
  pipeline applies once after the last sampling step) and `normalize_embedding` is the inverse (a
  training target). Both stop gradients into the statistics, so training leaves them fixed (1-D
  params are not weight-decayed either). Without the option both methods are the identity.
- `time_embed_dim`: the hidden width of the timestep MLP (None: width; Karlo's is width too).
The padding mask is the same rule as the CLIP tokenizer's attention mask (real tokens up to and
including the first end-of-text); diffusers adds -10000 to masked logits where this module masks
them out, which is the same in float32 (exp(-10000) underflows to 0 and every query row keeps at
least one visible key).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn

from unclip_jax.models.layers import (Dtype, LayerNorm, Transformer, config_kwargs, drop_to_null_token,
                                      get_activation, get_remat_policy, partitioned,
                                      timestep_embedding)

Array = jax.Array

NUM_EXTRA_TOKENS = 4  # z_t, timestep, noised z_i, query


class DiffusionPrior(nn.Module):
    """Causal-transformer diffusion prior: (z_i_t, t, z_t, caption tokens) -> predicted clean z_i.

    `embed_dim` is the CLIP embedding size D, `text_width` the width of the cached text hidden
    states and `text_length` their length L. `dtype` is the activation dtype, `param_dtype` the
    storage dtype. `scan_layers` / `remat_policy` / `attention_implementation` are passed to
    `layers.Transformer`. The defaults (scan on, remat "nothing_saveable") were the fastest
    forward+backward on a 2-core CPU (`benchmarks/prior_model_only.py`: width 256, depth 6,
    batch 32 gave 1.3 steps/s against 1.2 without remat and 0.8 unrolled) and keep activation
    memory at one block's worth on accelerators; use remat_policy="none" (or "dots_saveable")
    there when memory allows, to skip recomputing the forward pass in the backward pass.
    """
    embed_dim: int
    text_width: int
    text_length: int
    width: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    activation: str = "gelu"
    dropout: float = 0.0  # not implemented (the paper's prior uses none); only 0.0 is accepted
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = True
    remat_policy: str = "nothing_saveable"
    attention_implementation: str | None = None
    num_timesteps: int = 1000
    head_dim: int | None = None  # Per-head width (None: width // num_heads).
    # Operand dtype of the transformer's projections, forward and backward, with float32
    # accumulation (`layers.matmul`); None = `dtype`. "bfloat16" with float32 activations is
    # mixed precision for CPUs with bfloat16 matrix instructions (unclip_jax/cpu.py).
    matmul_dtype: Dtype | None = None
    # Learned null text token and null z_t for classifier-free guidance (`drop_text`). False: no
    # such params and `drop_text` is refused (the unconditional input is the empty caption's
    # encoding, as in Karlo).
    null_conditioning: bool = True
    # Params clip_mean / clip_std [embed_dim] of the standardised embedding space the model works
    # in (see `denormalize_embedding`); False: none, and those methods are the identity.
    embedding_stats: bool = False
    # Hidden width of the timestep MLP (time_embed_fc1's output); None = width.
    time_embed_dim: int | None = None

    @property
    def sequence_length(self) -> int:
        """Number of positions the transformer sees: L text tokens + z_t, t, z_i, query."""
        return self.text_length + NUM_EXTRA_TOKENS

    def _check_config(self):
        if self.dropout:
            raise ValueError(f"DiffusionPrior.dropout={self.dropout}: dropout is not implemented; "
                             "use 0.0")
        if self.width % self.num_heads:
            raise ValueError(f"DiffusionPrior.width {self.width} is not divisible by num_heads "
                             f"{self.num_heads}")
        if self.num_timesteps <= 0:
            raise ValueError(f"DiffusionPrior.num_timesteps must be positive, got "
                             f"{self.num_timesteps}")
        if self.time_embed_dim is not None and self.time_embed_dim <= 0:
            raise ValueError(f"DiffusionPrior.time_embed_dim must be positive (or None = width), got "
                             f"{self.time_embed_dim}")
        get_activation(self.activation)
        get_remat_policy(self.remat_policy)

    def _check_inputs(self, z_i_t, t, z_t, text_hidden, text_mask, drop_text):
        d, length = self.embed_dim, self.text_length
        if z_i_t.ndim != 2 or z_i_t.shape[1] != d:
            raise ValueError(f"z_i_t has shape {tuple(z_i_t.shape)}; expected [batch, {d}] "
                             f"(embed_dim={d})")
        batch = z_i_t.shape[0]
        if z_t.shape != (batch, d):
            raise ValueError(f"z_t has shape {tuple(z_t.shape)}; expected [batch, embed_dim] = "
                             f"{(batch, d)}")
        if t.shape != (batch,):
            raise ValueError(f"t has shape {tuple(t.shape)}; expected [batch] = ({batch},)")
        expected = (batch, length, self.text_width)
        if text_hidden.shape != expected:
            raise ValueError(f"text_hidden has shape {tuple(text_hidden.shape)}; expected "
                             f"[batch, text_length, text_width] = {expected}")
        if text_mask is not None and text_mask.shape != (batch, length):
            raise ValueError(f"text_mask has shape {tuple(text_mask.shape)}; expected "
                             f"[batch, text_length] = {(batch, length)}")
        if drop_text is not None and not self.null_conditioning:
            raise ValueError("drop_text was given but this prior has null_conditioning=False (no "
                             "learned null tokens): pass the empty caption's encoding (its tokens' "
                             "hidden states, mask and z_t) as the unconditional input instead")
        if drop_text is not None and drop_text.shape != (batch,):
            raise ValueError(f"drop_text has shape {tuple(drop_text.shape)}; expected [batch] = "
                             f"({batch},)")

    def _dense(self, features: int, names: tuple, bias_names: tuple, name: str,
               dtype: Dtype | None = None) -> nn.Dense:
        return nn.Dense(
            features, dtype=self.dtype if dtype is None else dtype, param_dtype=self.param_dtype,
            kernel_init=partitioned(nn.initializers.lecun_normal(), names),
            bias_init=partitioned(nn.initializers.zeros, bias_names), name=name)

    def _learned_token(self, name: str) -> Array:
        return self.param(name, partitioned(nn.initializers.normal(0.02), ("embed",)),
                          (self.width,), self.param_dtype)

    def setup(self):
        self._check_config()
        embed_in = ((None, "embed"), ("embed",))
        self.text_proj = self._dense(self.width, *embed_in, "text_proj")
        self.z_t_proj = self._dense(self.width, *embed_in, "z_t_proj")
        self.z_i_proj = self._dense(self.width, *embed_in, "z_i_proj")
        time_hidden = self.time_embed_dim or self.width
        self.time_embed_fc1 = self._dense(time_hidden, ("embed", "mlp"), ("mlp",), "time_embed_fc1")
        self.time_embed_fc2 = self._dense(self.width, ("mlp", "embed"), ("embed",), "time_embed_fc2")
        if self.null_conditioning:
            self.null_text_token = self._learned_token("null_text_token")
            self.null_z_t = self._learned_token("null_z_t")
        self.query = self._learned_token("query")
        if self.embedding_stats:  # Per-feature vectors, replicated like LayerNorm scales.
            self.clip_mean = self.param("clip_mean", partitioned(nn.initializers.zeros, ("norm",)),
                                        (self.embed_dim,), self.param_dtype)
            self.clip_std = self.param("clip_std", partitioned(nn.initializers.ones, ("norm",)),
                                       (self.embed_dim,), self.param_dtype)
        self.position_embedding = self.param(
            "position_embedding", partitioned(nn.initializers.normal(0.01), (None, "embed")),
            (self.sequence_length, self.width), self.param_dtype)
        kwargs = dict(depth=self.depth, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                      activation=self.activation, causal=True, dtype=self.dtype,
                      param_dtype=self.param_dtype, scan_layers=self.scan_layers,
                      remat_policy=self.remat_policy,
                      attention_implementation=self.attention_implementation, head_dim=self.head_dim,
                      matmul_dtype=self.matmul_dtype)
        self.transformer = Transformer(name="transformer", **kwargs)
        self.ln_final = LayerNorm(dtype=jnp.float32, param_dtype=self.param_dtype, name="ln_final")
        self.out_proj = self._dense(self.embed_dim, ("embed", None), (None,), "out_proj",
                                    dtype=jnp.float32)

    def _stats(self) -> tuple[Array, Array] | None:
        if not self.embedding_stats:
            return None
        return (jax.lax.stop_gradient(jnp.asarray(self.clip_mean, jnp.float32)),
                jax.lax.stop_gradient(jnp.asarray(self.clip_std, jnp.float32)))

    def denormalize_embedding(self, x: Array) -> Array:
        """A sampled x0 [..., D] of the model's embedding space -> a CLIP image embedding, float32.

        With `embedding_stats`: x * clip_std + clip_mean (diffusers' `post_process_latents`, applied
        once to the final sample, before any best-of-k selection or use by the decoder); otherwise
        the identity. No gradient reaches the statistics.
        """
        x = jnp.asarray(x, jnp.float32)
        stats = self._stats()
        return x if stats is None else x * stats[1] + stats[0]

    def normalize_embedding(self, z: Array) -> Array:
        """The inverse of `denormalize_embedding`: (z - clip_mean) / clip_std, float32 (identity
        without `embedding_stats`). No gradient reaches the statistics."""
        z = jnp.asarray(z, jnp.float32)
        stats = self._stats()
        return z if stats is None else (z - stats[0]) / stats[1]

    def _positions(self, start: int, stop: int) -> Array:
        return jnp.asarray(self.position_embedding[start:stop], self.dtype)[None]

    def _prefix(self, z_t, text_hidden, text_mask, drop_text):
        """Tokens [B, L + 1, width] of [text..., z_t] (with positions) and their key mask [B, L + 1]."""
        batch, length = z_t.shape[0], self.text_length
        text_mask = jnp.ones((batch, length), bool) if text_mask is None else text_mask.astype(bool)
        text = self.text_proj(text_hidden.astype(self.dtype))
        z_t_token = self.z_t_proj(z_t.astype(self.dtype))
        if drop_text is not None:
            drop = drop_text.astype(bool)
            text, text_mask = drop_to_null_token(text, text_mask, drop, self.null_text_token)
            z_t_token = jnp.where(drop[:, None], jnp.asarray(self.null_z_t, self.dtype)[None], z_t_token)
        x = jnp.concatenate([text, z_t_token[:, None]], axis=1) + self._positions(0, length + 1)
        x = nn.with_logical_constraint(x.astype(self.dtype), ("act_batch", "act_length", "act_embed"))
        return x, jnp.concatenate([text_mask, jnp.ones((batch, 1), bool)], axis=1)

    def _suffix(self, z_i_t, t):
        """Tokens [B, 3, width] of [timestep, noised z_i, query] (with positions)."""
        steps = t.astype(jnp.float32) * (1000.0 / self.num_timesteps)
        h = self.time_embed_fc1(timestep_embedding(steps, self.width).astype(self.dtype))
        t_token = self.time_embed_fc2(nn.silu(h))
        z_i_token = self.z_i_proj(z_i_t.astype(self.dtype))
        query = jnp.broadcast_to(jnp.asarray(self.query, self.dtype)[None], z_i_token.shape)
        x = jnp.stack([t_token, z_i_token, query], axis=1).astype(self.dtype)
        length = self.text_length + 1
        x = x + self._positions(length, length + 3)
        return nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))

    def _output(self, x: Array, return_sequence: bool = False) -> Array:
        x = self.ln_final(x)
        if return_sequence:
            return x
        return nn.with_logical_constraint(self.out_proj(x[:, -1]), ("act_batch", None))

    def __call__(self, z_i_t: Array, t: Array, z_t: Array, text_hidden: Array,
                 text_mask: Array | None = None, drop_text: Array | None = None,
                 return_sequence: bool = False) -> Array:
        """Predicts the clean CLIP image embedding.

        z_i_t: noised image embedding [B, D]; t: diffusion step [B] (int, in the ORIGINAL
        0..num_timesteps-1 range, also when sampling with strided steps; floats are accepted);
        z_t: CLIP text embedding [B, D]; text_hidden: CLIP text hidden states [B, L, text_width];
        text_mask: bool [B, L], True for real tokens (None: all real); drop_text: bool [B], True
        where the caption and z_t are replaced by the learned null embeddings (None: never).
        Returns z_i_0_pred float32 [B, D], or with `return_sequence=True` the final hidden states
        (after the last LayerNorm) float32 [B, L + 4, width].
        """
        self._check_inputs(z_i_t, t, z_t, text_hidden, text_mask, drop_text)
        prefix, prefix_mask = self._prefix(z_t, text_hidden, text_mask, drop_text)
        x = jnp.concatenate([prefix, self._suffix(z_i_t, t)], axis=1)
        mask = jnp.concatenate([prefix_mask, jnp.ones((x.shape[0], 3), bool)], axis=1)
        return self._output(self.transformer(x, mask), return_sequence)

    def encode_prefix(self, z_t: Array, text_hidden: Array, text_mask: Array | None = None,
                      drop_text: Array | None = None) -> dict[str, Any]:
        """The caption part of the sequence, computed once per sample (a KV cache).

        Causal attention makes the [text..., z_t] positions independent of the timestep and the
        noised z_i that follow, so sampling encodes them once and runs only the last three
        positions at each diffusion step (`denoise`). Returns {"kv": per-layer (keys, values),
        each [depth, B, L + 1, heads, head_dim]; "mask": bool [B, L + 1]}.
        """
        self._check_inputs(z_t, jnp.zeros((z_t.shape[0],), jnp.int32), z_t, text_hidden, text_mask,
                           drop_text)
        prefix, mask = self._prefix(z_t, text_hidden, text_mask, drop_text)
        _, kv = self.transformer(prefix, mask, return_kv=True)
        return {"kv": kv, "mask": mask}

    def denoise(self, prefix: Mapping[str, Any], z_i_t: Array, t: Array) -> Array:
        """`__call__` given the `encode_prefix` of the same caption: z_i_0_pred float32 [B, D]."""
        mask = jnp.concatenate([prefix["mask"], jnp.ones((z_i_t.shape[0], 3), bool)], axis=1)
        return self._output(self.transformer(self._suffix(z_i_t, t), mask, prefix["kv"]))


_REQUIRED = ("width", "depth", "num_heads")
_OPTIONAL = ("head_dim", "mlp_ratio", "activation", "dropout", "scan_layers", "remat_policy",
             "attention_implementation", "num_timesteps", "null_conditioning", "embedding_stats",
             "time_embed_dim")


def prior_from_config(cfg: Any, *, embed_dim: int, text_width: int,
                      text_length: int) -> DiffusionPrior:
    """Builds a `DiffusionPrior` from a config block whose fields share the module's names.

    Required: width, depth, num_heads. Optional (module defaults otherwise): head_dim (0 = width //
    num_heads), mlp_ratio, activation, dropout, dtype / param_dtype / matmul_dtype (names like
    "bfloat16" or dtypes; "" = the default), scan_layers, remat_policy, attention_implementation,
    num_timesteps, null_conditioning, embedding_stats, time_embed_dim (0 = width). Other fields are
    ignored. The CLIP-dependent sizes
    come from the keyword arguments (they describe the cached embeddings, not the prior).
    """
    kwargs = config_kwargs(cfg, _REQUIRED, _OPTIONAL, what="prior")
    if not kwargs.get("time_embed_dim"):  # 0 in a config means "width".
        kwargs["time_embed_dim"] = None
    for name in ("null_conditioning", "embedding_stats"):
        if name in kwargs:
            kwargs[name] = bool(kwargs[name])
    return DiffusionPrior(embed_dim=int(embed_dim), text_width=int(text_width),
                          text_length=int(text_length), **kwargs)
