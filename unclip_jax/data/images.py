"""Image bytes <-> arrays, and the resize used by every image pipeline (Pillow, no TensorFlow)."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

from unclip_jax.data.checks import checked_int


def _check_uint8_image(image, name: str = "image") -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 \
            or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"{name} must be uint8 [height, width, 3], got {image.dtype} "
                         f"{list(image.shape)}")
    return image


def check_image_batch(images, *, allow_single: bool = True) -> np.ndarray:
    """uint8 [N, H, W, 3] with N >= 1 (with `allow_single`, a single [H, W, 3] image becomes
    N = 1), with a clear error otherwise."""
    images = np.asarray(images)
    if allow_single and images.ndim == 3:
        images = images[None]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
        raise ValueError(f"images must be uint8 [N, H, W, 3] with N >= 1, got {images.dtype} "
                         f"{list(images.shape)}")
    return images


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of an image uint8 [height, width, 3]."""
    image = _check_uint8_image(image)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB view of any Pillow mode: alpha is composited over white, 16-bit greys scaled to 8."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        grey = np.asarray(img, dtype=np.float64)
        scale = 257.0 if grey.max(initial=0) > 255 else 1.0
        grey = np.clip(np.rint(grey / scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if img.mode == "F":
        grey = np.clip(np.rint(np.asarray(img, dtype=np.float64)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
            img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes) -> np.ndarray:
    """Decodes encoded image bytes (PNG, JPEG, WebP, ... any Pillow reads) to uint8 [H, W, 3] RGB.

    Honours the EXIF orientation; grey, palette, CMYK and 16-bit images are converted to RGB and
    transparent pixels are composited over white. Raises ValueError on corrupt or truncated data.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"decode_image expects encoded image bytes, got {type(data).__name__}")
    data = bytes(data)
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # decodes now, so truncated data fails here and not later
            img = ImageOps.exif_transpose(img)
            array = np.asarray(_to_rgb(img), dtype=np.uint8)
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, ...
        raise ValueError(f"could not decode image ({len(data)} bytes, starting "
                         f"{data[:8]!r}): {type(error).__name__}: {error}") from error
    return array.copy()


def resize_center_crop(image: np.ndarray, side: int) -> np.ndarray:
    """Resizes so the shorter side is `side` (Pillow bicubic, antialiased), then crops the centre.

    image: uint8 [H, W, 3]; returns uint8 [side, side, 3].
    """
    image = _check_uint8_image(image)
    side = checked_int("side", side, 1)
    h, w = image.shape[:2]
    scale = side / min(h, w)
    new_w, new_h = max(side, round(w * scale)), max(side, round(h * scale))
    img = Image.fromarray(image)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
    left, top = (new_w - side) // 2, (new_h - side) // 2
    return np.asarray(img.crop((left, top, left + side, top + side)), dtype=np.uint8).copy()


# Pillow filters by the names used in configs ("resample" fields) and by the Pillow / Hugging Face
# integer codes found in preprocessor_config.json files.
RESAMPLE_FILTERS = {
    "nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING,
}


def resize_shortest_side(image: np.ndarray, size: int, resample: str = "bicubic") -> np.ndarray:
    """Resizes so the shorter side is `size`, keeping the aspect ratio (Pillow, antialiased).

    The longer side becomes `int(size * long / short)` (rounded down, as torchvision's `Resize` and
    Hugging Face's `CLIPImageProcessor` do; `resize_center_crop` rounds to nearest instead).
    image: uint8 [H, W, 3] -> uint8 [H', W', 3].
    """
    image = _check_uint8_image(image)
    size = checked_int("size", size, 1)
    if resample not in RESAMPLE_FILTERS:
        raise ValueError(f"resample={resample!r}: expected one of {sorted(RESAMPLE_FILTERS)}")
    h, w = image.shape[:2]
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) == (w, h):
        return image.copy()
    img = Image.fromarray(image).resize((new_w, new_h), resample=RESAMPLE_FILTERS[resample])
    return np.asarray(img, dtype=np.uint8).copy()


def center_crop(image: np.ndarray, side: int) -> np.ndarray:
    """The centre `side` x `side` square (top-left at `(H - side) // 2, (W - side) // 2`).

    image: uint8 [H, W, 3] with H, W >= side -> uint8 [side, side, 3].
    """
    image = _check_uint8_image(image)
    side = checked_int("side", side, 1)
    h, w = image.shape[:2]
    if h < side or w < side:
        raise ValueError(f"cannot centre-crop {side} x {side} from an image of {h} x {w}")
    top, left = (h - side) // 2, (w - side) // 2
    return image[top:top + side, left:left + side].copy()


def clip_preprocess(image: np.ndarray, *, resize_size: int, crop_size: int,
                    resample: str = "bicubic") -> np.ndarray:
    """CLIP's image preprocessing up to normalisation: shorter side to `resize_size`, centre crop.

    The same pixels as Hugging Face's `CLIPImageProcessor` (Pillow backend) before its rescale and
    normalisation, which the model input does on device. image: uint8 [H, W, 3] ->
    uint8 [crop_size, crop_size, 3]; needs crop_size <= resize_size.
    """
    if checked_int("crop_size", crop_size, 1) > checked_int("resize_size", resize_size, 1):
        raise ValueError(f"crop_size={crop_size} must not exceed resize_size={resize_size}")
    return center_crop(resize_shortest_side(image, resize_size, resample), crop_size)
