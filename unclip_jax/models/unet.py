"""The ADM / GLIDE UNet, configurable into the unCLIP decoder and the two upsamplers (NHWC).

One module, `UNet`; its fields decide the role:

- **Decoder** (Ramesh et al. 2022 §2.1, GLIDE §4.1): `clip_dim > 0` conditions on the CLIP image
  embedding z_i (times `clip_scale`, default sqrt(clip_dim): unit-variance entries), which is projected and ADDED to the timestep embedding and projected into
  `clip_tokens` (4) extra attention-context tokens. `text_depth > 0` adds GLIDE's text pathway: a
  transformer over caption tokens whose last real token is projected and added to the timestep
  embedding (GLIDE's replacement of the class embedding) and whose token sequence is the rest of
  the attention context. Every attention layer projects the context with its own key/value
  projections (GLIDE's `encoder_kv`) and concatenates it to the image keys/values.
- **Upsampler** (§2.1, App. C): `low_res_conditioning=True`, `attention_resolutions=()`, no z_i and
  no text. The low-resolution image is resized inside the module to the size of x_t and
  concatenated on channels, so the same params run at any size divisible by 2^(levels - 1)
  (trained on crops, sampled at full size).
- **CLIP-text conditioning** (`clip_text_width > 0`; the unCLIP decoder as Kakao Brain's Karlo and
  diffusers' `UnCLIPTextProjModel` + `UNet2DConditionModel` build it, see
  `unclip_jax.convert.karlo_unet`): instead of its own caption transformer the decoder reads a
  frozen CLIP text encoder's outputs. Inputs (besides x_t, t, z_i, drop_z_i):
  `z_t` [B, clip_dim], the pooled, projected CLIP text embedding (`text_embeds`), projected
  (`clip_text_emb_proj`) and added to the timestep embedding next to z_i's term;
  `text_hidden` [B, L, clip_text_width], the text encoder's last hidden states, projected
  (`clip_text_seq_proj`) to `context_dim` and LayerNormed (`clip_text_seq_norm`): the caption part
  of the attention context, after the `clip_tokens` z_i tokens; `text_mask` bool [B, L] (True = real
  token; None: all real) masks those tokens as keys (the z_i tokens and the image are always keys).
  `drop_z_i` swaps z_i for the learned `null_z_i` (Karlo's classifier-free-guidance embedding) in
  both of its projections; there is no learned null caption: guidance's unconditional half passes
  the CLIP encoding of the empty caption ("") as z_t / text_hidden / text_mask, as Karlo does, so
  `drop_text` must be None. Karlo feeds z_i unscaled: `clip_scale=1`.
- `context_dim > 0` sets the width of the attention-context tokens (Karlo's `cross_attention_dim`);
  0 keeps `text_width` with the caption transformer, else `emb_dim`.
- `clip_dim=0` and `text_depth=0` with `low_res_conditioning=False` is an unconditional UNet.
- `clip_spatial=s` (not in the paper) also projects z_i to an s x s map added to the bottleneck
  features: a direct, linear path from the embedding to where things are, which the timestep
  embedding (global) and the context tokens (through attention) give only after long training.
- `clip_map_resolutions` (not in the paper) add a z_i-projected map at the entry of each listed
  level (pixels, as `attention_resolutions`), of that level's side and width: a linear template
  of the image from the embedding at full detail, where `clip_spatial` gives only the coarse
  layout. Zero-initialised, so a new model starts as one without them.
- `text_spatial=s` (not in the paper) does the same for the caption: its pooled embedding term
  (the learned null when dropped) projected to an s x s bottleneck map. CLIP's z_i pins the layout
  only as well as CLIP learned it; the caption states it outright. Randomly initialised like the
  z_i map (a zero-initialised projection passes the caption encoder no gradient through it). On
  shapes it has not yet taught the caption pathway position (docs/results.md).
- `coord_channels=True` (not in the paper) appends each pixel's (x, y) to the input, so that
  layout words in z_i and the caption ("on the left", "above") can be placed from the first layer
  instead of being inferred from the zero padding.

Classifier-free guidance (the unconditional model is a real model, never an empty one):
- `drop_z_i` (True = dropped) replaces z_i by a LEARNED null embedding `null_z_i` (initialised to
  zeros, i.e. the paper's "set to zero", then learned) that goes through the same two projections,
  so both the timestep-embedding term and the 4 context tokens come from the null embedding.
- `drop_text` replaces the text term of the timestep embedding by a learned `null_text_emb` and the
  caption's context tokens by ONE learned `null_text_token` at the first text position, the other
  text positions being masked out as keys. With both dropped the context is the null text token
  and the 4 null-z_i tokens; the image tokens are keys of every attention row anyway, so no
  softmax row is ever empty.

Architecture (ADM, improved-DDPM conventions): sinusoidal timestep embedding of width
`base_channels` -> Dense(4 base) -> SiLU -> Dense(4 base) = `emb`; residual blocks with GroupNorm
(statistics in float32), scale-shift conditioning on `emb`, BigGAN-style up/down-sampling inside
residual blocks and a zero-initialised last convolution; attention blocks with a zero-initialised
output projection; a zero-initialised output convolution (so a freshly initialised model outputs
exactly 0). Output channels: `image_channels`, or twice that with `learned_variance`
(first half: the mean/epsilon prediction, second half: the variance interpolation v).

`attention_resolutions` are in pixels at `image_size` (the training resolution): the levels they
name keep their attention when the model runs at another size.

`patch_size` p > 1 (not in ADM; simple diffusion's and U-ViT's patching) folds each p x p block of
input pixels into channels before the first convolution and unfolds the output the same way, so
every level runs at 1/p of the side: the first level at `image_size / p` px.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from unclip_jax.models.layers import (Dtype, Embed, HeadsDense, LayerNorm, Transformer, as_dtype,
                                      dot_product_attention, drop_to_null_token, partitioned,
                                      timestep_embedding)

Array = jax.Array

ACT_IMAGE = ("act_batch", None, None, "act_embed")  # activations [B, H, W, C]
_RESIZE_METHODS = ("nearest", "bilinear", "bicubic", "lanczos3", "lanczos5")


def norm_groups(channels: int, max_groups: int = 32) -> int:
    """The largest group count <= `max_groups` that divides `channels` (32 for ADM widths)."""
    for groups in range(min(max_groups, channels), 0, -1):
        if channels % groups == 0:
            return groups
    raise ValueError(f"channels must be positive, got {channels}")


def _conv(features: int, kernel: int, name: str, dtype: Dtype, param_dtype: Dtype,
          zero: bool = False) -> nn.Conv:
    init = nn.initializers.zeros if zero else nn.initializers.lecun_normal()
    return nn.Conv(features, (kernel, kernel), padding="SAME", dtype=dtype, param_dtype=param_dtype,
                   kernel_init=partitioned(init, (None, None, "conv_in", "conv_out")),
                   bias_init=partitioned(nn.initializers.zeros, ("conv_out",)), name=name)


def _dense(features: int, names: tuple, name: str, dtype: Dtype, param_dtype: Dtype,
           zero: bool = False) -> nn.Dense:
    init = nn.initializers.zeros if zero else nn.initializers.lecun_normal()
    return nn.Dense(features, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=partitioned(init, names),
                    bias_init=partitioned(nn.initializers.zeros, names[-1:]), name=name)


def resize_low_res(low_res: Array, height: int, width: int, method: str) -> Array:
    """The upsampler's conditioning image [B, h, w, C] resized to [B, height, width, C], float32."""
    return jax.image.resize(low_res.astype(jnp.float32),
                            (low_res.shape[0], height, width, low_res.shape[-1]), method=method)


def coordinate_channels(batch: int, height: int, width: int) -> Array:
    """[batch, height, width, 2] pixel-centre coordinates (x, y), each spanning [-1, 1].

    Convolutions with zero padding can infer where they are only slowly from the borders; these
    two channels give every pixel its position from the first layer (CoordConv, Liu et al. 2018),
    which is what a caption's "on the left" needs. They are defined per pixel in [-1, 1], so a
    fully convolutional model still runs at any size.
    """
    xs = (jnp.arange(width, dtype=jnp.float32) + 0.5) / width * 2 - 1
    ys = (jnp.arange(height, dtype=jnp.float32) + 0.5) / height * 2 - 1
    grid = jnp.stack(jnp.meshgrid(xs, ys, indexing="xy"), axis=-1)
    return jnp.broadcast_to(grid, (batch, height, width, 2))


def space_to_depth(x: Array, p: int) -> Array:
    """[B, H, W, C] -> [B, H/p, W/p, p * p * C]: each p x p block of pixels as channels (row, then
    column, then channel)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // p, w // p, p * p * c)


def depth_to_space(x: Array, p: int) -> Array:
    """The inverse of `space_to_depth`: [B, h, w, p * p * C] -> [B, h p, w p, C]."""
    b, h, w, pc = x.shape
    c = pc // (p * p)
    x = x.reshape(b, h, w, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * p, w * p, c)


def upsample_nearest(x: Array) -> Array:
    """Nearest-neighbour 2x upsampling: [B, H, W, C] -> [B, 2H, 2W, C].

    A broadcast and a reshape rather than two `jnp.repeat`s: the same values, and a gradient (the
    sum over each 2x2 block) that XLA:CPU runs faster.
    """
    b, h, w, c = x.shape
    return jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)


def downsample_avg(x: Array) -> Array:
    """2x2 average pooling: [B, H, W, C] -> [B, H/2, W/2, C] (H, W even).

    The four strided slices summed (one elementwise fusion) rather than a mean over a reshape.
    """
    return (x[:, 0::2, 0::2] + x[:, 0::2, 1::2] + x[:, 1::2, 0::2] + x[:, 1::2, 1::2]) * 0.25


class GroupNorm(nn.Module):
    """GroupNorm over [B, H, W, C] (or [B, L, C]); statistics and affine in float32, output `dtype`.

    `scale_shift` ([B, C], [B, C]) applies ADM's conditioning after the affine:
    `y * (1 + scale) + shift`. The group count is `norm_groups(C, num_groups)`.
    """
    num_groups: int = 32
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, scale_shift: tuple[Array, Array] | None = None) -> Array:
        c = x.shape[-1]
        groups = norm_groups(c, self.num_groups)
        scale = self.param("scale", partitioned(nn.initializers.ones, ("norm",)), (c,),
                           self.param_dtype)
        bias = self.param("bias", partitioned(nn.initializers.zeros, ("norm",)), (c,),
                          self.param_dtype)
        xf = x.astype(jnp.float32)
        spatial = tuple(range(1, x.ndim - 1))
        count = math.prod(x.shape[1:-1]) * (c // groups)

        def group_mean(v):
            # Per-channel sums over the spatial axes first, then over each group's channels,
            # broadcast back to [B, 1.., C]. One reduction over [B, H, W, G, C/G]'s axes (1, 2, 4)
            # is the same number, but XLA:CPU runs it (and its gradient) ~5x slower.
            sums = jnp.sum(v, axis=spatial).reshape(x.shape[0], groups, c // groups).sum(-1)
            per_channel = jnp.repeat(sums / count, c // groups, axis=-1)
            return per_channel.reshape((x.shape[0],) + (1,) * len(spatial) + (c,))

        centred = xf - group_mean(xf)
        y = centred * jax.lax.rsqrt(group_mean(jnp.square(centred)) + self.epsilon)
        y = y * jnp.asarray(scale, jnp.float32) + jnp.asarray(bias, jnp.float32)
        if scale_shift is not None:
            expand = (slice(None),) + (None,) * (x.ndim - 2)
            s, b = (jnp.asarray(a, jnp.float32)[expand] for a in scale_shift)
            y = y * (1 + s) + b
        return y.astype(self.dtype)


class ResBlock(nn.Module):
    """ADM residual block: [B, H, W, C] and emb [B, E] -> [B, H', W', out_channels].

    GroupNorm -> SiLU -> (2x nearest up / 2x2 average down of both the branch and the skip) ->
    3x3 conv -> GroupNorm with scale-shift from Dense(SiLU(emb)) (or additive emb) -> SiLU ->
    dropout -> zero-initialised 3x3 conv; a 1x1 conv on the skip when the channel count changes.
    """
    out_channels: int
    dropout: float = 0.0
    use_scale_shift_norm: bool = True
    up: bool = False
    down: bool = False
    num_groups: int = 32
    deterministic: bool = True  # False enables dropout (needs a "dropout" rng)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, emb: Array) -> Array:
        x = nn.with_logical_constraint(x.astype(self.dtype), ACT_IMAGE)
        norm = dict(num_groups=self.num_groups, dtype=self.dtype, param_dtype=self.param_dtype)
        conv = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(GroupNorm(name="in_norm", **norm)(x))
        if self.up:
            h, x = upsample_nearest(h), upsample_nearest(x)
        elif self.down:
            h, x = downsample_avg(h), downsample_avg(x)
        h = _conv(self.out_channels, 3, "in_conv", **conv)(h)
        emb_features = 2 * self.out_channels if self.use_scale_shift_norm else self.out_channels
        emb_out = _dense(emb_features, (None, "conv_out"), "emb_proj", **conv)(nn.silu(emb))
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(emb_out, 2, axis=-1)
            h = GroupNorm(name="out_norm", **norm)(h, (scale, shift))
        else:
            h = GroupNorm(name="out_norm", **norm)(h + emb_out[:, None, None, :].astype(h.dtype))
        h = nn.Dropout(self.dropout)(nn.silu(h), deterministic=self.deterministic)
        h = _conv(self.out_channels, 3, "out_conv", zero=True, **conv)(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, "skip_conv", **conv)(x)
        return nn.with_logical_constraint(x + h, ACT_IMAGE)


class AttentionBlock(nn.Module):
    """Self-attention over the H*W image tokens, plus optional context tokens; residual.

    x: [B, H, W, C]; context: [B, S, C_ctx] or None, projected by this layer's own key/value
    projections and concatenated to the image keys/values (GLIDE's `encoder_kv`);
    context_mask: bool [B, S], True = real token (None: all real). Heads: C // head_channels when
    `head_channels` > 0, else `num_heads`. The output projection is zero-initialised.
    """
    num_heads: int = 1
    head_channels: int = 0
    num_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    implementation: str | None = None

    def _heads(self, channels: int) -> tuple[int, int]:
        if self.head_channels > 0:
            if channels % self.head_channels:
                raise ValueError(f"attention channels {channels} are not divisible by "
                                 f"head_channels {self.head_channels}")
            return channels // self.head_channels, self.head_channels
        if channels % self.num_heads:
            raise ValueError(f"attention channels {channels} are not divisible by num_heads "
                             f"{self.num_heads}")
        return self.num_heads, channels // self.num_heads

    @nn.compact
    def __call__(self, x: Array, context: Array | None = None,
                 context_mask: Array | None = None) -> Array:
        b, height, width, c = x.shape
        heads, head_dim = self._heads(c)
        x = nn.with_logical_constraint(x.astype(self.dtype), ACT_IMAGE)
        h = GroupNorm(num_groups=self.num_groups, dtype=self.dtype, param_dtype=self.param_dtype,
                      name="norm")(x).reshape(b, height * width, c)

        def proj(name):
            return HeadsDense(features=(heads, head_dim), dtype=self.dtype,
                              param_dtype=self.param_dtype, name=name)

        act_heads = ("act_batch", "act_length", "act_heads", "act_kv")
        q = nn.with_logical_constraint(proj("q_proj")(h), act_heads)
        k = nn.with_logical_constraint(proj("k_proj")(h), act_heads)
        v = nn.with_logical_constraint(proj("v_proj")(h), act_heads)
        mask = None
        if context is not None:
            context = context.astype(self.dtype)
            k = jnp.concatenate([proj("context_k_proj")(context), k], axis=1)
            v = jnp.concatenate([proj("context_v_proj")(context), v], axis=1)
            if context_mask is not None:
                image_keys = jnp.ones((b, height * width), bool)
                mask = jnp.concatenate([context_mask.astype(bool), image_keys], axis=1)
                mask = mask[:, None, None, :]  # [B, 1 (heads), 1 (queries), S + H*W]
        out = dot_product_attention(q, k, v, mask=mask, implementation=self.implementation)
        out = nn.with_logical_constraint(out.astype(self.dtype), act_heads)
        kernel = self.param("out_proj_kernel",
                            partitioned(nn.initializers.zeros, ("heads", "kv", "embed")),
                            (heads, head_dim, c), self.param_dtype)
        bias = self.param("out_proj_bias", partitioned(nn.initializers.zeros, ("embed",)), (c,),
                          self.param_dtype)
        y = jnp.einsum("blhd,hde->ble", out, jnp.asarray(kernel, self.dtype))
        y = (y + jnp.asarray(bias, self.dtype)).reshape(b, height, width, c)
        return nn.with_logical_constraint(x + y, ACT_IMAGE)


class TextEncoder(nn.Module):
    """GLIDE's caption transformer: tokens int [B, L] -> (sequence [B, L, W], last token [B, W]).

    Token + learned position embeddings, `depth` pre-LN blocks (`layers.Transformer`, causal by
    default), a final LayerNorm. Keys are masked by `mask` (True = real token); position 0 is always
    a valid key so that an all-padding row has no empty softmax row. The pooled output is the last
    real token per `mask` (the EOT token of a right-padded caption); with causal attention it is
    the only position that has seen the whole caption.
    """
    vocab_size: int
    length: int
    width: int
    depth: int
    num_heads: int
    causal: bool = True
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    implementation: str | None = None

    @nn.compact
    def __call__(self, tokens: Array, mask: Array) -> tuple[Array, Array]:
        x = Embed(self.vocab_size, self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                  name="token_embedding")(tokens)
        pos = self.param("position_embedding",
                         partitioned(nn.initializers.normal(0.01), (None, "embed")),
                         (self.length, self.width), self.param_dtype)
        x = x + jnp.asarray(pos, self.dtype)[None]
        keys = mask.astype(bool).at[:, 0].set(True)
        x = Transformer(depth=self.depth, num_heads=self.num_heads, causal=self.causal,
                        activation="gelu", dtype=self.dtype, param_dtype=self.param_dtype,
                        scan_layers=True, remat_policy="full" if self.remat else "none",
                        attention_implementation=self.implementation, name="transformer")(x, keys)
        x = LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="ln_final")(x)
        last = self.length - 1 - jnp.argmax(mask.astype(bool)[:, ::-1], axis=1)  # no real: L - 1
        pooled = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
        return x, pooled


class UNet(nn.Module):
    """ADM / GLIDE UNet (see the module docstring): x_t [B, H, W, C] -> [B, H, W, out_channels].

    Sizes: `base_channels` (ADM's model_channels), `channel_mult` per level, `num_res_blocks` per
    level, `attention_resolutions` in pixels at `image_size`. Attention heads: channels //
    `head_channels` when `head_channels` > 0, else `num_heads`. `num_groups` caps the GroupNorm
    group count. Conditioning: `clip_dim` (0 = none), `clip_tokens` context tokens from z_i,
    `text_*` for the caption transformer (`text_depth=0` = none), `clip_text_width` for a CLIP text
    encoder's outputs instead (Karlo), `context_dim` for the context tokens' width,
    `low_res_conditioning` for the upsamplers (resize method `low_res_resize`). `num_timesteps`
    rescales t to a 1000-step embedding as the prior does. `remat` wraps every residual and
    attention block in `nn.remat`.
    """
    base_channels: int = 64
    channel_mult: Sequence[int] = (1, 2, 4)
    num_res_blocks: int = 2
    attention_resolutions: Sequence[int] = ()
    image_size: int = 64
    patch_size: int = 1  # fold p x p pixel blocks into channels: every level at 1/p of the side
    num_heads: int = 1
    head_channels: int = 0
    dropout: float = 0.0
    use_scale_shift_norm: bool = True
    num_groups: int = 32
    image_channels: int = 3
    learned_variance: bool = False
    low_res_conditioning: bool = False
    low_res_resize: str = "bilinear"
    clip_dim: int = 0
    clip_tokens: int = 4
    clip_scale: float = 0.0  # z_i times this before its projections; 0 = sqrt(clip_dim)
    coord_channels: bool = False  # append (x, y) in [-1, 1] to the input (CoordConv)
    clip_spatial: int = 0  # side of a z_i-projected feature map added at the bottleneck; 0 = none
    clip_map_resolutions: Sequence[int] = ()  # levels (pixels, as attention) whose entry adds a z_i map
    text_spatial: int = 0  # side of a caption-projected bottleneck map (needs text_depth > 0)
    text_vocab_size: int = 0
    text_length: int = 0
    text_width: int = 0
    text_depth: int = 0
    text_heads: int = 1
    text_causal: bool = True
    clip_text_width: int = 0  # > 0: CLIP-text conditioning (z_t, text_hidden; Karlo), see above
    context_dim: int = 0  # width of the attention-context tokens; 0 = text_width or emb_dim
    num_timesteps: int = 1000
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    attention_implementation: str | None = None

    # ---------------------------------------------------------------------------------------------
    # Derived sizes and checks.
    # ---------------------------------------------------------------------------------------------

    @property
    def out_channels(self) -> int:
        """Output channels: image_channels, doubled with `learned_variance`."""
        return self.image_channels * (2 if self.learned_variance else 1)

    @property
    def emb_dim(self) -> int:
        """Width of the timestep embedding `emb` (4 * base_channels)."""
        return 4 * self.base_channels

    @property
    def uses_text(self) -> bool:
        return self.text_depth > 0

    @property
    def uses_clip_text(self) -> bool:
        """The CLIP-text conditioning (z_t and text_hidden inputs; Karlo's text projection)."""
        return self.clip_text_width > 0

    @property
    def context_width(self) -> int:
        """Width of the attention-context tokens: `context_dim` when set, else text_width with the
        caption transformer, else emb_dim."""
        if self.context_dim:
            return self.context_dim
        return self.text_width if self.uses_text else self.emb_dim

    @property
    def downsample_factor(self) -> int:
        """H and W must be multiples of this: patch_size * 2^(levels - 1)."""
        return self.patch_size * 2 ** (len(self.channel_mult) - 1)

    def _check_config(self):
        name = type(self).__name__
        if self.base_channels <= 0 or not self.channel_mult or min(self.channel_mult) <= 0:
            raise ValueError(f"{name}: base_channels and channel_mult must be positive, got "
                             f"{self.base_channels} and {tuple(self.channel_mult)}")
        if self.num_res_blocks <= 0:
            raise ValueError(f"{name}.num_res_blocks must be positive, got {self.num_res_blocks}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{name}.dropout must be in [0, 1), got {self.dropout}")
        if self.low_res_resize not in _RESIZE_METHODS:
            raise ValueError(f"{name}.low_res_resize {self.low_res_resize!r}; expected one of "
                             f"{_RESIZE_METHODS}")
        if self.patch_size < 1 or self.image_size % self.patch_size:
            raise ValueError(f"{name}.patch_size={self.patch_size} must be >= 1 and divide "
                             f"image_size {self.image_size}")
        first = self.image_size // self.patch_size
        reachable = {first // 2 ** level for level in range(len(self.channel_mult))}
        for field in ("attention_resolutions", "clip_map_resolutions"):
            unknown = sorted(set(getattr(self, field)) - reachable)
            if unknown:
                raise ValueError(f"{name}.{field} {unknown} are not level resolutions "
                                 f"{sorted(reachable)} of image_size {self.image_size}")
        if self.clip_map_resolutions and not self.clip_dim:
            raise ValueError(f"{name}.clip_map_resolutions needs clip_dim > 0 (they project z_i)")
        if self.clip_dim < 0 or (self.clip_dim and self.clip_tokens < 0):
            raise ValueError(f"{name}: clip_dim and clip_tokens must be >= 0")
        if self.uses_text:
            sizes = (self.text_vocab_size, self.text_length, self.text_width, self.text_heads)
            if min(sizes) <= 0:
                raise ValueError(f"{name}: text_depth > 0 needs positive text_vocab_size, "
                                 f"text_length, text_width and text_heads, got {sizes}")
            if self.text_width % self.text_heads:
                raise ValueError(f"{name}.text_width {self.text_width} is not divisible by "
                                 f"text_heads {self.text_heads}")
        if self.text_spatial < 0 or (self.text_spatial and not self.uses_text):
            raise ValueError(f"{name}.text_spatial={self.text_spatial} needs text_depth > 0 "
                             "(it projects the caption) and must be >= 0")
        if self.clip_text_width < 0 or self.context_dim < 0:
            raise ValueError(f"{name}: clip_text_width and context_dim must be >= 0, got "
                             f"{self.clip_text_width} and {self.context_dim}")
        if self.context_dim and self.uses_text and self.context_dim != self.text_width:
            raise ValueError(f"{name}.context_dim={self.context_dim} differs from text_width="
                             f"{self.text_width}: the caption transformer's tokens are the context")
        if self.uses_clip_text and (self.uses_text or not self.clip_dim):
            raise ValueError(f"{name}.clip_text_width={self.clip_text_width} (CLIP-text "
                             "conditioning) needs clip_dim > 0 (z_i and z_t) and text_depth=0 (it "
                             "replaces the caption transformer)")
        if self.num_timesteps <= 0:
            raise ValueError(f"{name}.num_timesteps must be positive, got {self.num_timesteps}")

    def _check_inputs(self, x_t, t, z_i, text_tokens, text_mask, drop_z_i, drop_text, low_res,
                      z_t=None, text_hidden=None):
        c = self.image_channels
        if x_t.ndim != 4 or x_t.shape[-1] != c:
            raise ValueError(f"x_t has shape {tuple(x_t.shape)}; expected [batch, height, width, "
                             f"{c}] (image_channels={c})")
        b, h, w, _ = x_t.shape
        f = self.downsample_factor
        if h % f or w % f:
            raise ValueError(f"x_t is {h}x{w}; height and width must be multiples of {f} "
                             f"(patch_size {self.patch_size} x 2^(levels - 1) for channel_mult "
                             f"{tuple(self.channel_mult)})")
        if t.shape != (b,):
            raise ValueError(f"t has shape {tuple(t.shape)}; expected [batch] = ({b},)")

        def expect(value, what, shape, enabled, flag):
            if value is None:
                if enabled and what in ("z_i", "text_tokens", "low_res", "z_t", "text_hidden"):
                    raise ValueError(f"{what} is required: the model has {flag}")
                return
            if not enabled:
                raise ValueError(f"{what} was given but the model does not use it (it needs "
                                 f"{flag})")
            if shape is not None and tuple(value.shape) != shape:
                raise ValueError(f"{what} has shape {tuple(value.shape)}; expected {shape}")

        clip_on, text_on, clip_text_on = self.clip_dim > 0, self.uses_text, self.uses_clip_text
        expect(z_i, "z_i", (b, self.clip_dim), clip_on, "clip_dim > 0")
        expect(drop_z_i, "drop_z_i", (b,), clip_on, "clip_dim > 0")
        expect(text_tokens, "text_tokens", (b, self.text_length), text_on, "text_depth > 0")
        expect(z_t, "z_t", (b, self.clip_dim), clip_text_on, "clip_text_width > 0")
        expect(text_hidden, "text_hidden", None, clip_text_on, "clip_text_width > 0")
        if clip_text_on:
            if text_hidden.ndim != 3 or text_hidden.shape[0] != b or (
                    text_hidden.shape[-1] != self.clip_text_width):
                raise ValueError(f"text_hidden has shape {tuple(text_hidden.shape)}; expected "
                                 f"[batch, length, clip_text_width] = [{b}, L, "
                                 f"{self.clip_text_width}]")
            expect(text_mask, "text_mask", tuple(text_hidden.shape[:2]), True, "")
            if drop_text is not None:
                raise ValueError(
                    "drop_text was given but CLIP-text conditioning (clip_text_width > 0) has no "
                    "learned null caption: pass the CLIP encoding of the empty caption as z_t, "
                    "text_hidden and text_mask instead (as Karlo's guidance does)")
        else:
            expect(text_mask, "text_mask", (b, self.text_length), text_on, "text_depth > 0")
            expect(drop_text, "drop_text", (b,), text_on, "text_depth > 0")
        expect(low_res, "low_res", None, self.low_res_conditioning, "low_res_conditioning=True")
        if low_res is not None and (low_res.ndim != 4 or low_res.shape[0] != b
                                    or low_res.shape[-1] != c):
            raise ValueError(f"low_res has shape {tuple(low_res.shape)}; expected [batch, "
                             f"low_height, low_width, {c}] with batch {b}")

    # ---------------------------------------------------------------------------------------------
    # Conditioning.
    # ---------------------------------------------------------------------------------------------

    def _time_embedding(self, t: Array) -> Array:
        steps = t.astype(jnp.float32) * (1000.0 / self.num_timesteps)
        h = timestep_embedding(steps, self.base_channels).astype(self.dtype)
        h = _dense(self.emb_dim, ("embed", "mlp"), "time_embed_fc1", self.dtype,
                   self.param_dtype)(h)
        return _dense(self.emb_dim, ("mlp", "embed"), "time_embed_fc2", self.dtype,
                      self.param_dtype)(nn.silu(h))

    def _clip_conditioning(self, z_i: Array, drop_z_i: Array | None):
        """z_i [B, D] -> (emb term [B, E], context tokens [B, clip_tokens, context_width] or None,
        bottleneck map [B, clip_spatial, clip_spatial, bottleneck channels] or None)."""
        null = self.param("null_z_i", partitioned(nn.initializers.zeros, (None,)),
                          (self.clip_dim,), self.param_dtype)
        # A unit-norm z_i has entries of size ~1/sqrt(D): rescaled to unit variance, its projections
        # start as strong as the timestep embedding instead of sqrt(D) times weaker.
        scale = self.clip_scale or math.sqrt(self.clip_dim)
        z = z_i.astype(jnp.float32) * scale
        if drop_z_i is not None:
            z = jnp.where(drop_z_i.astype(bool)[:, None], jnp.asarray(null, jnp.float32)[None], z)
        z = z.astype(self.dtype)
        emb = _dense(self.emb_dim, (None, "embed"), "clip_emb_proj", self.dtype,
                     self.param_dtype)(z)
        tokens = spatial = None
        if self.clip_tokens:
            tokens = _dense(self.clip_tokens * self.context_width, (None, "embed"),
                            "clip_tokens_proj", self.dtype, self.param_dtype)(z)
            tokens = tokens.reshape(z.shape[0], self.clip_tokens, self.context_width)
        if self.clip_spatial:
            spatial = self._bottleneck_map(self.clip_spatial, z, "clip_spatial_proj")
        return emb, tokens, spatial, z

    def _text_conditioning(self, tokens: Array, mask: Array | None, drop: Array | None):
        """Caption -> (emb term [B, E], context tokens [B, L, text_width], key mask [B, L])."""
        b, length = tokens.shape
        mask = jnp.ones((b, length), bool) if mask is None else mask.astype(bool)
        seq, pooled = TextEncoder(
            vocab_size=self.text_vocab_size, length=self.text_length, width=self.text_width,
            depth=self.text_depth, num_heads=self.text_heads, causal=self.text_causal,
            remat=self.remat, dtype=self.dtype, param_dtype=self.param_dtype,
            implementation=self.attention_implementation, name="text_encoder")(tokens, mask)
        emb = _dense(self.emb_dim, (None, "embed"), "text_emb_proj", self.dtype,
                     self.param_dtype)(pooled)
        null_emb = self.param("null_text_emb",
                              partitioned(nn.initializers.normal(0.02), ("embed",)),
                              (self.emb_dim,), self.param_dtype)
        null_token = self.param("null_text_token",
                                partitioned(nn.initializers.normal(0.02), ("embed",)),
                                (self.text_width,), self.param_dtype)
        if drop is not None:
            drop = drop.astype(bool)
            emb = jnp.where(drop[:, None], jnp.asarray(null_emb, emb.dtype)[None], emb)
            seq, mask = drop_to_null_token(seq, mask, drop, null_token)
        return emb, seq, mask

    def _clip_text_conditioning(self, z_t: Array, hidden: Array, mask: Array | None):
        """Karlo's text projection: z_t [B, D] and the CLIP text encoder's hidden states
        [B, L, clip_text_width] -> (emb term [B, E], context tokens [B, L, context_width],
        key mask [B, L])."""
        emb = _dense(self.emb_dim, (None, "embed"), "clip_text_emb_proj", self.dtype,
                     self.param_dtype)(z_t.astype(self.dtype))
        seq = _dense(self.context_width, (None, "embed"), "clip_text_seq_proj", self.dtype,
                     self.param_dtype)(hidden.astype(self.dtype))
        seq = LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype,
                        name="clip_text_seq_norm")(seq)
        b, length = hidden.shape[:2]
        mask = jnp.ones((b, length), bool) if mask is None else mask.astype(bool)
        return emb, seq, mask

    def _level_keys(self, resolutions: Sequence[int]) -> set[int]:
        """Resolutions in pixels at `image_size` -> the 2^level of the levels that run at them."""
        return {self.image_size // self.patch_size // r for r in resolutions}

    def _bottleneck_map(self, side: int, source: Array, name: str) -> Array:
        """source [B, F] -> a [B, side, side, bottleneck channels] map (resized where it is added)."""
        width = self.base_channels * self.channel_mult[-1]
        return _dense(side * side * width, (None, "embed"), name, self.dtype,
                      self.param_dtype)(source).reshape(source.shape[0], side, side, width)

    # ---------------------------------------------------------------------------------------------
    # Forward.
    # ---------------------------------------------------------------------------------------------

    @nn.compact
    def __call__(self, x_t: Array, t: Array, *, z_i: Array | None = None,
                 text_tokens: Array | None = None, text_mask: Array | None = None,
                 drop_z_i: Array | None = None, drop_text: Array | None = None,
                 low_res: Array | None = None, z_t: Array | None = None,
                 text_hidden: Array | None = None, train: bool = False) -> Array:
        """Predicts the diffusion output for x_t at step t.

        x_t: [B, H, W, image_channels] (H, W multiples of 2^(levels - 1)); t: [B] diffusion step
        in the ORIGINAL 0..num_timesteps-1 range (floats accepted); z_i: CLIP image embedding
        [B, clip_dim] (required iff clip_dim > 0); text_tokens: int32 [B, text_length] and
        text_mask: bool [B, text_length], True = real token (None: all real) (iff text_depth > 0);
        drop_z_i / drop_text: bool [B], True where that condition is replaced by its learned null
        (None: never); low_res: [B, h, w, image_channels] in [-1, 1] (iff low_res_conditioning),
        resized to H x W inside. train: enables dropout (needs a "dropout" rng).
        With `clip_text_width > 0` (CLIP-text conditioning, Karlo) instead of the caption tokens:
        z_t [B, clip_dim] the CLIP text embedding, text_hidden [B, L, clip_text_width] the CLIP
        text encoder's last hidden states, text_mask bool [B, L] (None: all real); drop_text must
        be None.
        Returns float32 [B, H, W, out_channels].
        """
        self._check_config()
        self._check_inputs(x_t, t, z_i, text_tokens, text_mask, drop_z_i, drop_text, low_res,
                           z_t, text_hidden)
        batch, height, width, _ = x_t.shape

        emb = self._time_embedding(t)
        context, context_mask, maps, clip_z = [], [], [], None
        if self.uses_text:
            text_emb, text_seq, text_keys = self._text_conditioning(text_tokens, text_mask,
                                                                    drop_text)
            if self.text_spatial:
                maps.append(self._bottleneck_map(self.text_spatial, text_emb, "text_spatial_proj"))
            emb = emb + text_emb
            context.append(text_seq.astype(self.dtype))
            context_mask.append(text_keys)
        if self.clip_dim:
            clip_emb, clip_seq, clip_map, clip_z = self._clip_conditioning(z_i, drop_z_i)
            if clip_map is not None:
                maps.append(clip_map)
            emb = emb + clip_emb
            if clip_seq is not None:
                context.append(clip_seq.astype(self.dtype))
                context_mask.append(jnp.ones(clip_seq.shape[:2], bool))
        if self.uses_clip_text:  # Karlo: the z_i tokens first, then the caption's
            text_emb, text_seq, text_keys = self._clip_text_conditioning(z_t, text_hidden,
                                                                         text_mask)
            emb = emb + text_emb
            context.append(text_seq.astype(self.dtype))
            context_mask.append(text_keys)
        emb = nn.with_logical_constraint(emb, ("act_batch", "act_embed"))
        ctx = jnp.concatenate(context, axis=1) if context else None
        ctx_mask = jnp.concatenate(context_mask, axis=1) if context else None
        if ctx is not None:
            ctx = nn.with_logical_constraint(ctx, ("act_batch", "act_length", "act_embed"))

        h = x_t.astype(jnp.float32)
        if self.low_res_conditioning:
            up = resize_low_res(low_res, height, width, self.low_res_resize)
            h = jnp.concatenate([h, up], axis=-1)
        if self.coord_channels:
            h = jnp.concatenate([h, coordinate_channels(batch, height, width)], axis=-1)
        if self.patch_size > 1:
            h = space_to_depth(h, self.patch_size)
        h = nn.with_logical_constraint(h.astype(self.dtype), ACT_IMAGE)

        res_cls = nn.remat(ResBlock) if self.remat else ResBlock
        attn_cls = nn.remat(AttentionBlock) if self.remat else AttentionBlock
        attention_levels = self._level_keys(self.attention_resolutions)
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def res(channels, name, **kw):
            return res_cls(out_channels=channels, dropout=self.dropout,
                           use_scale_shift_norm=self.use_scale_shift_norm,
                           num_groups=self.num_groups, deterministic=not train, name=name,
                           **common, **kw)

        def attn(x, name):
            block = attn_cls(num_heads=self.num_heads, head_channels=self.head_channels,
                             num_groups=self.num_groups,
                             implementation=self.attention_implementation, name=name, **common)
            return block(x, ctx, ctx_mask)

        map_levels = self._level_keys(self.clip_map_resolutions)

        def level_map(x, level):  # z_i's own map of this level's size and width, added at its entry
            if 2 ** level not in map_levels:
                return x
            layout = _dense(x.shape[1] * x.shape[2] * x.shape[3], (None, "embed"),
                            f"clip_map_{level}_proj", self.dtype, self.param_dtype, zero=True)(clip_z)
            return x + layout.reshape(x.shape).astype(x.dtype)

        h = _conv(self.base_channels * self.channel_mult[0], 3, "input_conv", **common)(h)
        skips = [h]
        levels = len(self.channel_mult)
        for level, mult in enumerate(self.channel_mult):
            h = skips[-1] = level_map(h, level)  # the level's entry: input conv or downsample
            for i in range(self.num_res_blocks):
                h = res(self.base_channels * mult, f"down_{level}_res_{i}")(h, emb)
                if 2 ** level in attention_levels:
                    h = attn(h, f"down_{level}_attn_{i}")
                skips.append(h)
            if level != levels - 1:
                h = res(h.shape[-1], f"down_{level}_downsample", down=True)(h, emb)
                skips.append(h)

        for layout in maps:  # z_i's / the caption's own layout maps, resized to the bottleneck
            h = h + jax.image.resize(layout, (batch, h.shape[1], h.shape[2], h.shape[3]),
                                     method="bilinear").astype(h.dtype)
        h = res(h.shape[-1], "middle_res_0")(h, emb)
        if attention_levels:
            h = attn(h, "middle_attn")
        h = res(h.shape[-1], "middle_res_1")(h, emb)

        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = res(self.base_channels * mult, f"up_{level}_res_{i}")(h, emb)
                if 2 ** level in attention_levels:
                    h = attn(h, f"up_{level}_attn_{i}")
            if level:
                h = res(h.shape[-1], f"up_{level}_upsample", up=True)(h, emb)

        h = nn.silu(GroupNorm(num_groups=self.num_groups, dtype=jnp.float32,
                              param_dtype=self.param_dtype, name="out_norm")(h))
        p = self.patch_size
        out = _conv(self.out_channels * p * p, 3, "out_conv", jnp.float32, self.param_dtype, zero=True)(h)
        if p > 1:
            out = depth_to_space(out, p)
        return nn.with_logical_constraint(out, ACT_IMAGE)


# -------------------------------------------------------------------------------------------------
# Config.
# -------------------------------------------------------------------------------------------------

_FIELDS = ("base_channels", "channel_mult", "num_res_blocks", "attention_resolutions",
           "image_size", "patch_size", "num_heads", "head_channels", "dropout", "use_scale_shift_norm",
           "num_groups", "image_channels", "learned_variance", "low_res_conditioning",
           "low_res_resize", "clip_dim", "clip_tokens", "clip_scale", "clip_spatial",
           "clip_map_resolutions", "text_spatial", "coord_channels", "text_vocab_size",
           "text_length", "text_width", "text_depth", "text_heads", "text_causal",
           "clip_text_width", "context_dim", "num_timesteps", "remat", "attention_implementation")
_TUPLE_FIELDS = ("channel_mult", "attention_resolutions", "clip_map_resolutions")


def unet_from_config(cfg: Any, **sizes: Any) -> UNet:
    """Builds a `UNet` from a config block whose fields share the module's names.

    Every field is optional (module defaults otherwise); `dtype`/`param_dtype` may be names such as
    "bfloat16"; list-valued `channel_mult`/`attention_resolutions` become tuples; unknown fields
    (learning rates, drop probabilities, ...) are ignored. Keyword arguments override the config:
    pass sizes that come from elsewhere (e.g. `clip_dim` from the CLIP model, `text_vocab_size`
    and `text_length` from the tokenizer).
    """
    unknown = sorted(set(sizes) - set(_FIELDS) - {"dtype", "param_dtype"})
    if unknown:
        raise ValueError(f"unet_from_config got unknown size arguments {unknown}")
    kwargs = {}
    for name in _FIELDS + ("dtype", "param_dtype"):
        if name in sizes:
            kwargs[name] = sizes[name]
        elif name in cfg and (cfg[name] is not None or name == "attention_implementation"):
            kwargs[name] = cfg[name]
    for name in _TUPLE_FIELDS:
        if name in kwargs:
            kwargs[name] = tuple(int(v) for v in kwargs[name])
    for name in ("dtype", "param_dtype"):
        if name in kwargs:
            kwargs[name] = as_dtype(kwargs[name])
    return UNet(**kwargs)
