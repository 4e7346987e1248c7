"""Pieces shared by the image diffusion stages (decoder, upsamplers): pixel ranges, loss, sampling."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from unclip_jax.diffusion import gaussian, samplers
from unclip_jax.diffusion.schedules import Schedule


def to_model_range(images: jax.Array) -> jax.Array:
    """uint8 [B, H, W, 3] -> float32 in [-1, 1] (on device)."""
    return images.astype(jnp.float32) / 127.5 - 1.0


def to_uint8(x: jax.Array) -> np.ndarray:
    """float [-1, 1] -> uint8 numpy [B, H, W, 3]."""
    return np.asarray(jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255)).astype(np.uint8)


def schedules(diffusion: ml_collections.ConfigDict) -> tuple[Schedule, Schedule]:
    """The training schedule and its respacing for sampling (`sample_steps`)."""
    schedule = Schedule.named(diffusion.schedule, int(diffusion.num_timesteps))
    return schedule, schedule.respace(diffusion.sample_steps)


def noised(schedule: Schedule, x0: jax.Array, rng: jax.Array):
    """Draws t ~ U{0..T-1} and noise; returns (x_t, t, noise)."""
    t_rng, n_rng = jax.random.split(rng)
    t = jax.random.randint(t_rng, (x0.shape[0],), 0, schedule.num_steps)
    noise = jax.random.normal(n_rng, x0.shape, jnp.float32)
    return gaussian.q_sample(schedule, x0, t, noise), t, noise


def diffusion_loss(diffusion: ml_collections.ConfigDict, schedule: Schedule, output: jax.Array,
                   x0: jax.Array, x_t: jax.Array, t: jax.Array, noise: jax.Array):
    """Mean loss and metrics: the hybrid loss with learned variance, else the plain MSE."""
    gamma = float(diffusion.get("min_snr_gamma", 0.0))
    if diffusion.learned_variance:
        loss, terms = gaussian.hybrid_loss(diffusion.param, schedule, output, x0, x_t, t, noise,
                                           min_snr_gamma=gamma)
        return loss.mean(), {k: v.mean() for k, v in terms.items()}
    return gaussian.mse_loss(diffusion.param, schedule, output, x0, t, noise, gamma).mean(), {}


def sample_images(diffusion: ml_collections.ConfigDict, schedule: Schedule, model_fn: Callable,
                  shape, rng: jax.Array, *, guided_fn: Callable | None = None,
                  guidance_scale: float = 1.0, sampler: str | None = None, clip_x0: float = 1.0,
                  **kwargs) -> jax.Array:
    """Runs the configured sampler; with `guided_fn` (doubled-batch model) and a scale != 1, guided.

    Returns x_0 float32 in [-clip_x0, clip_x0] (the x0 predictions are clipped to that range).
    """
    learned = bool(diffusion.learned_variance)
    fn = model_fn
    if guided_fn is not None and guidance_scale != 1:
        fn = samplers.guided(guided_fn, guidance_scale, learned_variance=learned)
    name = sampler or diffusion.sampler
    if name == "ddim":
        kwargs.setdefault("eta", float(diffusion.get("eta", 0.0)))
    return samplers.sample(name, fn, schedule, shape, rng, param=diffusion.param,
                           learned_variance=learned, clip_x0=clip_x0, **kwargs)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Mean PSNR (dB) between uint8 image batches."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2, axis=(1, 2, 3))
    return float(np.mean(10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))))
