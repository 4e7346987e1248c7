"""Pieces shared by the image diffusion stages (decoder, upsamplers): schedules, loss, sampling."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections

from unclip_jax.diffusion import gaussian, samplers
from unclip_jax.diffusion.schedules import Schedule


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
