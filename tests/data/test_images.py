"""Image bytes <-> arrays and the resize / centre crop."""
import io

import numpy as np
import pytest
from PIL import Image

from unclip_jax.data import images


def _bytes(img: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt)
    return buffer.getvalue()


def test_png_round_trip():
    array = np.random.default_rng(0).integers(0, 256, (13, 17, 3), dtype=np.uint8)
    data = images.encode_png(array)
    assert data.startswith(b"\x89PNG")
    assert np.array_equal(images.decode_image(data), array)


@pytest.mark.parametrize("mode,fmt", [("L", "PNG"), ("RGBA", "PNG"), ("P", "PNG"),
                                      ("LA", "PNG"), ("1", "PNG"), ("CMYK", "JPEG"),
                                      ("RGB", "WEBP"), ("RGB", "JPEG")])
def test_decode_converts_to_rgb(mode, fmt):
    array = np.random.default_rng(1).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    out = images.decode_image(_bytes(Image.fromarray(array).convert(mode), fmt))
    assert out.shape == (9, 11, 3) and out.dtype == np.uint8


def test_transparent_pixels_become_white():
    rgba = np.zeros((4, 4, 4), np.uint8)  # fully transparent black
    out = images.decode_image(_bytes(Image.fromarray(rgba), "PNG"))
    assert (out == 255).all()


def test_sixteen_bit_grey_is_scaled():
    grey = np.full((4, 4), 65535, np.uint16)
    out = images.decode_image(_bytes(Image.fromarray(grey), "PNG"))
    assert (out == 255).all()


@pytest.mark.parametrize("data", [b"", b"not an image", "text"])
def test_decode_rejects_garbage(data):
    with pytest.raises(ValueError, match="decode"):
        images.decode_image(data)


def test_decode_rejects_truncated_files():
    array = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    data = images.encode_png(array)
    with pytest.raises(ValueError, match="truncated"):
        images.decode_image(data[: len(data) // 2])


def test_resize_center_crop():
    wide = np.zeros((40, 80, 3), np.uint8)
    wide[:, 20:60] = 255  # the centre square
    out = images.resize_center_crop(wide, 20)
    assert out.shape == (20, 20, 3) and out.dtype == np.uint8
    # Only the white centre is left (bicubic lets the black sides bleed into the edge columns).
    assert (out[:, 2:-2] == 255).all() and out.min() > 200
    tall = np.zeros((90, 30, 3), np.uint8)
    assert images.resize_center_crop(tall, 64).shape == (64, 64, 3)  # upsampling too
    same = np.random.default_rng(3).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    assert np.array_equal(images.resize_center_crop(same, 16), same)


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 3), np.float32)])
def test_bad_arrays_are_rejected(bad):
    with pytest.raises(ValueError, match="image"):
        images.encode_png(bad)
    with pytest.raises(ValueError, match="image"):
        images.resize_center_crop(bad, 2)
    with pytest.raises(ValueError, match="side"):
        images.resize_center_crop(np.zeros((4, 4, 3), np.uint8), 0)
