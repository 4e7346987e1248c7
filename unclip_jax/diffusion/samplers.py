"""Reverse-process samplers, each one `lax.fori_loop` over the steps of a (respaced) schedule.

Conventions:
- A model function is `model_fn(x_t, t) -> output`: x_t [B, ...] float32, t int32 [B] the ORIGINAL
  timestep index (`schedule.timesteps[i]` at step i), output the model's raw prediction [B, ...]
  (with `learned_variance=True`, [B, ..., 2C]: mean part then variance part, see `gaussian`).
  `param` ("eps" | "x0" | "v") says what the mean part predicts.
- Step i of a schedule goes from noise level abar_i to abar_{i-1} (abar_{-1} = 1, clean data), so
  the sampler visits steps N-1, ..., 0 and calls the model exactly once per step.
- `clip_x0` clips every x0 prediction to [-clip_x0, clip_x0] (images live in [-1, 1]); None turns
  clipping off (the prior's embedding space is unbounded).
- All samplers are pure and jit-friendly: call them inside `jax.jit` with a model function that
  closes over (possibly traced) params. `shape` and the keyword options are static.
- Classifier-free guidance: wrap a model function that evaluates a doubled batch with `guided`.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from unclip_jax.diffusion import gaussian
from unclip_jax.diffusion.schedules import Schedule

Array = jax.Array
ModelFn = Callable[[Array, Array], Array]


def guided(model_fn: ModelFn, guidance_scale, *, learned_variance: bool = False) -> ModelFn:
    """Classifier-free guidance as one batched model call.

    `model_fn(x2, t2)` takes the doubled batch [2B, ...]; its first half is evaluated with the
    condition and its second half without (the caller builds the doubled conditioning). The
    returned function takes x_t [B, ...], t [B] and gives uncond + s (cond - uncond) on the mean
    part; with learned variance the conditional variance part is kept. Since every parameterisation
    ("eps", "x0", "v") is affine in the output with x_t-only offsets, guiding the raw output equals
    guiding eps. A Python `guidance_scale == 1` returns the conditional half exactly.
    """
    exactly_one = isinstance(guidance_scale, (int, float)) and guidance_scale == 1

    def guided_fn(x_t: Array, t: Array) -> Array:
        out = model_fn(jnp.concatenate([x_t, x_t], axis=0), jnp.concatenate([t, t], axis=0))
        batch = x_t.shape[0]
        if out.shape[0] != 2 * batch:
            raise ValueError(f"the guided model function returned batch {out.shape[0]}; "
                             f"expected 2 * {batch} (conditional half, then unconditional half)")
        cond, uncond = out[:batch], out[batch:]
        if exactly_one:
            return cond
        if learned_variance:
            cond_mean, cond_var = gaussian.split_learned_variance(cond)
            uncond_mean, _ = gaussian.split_learned_variance(uncond)
            mean = uncond_mean + guidance_scale * (cond_mean - uncond_mean)
            return jnp.concatenate([mean.astype(cond.dtype), cond_var], axis=-1)
        return (uncond + guidance_scale * (cond - uncond)).astype(cond.dtype)

    return guided_fn


def _denoise(model_fn, schedule, x, i, *, param, learned_variance, clip_x0):
    """Calls the model at step i (scalar) on x [B, ...]; returns float32 (x0, eps, v_var or None)"""
    t = jnp.full((x.shape[0],), schedule.timesteps[i], jnp.int32)
    out = model_fn(x, t)
    expected = x.shape[:-1] + (x.shape[-1] * (2 if learned_variance else 1),)
    if out.shape != expected:
        raise ValueError(f"model_fn returned shape {out.shape}; expected {expected} "
                         f"(learned_variance={learned_variance})")
    out = out.astype(jnp.float32)
    v_var = None
    if learned_variance:
        out, v_var = gaussian.split_learned_variance(out)
    x0, eps = gaussian.predict_x0_eps(param, schedule, x, i, out, clip_x0)
    return x0, eps, v_var


def _initial_noise(shape, rng, x_T):
    if x_T is not None:
        if shape is not None and tuple(x_T.shape) != tuple(shape):
            raise ValueError(f"x_T has shape {x_T.shape}; expected {tuple(shape)}")
        return jnp.asarray(x_T, jnp.float32), rng
    if rng is None:
        raise ValueError("rng is required to draw x_T (or pass x_T)")
    rng, key = jax.random.split(rng)
    return jax.random.normal(key, tuple(shape), jnp.float32), rng


def ddpm_step(model_fn: ModelFn, schedule: Schedule, x: Array, i, noise: Array, *, param: str,
              learned_variance: bool = False, clip_x0: float | None = 1.0,
              clip_variance: bool = True) -> Array:
    """One ancestral step from x_i [B, ...] at step i (scalar): x_{i-1} = mu(x_i, x0_hat) + sigma_i
    noise, float32, with `noise` standard normal [B, ...] (unused at i = 0, where sigma is 0).

    mu is the mean of the posterior q(x_{i-1} | x_i, x0_hat); sigma_i^2 its variance beta~_i
    ("fixed small", diffusers' "fixed_small_log": the same for i > 0), or the model's learned
    variance when `learned_variance` (`gaussian.learned_log_variance`, with the interpolation
    weight clipped to [-1, 1] unless `clip_variance=False`). On a respaced schedule the betas are
    those between the kept timesteps (beta_k = 1 - abar_{t_k} / abar_{t_{k-1}}), which is exactly
    how diffusers' `UnCLIPScheduler.step` recomputes them from its `prev_timestep` argument.
    """
    x0, _, v_var = _denoise(model_fn, schedule, x, i, param=param,
                            learned_variance=learned_variance, clip_x0=clip_x0)
    mean, _, log_var = gaussian.q_posterior_mean_variance(schedule, x0, x, i)
    if learned_variance:
        log_var = gaussian.learned_log_variance(schedule, v_var, i, clip=clip_variance)
    return mean + jnp.where(i > 0, jnp.exp(0.5 * log_var), 0.0) * noise


def ddpm_sample(model_fn: ModelFn, schedule: Schedule, shape: Sequence[int] | None,
                rng: Array | None, *, param: str, learned_variance: bool = False,
                clip_x0: float | None = 1.0, x_T: Array | None = None,
                clip_variance: bool = True, step_noise: Array | None = None,
                last_step_model_fn: ModelFn | None = None) -> Array:
    """Ancestral sampling x_{i-1} ~ N(mu(x_i, x0_hat), sigma_i^2); returns x_0 [*shape] float32.

    Each step is `ddpm_step` (see there for `clip_variance`). No noise is added at the last step
    (i = 0). By default step i's noise is `jax.random.normal(jax.random.fold_in(rng, i), shape)`.

    step_noise: optional float [num_steps - 1, *shape], the noise of every step that adds some, in
      the order the steps are taken: step_noise[k] is used at step i = num_steps - 1 - k. This
      replays externally drawn noise (e.g. the draws of a torch pipeline, in its order). With both
      `x_T` and `step_noise` given, `rng` may be None.
    last_step_model_fn: optional model function used for the last step only (i = 0) instead of
      `model_fn` (Karlo's super-resolution, whose final step is taken by a separately fine-tuned
      UNet, diffusers' `super_res_last`). The other steps stay one `lax.fori_loop`; the last step
      follows it, so each model is traced once.
    """
    gaussian.check_param(param)
    if rng is None and (x_T is None or step_noise is None):
        raise ValueError("ddpm_sample needs an rng (it adds noise at every step but the last), "
                         "unless both x_T and step_noise are given")
    x, rng = _initial_noise(shape, rng, x_T)
    n = schedule.num_steps
    if step_noise is not None:
        step_noise = jnp.asarray(step_noise, jnp.float32)
        if step_noise.shape != (n - 1,) + x.shape:
            raise ValueError(f"step_noise has shape {step_noise.shape}; expected "
                             f"{(n - 1,) + x.shape} (one draw per step but the last)")
    kwargs = dict(param=param, learned_variance=learned_variance, clip_x0=clip_x0,
                  clip_variance=clip_variance)

    def body(k, x):
        i = n - 1 - k
        if step_noise is None:
            noise = jax.random.normal(jax.random.fold_in(rng, i), x.shape, jnp.float32)
        else:  # the last step (k = n - 1) adds no noise: any in-range row will do
            noise = step_noise[jnp.minimum(k, max(n - 2, 0))] if n > 1 else jnp.zeros_like(x)
        return ddpm_step(model_fn, schedule, x, i, noise, **kwargs)

    if last_step_model_fn is None:
        return jax.lax.fori_loop(0, n, body, x)
    x = jax.lax.fori_loop(0, n - 1, body, x)
    return ddpm_step(last_step_model_fn, schedule, x, 0, jnp.zeros_like(x), **kwargs)


def ddim_sample(model_fn: ModelFn, schedule: Schedule, shape_or_x_T, rng: Array | None = None, *,
                param: str, eta: float = 0.0, clip_x0: float | None = 1.0,
                learned_variance: bool = False) -> Array:
    """DDIM (Song et al. 2021) with stochasticity eta; returns x_0 float32.

    shape_or_x_T: the output shape [B, ...] (x_T is drawn from `rng`) or x_T itself (e.g. from
    `ddim_invert`). x_{i-1} = sqrt(abar_{i-1}) x0_hat + sqrt(1 - abar_{i-1} - sigma^2) eps_hat
    + sigma z with sigma = eta sqrt(beta~_i). eta=0 is deterministic (rng may then be None).
    A learned variance part of the output is ignored.
    """
    gaussian.check_param(param)
    if isinstance(shape_or_x_T, (tuple, list)):
        x, rng = _initial_noise(shape_or_x_T, rng, None)
    else:
        x, rng = _initial_noise(None, rng, shape_or_x_T)
    stochastic = not (isinstance(eta, (int, float)) and eta == 0)
    if stochastic and rng is None:
        raise ValueError("ddim_sample with eta != 0 needs an rng")
    n = schedule.num_steps

    def body(k, x):
        i = n - 1 - k
        x0, eps, _ = _denoise(model_fn, schedule, x, i, param=param,
                              learned_variance=learned_variance, clip_x0=clip_x0)
        abar, abar_prev = schedule.alphas_cumprod[i], schedule.alphas_cumprod_prev[i]
        sigma = eta * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev))
        x_prev = (jnp.sqrt(abar_prev) * x0
                  + jnp.sqrt(jnp.maximum(1.0 - abar_prev - sigma**2, 0.0)) * eps)
        if stochastic:
            noise = jax.random.normal(jax.random.fold_in(rng, i), x.shape, jnp.float32)
            x_prev = x_prev + sigma * noise  # sigma is 0 at i = 0 (abar_prev = 1)
        return x_prev

    return jax.lax.fori_loop(0, n, body, x)


def ddim_invert(model_fn: ModelFn, schedule: Schedule, x0: Array, *, param: str,
                clip_x0: float | None = None, learned_variance: bool = False,
                num_fixed_point_iters: int = 0) -> Array:
    """Deterministic DDIM inversion of data x0 [B, ...] into the x_T that `ddim_sample` starts from.

    Runs the DDIM ODE forward (ADM App. F, guided-diffusion's `ddim_reverse_sample`): x0 is taken as
    the state at step 0, and each step k = 1..N-1 evaluates the model at (x_{k-1}, t_{k-1}) and
    moves to level abar_k: x_k = sqrt(abar_k) x0_hat + sqrt(1 - abar_k) eps_hat. That is N - 1 model
    calls ending at level abar_{N-1}, the level `ddim_sample` starts from: ADM's "reverse the
    first 249 of 250 steps", which reconstructs better than going on to abar = 0.

    The explicit steps evaluate the model at the other end of each step than `ddim_sample` does, so
    a round trip is exact only as the step size goes to 0. `num_fixed_point_iters` > 0 refines every
    state x_k (x_0 included) by that many fixed-point iterations of "one `ddim_sample` step (same
    clip_x0) from x_k lands on x_{k-1}" (x_{-1} = the data), which makes inversion followed by
    `ddim_sample` reproduce x0 as the iterations converge, at N more model calls per iteration.
    Returns x_T [B, ...] float32.
    """
    gaussian.check_param(param)
    if num_fixed_point_iters < 0:
        raise ValueError(f"num_fixed_point_iters must be >= 0, got {num_fixed_point_iters}")
    denoise = functools.partial(_denoise, model_fn, schedule, param=param,
                                learned_variance=learned_variance, clip_x0=clip_x0)
    sqrt_abar, sqrt_1m_abar = schedule.sqrt_alphas_cumprod, schedule.sqrt_one_minus_alphas_cumprod

    def refine(x, x_prev, k):
        # A DDIM step from x at level k gives a_p x0_hat + s_p eps_hat, x0_hat = (x - s eps_hat)/a,
        # so its preimage of x_prev solves x = (a/a_p) x_prev - (a s_p/a_p - s) eps_hat(x).
        if num_fixed_point_iters == 0:
            return x
        a, s = sqrt_abar[k], sqrt_1m_abar[k]
        a_p = jnp.sqrt(schedule.alphas_cumprod_prev[k])
        s_p = jnp.sqrt(1.0 - schedule.alphas_cumprod_prev[k])

        def iterate(_, x):
            _, eps, _ = denoise(x, k)
            return (a / a_p) * x_prev - (a * s_p / a_p - s) * eps

        return jax.lax.fori_loop(0, num_fixed_point_iters, iterate, x)

    data = jnp.asarray(x0, jnp.float32)
    x = refine(data, data, 0)

    def body(k, x_prev):
        x0_hat, eps, _ = denoise(x_prev, k - 1)
        x = sqrt_abar[k] * x0_hat + sqrt_1m_abar[k] * eps
        return refine(x, x_prev, k)

    return jax.lax.fori_loop(1, schedule.num_steps, body, x)


def dpm_solver_pp_2m_sample(model_fn: ModelFn, schedule: Schedule, shape: Sequence[int],
                            rng: Array | None, *, param: str, clip_x0: float | None = 1.0,
                            learned_variance: bool = False, x_T: Array | None = None) -> Array:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): multistep, data-prediction form; returns x_0.

    With alpha_i = sqrt(abar_i), sigma_i = sqrt(1 - abar_i), lambda_i = log(alpha_i / sigma_i) and
    h = lambda_{i-1} - lambda_i, one step from step i to i-1 is
        x_{i-1} = (sigma_{i-1} / sigma_i) x_i - alpha_{i-1} (exp(-h) - 1) D,
    D = x0_i for the first step (first order) and otherwise
    D = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i+1}, r = h_prev / h. The last step goes to clean data
    (sigma = 0, h = inf), where the first-order update is the x0 prediction itself. One model call
    per step of the (respaced) schedule. A learned variance part of the output is ignored.
    """
    gaussian.check_param(param)
    x, _ = _initial_noise(shape, rng, x_T)
    n = schedule.num_steps
    log_alpha = jnp.log(schedule.sqrt_alphas_cumprod)
    log_sigma = jnp.log(schedule.sqrt_one_minus_alphas_cumprod)
    lam = log_alpha - log_sigma

    def body(k, carry):
        x, x0_prev, h_prev = carry
        i = n - 1 - k
        x0, _, _ = _denoise(model_fn, schedule, x, i, param=param,
                            learned_variance=learned_variance, clip_x0=clip_x0)
        j = jnp.maximum(i - 1, 0)  # the next step's index (unused when i == 0)
        h = lam[j] - lam[i]
        r = h_prev / h
        d = jnp.where(k == 0, x0, (1.0 + 0.5 / r) * x0 - (0.5 / r) * x0_prev)
        x_next = (jnp.exp(log_sigma[j] - log_sigma[i]) * x
                  - jnp.exp(log_alpha[j]) * jnp.expm1(-h) * d)
        x_next = jnp.where(i == 0, x0, x_next)
        return x_next, x0, h

    carry = (x, jnp.zeros_like(x), jnp.ones((), jnp.float32))
    return jax.lax.fori_loop(0, n, body, carry)[0]


_SAMPLERS = ("ddpm", "ddim", "dpm++2m")


def sample(name: str, model_fn: ModelFn, schedule: Schedule, shape: Sequence[int],
           rng: Array | None, *, param: str, x_T: Array | None = None, **kwargs) -> Array:
    """Dispatches to the sampler called `name` ("ddpm" | "ddim" | "dpm++2m"); returns x_0.

    Keyword arguments go to the sampler (`learned_variance`, `clip_x0`, `eta` for "ddim", and
    `clip_variance`, `step_noise`, `last_step_model_fn` for "ddpm").
    """
    if name == "ddpm":
        return ddpm_sample(model_fn, schedule, shape, rng, param=param, x_T=x_T, **kwargs)
    if name == "ddim":
        return ddim_sample(model_fn, schedule, tuple(shape) if x_T is None else x_T, rng,
                           param=param, **kwargs)
    if name == "dpm++2m":
        return dpm_solver_pp_2m_sample(model_fn, schedule, shape, rng, param=param, x_T=x_T,
                                       **kwargs)
    raise ValueError(f"unknown sampler {name!r}; expected one of {list(_SAMPLERS)}")
