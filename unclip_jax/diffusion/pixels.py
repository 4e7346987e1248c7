"""The pixel range image diffusion works in: uint8 images <-> floats in [-1, 1], and PSNR."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def to_model_range(images: jax.Array) -> jax.Array:
    """uint8 [..., H, W, 3] -> float32 in [-1, 1]."""
    return images.astype(jnp.float32) / 127.5 - 1.0


def to_uint8(x: jax.Array) -> jax.Array:
    """float [-1, 1] -> uint8 (rounded, clipped); traceable, so it can end a jitted sampler."""
    return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Mean PSNR (dB) between uint8 image batches [N, H, W, C]."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2, axis=(1, 2, 3))
    return float(np.mean(10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))))
