"""Kakao Brain Karlo's sampling schedules (diffusers' `UnCLIPScheduler` + `UnCLIPPipeline`), expressed
as options of `samplers.ddpm_sample`: no separate code path.

Every Karlo stage is ancestral DDPM sampling on the 1000-step "squaredcos_cap_v2" schedule
(= `Schedule.named("cosine", 1000)`: s = 0.008, betas capped at 0.999), respaced to a few steps.
How each part of `UnCLIPScheduler` maps onto this package:

- `set_timesteps(K)`: timesteps round(k * 999 / (K - 1)) (half to even), descending; the same set as
  the int spacing spec K (`schedules.space_timesteps`), so the schedule is
  `Schedule.named("cosine", 1000).respace(K)`; the sampler visits its steps in descending order.
- `step(..., prev_timestep=t_next)` with the pipeline passing the next timestep of the list (None,
  i.e. t - 1, at the last one): beta = 1 - abar_t / abar_prev, alpha = 1 - beta recomputed between
  the two kept timesteps; those are exactly the respaced schedule's betas. The last timestep is
  always 0 and steps to abar = 1 (clean data) like the respaced schedule's step 0.
- `prediction_type`: "sample" is `param="x0"`, "epsilon" is `param="eps"`.
- `clip_sample` / `clip_sample_range`: `clip_x0=clip_sample_range` (None when clip_sample is off).
- `variance_type="fixed_small_log"`: sigma = sqrt(beta~) (the posterior variance between the kept
  timesteps): `learned_variance=False`.
- `variance_type="learned_range"`: log sigma^2 = frac log(beta) + (1 - frac) log(beta~),
  frac = (v + 1) / 2, with the respaced beta and beta~ (not the 1000-step beta_t as diffusers'
  DDPMScheduler would): `learned_variance=True`, and `clip_variance=False` because neither
  diffusers nor Karlo clips v to [-1, 1].
- noise only when t > 0: the last step (t = 0) adds none, as `ddpm_step` at i = 0.
- `UnCLIPPipeline` takes the super-resolution's last step with `super_res_last`:
  `last_step_model_fn`.

Numerics: this package computes the schedule in float64 and stores float32 coefficients, as Karlo's
own (guided-diffusion) code does. diffusers keeps its tables in float32, where 1 - alphas_cumprod[0]
= 1 - (1 - beta_0) cancels to ~7e-4 relative error (beta_0 ~ 4e-5): its last step differs from the
exact one by up to ~5e-4 of the sample's scale (tests/diffusion/test_unclip_scheduler.py measures
parity against diffusers' own step code run on float64 tables, and bounds the float32 deviation).

Not covered here (other stages' business): classifier-free guidance (`samplers.guided`; diffusers
keeps the conditional half's predicted variance, as `guided` does), the prior's clip_mean/clip_std
post-processing, the decoder output clamp to [-1, 1] and the bicubic upsampling before the
super-resolution (the pipeline's; after a clip_x0=1 schedule the clamp only removes round-off).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax

from unclip_jax.diffusion import samplers
from unclip_jax.diffusion.schedules import Schedule

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class KarloSampling:
    """The sampler settings of one Karlo stage (`samplers.ddpm_sample` options).

    stage: "prior" | "decoder" | "super_res" (for messages).
    num_inference_steps: respacing (int spec): UnCLIPPipeline's defaults 25 / 25 / 7. Karlo's own
      "default" sampling uses 50 decoder steps, its "fast" 25: `dataclasses.replace(..., 50)`.
    param, learned_variance, clip_x0, clip_variance: as in `samplers.ddpm_step`.
    last_step_model: True where the last step is taken by another model (`last_step_model_fn`
      is then required by `sample`; super-res: `super_res_last`).
    num_train_timesteps, noise_schedule: the training schedule (`Schedule.named`).
    """
    stage: str
    num_inference_steps: int
    param: str
    learned_variance: bool
    clip_x0: float | None
    clip_variance: bool = False
    last_step_model: bool = False
    num_train_timesteps: int = 1000
    noise_schedule: str = "cosine"

    def schedule(self) -> Schedule:
        """The respaced schedule: `Schedule.named(noise_schedule, T).respace(num_inference_steps)`.

        Its `timesteps[::-1]` equal diffusers' `UnCLIPScheduler.set_timesteps(K).timesteps`.
        Concrete even when called under `jax.jit` (computed eagerly, embedded as constants)."""
        with jax.ensure_compile_time_eval():
            return Schedule.named(self.noise_schedule, self.num_train_timesteps).respace(
                self.num_inference_steps)

    def sampler_kwargs(self) -> dict:
        """Keyword options of `samplers.ddpm_sample` / `samplers.ddpm_step` for this stage."""
        return dict(param=self.param, learned_variance=self.learned_variance,
                    clip_x0=self.clip_x0, clip_variance=self.clip_variance)

    def sample(self, model_fn: samplers.ModelFn, shape: Sequence[int] | None, rng: Array | None,
               *, last_step_model_fn: samplers.ModelFn | None = None, x_T: Array | None = None,
               step_noise: Array | None = None, schedule: Schedule | None = None) -> Array:
        """`samplers.ddpm_sample` with this stage's settings; returns x_0 float32 [*shape].

        `schedule` defaults to `self.schedule()` (pass one to reuse it).
        """
        if self.last_step_model and last_step_model_fn is None:
            raise ValueError(f"Karlo's {self.stage} takes its last step with a second model: "
                             "pass last_step_model_fn")
        if not self.last_step_model and last_step_model_fn is not None:
            raise ValueError(f"Karlo's {self.stage} uses one model for every step; "
                             "last_step_model_fn must be None")
        return samplers.ddpm_sample(model_fn, self.schedule() if schedule is None else schedule,
                                    shape, rng, x_T=x_T, step_noise=step_noise,
                                    last_step_model_fn=last_step_model_fn, **self.sampler_kwargs())


# diffusers' UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample",
# clip_sample_range=5.0): the prior predicts the (normalised) CLIP image embedding.
KARLO_PRIOR = KarloSampling("prior", 25, param="x0", learned_variance=False, clip_x0=5.0)
# UnCLIPScheduler(variance_type="learned_range", prediction_type="epsilon"), clip_sample range 1.
KARLO_DECODER = KarloSampling("decoder", 25, param="eps", learned_variance=True, clip_x0=1.0)
# UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="epsilon"), clip range 1
# (diffusers' conversion script; Karlo's SR UNets output 3 channels, no variance), the last of the
# 7 steps taken by super_res_last.
KARLO_SUPER_RES = KarloSampling("super_res", 7, param="eps", learned_variance=False, clip_x0=1.0,
                                last_step_model=True)

KARLO_STAGES = {s.stage: s for s in (KARLO_PRIOR, KARLO_DECODER, KARLO_SUPER_RES)}
