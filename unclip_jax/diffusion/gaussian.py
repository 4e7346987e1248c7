"""Forward process q(x_t | x_0), parameterisation conversions and training losses.

Conventions:
- `t` is an int32 [B] array of step indices into `schedule` (for the full training schedule these
  are the original timesteps). Per-example coefficients are broadcast over the trailing dims of x
  ([B] -> [B, 1, 1, ...]); a scalar `t` also works.
- x is [B, ...]: images NHWC in [-1, 1], or embeddings [B, D] (the prior's space is unbounded).
- `param` names what a model predicts: "eps" (the noise), "x0" (the clean data) or
  "v" (v = sqrt(abar) eps - sqrt(1 - abar) x_0).
- Learned variance (improved DDPM / ADM): the model output has 2C channels on its last axis,
  (mean part, v_var part); v_var in [-1, 1] interpolates the log-variance between
  log beta~_t (v_var = -1) and log beta_t (v_var = +1).
- Losses are computed in float32 whatever the input dtype, and are per example [B].
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from unclip_jax.diffusion.schedules import Schedule

Array = jax.Array

PARAMS = ("eps", "x0", "v")


def check_param(param: str) -> None:
    """Raises a ValueError unless `param` is one of "eps" | "x0" | "v"."""
    if param not in PARAMS:
        raise ValueError(f"unknown model parameterisation param={param!r}; "
                         f"expected one of {PARAMS}")


def extract(arr: Array, t: Array, x: Array) -> Array:
    """arr[t] broadcast against x: t [B] -> [B, 1, ..., 1] (x.ndim dims); scalar t -> scalar."""
    v = jnp.asarray(arr)[t]
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim)) if v.ndim else v


# ---------------------------------------------------------------------------------------------
# Forward process and conversions
# ---------------------------------------------------------------------------------------------

def q_sample(schedule: Schedule, x0: Array, t: Array, noise: Array) -> Array:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise. x0, noise: [B, ...]; returns [B, ...]."""
    return (extract(schedule.sqrt_alphas_cumprod, t, x0) * x0
            + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * noise)


def q_posterior_mean_variance(schedule: Schedule, x0: Array, x_t: Array, t: Array):
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x0), broadcast like x_t."""
    mean = (extract(schedule.posterior_mean_coef1, t, x_t) * x0
            + extract(schedule.posterior_mean_coef2, t, x_t) * x_t)
    variance = extract(schedule.posterior_variance, t, x_t)
    log_variance = extract(schedule.posterior_log_variance_clipped, t, x_t)
    return mean, variance, log_variance


def predict_x0_from_eps(schedule: Schedule, x_t: Array, t: Array, eps: Array) -> Array:
    """x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)."""
    return (extract(schedule.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)


def predict_eps_from_x0(schedule: Schedule, x_t: Array, t: Array, x0: Array) -> Array:
    """eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)."""
    return ((extract(schedule.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0)
            / extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t))


def predict_x0_from_v(schedule: Schedule, x_t: Array, t: Array, v: Array) -> Array:
    """x0 = sqrt(abar) x_t - sqrt(1 - abar) v."""
    return (extract(schedule.sqrt_alphas_cumprod, t, x_t) * x_t
            - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * v)


def predict_eps_from_v(schedule: Schedule, x_t: Array, t: Array, v: Array) -> Array:
    """eps = sqrt(1 - abar) x_t + sqrt(abar) v."""
    return (extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t
            + extract(schedule.sqrt_alphas_cumprod, t, x_t) * v)


def v_target(schedule: Schedule, x0: Array, t: Array, noise: Array) -> Array:
    """v = sqrt(abar) noise - sqrt(1 - abar) x0 (Salimans & Ho 2022)."""
    return (extract(schedule.sqrt_alphas_cumprod, t, x0) * noise
            - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * x0)


def predict_x0_eps(param: str, schedule: Schedule, x_t: Array, t: Array, output: Array,
                   clip_x0: float | None = None):
    """(x0, eps) implied by a model's mean `output` (no variance channels) under `param`.

    With `clip_x0` the x0 prediction is clipped to [-clip_x0, clip_x0] and eps is re-derived from
    the clipped x0 (as ADM does), so the two stay consistent with x_t. Both [B, ...].
    """
    check_param(param)
    if param == "eps":
        eps = output
        x0 = predict_x0_from_eps(schedule, x_t, t, eps)
    elif param == "x0":
        x0 = output
        eps = predict_eps_from_x0(schedule, x_t, t, x0)
    else:
        x0 = predict_x0_from_v(schedule, x_t, t, output)
        eps = predict_eps_from_v(schedule, x_t, t, output)
    if clip_x0 is not None:
        x0 = jnp.clip(x0, -clip_x0, clip_x0)
        eps = predict_eps_from_x0(schedule, x_t, t, x0)
    return x0, eps


def split_learned_variance(output: Array) -> tuple[Array, Array]:
    """Splits a learned-variance output [..., 2C] into (mean part [..., C], v_var [..., C])."""
    channels = output.shape[-1]
    if channels % 2:
        raise ValueError(f"a learned-variance model output needs an even number of channels on "
                         f"its last axis (mean, variance); got shape {output.shape}")
    return output[..., : channels // 2], output[..., channels // 2:]


# ---------------------------------------------------------------------------------------------
# Training targets and losses
# ---------------------------------------------------------------------------------------------

def training_targets(param: str, schedule: Schedule, x0: Array, t: Array, noise: Array) -> Array:
    """The regression target of a model with parameterisation `param` ("eps" | "x0" | "v")."""
    check_param(param)
    if param == "eps":
        return noise
    if param == "x0":
        return x0
    return v_target(schedule, x0, t, noise)


def _mean_over_non_batch(x: Array) -> Array:
    return jnp.mean(x.reshape(x.shape[0], -1), axis=1)


def min_snr_weight(param: str, schedule: Schedule, t: Array, gamma: float) -> Array:
    """Min-SNR-gamma loss weights [B] (Hang et al. 2023) for a model predicting `param`.

    With snr = abar / (1 - abar), the weighted loss equals min(snr, gamma) * ||x0_hat - x0||^2, so
    low-noise steps (snr > gamma) stop dominating: the weight on the `param` MSE is
    min(snr, gamma) / snr for eps, min(snr, gamma) for x0, min(snr, gamma) / (snr + 1) for v.
    gamma <= 0 gives weight 1 (plain MSE).
    """
    check_param(param)
    t = jnp.asarray(t)
    if gamma <= 0:
        return jnp.ones(t.shape, jnp.float32)
    abar = schedule.alphas_cumprod[t].astype(jnp.float32)
    snr = abar / (1.0 - abar)
    clipped = jnp.minimum(snr, gamma)
    if param == "eps":
        return clipped / snr
    if param == "x0":
        return clipped
    return clipped / (snr + 1.0)


def mse_loss(param: str, schedule: Schedule, model_output: Array, x0: Array, t: Array,
             noise: Array, min_snr_gamma: float = 0.0) -> Array:
    """Per-example MSE [B] between `model_output` [B, ...] and the `param` target, in float32.

    `min_snr_gamma` > 0 weights each example by `min_snr_weight`.
    """
    x0, noise = x0.astype(jnp.float32), noise.astype(jnp.float32)
    target = training_targets(param, schedule, x0, t, noise)
    if model_output.shape != target.shape:
        raise ValueError(f"model_output has shape {model_output.shape}; expected {target.shape} "
                         "(for a learned-variance output use hybrid_loss)")
    mse = _mean_over_non_batch(jnp.square(model_output.astype(jnp.float32) - target))
    if min_snr_gamma > 0:
        mse = mse * min_snr_weight(param, schedule, t, min_snr_gamma)
    return mse


def learned_log_variance(schedule: Schedule, v: Array, t: Array, *, clip: bool = True) -> Array:
    """ADM's learned log-variance: frac log(beta_t) + (1 - frac) log(beta~_t), frac = (v + 1)/2.

    v: [B, ...], cast to float32 and, with `clip` (the default), clipped to [-1, 1] (the interval
    between the two bounds of the optimal variance), which also keeps exp(-log_variance) finite for
    wild outputs. `clip=False` extrapolates linearly in log space for |v| > 1, as guided-diffusion,
    Karlo and diffusers' `UnCLIPScheduler` ("learned_range") do; sampling uses it to reproduce them.
    """
    v = v.astype(jnp.float32)
    if clip:
        v = jnp.clip(v, -1.0, 1.0)
    frac = (v + 1.0) / 2.0
    max_log = extract(jnp.log(schedule.betas), t, v)
    min_log = extract(schedule.posterior_log_variance_clipped, t, v)
    return frac * max_log + (1.0 - frac) * min_log


def normal_kl(mean1: Array, logvar1: Array, mean2: Array, logvar2: Array) -> Array:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: Array, means: Array, log_scales: Array,
                                        num_bins: int = 256) -> Array:
    """log P(x) per element for data x in [-1, 1] quantised to `num_bins` levels, in nats.

    P is the mass of N(means, exp(log_scales)^2) on the bin of x (bin half-width 1/(num_bins-1));
    the edge bins extend to -inf / +inf. Uses log_ndtr for the tails so it stays finite.
    """
    half_width = 1.0 / (num_bins - 1)
    centered = x - means
    inv_std = jnp.exp(-log_scales)
    upper = inv_std * (centered + half_width)
    lower = inv_std * (centered - half_width)
    log_cdf_upper = jax.scipy.special.log_ndtr(upper)
    log_sf_lower = jax.scipy.special.log_ndtr(-lower)
    # Mass of the bin, from whichever tail keeps precision (above or below the mean).
    ndtr = jax.scipy.special.ndtr
    mass = jnp.where(lower > 0, ndtr(-lower) - ndtr(-upper), ndtr(upper) - ndtr(lower))
    log_mass = jnp.log(jnp.maximum(mass, 1e-12))
    edge = 1.0 - half_width  # the first/last bin centres are -1 and +1
    return jnp.where(x < -edge, log_cdf_upper, jnp.where(x > edge, log_sf_lower, log_mass))


def hybrid_loss(param: str, schedule: Schedule, model_output: Array, x0: Array, x_t: Array,
                t: Array, noise: Array, vb_weight: float | None = None,
                min_snr_gamma: float = 0.0):
    """Improved-DDPM L_hybrid = MSE(mean part) + vb_weight * L_vlb, per example [B].

    model_output: [B, ..., 2C] = (mean part, v_var); x0, x_t, noise: [B, ..., C]; t: [B] int.
    L_vlb (bits per dim) is KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) for t > 0 and the discretised
    decoder NLL of x0 (images in [-1, 1], 256 bins) for t == 0. It is computed on a STOP-GRADIENT
    of the mean part, so it trains only the variance. vb_weight defaults to T/1000 (lambda=0.001
    times the T terms of the bound). `min_snr_gamma` > 0 weights the MSE term (`min_snr_weight`).
    Returns (loss [B], {"mse": [B], "vb": [B]}).
    """
    model_output = model_output.astype(jnp.float32)
    x0, x_t, noise = (a.astype(jnp.float32) for a in (x0, x_t, noise))
    mean_out, v_var = split_learned_variance(model_output)
    if mean_out.shape != x0.shape:
        raise ValueError(f"model_output has shape {model_output.shape}; expected x0's shape "
                         f"{x0.shape} with twice the channels on the last axis")
    mse = mse_loss(param, schedule, mean_out, x0, t, noise, min_snr_gamma)

    frozen_x0, _ = predict_x0_eps(param, schedule, x_t, t, jax.lax.stop_gradient(mean_out))
    model_mean, _, _ = q_posterior_mean_variance(schedule, frozen_x0, x_t, t)
    model_log_var = learned_log_variance(schedule, v_var, t)
    true_mean, _, true_log_var = q_posterior_mean_variance(schedule, x0, x_t, t)

    kl = _mean_over_non_batch(normal_kl(true_mean, true_log_var, model_mean, model_log_var))
    nll = -_mean_over_non_batch(
        discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var))
    vb = jnp.where(jnp.asarray(t) == 0, nll, kl) / math.log(2.0)
    if vb_weight is None:
        vb_weight = schedule.num_steps / 1000.0
    return mse + vb_weight * vb, {"mse": mse, "vb": vb}
