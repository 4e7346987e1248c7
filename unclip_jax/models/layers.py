"""Reusable transformer building blocks (pure linen): attention, MLP, pre-LN block, layer stack.

Conventions shared by every module here:
- `dtype` is the activation/compute dtype (e.g. bfloat16); `param_dtype` the storage dtype (float32).
- LayerNorm is always computed in float32 and its output cast back to `dtype`.
- Every parameter is created through `nn.with_logical_partitioning` with the logical names of
  `unclip_jax.parallel` (`embed`, `mlp`, `heads`, `kv`, `vocab`, `norm`; a stacked layer axis is
  `layers`), and activations are constrained with the `act_*` names, so the same module runs
  replicated, FSDP- or tensor-sharded depending only on the rules in the config.
- Submodule names follow Hugging Face CLIP (`self_attn.q_proj`, `layer_norm1`, `mlp.fc1`, ...) so that
  published checkpoints map onto them by name.
"""
from __future__ import annotations

import functools
import math
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Dtype = Any
Array = jax.Array

LAYER_AXIS = "layers"  # logical name of the leading axis of scanned (stacked) layer params

_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}

# `remat_policy` values: "none" disables rematerialisation, "full" recomputes everything in the
# backward pass; any other name is a plain policy of `jax.checkpoint_policies`.
_REMAT_POLICIES = ("none", "full", "dots_saveable", "nothing_saveable", "everything_saveable",
                   "dots_with_no_batch_dims_saveable", "checkpoint_dots",
                   "checkpoint_dots_with_no_batch_dims")


def get_activation(name: str) -> Callable[[Array], Array]:
    """Returns the elementwise activation called `name` ("quick_gelu", "gelu", "gelu_tanh")."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def get_remat_policy(name: str) -> Callable[..., bool] | None:
    """Maps a `remat_policy` name to a `jax.checkpoint_policies` policy (None means "full")."""
    if name not in _REMAT_POLICIES:
        raise ValueError(f"unknown remat_policy {name!r}; expected one of {list(_REMAT_POLICIES)}")
    if name in ("none", "full"):
        return None
    return getattr(jax.checkpoint_policies, name)


def _low_precision_dot(x: Array, w: Array, compute_dtype: Any) -> Array:
    """[M, K] @ [K, N] with both operands in `compute_dtype`, accumulated and returned in float32."""
    return jax.lax.dot(x.astype(compute_dtype), w.astype(compute_dtype),
                       preferred_element_type=jnp.float32)


def _row_major(a: Array) -> Array:
    """`a`, materialised in its row-major layout (on CPU; elsewhere `a` itself).

    XLA:CPU folds a transpose that feeds a dot into the dot's operand (or output) layout; its fast
    bfloat16 dot kernels only take row-major operands, so such a dot is run in float32 instead (or,
    for a folded output transpose, fails outright in this XLA version). Flattening behind an
    `optimization_barrier` leaves the layout no freedom. Not done on accelerators, where folded
    transposes are free and a flattened sharded array would have to be resharded.
    """
    if jax.default_backend() != "cpu":
        return a
    return jax.lax.optimization_barrier(a.reshape(-1)).reshape(a.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul_2d(x: Array, w: Array, compute_dtype: Any) -> Array:
    return _low_precision_dot(x, w, compute_dtype)


def _matmul_2d_fwd(x, w, compute_dtype):
    x_c, w_c = x.astype(compute_dtype), w.astype(compute_dtype)
    # The cotangents must come back in the primals' dtypes: keep those as empty arrays.
    dtypes = (jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))
    return _low_precision_dot(x_c, w_c, compute_dtype), (x_c, w_c, dtypes)


def _matmul_2d_bwd(compute_dtype, residuals, g):
    x_c, w_c, (x_like, w_like) = residuals
    g_c = g.astype(compute_dtype)
    dx = _low_precision_dot(g_c, _row_major(w_c.T), compute_dtype)  # [M, N] @ [N, K]
    if x_c.shape[1] <= g_c.shape[1]:  # Transpose the narrower of x [M, K] and g [M, N].
        dw = _low_precision_dot(_row_major(x_c.T), g_c, compute_dtype)
    else:  # dw^T = g^T x, transposed back after the product.
        dw = _row_major(_low_precision_dot(_row_major(g_c.T), x_c, compute_dtype)).T
    return dx.astype(x_like.dtype), dw.astype(w_like.dtype)


_matmul_2d.defvjp(_matmul_2d_fwd, _matmul_2d_bwd)


def matmul(x: Array, w: Array, matmul_dtype: Dtype | None = None) -> Array:
    """x [..., K] @ w [K, N] -> [..., N] in the promoted dtype of x and w.

    With `matmul_dtype` (e.g. bfloat16) the operands of the forward product AND of both backward
    products (dx = g w^T, dw = x^T g) are cast to it, with float32 accumulation: mixed-precision
    matmuls while activations, LayerNorms, softmaxes and the weights stay in their own dtypes.
    (Plain autodiff of a cast-then-dot would run the backward products with a float32 cotangent,
    i.e. in float32.) CPUs with bfloat16 matrix instructions run such dots faster (unclip_jax/cpu.py).
    """
    out_dtype = jnp.promote_types(x.dtype, w.dtype)
    if matmul_dtype is None or jnp.dtype(matmul_dtype) == jnp.dtype(out_dtype):
        return jnp.matmul(x, w)
    lead = x.shape[:-1]
    y = _matmul_2d(x.reshape(-1, x.shape[-1]), w, jnp.dtype(matmul_dtype))
    return y.reshape(*lead, w.shape[-1]).astype(out_dtype)


def dense_dot_general(matmul_dtype: Dtype | None):
    """A `dot_general` for `nn.Dense` that multiplies through `matmul` (None: jax.lax.dot_general)."""
    if matmul_dtype is None:
        return jax.lax.dot_general

    def dot_general(x, kernel, dimension_numbers, precision=None, **_):
        (contract_x, contract_k), (batch_x, batch_k) = dimension_numbers
        if batch_x or batch_k or tuple(contract_x) != (x.ndim - 1,) or tuple(contract_k) != (0,):
            raise ValueError(f"matmul_dtype supports [..., K] x [K, N] products, got "
                             f"{dimension_numbers}")
        return matmul(x, kernel, matmul_dtype)

    return dot_general


def partitioned(init: Callable[..., Array], names: tuple[str | None, ...]):
    """`init` whose parameter carries the logical axis names `names` (one per axis)."""
    return nn.with_logical_partitioning(init, names)


def as_dtype(value: Any) -> Any:
    """A config's dtype field as a dtype: names such as "bfloat16" are converted, dtypes kept."""
    return jnp.dtype(value) if isinstance(value, str) else value


def config_kwargs(cfg: Any, required: tuple[str, ...], optional: tuple[str, ...], *, what: str) -> dict:
    """A model's keyword arguments from a config block whose fields share the module's names: the
    `required` fields (ValueError naming `what` when any is missing) and the `optional` ones set
    (None = the module's default; attention_implementation may be None), dtype / param_dtype /
    matmul_dtype names as dtypes ("" = the default; matmul_dtype through `cpu.matmul_dtype`, so
    "auto" picks per backend and CPU), head_dim 0 = width // num_heads."""
    from unclip_jax import cpu

    missing = [name for name in required if name not in cfg]
    if missing:
        raise ValueError(f"{what} config is missing required fields {missing}")
    kwargs = {name: cfg[name] for name in required}
    for name in optional:
        if name in cfg and (cfg[name] is not None or name == "attention_implementation"):
            kwargs[name] = cfg[name]
    for name in ("dtype", "param_dtype"):
        if name in cfg and cfg[name]:
            kwargs[name] = as_dtype(cfg[name])
    matmul = cpu.matmul_dtype(cfg["matmul_dtype"]) if "matmul_dtype" in cfg else None
    if matmul:
        kwargs["matmul_dtype"] = as_dtype(matmul)
    if not kwargs.get("head_dim"):  # 0 in a config means "width // num_heads".
        kwargs["head_dim"] = None
    return kwargs


def count_params(tree: Any) -> int:
    """Number of scalars in a param tree of arrays or abstract arrays, boxed (`nn.Partitioned`) or
    not."""
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(tree))))


class LayerNorm(nn.Module):
    """LayerNorm over the last axis, computed in float32, output cast to `dtype`.

    x: [..., features] -> [..., features]. Parameters `scale`/`bias` have logical name `norm`.
    """
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        features = x.shape[-1]
        scale = self.param("scale", partitioned(nn.initializers.ones, ("norm",)), (features,),
                           self.param_dtype)
        bias = self.param("bias", partitioned(nn.initializers.zeros, ("norm",)), (features,),
                          self.param_dtype)
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
        y = y * jnp.asarray(scale, jnp.float32) + jnp.asarray(bias, jnp.float32)
        return y.astype(self.dtype)


class Embed(nn.Module):
    """Token embedding: ids int [...] -> [..., features] in `dtype`; table [vocab, embed].

    Before the lookup the table is constrained to `("vocab", None)`: the FSDP all-gather of the
    `embed` axis happens up front (as for every other weight), so the gather output can be laid
    out by batch instead of being fully rematerialised by the partitioner.
    """
    num_embeddings: int
    features: int
    embedding_init: Callable[..., Array] = nn.initializers.normal(0.02)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids: Array) -> Array:
        table = self.param("embedding", partitioned(self.embedding_init, ("vocab", "embed")),
                           (self.num_embeddings, self.features), self.param_dtype)
        table = nn.with_logical_constraint(jnp.asarray(table, self.dtype), ("vocab", None))
        return jnp.take(table, ids, axis=0)


class HeadsDense(nn.Module):
    """Biased projection to or from attention heads, with a full-rank logically named kernel.

    `contract_heads=False`: [..., embed] -> [..., heads, kv], kernel [embed, heads, kv],
    bias [heads, kv]. `contract_heads=True`: [..., heads, kv] -> [..., embed], kernel
    [heads, kv, embed], bias [embed]. (This is `nn.DenseGeneral` restricted to these two cases;
    DenseGeneral initialises its kernel flat and unboxes it, which fails on a 3-D logically
    partitioned kernel whenever a mesh is set, as in a sharded `init`.)
    """
    features: tuple[int, ...]
    contract_heads: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    matmul_dtype: Dtype | None = None  # operand dtype of the products (see `matmul`); None = dtype

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.contract_heads:
            in_shape, names = tuple(x.shape[-2:]), ("heads", "kv", "embed")
            init = nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)
            bias_names = ("embed",)
            equation = "...hd,hde->...e"
        else:
            in_shape, names = (x.shape[-1],), ("embed", "heads", "kv")
            init = nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
            bias_names = ("heads", "kv")
            equation = "...e,ehd->...hd"
        kernel = self.param("kernel", partitioned(init, names), in_shape + tuple(self.features),
                            self.param_dtype)
        bias = self.param("bias", partitioned(nn.initializers.zeros, bias_names),
                          tuple(self.features), self.param_dtype)
        kernel = jnp.asarray(kernel, self.dtype)
        if self.matmul_dtype is None:
            y = jnp.einsum(equation, x.astype(self.dtype), kernel)
        else:  # The same product as one [..., K] x [K, N] matmul.
            lead = x.shape[:-len(in_shape)]
            flat = matmul(x.astype(self.dtype).reshape(*lead, -1),
                          kernel.reshape(int(np.prod(in_shape)), -1), self.matmul_dtype)
            y = flat.reshape(*lead, *self.features)
        return y + jnp.asarray(bias, self.dtype)


def timestep_embedding(t: Array, dim: int, max_period: float = 10000.0) -> Array:
    """ADM sinusoidal embedding: t [B] (int or float steps) -> float32 [B, dim].

    Half the channels are cos(t * f_k), half sin(t * f_k), with f_k = max_period^(-k / (dim / 2));
    an odd `dim` gets one trailing zero channel.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


def text_mask(tokens: Array, eot_token_id: int) -> Array:
    """True for a caption's tokens up to and including its first end-of-text token: bool [B, L]
    (or [L]). A numpy array in gives a numpy array out (data loaders call it off the device)."""
    is_eot = tokens == eot_token_id
    seen_before = is_eot.cumsum(axis=-1) - is_eot
    return seen_before == 0


def drop_to_null_token(seq: Array, mask: Array, drop: Array,
                       null_token: Array) -> tuple[Array, Array]:
    """Classifier-free guidance's dropped caption: where `drop` (bool [B]) is True, the sequence
    seq [B, L, W] becomes ONE learned `null_token` [W] at position 0 and the key mask (bool [B, L])
    keeps only that position, so that no query's softmax row is empty; other rows are unchanged."""
    first = jnp.arange(seq.shape[1]) == 0
    null_seq = jnp.where(first[:, None], jnp.asarray(null_token, seq.dtype)[None], 0)
    seq = jnp.where(drop[:, None, None], null_seq[None].astype(seq.dtype), seq)
    mask = jnp.where(drop[:, None], first[None], mask)
    return seq, mask


def dot_product_attention(q: Array, k: Array, v: Array, mask: Array | None = None,
                          is_causal: bool = False, implementation: str | None = None) -> Array:
    """Softmax attention, q [B, T, N, H], k/v [B, S, N, H] -> [B, T, N, H] (in q's dtype).

    `mask`: bool, broadcastable to [B, N, T, S], True where a query may attend to a key.
    `implementation`: "xla" / "cudnn" run `jax.nn.dot_product_attention` with that choice;
    "einsum" is this module's heads-major einsum attention (logits and softmax in float32); None
    picks "einsum" on CPU (faster there than JAX's XLA path, forward and backward; see
    benchmarks/README.md) and lets JAX choose elsewhere.
    """
    if implementation is None and jax.default_backend() == "cpu":
        implementation = "einsum"
    if implementation != "einsum":
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal,
                                            implementation=implementation)
    if is_causal:
        causal = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))[None, None]
        mask = causal if mask is None else mask & causal
    q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))  # [B, N, length, H]
    scale = jnp.asarray(1.0 / np.sqrt(q.shape[-1]), q.dtype)
    logits = jnp.einsum("bnth,bnsh->bnts", q * scale, k, preferred_element_type=jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.swapaxes(jnp.einsum("bnts,bnsh->bnth", weights, v), 1, 2)


class MultiHeadAttention(nn.Module):
    """Multi-head dot-product attention with separate, biased q/k/v/out projections (as HF CLIP).

    Kernels: q/k/v `[embed, heads, kv]`, out `[heads, kv, embed]`. The attention itself is
    `dot_product_attention` (logits and softmax in float32).
    """
    num_heads: int
    head_dim: int | None = None  # defaults to width // num_heads
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    implementation: str | None = None  # "xla" | "cudnn" | "einsum"; None: see dot_product_attention
    matmul_dtype: Dtype | None = None  # operand dtype of the q/k/v/out projections (see `matmul`)

    @nn.compact
    def __call__(self, x: Array, *, causal: bool = False, key_padding_mask: Array | None = None,
                 inputs_kv: Array | None = None, prefix_kv: tuple[Array, Array] | None = None,
                 return_kv: bool = False):
        """Attends `x` to itself (or to `inputs_kv` when given).

        x: [batch, length, width]; inputs_kv: [batch, kv_length, width] or None;
        key_padding_mask: bool [batch, kv_length], True where a key is a real token (may be None);
        with `prefix_kv` it covers the prefix keys too ([batch, prefix + kv_length]).
        causal: position i only attends to positions <= i (self-attention only).
        prefix_kv: (keys, values) [batch, prefix, heads, kv] of earlier positions (a KV cache):
          `x` continues that sequence, so causal query i sits at position prefix + i.
        return_kv: also return this call's own (keys, values), to serve as a later prefix.
        Returns [batch, length, width] in `dtype` (and the (keys, values) with `return_kv`).
        """
        width = x.shape[-1]
        if self.head_dim is None and width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
        head_dim = self.head_dim or width // self.num_heads
        kv_in = x if inputs_kv is None else inputs_kv
        if causal and inputs_kv is not None:
            raise ValueError("causal=True is only defined for self-attention (inputs_kv=None)")

        def proj(name):
            return HeadsDense(features=(self.num_heads, head_dim), dtype=self.dtype,
                              param_dtype=self.param_dtype, matmul_dtype=self.matmul_dtype,
                              name=name)

        act_heads = ("act_batch", "act_length", "act_heads", "act_kv")
        q = nn.with_logical_constraint(proj("q_proj")(x.astype(self.dtype)), act_heads)
        k = nn.with_logical_constraint(proj("k_proj")(kv_in.astype(self.dtype)), act_heads)
        v = nn.with_logical_constraint(proj("v_proj")(kv_in.astype(self.dtype)), act_heads)

        own_kv = (k, v)
        is_causal = causal
        mask = None
        if prefix_kv is not None:
            prefix = prefix_kv[0].shape[1]
            k = jnp.concatenate([prefix_kv[0].astype(k.dtype), k], axis=1)
            v = jnp.concatenate([prefix_kv[1].astype(v.dtype), v], axis=1)
            if causal:  # Query i is at position prefix + i: it sees every key j <= prefix + i.
                queries = jnp.arange(q.shape[1])[:, None] + prefix
                mask = (jnp.arange(k.shape[1])[None, :] <= queries)[None, None]
                is_causal = False
        if key_padding_mask is not None:
            if key_padding_mask.shape != k.shape[:2]:
                raise ValueError(f"key_padding_mask has shape {key_padding_mask.shape}; "
                                 f"expected [batch, kv_length] = {k.shape[:2]}")
            padding = key_padding_mask.astype(bool)[:, None, None, :]  # [B, 1(heads), 1(q), S]
            mask = padding if mask is None else mask & padding
        out = dot_product_attention(q, k, v, mask=mask, is_causal=is_causal,
                                    implementation=self.implementation)
        out = nn.with_logical_constraint(out.astype(self.dtype), act_heads)

        y = HeadsDense(features=(width,), contract_heads=True, dtype=self.dtype,
                       param_dtype=self.param_dtype, matmul_dtype=self.matmul_dtype,
                       name="out_proj")(out)
        y = nn.with_logical_constraint(y, ("act_batch", "act_length", "act_embed"))
        return (y, own_kv) if return_kv else y


class Mlp(nn.Module):
    """Position-wise MLP: fc1 -> activation -> fc2 (both biased). [..., width] -> [..., width]."""
    hidden_dim: int
    activation: str = "quick_gelu"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    matmul_dtype: Dtype | None = None  # operand dtype of fc1/fc2 (see `matmul`); None = dtype

    @nn.compact
    def __call__(self, x: Array) -> Array:
        act = get_activation(self.activation)
        width = x.shape[-1]
        h = nn.Dense(
            self.hidden_dim, dtype=self.dtype, param_dtype=self.param_dtype,
            dot_general=dense_dot_general(self.matmul_dtype),
            kernel_init=partitioned(nn.initializers.lecun_normal(), ("embed", "mlp")),
            bias_init=partitioned(nn.initializers.zeros, ("mlp",)), name="fc1")(x.astype(self.dtype))
        h = nn.with_logical_constraint(act(h), ("act_batch", "act_length", "act_mlp"))
        y = nn.Dense(
            width, dtype=self.dtype, param_dtype=self.param_dtype,
            dot_general=dense_dot_general(self.matmul_dtype),
            kernel_init=partitioned(nn.initializers.lecun_normal(), ("mlp", "embed")),
            bias_init=partitioned(nn.initializers.zeros, ("embed",)), name="fc2")(h)
        return nn.with_logical_constraint(y, ("act_batch", "act_length", "act_embed"))


class TransformerBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)); then x + mlp(ln2(x)). [B, L, W] -> [B, L, W]."""
    num_heads: int
    mlp_ratio: float = 4.0
    activation: str = "quick_gelu"
    causal: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_implementation: str | None = None
    scanned: bool = False  # return (x, kv or None), the carry/output pair `nn.scan` expects
    head_dim: int | None = None  # per-head width; None = width // num_heads
    return_kv: bool = False  # also return the attention's own (keys, values) (a KV cache)
    matmul_dtype: Dtype | None = None  # operand dtype of the projections (see `matmul`)

    @nn.compact
    def __call__(self, x: Array, key_padding_mask: Array | None = None,
                 prefix_kv: tuple[Array, Array] | None = None):
        """x: [batch, length, width]; key_padding_mask: bool [batch, (prefix +) length] or None;
        prefix_kv: cached (keys, values) of earlier positions that `x` continues (see attention)."""
        width = x.shape[-1]
        x = nn.with_logical_constraint(x.astype(self.dtype), ("act_batch", "act_length", "act_embed"))
        h = LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="layer_norm1")(x)
        attention = MultiHeadAttention(num_heads=self.num_heads, head_dim=self.head_dim,
                                       dtype=self.dtype, param_dtype=self.param_dtype,
                                       implementation=self.attention_implementation,
                                       matmul_dtype=self.matmul_dtype, name="self_attn")
        h = attention(h, causal=self.causal, key_padding_mask=key_padding_mask, prefix_kv=prefix_kv,
                      return_kv=self.return_kv)
        kv = None
        if self.return_kv:
            h, kv = h
        x = x + h
        h = LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="layer_norm2")(x)
        h = Mlp(hidden_dim=int(round(width * self.mlp_ratio)), activation=self.activation,
                dtype=self.dtype, param_dtype=self.param_dtype, matmul_dtype=self.matmul_dtype,
                name="mlp")(h)
        x = nn.with_logical_constraint(x + h, ("act_batch", "act_length", "act_embed"))
        if self.scanned:
            return x, kv
        return (x, kv) if self.return_kv else x


class Transformer(nn.Module):
    """A stack of `depth` pre-LN `TransformerBlock`s (no final LayerNorm). [B, L, W] -> [B, L, W].

    With `scan_layers=True` the blocks run under `nn.scan` and their params are stacked under
    `layers` with a leading axis of size `depth` (logical name `layers`); otherwise they are
    `layers_0 ... layers_{depth-1}`. `stack_layer_params` / `unstack_layer_params` convert.
    `remat_policy` ("none", "full", "dots_saveable", "nothing_saveable", ...) wraps each block in
    `nn.remat` with the matching `jax.checkpoint_policies` policy.
    """
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    activation: str = "quick_gelu"
    causal: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"
    attention_implementation: str | None = None
    head_dim: int | None = None  # per-head width; None = width // num_heads
    matmul_dtype: Dtype | None = None  # operand dtype of every projection (see `matmul`)

    @nn.compact
    def __call__(self, x: Array, key_padding_mask: Array | None = None,
                 prefix_kv: tuple[Array, Array] | None = None, return_kv: bool = False):
        """x: [batch, length, width]; key_padding_mask: bool [batch, (prefix +) length] or None.

        prefix_kv: a KV cache from an earlier `return_kv=True` call (each [depth, batch, prefix,
        heads, kv]): `x` continues that sequence. return_kv: also return every layer's (keys,
        values) of this call's positions, stacked [depth, ...]. Returns x, or (x, (keys, values)).
        """
        policy = get_remat_policy(self.remat_policy)
        get_activation(self.activation)  # fail early on a bad name
        block_cls = TransformerBlock
        if self.remat_policy != "none":
            # prevent_cse is only needed outside scan (scan already blocks CSE across iterations).
            block_cls = nn.remat(TransformerBlock, policy=policy, prevent_cse=not self.scan_layers)
        kwargs = dict(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                      activation=self.activation, causal=self.causal, dtype=self.dtype,
                      param_dtype=self.param_dtype,
                      attention_implementation=self.attention_implementation,
                      head_dim=self.head_dim, return_kv=return_kv, matmul_dtype=self.matmul_dtype)
        if self.scan_layers:
            stack = nn.scan(block_cls, variable_axes={"params": 0},
                            split_rngs={"params": True, "dropout": True},
                            in_axes=(nn.broadcast, 0), length=self.depth,
                            metadata_params={nn.PARTITION_NAME: LAYER_AXIS})
            x, kv = stack(scanned=True, name=LAYER_AXIS, **kwargs)(x, key_padding_mask, prefix_kv)
            return (x, kv) if return_kv else x
        kvs = []
        for i in range(self.depth):
            layer_prefix = None if prefix_kv is None else jax.tree.map(lambda a: a[i], prefix_kv)
            x = block_cls(name=f"{LAYER_AXIS}_{i}", **kwargs)(x, key_padding_mask, layer_prefix)
            if return_kv:
                x, kv = x
                kvs.append(kv)
        if return_kv:
            return x, jax.tree.map(lambda *a: jnp.stack(a), *kvs)
        return x


# ----------------------------------------------------------------------------------------------
# Converting params between the scanned (stacked) and unrolled layouts.
# ----------------------------------------------------------------------------------------------

_LAYER_KEY = re.compile(rf"^{LAYER_AXIS}_(\d+)$")


def _stack_leaves(leaves: list[Any]) -> Any:
    if isinstance(leaves[0], nn.Partitioned):
        first = leaves[0]
        value = jnp.stack([leaf.unbox() for leaf in leaves], axis=0)
        return first.replace(value=value, names=(LAYER_AXIS,) + tuple(first.names))
    return jnp.stack([jnp.asarray(leaf) for leaf in leaves], axis=0)


def _unstack_leaf(leaf: Any, i: int) -> Any:
    if isinstance(leaf, nn.Partitioned):
        names = tuple(leaf.names)
        if not names or names[0] != LAYER_AXIS:
            raise ValueError(f"stacked param has axis names {names}; expected {LAYER_AXIS!r} first")
        return leaf.replace(value=leaf.unbox()[i], names=names[1:])
    return leaf[i]


def stack_layer_params(params: Any) -> Any:
    """Unrolled -> scanned layout: every dict holding `layers_0..layers_{n-1}` gets them stacked
    into one `layers` subtree whose leaves have a new leading axis of size n (boxes get `layers`)."""
    if not isinstance(params, dict) and not hasattr(params, "items"):
        return params
    params = dict(params)
    indices = sorted(int(m.group(1)) for k in params if (m := _LAYER_KEY.match(str(k))))
    out = {k: stack_layer_params(v) for k, v in params.items() if not _LAYER_KEY.match(str(k))}
    if indices:
        if indices != list(range(len(indices))):
            raise ValueError(f"layer keys are not contiguous from 0: {indices}")
        if LAYER_AXIS in out:
            raise ValueError(f"params hold both {LAYER_AXIS!r} and {LAYER_AXIS}_i keys")
        layers = [params[f"{LAYER_AXIS}_{i}"] for i in indices]
        out[LAYER_AXIS] = jax.tree.map(lambda *xs: _stack_leaves(list(xs)), *layers,
                                       is_leaf=lambda x: isinstance(x, nn.Partitioned))
    return out


def unstack_layer_params(params: Any) -> Any:
    """Scanned -> unrolled layout: every `layers` subtree becomes `layers_0..layers_{n-1}`, with n
    the leading dimension of its leaves (the inverse of `stack_layer_params`)."""
    if not isinstance(params, dict) and not hasattr(params, "items"):
        return params
    out = {}
    for k, v in dict(params).items():
        if k == LAYER_AXIS and hasattr(v, "items"):
            leaves = jax.tree.leaves(v, is_leaf=lambda x: isinstance(x, nn.Partitioned))
            n = int(np.shape(leaves[0].unbox() if isinstance(leaves[0], nn.Partitioned)
                             else leaves[0])[0])
            for i in range(n):
                out[f"{LAYER_AXIS}_{i}"] = jax.tree.map(
                    lambda x, i=i: _unstack_leaf(x, i), v,
                    is_leaf=lambda x: isinstance(x, nn.Partitioned))
        else:
            out[k] = unstack_layer_params(v)
    return out
