"""InceptionV3 as the FID network (pure linen): pytorch-fid's variant, preprocessing included.

FID is only comparable across papers when every paper computes it with the same network: the
TensorFlow Inception graph of 2015 (`inception-2015-12-05`) that the original FID code used.
pytorch-fid ported it to PyTorch as torchvision's `Inception3` with three kinds of patched blocks,
and this module reproduces that network, so that its weights file (`pt_inception-2015-12-05`),
converted once to safetensors by `convert_inception.py`, gives the same 2048-d pool3 features:

- `FIDInceptionA` / `FIDInceptionC` / `FIDInceptionE_1`: the average pool of the pool branch does
  not count the zero padding (TensorFlow's `AVG` pooling), where torchvision's does;
- `FIDInceptionE_2` (`Mixed_7c`): the pool branch is a 3x3 *max* pool (a quirk of the TF graph);
- every convolution is `BasicConv2d`: bias-free conv, BatchNorm (eps 1e-3, inference statistics),
  ReLU;
- the input (pixels in [0, 1], any size) is resized to 299 x 299 bilinearly, without antialiasing
  and with half-pixel centres (`F.interpolate(..., mode="bilinear", align_corners=False)`), then
  mapped to [-1, 1].

The network is a frozen feature extractor: BatchNorm's running mean and variance are ordinary
params here (there is no training mode), which keeps the param tree one flat dict that
safetensors and `convert_inception.py` map name for name:

    torch `Mixed_6b.branch7x7_2.conv.weight` [O, I, kh, kw] -> `Mixed_6b/branch7x7_2/conv/kernel` [kh, kw, I, O]
    torch `Mixed_6b.branch7x7_2.bn.{weight, bias, running_mean, running_var}`
                                                          -> `Mixed_6b/branch7x7_2/bn/{scale, bias, mean, var}`

Channels are last (NHWC), as every image in this project; params carry the logical names
`conv_in` / `conv_out` of `unclip_jax.parallel` and the activations `act_batch`, so the batch
shards over the data axes while the (small, 22M) weights stay replicated by the default rules.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

Dtype = Any

INPUT_SIZE = 299  # pytorch-fid resizes every image to this before the network.
FEATURE_DIM = 2048  # pool3: the final average pool, what FID is computed on.
BN_EPS = 1e-3  # torchvision's BasicConv2d (TensorFlow's default).


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class FrozenBatchNorm(nn.Module):
    """BatchNorm with fixed (imported) statistics: (x - mean) / sqrt(var + eps) * scale + bias."""

    eps: float = BN_EPS
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        part = lambda init: nn.with_logical_partitioning(init, ("conv_out",))  # noqa: E731
        scale = self.param("scale", part(nn.initializers.ones), (c,), jnp.float32)
        bias = self.param("bias", part(nn.initializers.zeros), (c,), jnp.float32)
        mean = self.param("mean", part(nn.initializers.zeros), (c,), jnp.float32)
        var = self.param("var", part(nn.initializers.ones), (c,), jnp.float32)
        mul = scale * jax.lax.rsqrt(var + self.eps)
        return (x.astype(jnp.float32) * mul + (bias - mean * mul)).astype(self.dtype)


class BasicConv(nn.Module):
    """torchvision's `BasicConv2d`: bias-free conv (explicit symmetric padding), BatchNorm, ReLU."""

    features: int
    kernel: int | Sequence[int]
    stride: int = 1
    padding: int | Sequence[int] = 0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        ph, pw = _pair(self.padding)
        x = nn.Conv(self.features, _pair(self.kernel), strides=_pair(self.stride),
                    padding=((ph, ph), (pw, pw)), use_bias=False, dtype=self.dtype,
                    param_dtype=jnp.float32, precision=jax.lax.Precision.HIGHEST,
                    kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                             (None, None, "conv_in", "conv_out")),
                    name="conv")(x)
        return nn.relu(FrozenBatchNorm(dtype=self.dtype, name="bn")(x))


def _avg_pool_same(x):
    """3x3 stride-1 average pool over the unpadded neighbours (TensorFlow's, FIDInception*)."""
    return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x, stride: int = 2, padding: int = 0):
    return nn.max_pool(x, (3, 3), (stride, stride), padding=((padding, padding), (padding, padding)))


class InceptionA(nn.Module):
    """`FIDInceptionA` (Mixed_5b..d): 1x1, 5x5, double 3x3 and pool branches."""

    pool_features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = lambda f, k, p=0, name=None: BasicConv(f, k, padding=p, dtype=self.dtype, name=name)  # noqa: E731
        b1 = c(64, 1, name="branch1x1")(x)
        b5 = c(64, 5, 2, name="branch5x5_2")(c(48, 1, name="branch5x5_1")(x))
        b3 = c(64, 1, name="branch3x3dbl_1")(x)
        b3 = c(96, 3, 1, name="branch3x3dbl_3")(c(96, 3, 1, name="branch3x3dbl_2")(b3))
        bp = c(self.pool_features, 1, name="branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """torchvision's `InceptionB` (Mixed_6a): the 35 -> 17 px reduction."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = lambda f, k, s=1, p=0, name=None: BasicConv(f, k, s, p, dtype=self.dtype, name=name)  # noqa: E731
        b3 = c(384, 3, 2, name="branch3x3")(x)
        bd = c(64, 1, name="branch3x3dbl_1")(x)
        bd = c(96, 3, 2, name="branch3x3dbl_3")(c(96, 3, 1, 1, name="branch3x3dbl_2")(bd))
        return jnp.concatenate([b3, bd, _max_pool(x)], axis=-1)


class InceptionC(nn.Module):
    """`FIDInceptionC` (Mixed_6b..e): factorised 7x7 branches (1x7 then 7x1) and a pool branch."""

    channels_7x7: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = lambda f, k, p=0, name=None: BasicConv(f, k, padding=p, dtype=self.dtype, name=name)  # noqa: E731
        c7 = self.channels_7x7
        row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, padding) of a 1x7 and a 7x1 conv.
        b1 = c(192, 1, name="branch1x1")(x)
        b7 = c(c7, 1, name="branch7x7_1")(x)
        b7 = c(c7, *row, name="branch7x7_2")(b7)
        b7 = c(192, *col, name="branch7x7_3")(b7)
        bd = c(c7, 1, name="branch7x7dbl_1")(x)
        bd = c(c7, *col, name="branch7x7dbl_2")(bd)
        bd = c(c7, *row, name="branch7x7dbl_3")(bd)
        bd = c(c7, *col, name="branch7x7dbl_4")(bd)
        bd = c(192, *row, name="branch7x7dbl_5")(bd)
        bp = c(192, 1, name="branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """torchvision's `InceptionD` (Mixed_7a): the 17 -> 8 px reduction."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = lambda f, k, s=1, p=0, name=None: BasicConv(f, k, s, p, dtype=self.dtype, name=name)  # noqa: E731
        b3 = c(320, 3, 2, name="branch3x3_2")(c(192, 1, name="branch3x3_1")(x))
        b7 = c(192, 1, name="branch7x7x3_1")(x)
        b7 = c(192, (1, 7), 1, (0, 3), name="branch7x7x3_2")(b7)
        b7 = c(192, (7, 1), 1, (3, 0), name="branch7x7x3_3")(b7)
        b7 = c(192, 3, 2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool(x)], axis=-1)


class InceptionE(nn.Module):
    """`FIDInceptionE_1` (Mixed_7b, average pool without padding) or `FIDInceptionE_2` (Mixed_7c,
    max pool): 1x1, split 3x3 and split double-3x3 branches."""

    max_pool: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = lambda f, k, p=0, name=None: BasicConv(f, k, padding=p, dtype=self.dtype, name=name)  # noqa: E731
        b1 = c(320, 1, name="branch1x1")(x)
        b3 = c(384, 1, name="branch3x3_1")(x)
        b3 = jnp.concatenate([c(384, (1, 3), (0, 1), name="branch3x3_2a")(b3),
                              c(384, (3, 1), (1, 0), name="branch3x3_2b")(b3)], axis=-1)
        bd = c(448, 1, name="branch3x3dbl_1")(x)
        bd = c(384, 3, 1, name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([c(384, (1, 3), (0, 1), name="branch3x3dbl_3a")(bd),
                              c(384, (3, 1), (1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
        pooled = _max_pool(x, stride=1, padding=1) if self.max_pool else _avg_pool_same(x)
        bp = c(192, 1, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def preprocess(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
    """Pixels in [0, 1] (float [B, H, W, 3], any H, W) -> the network's input [B, size, size, 3].

    Bilinear resize as `torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`
    (half-pixel centres, no antialiasing, also when shrinking), then [0, 1] -> [-1, 1].
    """
    x = images.astype(jnp.float32)
    if x.shape[1:3] != (size, size):
        x = jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), "bilinear", antialias=False)
    return 2.0 * x - 1.0


@functools.lru_cache(maxsize=1)
def param_shapes() -> dict[str, tuple[int, ...]]:
    """{"Mixed_5b/branch1x1/conv/kernel": shape, ...}: every param of `InceptionV3` (nothing allocated)."""
    from flax import traverse_util

    boxed = jax.eval_shape(lambda: InceptionV3().init(jax.random.key(0), jnp.zeros((1, 75, 75, 3)))["params"])
    flat = traverse_util.flatten_dict(nn.meta.unbox(boxed), sep="/")
    return {k: tuple(v.shape) for k, v in flat.items()}


class InceptionV3(nn.Module):
    """pytorch-fid's FID InceptionV3 up to pool3: pixels in [0, 1] [B, H, W, 3] -> [B, 2048].

    `resize_input=False` skips the resize (the input must then be 299 px for the published
    statistics to mean anything; any size >= 75 px runs)."""

    resize_input: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images):
        x = preprocess(images) if self.resize_input else 2.0 * images.astype(jnp.float32) - 1.0
        x = nn.with_logical_constraint(x.astype(self.dtype), ("act_batch", None, None, None))
        c = lambda f, k, s=1, p=0, name=None: BasicConv(f, k, s, p, dtype=self.dtype, name=name)  # noqa: E731
        # Block 0: to the first max pool.
        x = c(32, 3, 2, name="Conv2d_1a_3x3")(x)
        x = c(32, 3, name="Conv2d_2a_3x3")(x)
        x = _max_pool(c(64, 3, 1, 1, name="Conv2d_2b_3x3")(x))
        # Block 1: to the second max pool.
        x = c(80, 1, name="Conv2d_3b_1x1")(x)
        x = _max_pool(c(192, 3, name="Conv2d_4a_3x3")(x))
        # Block 2: 35 px, then 17 px mixed blocks.
        x = InceptionA(32, self.dtype, name="Mixed_5b")(x)
        x = InceptionA(64, self.dtype, name="Mixed_5c")(x)
        x = InceptionA(64, self.dtype, name="Mixed_5d")(x)
        x = InceptionB(self.dtype, name="Mixed_6a")(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = InceptionC(c7, self.dtype, name=name)(x)
        # Block 3: 8 px, then the global average pool (pool3).
        x = InceptionD(self.dtype, name="Mixed_7a")(x)
        x = InceptionE(False, self.dtype, name="Mixed_7b")(x)
        x = InceptionE(True, self.dtype, name="Mixed_7c")(x)
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        return nn.with_logical_constraint(x, ("act_batch", None))
