"""Pieces shared by the image diffusion stages (decoder, upsamplers): schedules, loss, sampling;
and the Karlo-mode switch shared by every diffusion stage (prior included)."""
from __future__ import annotations

import dataclasses
import numbers
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections

from unclip_jax.diffusion import gaussian, samplers, unclip
from unclip_jax.diffusion.schedules import Schedule


T_SAMPLING = ("uniform", "lognormal")  # How training draws the noise level (`diffusion.t_sampling`).


def schedules(diffusion: ml_collections.ConfigDict) -> tuple[Schedule, Schedule]:
    """The training schedule (`schedule`, `num_timesteps`, `logsnr_shift`) and its respacing for
    sampling (`sample_steps`)."""
    schedule = Schedule.named(diffusion.schedule, int(diffusion.num_timesteps),
                              float(diffusion.get("logsnr_shift", 0.0)))
    return schedule, schedule.respace(diffusion.sample_steps)


def sample_t(schedule: Schedule, rng: jax.Array, n: int,
             diffusion: ml_collections.ConfigDict | None = None) -> jax.Array:
    """n training steps [n] int32, drawn as `diffusion.t_sampling` says (uniform without a config).

    - "uniform": t ~ U{0..T-1} (DDPM and the paper).
    - "lognormal": EDM's noise distribution (Karras et al. 2022): ln sigma ~ N(`t_lognormal_mean`,
      `t_lognormal_std`^2) (EDM: -1.2, 1.2), sigma = sqrt((1 - abar) / abar) the noise-to-signal
      ratio of the variance-exploding view of x_t; each draw becomes the step with the nearest
      sigma above it (the last step for sigmas beyond the schedule). With the v-parameterisation
      this is EDM's training recipe: EDM's preconditioning with sigma_data = 1 is v-prediction
      in the variance-preserving form, and its loss weighting then weighs every sigma's v error
      equally, as the plain v MSE does.
    """
    kind = "uniform" if diffusion is None else diffusion.get("t_sampling", "uniform")
    if kind not in T_SAMPLING:
        raise ValueError(f"diffusion.t_sampling={kind!r}: expected one of {T_SAMPLING}")
    if kind == "uniform":
        return jax.random.randint(rng, (n,), 0, schedule.num_steps)
    mean = float(diffusion.get("t_lognormal_mean", -1.2))
    std = float(diffusion.get("t_lognormal_std", 1.2))
    sigma = jnp.exp(mean + std * jax.random.normal(rng, (n,), jnp.float32))
    t = jnp.searchsorted(schedule.sqrt_recipm1_alphas_cumprod, sigma)
    return jnp.minimum(t, schedule.num_steps - 1).astype(jnp.int32)


def noised(schedule: Schedule, x0: jax.Array, rng: jax.Array,
           diffusion: ml_collections.ConfigDict | None = None):
    """Draws t (`sample_t`: uniform unless `diffusion.t_sampling` says otherwise) and noise;
    returns (x_t, t, noise)."""
    t_rng, n_rng = jax.random.split(rng)
    t = sample_t(schedule, t_rng, x0.shape[0], diffusion)
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


# ---------------------------------------------------------------------------------------------
# Karlo mode (Kakao Brain's Karlo as diffusers' UnCLIPPipeline samples it), shared by the stages.
# ---------------------------------------------------------------------------------------------
KARLO = "karlo"
"""`diffusion.sampler` of a stage config in Karlo mode (see `is_karlo`)."""


def is_karlo(diffusion: ml_collections.ConfigDict) -> bool:
    """Whether a stage config's `diffusion` block selects Karlo mode: `diffusion.sampler == "karlo"`.

    In Karlo mode a stage's `sample_body` reproduces its part of diffusers' `UnCLIPPipeline.__call__`
    (the `UnCLIPScheduler` settings of `diffusion.unclip.KARLO_STAGES`, the pipeline's guidance and
    pre/post-processing) on weights imported by `unclip_jax.convert.karlo_*`; the model block must
    carry the converter's options (each stage checks the ones it needs). Of the stages' losses only the
    decoder's trains in this mode (fine-tuning an imported decoder: `DecoderStage.loss`).
    """
    return diffusion.get("sampler", None) == KARLO


def karlo_sampling(stage: str, diffusion: ml_collections.ConfigDict, steps=None):
    """The `unclip.KarloSampling` of `stage` ("prior" | "decoder" | "super_res") for a Karlo-mode
    `diffusion` block, with its number of steps: `steps`, else `diffusion.sample_steps` when the
    block has one, else Karlo's (UnCLIPPipeline's defaults 25 / 25 / 7). Steps are a plain number
    of inference steps (`UnCLIPScheduler.set_timesteps(K)`): an int or a string of digits.

    Raises ValueError listing every field of the block that contradicts Karlo's sampling
    (`schedule` other than cosine, `num_timesteps` other than 1000, another `param` or
    `learned_variance`, the upsamplers' `residual`).
    """
    base = unclip.KARLO_STAGES[stage]
    problems = []
    expected = {"schedule": base.noise_schedule, "num_timesteps": base.num_train_timesteps,
                "param": base.param, "learned_variance": base.learned_variance, "residual": False}
    for name, want in expected.items():
        if name in diffusion and diffusion[name] is not None and diffusion[name] != want:
            problems.append(f"diffusion.{name}={diffusion[name]!r} (Karlo's {stage}: {want!r})")
    value = steps if steps is not None else diffusion.get("sample_steps", None)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
        problems.append(f"steps={value!r}: Karlo mode takes a positive number of inference steps "
                        "(UnCLIPScheduler.set_timesteps), not a respacing spec")
        value = None
    if problems:
        raise ValueError(f"Karlo mode (diffusion.sampler={KARLO!r}) of the {stage}: "
                         + "; ".join(problems))
    return base if value is None else dataclasses.replace(base, num_inference_steps=int(value))


def check_karlo_sampler(stage: str, sampler: str | None, also: tuple[str, ...] = ()) -> None:
    """A Karlo-mode stage samples as Karlo does: `sampler` must be None or "karlo" (or in `also`:
    the decoder's DDIM, for the manipulations)."""
    if sampler not in (None, KARLO, *also):
        allowed = " or ".join(repr(a) for a in (None, KARLO, *also))
        raise ValueError(f"the {stage} is in Karlo mode (diffusion.sampler={KARLO!r}): sampler="
                         f"{sampler!r} is not supported ({allowed})")
