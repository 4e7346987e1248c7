"""The upsamplers' training-data transforms: crops, resizing, blur, BSR degradation."""
import math

import numpy as np
import pytest

from unclip_jax.data import degradations as deg
from unclip_jax.data import shapes


def _random_image(h, w, c=3, seed=0, dtype=np.uint8):
    image = np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)
    if dtype == np.uint8:
        return image
    return (image.astype(dtype) / 127.5 - 1).astype(dtype)


def _shapes_image(index, side=128):
    return shapes.example(0, "train", index, side)["image"]


def _psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * math.log10(255.0 ** 2 / max(mse, 1e-12))


# --- example_rng ----------------------------------------------------------------------------------

def test_example_rng_is_pinned_and_separates_examples():
    # Pinned values: the per-example stream must not change between versions or machines.
    assert deg.example_rng(0, 0).integers(0, 2 ** 31, 4).tolist() == [
        1836959827, 1474964957, 41415395, 1746467418]
    assert deg.example_rng(7, 123).integers(0, 2 ** 31, 4).tolist() == [
        1410980457, 26744546, 715177239, 1460322341]
    draws = {tuple(deg.example_rng(s, i, k).integers(0, 2 ** 31, 2).tolist())
             for s in range(3) for i in range(3) for k in range(2)}
    assert len(draws) == 18
    # Not the shapes renderer's stream for the same (seed, index).
    shapes_rng = np.random.default_rng(np.random.SeedSequence([0, 0, 0]))
    assert shapes_rng.integers(0, 2 ** 31, 4).tolist() != [
        1836959827, 1474964957, 41415395, 1746467418]


@pytest.mark.parametrize("kwargs,name", [({"seed": -1, "index": 0}, "seed"),
                                         ({"seed": 0, "index": 1.5}, "index"),
                                         ({"seed": 0, "index": 0, "stream": -2}, "stream")])
def test_example_rng_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        deg.example_rng(**kwargs)


# --- crops ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("h,w,c,size", [(32, 32, 3, 8), (48, 64, 3, 16), (40, 24, 1, 24),
                                        (17, 9, 4, 9)])
def test_random_crop_shape_and_content(h, w, c, size):
    image = _random_image(h, w, c)
    crop = deg.random_crop(image, size, 3)
    assert crop.shape == (size, size, c) and crop.dtype == image.dtype
    matches = [(t, l) for t in range(h - size + 1) for l in range(w - size + 1)
               if np.array_equal(image[t:t + size, l:l + size], crop)]
    assert len(matches) == 1


def test_random_crop_is_deterministic_and_varies_with_the_seed():
    image = _random_image(64, 48)
    a = deg.random_crop(image, 16, deg.example_rng(1, 2))
    b = deg.random_crop(image, 16, deg.example_rng(1, 2))
    assert a.tobytes() == b.tobytes()
    assert np.array_equal(deg.random_crop(image, 16, 5), deg.random_crop(image, 16, 5))
    crops = {deg.random_crop(image, 16, seed).tobytes() for seed in range(10)}
    assert len(crops) > 5


def test_random_crop_of_the_whole_image_is_the_image():
    image = _random_image(20, 20, dtype=np.float32)
    assert np.array_equal(deg.random_crop(image, 20, 0), image)


def test_random_crop_errors():
    with pytest.raises(ValueError, match="size=33 is larger than the image"):
        deg.random_crop(_random_image(32, 40), 33, 0)
    with pytest.raises(ValueError, match="size"):
        deg.random_crop(_random_image(32, 32), 0, 0)
    with pytest.raises(ValueError, match="image must be"):
        deg.random_crop(np.zeros((32, 32), np.uint8), 8, 0)
    with pytest.raises(ValueError, match="rng"):
        deg.random_crop(_random_image(32, 32), 8, "seed")
    with pytest.raises(ValueError, match="rng"):
        deg.random_crop(_random_image(32, 32), 8, -1)


@pytest.mark.parametrize("h,w,scale,high_size", [(16, 16, 4, 32), (12, 20, 4, 16), (9, 7, 2, 6)])
def test_paired_crop_of_a_checkerboard_lines_up_with_its_exact_downsample(h, w, scale, high_size):
    # Each low-res pixel is a distinct colour block of the high-res image, so its exact
    # downsample (box average) is the low-res image and any misalignment shows.
    low = _random_image(h, w, seed=1)
    high = np.kron(low, np.ones((scale, scale, 1), np.uint8))
    assert np.array_equal(deg.downsample(high, scale, "area"), low)
    for seed in range(5):
        high_crop, low_crop = deg.paired_random_crop(high, low, high_size, scale, seed)
        assert high_crop.shape == (high_size, high_size, 3)
        assert low_crop.shape == (high_size // scale, high_size // scale, 3)
        assert np.array_equal(high_crop, np.kron(low_crop, np.ones((scale, scale, 1), np.uint8)))
        assert np.array_equal(deg.downsample(high_crop, scale, "area"), low_crop)
    a = deg.paired_random_crop(high, low, high_size, scale, deg.example_rng(0, 1))
    b = deg.paired_random_crop(high, low, high_size, scale, deg.example_rng(0, 1))
    assert all(x.tobytes() == y.tobytes() for x, y in zip(a, b))


def test_paired_crop_errors():
    low, high = _random_image(8, 8), _random_image(32, 32)
    with pytest.raises(ValueError, match="times scale=2"):
        deg.paired_random_crop(high, low, 16, 2, 0)
    with pytest.raises(ValueError, match="high_size=10 must be divisible by scale=4"):
        deg.paired_random_crop(high, low, 10, 4, 0)
    with pytest.raises(ValueError, match="high_size=36 is larger"):
        deg.paired_random_crop(high, low, 36, 4, 0)
    with pytest.raises(ValueError, match="low must be"):
        deg.paired_random_crop(high, low[..., 0], 16, 4, 0)


# --- downsample -----------------------------------------------------------------------------------

@pytest.mark.parametrize("method", deg.METHODS)
@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64])
@pytest.mark.parametrize("h,w,c,factor", [(32, 32, 3, 4), (24, 40, 3, 2), (12, 18, 1, 3)])
def test_downsample_shape_dtype_and_range(method, dtype, h, w, c, factor):
    image = _random_image(h, w, c, dtype=dtype)
    out = deg.downsample(image, factor, method)
    assert out.shape == (h // factor, w // factor, c) and out.dtype == dtype
    if dtype != np.uint8:
        assert out.min() >= -1 and out.max() <= 1


def test_downsample_uint8_and_float_agree_and_factor_one_is_identity():
    image = _random_image(32, 48)
    as_float = image.astype(np.float32) / 127.5 - 1
    small = deg.downsample(image, 4).astype(np.float32)
    small_float = (deg.downsample(as_float, 4) + 1) * 127.5
    assert np.abs(small - small_float).max() <= 1.0
    assert np.array_equal(deg.downsample(image, 1), image)
    constant = np.full((16, 24, 3), 77, np.uint8)
    for method in deg.METHODS:
        assert (deg.downsample(constant, 4, method) == 77).all()


def test_downsample_errors():
    with pytest.raises(ValueError, match=r"\(30, 32\) must be divisible by factor=4"):
        deg.downsample(_random_image(30, 32), 4)
    with pytest.raises(ValueError, match="method='lanczos'"):
        deg.downsample(_random_image(32, 32), 2, "lanczos")
    with pytest.raises(ValueError, match="factor"):
        deg.downsample(_random_image(32, 32), 0)
    with pytest.raises(ValueError, match="uint8 or float"):
        deg.downsample(np.zeros((8, 8, 3), np.int32), 2)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        deg.downsample(np.full((8, 8, 3), 255.0, np.float32), 2)


# --- Gaussian blur --------------------------------------------------------------------------------

def test_gaussian_kernel_matches_the_closed_form():
    kernel = deg.gaussian_kernel(3, 0.6)
    side = math.exp(-1 / (2 * 0.6 ** 2))
    np.testing.assert_allclose(kernel, np.array([side, 1, side]) / (1 + 2 * side), rtol=1e-12)
    np.testing.assert_allclose(kernel, [0.16637851, 0.66724298, 0.16637851], rtol=1e-6)
    for size, sigma in [(1, 1.0), (5, 0.3), (7, 2.0), (21, 5.0)]:
        k = deg.gaussian_kernel(size, sigma)
        assert k.shape == (size,) and abs(k.sum() - 1) < 1e-12 and np.allclose(k, k[::-1])
        assert np.argmax(k) == size // 2


def test_anisotropic_kernel():
    g = deg.gaussian_kernel(7, 1.2)
    np.testing.assert_allclose(deg.anisotropic_gaussian_kernel(7, 1.2, 1.2, 0.4), np.outer(g, g),
                               atol=1e-12)
    wide = deg.anisotropic_gaussian_kernel(9, 3.0, 0.5, 0.0)  # spread along x (columns)
    assert abs(wide.sum() - 1) < 1e-12
    assert wide[4, 0] > wide[0, 4]
    np.testing.assert_allclose(deg.anisotropic_gaussian_kernel(9, 3.0, 0.5, math.pi / 2), wide.T,
                               atol=1e-12)


def test_gaussian_kernel_errors():
    with pytest.raises(ValueError, match="size must be an odd integer"):
        deg.gaussian_kernel(4, 1.0)
    with pytest.raises(ValueError, match="sigma must be a positive number"):
        deg.gaussian_kernel(3, 0.0)
    with pytest.raises(ValueError, match="kernel_size"):
        deg.gaussian_blur(_random_image(8, 8), 0.6, 2)
    with pytest.raises(ValueError, match="theta"):
        deg.anisotropic_gaussian_kernel(3, 1.0, 1.0, float("nan"))


@pytest.mark.parametrize("shape", [(32, 32, 3), (24, 40, 3), (1, 1, 3), (2, 5, 1), (2, 16, 8, 3)])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_blur_of_a_constant_image_is_the_constant(shape, dtype):
    value = 200 if dtype == np.uint8 else 0.3
    image = np.full(shape, value, dtype)
    out = deg.gaussian_blur(image)
    assert out.shape == shape and out.dtype == dtype
    if dtype == np.uint8:
        assert (out == value).all()
    else:
        np.testing.assert_allclose(out, value, atol=1e-6)


def test_blur_of_an_impulse_is_the_kernel_and_channels_stay_apart():
    image = np.zeros((7, 9, 3), np.float32)
    image[3, 4, 1] = 1.0
    out = deg.gaussian_blur(image, 0.6, 3)
    k = deg.gaussian_kernel(3, 0.6)
    np.testing.assert_allclose(out[2:5, 3:6, 1], np.outer(k, k), atol=1e-7)
    assert out[..., 1].sum() == pytest.approx(1.0, abs=1e-6)
    assert (out[..., 0] == 0).all() and (out[..., 2] == 0).all()
    wide = deg.gaussian_blur(image, 1.5, 5)
    assert wide[3, 4, 1] < out[3, 4, 1]


# --- BSR degradation ------------------------------------------------------------------------------

@pytest.mark.parametrize("h,w,scale", [(128, 128, 4), (64, 96, 4), (32, 48, 2), (64, 64, 8),
                                       (16, 24, 1), (4, 8, 4)])
def test_bsr_shape_and_dtype(h, w, scale):
    image = _random_image(h, w)
    for seed in range(4):
        out = deg.bsr_degrade(image, scale, seed)
        assert out.shape == (h // scale, w // scale, 3) and out.dtype == np.uint8


def test_bsr_is_deterministic_and_varies_with_the_seed():
    image = _shapes_image(3)
    a = deg.bsr_degrade(image, 4, deg.example_rng(0, 3))
    b = deg.bsr_degrade(image, 4, deg.example_rng(0, 3))
    assert a.tobytes() == b.tobytes()
    assert deg.bsr_degrade(image, 4, 11).tobytes() == deg.bsr_degrade(image, 4, 11).tobytes()
    outputs = {deg.bsr_degrade(image, 4, deg.example_rng(0, i)).tobytes() for i in range(6)}
    assert len(outputs) == 6


def test_bsr_differs_from_plain_downsample_but_stays_close():
    for index in range(8):
        image = _shapes_image(index)
        plain = deg.downsample(image, 4, "bicubic")
        out = deg.bsr_degrade(image, 4, deg.example_rng(0, index))
        assert not np.array_equal(out, plain)
        assert _psnr(out, plain) > 15.0, index
        assert np.corrcoef(out.ravel().astype(float), plain.ravel().astype(float))[0, 1] > 0.8


def test_bsr_with_every_random_step_off_is_the_plain_downsample():
    image = _shapes_image(5)
    out = deg.bsr_degrade(image, 4, 0, two_stage_prob=0.0, blur_sigma_range=(1e-3, 1e-3),
                          resize_prob=1.0, resize_max_factor=0.25, noise_level_range=(0, 0),
                          jpeg_prob=0.0, final_jpeg=False, methods=("bicubic",))
    plain = deg.downsample(image, 4, "bicubic").astype(int)
    assert np.abs(out.astype(int) - plain).max() <= 1


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_bsr_strided_downsampling_is_centred_on_the_area_grid(scale):
    # A linear ramp: a symmetric blur sampled at each block's centre equals the block average.
    h = w = 12 * scale
    ramp = np.add.outer(np.arange(h) * 2.0, np.arange(w) * 1.0)
    image = np.repeat(np.rint(ramp * 100 / ramp.max() + 60)[..., None], 3, -1).astype(np.uint8)
    out = deg.bsr_degrade(image, scale, 1, two_stage_prob=0.0, blur_sigma_range=(1e-3, 1e-3),
                          resize_prob=0.0, strided_sigma_range=(0.3, 0.3),
                          noise_level_range=(0, 0), jpeg_prob=0.0, final_jpeg=False,
                          methods=("area",))
    area = deg.downsample(image, scale, "area").astype(int)
    inner = slice(2, -2)  # away from the reflect-padded border
    assert np.abs(out[inner, inner].astype(int) - area[inner, inner]).max() <= 1


@pytest.mark.parametrize("kwargs,match", [
    ({"two_stage_prob": 1.5}, "two_stage_prob must be a probability"),
    ({"jpeg_prob": -0.1}, "jpeg_prob"),
    ({"blur_kernel_size_range": (4, 8)}, "blur_kernel_size_range must hold odd sizes"),
    ({"blur_sigma_range": (2.0, 1.0)}, "blur_sigma_range must be a pair"),
    ({"blur_sigma_range": (0.0, 1.0)}, "blur_sigma_range must be positive"),
    ({"noise_level_range": (1.5, 3)}, "noise_level_range must be a pair"),
    ({"jpeg_quality_range": (50, 101)}, "jpeg_quality_range must lie in"),
    ({"resize_max_factor": 0}, "resize_max_factor"),
    ({"methods": ("bicubic", "lanczos")}, "methods='lanczos'"),
    ({"methods": "bicubic"}, "methods must be a non-empty sequence"),
])
def test_bsr_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        deg.bsr_degrade(_random_image(32, 32), 4, 0, **kwargs)


def test_bsr_rejects_bad_images():
    with pytest.raises(ValueError, match="image_hr height and width"):
        deg.bsr_degrade(_random_image(30, 32), 4, 0)
    with pytest.raises(ValueError, match="image_hr must be uint8"):
        deg.bsr_degrade(_random_image(32, 32, dtype=np.float32), 4, 0)
    with pytest.raises(ValueError, match="image_hr must be uint8"):
        deg.bsr_degrade(_random_image(32, 32, 1), 4, 0)
    with pytest.raises(ValueError, match="scale"):
        deg.bsr_degrade(_random_image(32, 32), 0, 0)


# --- corrupt_low_res and crop_and_corrupt ---------------------------------------------------------

@pytest.mark.parametrize("h,w,scale", [(128, 128, 4), (32, 64, 4), (18, 12, 3)])
def test_corrupt_low_res_kinds(h, w, scale):
    image = _random_image(h, w)
    plain = deg.downsample(image, scale, "bicubic")
    for kind in deg.KINDS:
        out = deg.corrupt_low_res(image, scale, kind, 0)
        assert out.shape == (h // scale, w // scale, 3) and out.dtype == np.uint8
    assert np.array_equal(deg.corrupt_low_res(image, scale, "none"), plain)
    blurred = deg.corrupt_low_res(image, scale, "blur")
    assert np.array_equal(blurred, deg.gaussian_blur(plain, 0.6, 3))
    assert not np.array_equal(blurred, plain)
    assert np.array_equal(deg.corrupt_low_res(image, scale, "bsr", 5, final_jpeg=False),
                          deg.bsr_degrade(image, scale, 5, final_jpeg=False))


def test_corrupt_low_res_errors():
    image = _random_image(32, 32)
    with pytest.raises(ValueError, match="kind='sharpen'"):
        deg.corrupt_low_res(image, 4, "sharpen", 0)
    with pytest.raises(ValueError, match="needs rng"):
        deg.corrupt_low_res(image, 4, "bsr")
    with pytest.raises(ValueError, match="only to kind='bsr'"):
        deg.corrupt_low_res(image, 4, "blur", 0, jpeg_prob=0.5)
    with pytest.raises(ValueError, match="divisible by scale=3"):
        deg.corrupt_low_res(image, 3, "none")


@pytest.mark.parametrize("kind", deg.KINDS)
def test_crop_and_corrupt(kind):
    image = _shapes_image(1)
    high, low = deg.crop_and_corrupt(image, 32, 4, kind, deg.example_rng(2, 9))
    assert high.shape == (32, 32, 3) and low.shape == (8, 8, 3)
    assert high.dtype == low.dtype == np.uint8
    rng = deg.example_rng(2, 9)
    expected_high = deg.random_crop(image, 32, rng)
    assert np.array_equal(high, expected_high)
    assert np.array_equal(low, deg.corrupt_low_res(expected_high, 4, kind, rng))
    again = deg.crop_and_corrupt(image, 32, 4, kind, deg.example_rng(2, 9))
    assert high.tobytes() == again[0].tobytes() and low.tobytes() == again[1].tobytes()


def test_crop_and_corrupt_errors():
    with pytest.raises(ValueError, match="crop_size=30 must be divisible by scale=4"):
        deg.crop_and_corrupt(_random_image(64, 64), 30, 4, "blur", 0)
    with pytest.raises(ValueError, match="kind='jpeg'"):
        deg.crop_and_corrupt(_random_image(64, 64), 32, 4, "jpeg", 0)
    with pytest.raises(ValueError, match="crop size=96"):
        deg.crop_and_corrupt(_random_image(64, 64), 96, 4, "blur", 0)
