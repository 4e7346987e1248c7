"""Training-data transforms of the upsamplers: random crops and corruptions of the low-res input.

unCLIP's two upsamplers [P §2.1, App. C] train on random crops one fourth of the target side,
conditioned on a corrupted low-resolution version of the crop:

- 64->256 (on the shapes data 32->128): Gaussian blur, kernel 3, sigma 0.6
  (`corrupt_low_res(kind="blur")`);
- 256->1024: BSR degradation (Zhang et al. 2021, "Designing a Practical Degradation Model for Deep
  Blind Image Super-Resolution", as used by Rombach et al. 2022) (`corrupt_low_res(kind="bsr")`).

Everything here runs on the host (grain map functions), uses numpy and Pillow only, and is a pure
function of its inputs and a numpy `Generator` (or an integer seed). Derive one generator per
example with `example_rng(seed, index)` so that the stream is reproducible and a resumed run draws
the same crops and corruptions. A passed `Generator` is advanced (its draws are consumed).

Images are `[height, width, channels]` (HWC), uint8 in [0, 255] or float in [-1, 1]. Outputs are
bit-identical for the same inputs with the same numpy and Pillow versions (JPEG goes through
Pillow's bundled libjpeg).
"""
from __future__ import annotations

import io
import math
import numbers
from typing import Sequence, Union

import numpy as np
from PIL import Image

from unclip_jax.data.checks import checked_int

RngLike = Union[np.random.Generator, int]

KINDS = ("blur", "bsr", "none")
_RESAMPLING = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "area": Image.Resampling.BOX,  # Pillow's box filter averages the covered input area
    "nearest": Image.Resampling.NEAREST,
}
METHODS = tuple(_RESAMPLING)
# The conditioning blur of the 64->256 upsampler [P App. C].
BLUR_SIGMA = 0.6
BLUR_KERNEL_SIZE = 3
# Mixes into every per-example seed so these streams never coincide with other
# SeedSequence([seed, ...]) streams of the project (e.g. the shapes renderer's).
_EXAMPLE_RNG_TAG = 0x55505352  # "UPSR"
_FLOAT_TOLERANCE = 1e-3


# ------------------------------------------------------------------------------------------------
# Random generators
# ------------------------------------------------------------------------------------------------

def example_rng(seed: int, index: int, stream: int = 0) -> np.random.Generator:
    """The generator of example `index` under `seed`: the same stream on any machine.

    A PCG64 generator seeded by `SeedSequence([tag, seed, index, stream])`; `stream` separates
    independent uses of the same example (e.g. 0 for training crops, 1 for evaluation).
    All three must be non-negative integers.
    """
    seed = checked_int("seed", seed)
    index = checked_int("index", index)
    stream = checked_int("stream", stream)
    return np.random.Generator(np.random.PCG64(
        np.random.SeedSequence([_EXAMPLE_RNG_TAG, seed, index, stream])))


def _as_rng(rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, numbers.Integral) and not isinstance(rng, bool) and rng >= 0:
        return np.random.default_rng(np.random.SeedSequence(int(rng)))
    raise ValueError(f"rng must be a numpy Generator or a non-negative integer seed, got {rng!r}")


# ------------------------------------------------------------------------------------------------
# Argument checks
# ------------------------------------------------------------------------------------------------

def _check_image(image, name: str = "image", *, uint8_only: bool = False,
                 channels: int | None = None, batched: bool = False) -> np.ndarray:
    """`image` as an array [H, W, C] (or [..., H, W, C] if `batched`), uint8 or float in [-1, 1]."""
    image = np.asarray(image)
    dtypes = "uint8" if uint8_only else "uint8 or float"
    layout = "[..., height, width, channels]" if batched else "[height, width, channels]"
    if channels is not None:
        layout = layout.replace("channels", str(channels))
    is_float = np.issubdtype(image.dtype, np.floating)
    ok_dtype = image.dtype == np.uint8 or (not uint8_only and is_float)
    ok_ndim = image.ndim >= 3 if batched else image.ndim == 3
    if not (ok_dtype and ok_ndim and image.size > 0) or (
            channels is not None and image.shape[-1] != channels):
        raise ValueError(f"{name} must be {dtypes} {layout}, got {image.dtype} {list(image.shape)}")
    if image.dtype != np.uint8:
        low, high = float(np.min(image)), float(np.max(image))
        if not (-1 - _FLOAT_TOLERANCE <= low and high <= 1 + _FLOAT_TOLERANCE):
            raise ValueError(f"{name}: float images must lie in [-1, 1], got values in "
                             f"[{low:.4g}, {high:.4g}]")
    return image


def _check_divisible(name: str, image: np.ndarray, factor: int, factor_name: str) -> None:
    h, w = image.shape[-3:-1]
    if h % factor or w % factor:
        raise ValueError(f"{name} height and width ({h}, {w}) must be divisible by "
                         f"{factor_name}={factor}")


def _check_method(name: str, method: str) -> str:
    if method not in _RESAMPLING:
        raise ValueError(f"{name}={method!r}: expected one of {METHODS}")
    return method


def _check_probability(name: str, p) -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
    return float(p)


def _check_range(name: str, value, minimum: float, *, integer: bool = False) -> tuple:
    """`value` as a (low, high) pair with minimum <= low <= high."""
    try:
        low, high = value
        ok = all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in (low, high))
        ok = ok and (not integer or all(isinstance(v, numbers.Integral) for v in (low, high)))
    except (TypeError, ValueError):
        ok = False
    if not ok or not minimum <= low <= high:
        kind = "integers" if integer else "numbers"
        raise ValueError(f"{name} must be a pair (low, high) of {kind} with {minimum} <= low <= "
                         f"high, got {value!r}")
    return (int(low), int(high)) if integer else (float(low), float(high))


def _check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _check_kernel_size(name: str, size) -> int:
    size = checked_int(name, size, 1)
    if size % 2 == 0:
        raise ValueError(f"{name} must be an odd integer >= 1, got {size}")
    return size


# ------------------------------------------------------------------------------------------------
# Crops
# ------------------------------------------------------------------------------------------------

def random_crop(image: np.ndarray, size: int, rng: RngLike) -> np.ndarray:
    """A uniformly placed `size` x `size` crop of image [H, W, C] (any dtype) -> [size, size, C]."""
    image = np.asarray(image)
    if image.ndim != 3 or image.size == 0:
        raise ValueError(f"image must be [height, width, channels], got {list(image.shape)}")
    size = checked_int("size", size, 1)
    h, w = image.shape[:2]
    if size > min(h, w):
        raise ValueError(f"crop size={size} is larger than the image ({h} x {w})")
    rng = _as_rng(rng)
    top = int(rng.integers(0, h - size + 1))
    left = int(rng.integers(0, w - size + 1))
    return image[top:top + size, left:left + size].copy()


def paired_random_crop(high: np.ndarray, low: np.ndarray, high_size: int, scale: int,
                       rng: RngLike) -> tuple[np.ndarray, np.ndarray]:
    """The same region cropped from a high-res image and its low-res version.

    high: [h * scale, w * scale, C_high]; low: [h, w, C_low] (any dtypes). The crop is placed on the
    low-res pixel grid, so the low-res box is exactly the high-res box divided by `scale`.
    Returns (high [high_size, high_size, C_high],
             low [high_size / scale, high_size / scale, C_low]).
    When the low-res input is derived from the crop itself, use `random_crop` then
    `corrupt_low_res` (or `crop_and_corrupt`).
    """
    high, low = np.asarray(high), np.asarray(low)
    for name, image in (("high", high), ("low", low)):
        if image.ndim != 3 or image.size == 0:
            raise ValueError(f"{name} must be [height, width, channels], got {list(image.shape)}")
    scale = checked_int("scale", scale, 1)
    high_size = checked_int("high_size", high_size, 1)
    h, w = low.shape[:2]
    if high.shape[:2] != (h * scale, w * scale):
        raise ValueError(f"high is {list(high.shape[:2])} but low {list(low.shape[:2])} times "
                         f"scale={scale} is {[h * scale, w * scale]}")
    if high_size % scale:
        raise ValueError(f"high_size={high_size} must be divisible by scale={scale}")
    low_size = high_size // scale
    if low_size > min(h, w):
        raise ValueError(f"crop high_size={high_size} is larger than high ({h * scale} x "
                         f"{w * scale})")
    rng = _as_rng(rng)
    top = int(rng.integers(0, h - low_size + 1))
    left = int(rng.integers(0, w - low_size + 1))
    low_crop = low[top:top + low_size, left:left + low_size].copy()
    high_crop = high[top * scale:(top + low_size) * scale,
                     left * scale:(left + low_size) * scale].copy()
    return high_crop, low_crop


# ------------------------------------------------------------------------------------------------
# Resizing and filtering (internal helpers work on float arrays [..., H, W, C])
# ------------------------------------------------------------------------------------------------

def _resize(x: np.ndarray, height: int, width: int, method: str) -> np.ndarray:
    """Pillow resize of float32 [H, W, C], channel by channel in mode "F" (no uint8 rounding)."""
    if x.shape[:2] == (height, width):
        return x
    resample = _RESAMPLING[method]
    channels = [np.asarray(Image.fromarray(np.ascontiguousarray(x[..., c], np.float32))
                           .resize((width, height), resample=resample), np.float32)
                for c in range(x.shape[2])]
    return np.stack(channels, axis=-1)


def _to_float(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32)


def _to_dtype(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if dtype == np.uint8:
        return np.clip(np.rint(x), 0, 255).astype(np.uint8)
    return np.clip(x, -1.0, 1.0).astype(dtype)


def downsample(image: np.ndarray, factor: int, method: str = "bicubic") -> np.ndarray:
    """Image [H, W, C] -> [H / factor, W / factor, C] with Pillow's antialiased filters.

    method: "bicubic", "bilinear", "area" (box average) or "nearest". uint8 in, uint8 out (rounded);
    float in [-1, 1] in, the same float dtype out (clipped to [-1, 1]: bicubic can overshoot).
    H and W must be divisible by `factor`.
    """
    image = _check_image(image)
    factor = checked_int("factor", factor, 1)
    _check_method("method", method)
    _check_divisible("image", image, factor, "factor")
    h, w = image.shape[:2]
    out = _resize(_to_float(image), h // factor, w // factor, method)
    return _to_dtype(out, image.dtype)


def gaussian_kernel(size: int, sigma: float) -> np.ndarray:
    """The normalised 1-D Gaussian kernel [size]: exp(-x^2 / (2 sigma^2)), x = -size//2..size//2."""
    size = _check_kernel_size("size", size)
    sigma = _check_positive("sigma", sigma)
    x = np.arange(size, dtype=np.float64) - size // 2
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def anisotropic_gaussian_kernel(size: int, sigma_x: float, sigma_y: float,
                                theta: float = 0.0) -> np.ndarray:
    """The normalised 2-D Gaussian kernel [size, size] with standard deviations `sigma_x`, `sigma_y`
    along its principal axes, the first rotated by `theta` radians from the x (column) axis."""
    size = _check_kernel_size("size", size)
    sigma_x = _check_positive("sigma_x", sigma_x)
    sigma_y = _check_positive("sigma_y", sigma_y)
    if isinstance(theta, bool) or not isinstance(theta, numbers.Real) or not math.isfinite(theta):
        raise ValueError(f"theta must be a finite number of radians, got {theta!r}")
    c, s = math.cos(theta), math.sin(theta)
    rotation = np.array([[c, -s], [s, c]])
    covariance = rotation @ np.diag([sigma_x ** 2, sigma_y ** 2]) @ rotation.T
    return _gaussian_kernel_2d(size, covariance)


def _gaussian_kernel_2d(size: int, covariance: np.ndarray, shift: float = 0.0) -> np.ndarray:
    """Normalised kernel [size, size] of N(mean=(shift, shift), covariance), (x, y) coordinates."""
    r = np.arange(size, dtype=np.float64) - size // 2 - shift
    y, x = np.meshgrid(r, r, indexing="ij")
    points = np.stack([x, y], axis=-1)
    precision = np.linalg.inv(covariance)
    kernel = np.exp(-0.5 * np.einsum("...i,ij,...j->...", points, precision, points))
    return kernel / kernel.sum()


def _correlate_axis(x: np.ndarray, kernel: np.ndarray, axis: int) -> np.ndarray:
    """Correlation of float x with a 1-D kernel along `axis`, reflect padding (d c b | a b c d)."""
    radius = len(kernel) // 2
    pad = [(0, 0)] * x.ndim
    pad[axis] = (radius, radius)
    padded = np.pad(x, pad, mode="reflect")
    n = x.shape[axis]
    out = np.zeros_like(x)
    index = [slice(None)] * x.ndim
    for i, weight in enumerate(kernel):
        index[axis] = slice(i, i + n)
        out += weight * padded[tuple(index)]
    return out


def _correlate_2d(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlation of float x [H, W, C] with a kernel [k, k] (k odd), reflect padding."""
    radius = kernel.shape[0] // 2
    padded = np.pad(x, [(radius, radius), (radius, radius), (0, 0)], mode="reflect")
    h, w = x.shape[:2]
    out = np.zeros_like(x)
    for i in range(kernel.shape[0]):
        for j in range(kernel.shape[1]):
            out += kernel[i, j] * padded[i:i + h, j:j + w]
    return out


def _blur(x: np.ndarray, kernel_1d: np.ndarray) -> np.ndarray:
    x = _correlate_axis(x, kernel_1d.astype(x.dtype), axis=x.ndim - 3)
    return _correlate_axis(x, kernel_1d.astype(x.dtype), axis=x.ndim - 2)


def gaussian_blur(image: np.ndarray, sigma: float = BLUR_SIGMA,
                  kernel_size: int = BLUR_KERNEL_SIZE) -> np.ndarray:
    """Separable Gaussian blur of image [..., H, W, C], each channel alone, reflect padding.

    uint8 in, uint8 out (rounded); float in [-1, 1] in, the same dtype out. The defaults are the
    64->256 upsampler's conditioning blur (kernel 3, sigma 0.6).
    """
    image = _check_image(image, batched=True)
    kernel = gaussian_kernel(_check_kernel_size("kernel_size", kernel_size),
                             _check_positive("sigma", sigma))
    return _to_dtype(_blur(_to_float(image), kernel), image.dtype)


# ------------------------------------------------------------------------------------------------
# BSR degradation
# ------------------------------------------------------------------------------------------------

def _jpeg(x: np.ndarray, quality: int) -> np.ndarray:
    """JPEG round trip (Pillow, in memory) of float [H, W, 3] in [0, 1]."""
    buffer = io.BytesIO()
    Image.fromarray(np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)).save(
        buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as img:
        return np.asarray(img.convert("RGB"), np.float32) / 255.0


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3x3 rotation (from a random unit quaternion; no LAPACK involved)."""
    q = rng.standard_normal(4)
    a, b, c, d = q / np.linalg.norm(q)
    return np.array([
        [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
        [2 * (b * c + a * d), a * a - b * b + c * c - d * d, 2 * (c * d - a * b)],
        [2 * (b * d - a * c), 2 * (c * d + a * b), a * a - b * b - c * c + d * d]])


def _odd_in(rng: np.random.Generator, low: int, high: int) -> int:
    """A uniformly random odd integer in [low, high] (both odd)."""
    return 2 * int(rng.integers(low // 2, high // 2 + 1)) + 1


def bsr_degrade(
    image_hr: np.ndarray,
    scale: int,
    rng: RngLike,
    *,
    two_stage_prob: float = 0.25,
    blur_kernel_size_range: tuple[int, int] = (5, 13),
    blur_sigma_range: tuple[float, float] = (0.1, 1.5),
    anisotropic_prob: float = 0.5,
    resize_prob: float = 0.75,
    resize_max_factor: float = 1.5,
    strided_sigma_range: tuple[float, float] = (0.1, 0.6),
    noise_level_range: tuple[int, int] = (1, 12),
    jpeg_prob: float = 0.9,
    jpeg_quality_range: tuple[int, int] = (60, 95),
    final_jpeg: bool = True,
    methods: Sequence[str] = ("bilinear", "bicubic", "area"),
) -> np.ndarray:
    """BSR-style degradation: uint8 [H, W, 3] -> uint8 [H / scale, W / scale, 3].

    In the spirit of Zhang et al. 2021 (BSRGAN; as used by Rombach et al. 2022 for latent diffusion
    and by unCLIP for its 256->1024 upsampler), with moderate default ranges for small images.
    Works in float [0, 1] and clips to [0, 1] after every step. `s` below is the remaining
    scale factor (`scale`, or `scale / 2` after a first-stage halving). Steps:

    1. Two-stage downsampling: if `scale` is even and >= 4, with probability `two_stage_prob`
       the image is first halved (interpolation drawn from `methods`) and s = scale / 2.
    2. Six operations in a random order, except that the random resize (c) always precedes the
       final downsample (d) (the paper's `shuffle_order` with its index swap):
       a. blur, twice (two independent draws): kernel size odd in `blur_kernel_size_range`
          (paper: 7..25); with probability `anisotropic_prob` an anisotropic Gaussian with
          per-axis sigma in `blur_sigma_range` and rotation U[0, pi), else isotropic with sigma in
          `blur_sigma_range` (paper: up to sqrt(4 + s) anisotropic, 2 + 0.2 s isotropic).
       c. random resize: with probability `resize_prob` resize by 1 / f, f ~ U[1, resize_max_factor
          * s] (paper: U[1, 2 s]) with an interpolation drawn from `methods`; otherwise blur with
          a Gaussian of sigma ~ U[lo * s, hi * s] (`strided_sigma_range`) centred half a pixel
          off for even s, then keep every s-th pixel (blur + nearest downsampling, aligned with
          the area grid).
       d. final downsample to exactly H / scale x W / scale, interpolation drawn from `methods`.
       e. Gaussian noise, level ~ U{`noise_level_range`} / 255 (paper: 2..25): with probability
          0.4 the same noise in every channel (grey), 0.4 independent per channel (colour), 0.2
          correlated across channels (covariance level^2 R diag(u) R^T, R a random rotation,
          u ~ U[0, 1)^3).
       f. with probability `jpeg_prob` (paper 0.9) JPEG compression, quality ~
          U{`jpeg_quality_range`} (paper: 30..95).
    3. If `final_jpeg` (paper: always), one more JPEG compression with a fresh quality draw.

    The paper's optional camera-ISP step is left out. H and W must be divisible by `scale`;
    `rng` (a Generator, advanced, or an int seed) makes the result deterministic.
    """
    image_hr = _check_image(image_hr, "image_hr", uint8_only=True, channels=3)
    scale = checked_int("scale", scale, 1)
    _check_divisible("image_hr", image_hr, scale, "scale")
    two_stage_prob = _check_probability("two_stage_prob", two_stage_prob)
    anisotropic_prob = _check_probability("anisotropic_prob", anisotropic_prob)
    resize_prob = _check_probability("resize_prob", resize_prob)
    jpeg_prob = _check_probability("jpeg_prob", jpeg_prob)
    kernel_low, kernel_high = _check_range("blur_kernel_size_range", blur_kernel_size_range, 1,
                                           integer=True)
    if kernel_low % 2 == 0 or kernel_high % 2 == 0:
        raise ValueError(f"blur_kernel_size_range must hold odd sizes, "
                         f"got {blur_kernel_size_range!r}")
    sigma_low, sigma_high = _check_range("blur_sigma_range", blur_sigma_range, 0)
    if sigma_low <= 0:
        raise ValueError(f"blur_sigma_range must be positive, got {blur_sigma_range!r}")
    resize_max_factor = _check_positive("resize_max_factor", resize_max_factor)
    strided_low, strided_high = _check_range("strided_sigma_range", strided_sigma_range, 0)
    if strided_low <= 0:
        raise ValueError(f"strided_sigma_range must be positive, got {strided_sigma_range!r}")
    noise_low, noise_high = _check_range("noise_level_range", noise_level_range, 0, integer=True)
    quality_low, quality_high = _check_range("jpeg_quality_range", jpeg_quality_range, 1,
                                             integer=True)
    if quality_high > 100:
        raise ValueError(f"jpeg_quality_range must lie in [1, 100], got {jpeg_quality_range!r}")
    if isinstance(methods, str) or not methods:
        raise ValueError(f"methods must be a non-empty sequence of {METHODS}, got {methods!r}")
    methods = tuple(_check_method("methods", m) for m in methods)
    rng = _as_rng(rng)

    def method() -> str:
        return methods[int(rng.integers(len(methods)))]

    h, w = image_hr.shape[:2]
    target = (h // scale, w // scale)
    x = image_hr.astype(np.float32) / 255.0
    s = scale

    # 1. Optional first-stage halving.
    if scale >= 4 and scale % 2 == 0 and rng.random() < two_stage_prob:
        x = np.clip(_resize(x, h // 2, w // 2, method()), 0.0, 1.0)
        s = scale // 2

    def blur(x):
        size = _odd_in(rng, kernel_low, kernel_high)
        if rng.random() < anisotropic_prob:
            sx, sy = rng.uniform(sigma_low, sigma_high, size=2)
            theta = rng.uniform(0.0, math.pi)
            kernel = anisotropic_gaussian_kernel(size, sx, sy, theta)
            return _correlate_2d(x, kernel.astype(np.float32))
        return _blur(x, gaussian_kernel(size, rng.uniform(sigma_low, sigma_high)))

    def random_resize(x):
        if rng.random() < resize_prob:
            factor = rng.uniform(1.0, max(1.0, resize_max_factor * s))
            height = max(1, int(round(x.shape[0] / factor)))
            width = max(1, int(round(x.shape[1] / factor)))
            return _resize(x, height, width, method())
        sigma = rng.uniform(strided_low * s, strided_high * s)
        size = 2 * math.ceil(3 * sigma) + 1
        # Pixel s // 2 of each s x s block is kept; a kernel centred at (s - 1) / 2 - s // 2
        # (-0.5 for even s) makes the kept sample sit at the block's centre.
        shift = (s - 1) / 2 - s // 2
        kernel = _gaussian_kernel_2d(size, np.eye(2) * sigma ** 2, shift).astype(np.float32)
        x = _correlate_2d(x, kernel)
        return x[s // 2::s, s // 2::s]

    def noise(x):
        level = int(rng.integers(noise_low, noise_high + 1)) / 255.0
        mode = rng.random()
        if mode < 0.4:  # grey
            return x + level * rng.standard_normal((*x.shape[:2], 1), dtype=np.float32)
        if mode < 0.8:  # colour
            return x + level * rng.standard_normal(x.shape, dtype=np.float32)
        rotation = _random_rotation(rng)
        scales = np.sqrt(rng.random(3))
        z = rng.standard_normal(x.shape, dtype=np.float32)
        return x + level * (z * scales.astype(np.float32)) @ rotation.T.astype(np.float32)

    def jpeg(x):
        if rng.random() < jpeg_prob:
            return _jpeg(x, int(rng.integers(quality_low, quality_high + 1)))
        return x

    operations = {
        "blur": blur,
        "resize": random_resize,
        "downsample": lambda x: _resize(x, *target, method()),
        "noise": noise,
        "jpeg": jpeg,
    }
    # 2. The shuffled operations, the random resize always before the final downsample.
    names = ("blur", "blur", "resize", "downsample", "noise", "jpeg")
    order = [names[i] for i in rng.permutation(len(names))]
    i, j = order.index("resize"), order.index("downsample")
    if i > j:
        order[i], order[j] = order[j], order[i]
    for name in order:
        x = np.clip(operations[name](x), 0.0, 1.0).astype(np.float32)

    # 3. Final JPEG compression.
    if final_jpeg:
        x = _jpeg(x, int(rng.integers(quality_low, quality_high + 1)))
    x = _resize(x, *target, "bicubic")  # a no-op: every path already ends at the target size
    return _to_dtype(x * 255.0, np.uint8)


# ------------------------------------------------------------------------------------------------
# The upsampler's conditioning input
# ------------------------------------------------------------------------------------------------

def corrupt_low_res(image_hr: np.ndarray, scale: int, kind: str = "blur",
                    rng: RngLike | None = None, *, blur_sigma: float = BLUR_SIGMA,
                    blur_kernel_size: int = BLUR_KERNEL_SIZE,
                    **bsr_options) -> np.ndarray:
    """The upsampler's conditioning image: uint8 [H, W, 3] -> uint8 [H / scale, W / scale, 3].

    kind:
      "blur": bicubic downsample by `scale`, then Gaussian blur (kernel `blur_kernel_size`, sigma
        `blur_sigma`; the paper's 3 and 0.6). The blur comes after the downsampling: the paper
        corrupts the low-resolution conditioning image, and a 3-tap sigma-0.6 blur at the high
        resolution would be mostly removed by the antialiased downsample (DALLE2-pytorch's
        LowresConditioner also blurs after downsampling). Deterministic; `rng` is unused.
      "bsr": `bsr_degrade(image_hr, scale, rng, **bsr_options)`; needs `rng`.
      "none": plain bicubic downsample.
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {KINDS}")
    image_hr = _check_image(image_hr, "image_hr", uint8_only=True, channels=3)
    scale = checked_int("scale", scale, 1)
    _check_divisible("image_hr", image_hr, scale, "scale")
    if kind == "bsr":
        if rng is None:
            raise ValueError("kind='bsr' needs rng (a numpy Generator or an integer seed)")
        return bsr_degrade(image_hr, scale, rng, **bsr_options)
    if bsr_options:
        raise ValueError(f"options {sorted(bsr_options)} apply only to kind='bsr', not {kind!r}")
    low = downsample(image_hr, scale, "bicubic")
    if kind == "blur":
        low = gaussian_blur(low, blur_sigma, blur_kernel_size)
    return low


def crop_and_corrupt(image_hr: np.ndarray, crop_size: int, scale: int, kind: str, rng: RngLike,
                     **options) -> tuple[np.ndarray, np.ndarray]:
    """One upsampler training pair: a random crop and its corrupted low-res version.

    image_hr: uint8 [H, W, 3]. Returns (high uint8 [crop_size, crop_size, 3], low uint8
    [crop_size / scale, crop_size / scale, 3]); the low-res input is derived from the crop
    (`corrupt_low_res(crop, scale, kind, rng, **options)`), drawing from the same `rng` after
    the crop position.
    """
    image_hr = _check_image(image_hr, "image_hr", uint8_only=True, channels=3)
    crop_size = checked_int("crop_size", crop_size, 1)
    scale = checked_int("scale", scale, 1)
    if crop_size % scale:
        raise ValueError(f"crop_size={crop_size} must be divisible by scale={scale}")
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {KINDS}")
    rng = _as_rng(rng)
    high = random_crop(image_hr, crop_size, rng)
    return high, corrupt_low_res(high, scale, kind, rng, **options)
