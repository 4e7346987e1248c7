"""Noise schedules of discrete-time Gaussian diffusion (DDPM / improved DDPM / ADM), respacing.

Conventions used by every module of `unclip_jax.diffusion`:
- A schedule has `num_steps` steps indexed 0..num_steps-1; step i has noise level
  `alphas_cumprod[i]` (written abar_i): x_i = sqrt(abar_i) x_0 + sqrt(1 - abar_i) eps.
- `timesteps[i]` is the ORIGINAL (training) timestep index of step i, int32. It is the identity for
  a full schedule; a respaced schedule keeps a subset of the original steps, and the model is always
  called with the original index, so one trained model serves every respacing.
- Schedule math is done in float64 numpy and stored as float32 jnp arrays.
"""
from __future__ import annotations

import math
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

Array = jax.Array


def betas_cosine(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Improved-DDPM cosine schedule: abar(t) = cos^2(((t/T) + s)/(1 + s) * pi/2).

    beta_t = 1 - abar((t+1)/T) / abar(t/T), clipped to `max_beta`. Returns float64 [T].
    """
    _check_num_timesteps(num_timesteps)

    def alpha_bar(u):
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((t + 1) / num_timesteps) / alpha_bar(t / num_timesteps), max_beta)
             for t in range(num_timesteps)]
    return np.asarray(betas, np.float64)


def betas_linear(num_timesteps: int, beta_start: float | None = None,
                 beta_end: float | None = None) -> np.ndarray:
    """ADM's scaled linear schedule: betas evenly spaced in [1e-4, 0.02] * 1000/T. float64 [T]."""
    _check_num_timesteps(num_timesteps)
    scale = 1000.0 / num_timesteps
    beta_start = 1e-4 * scale if beta_start is None else beta_start
    beta_end = 0.02 * scale if beta_end is None else beta_end
    return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


_BETA_SCHEDULES = {"cosine": betas_cosine, "linear": betas_linear}


def get_betas(name: str, num_timesteps: int) -> np.ndarray:
    """Betas of the named schedule ("cosine" | "linear"), float64 [num_timesteps]."""
    if name not in _BETA_SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}; "
                         f"expected one of {sorted(_BETA_SCHEDULES)}")
    return _BETA_SCHEDULES[name](num_timesteps)


def shift_logsnr(betas: np.ndarray, shift: float, max_beta: float = 0.999) -> np.ndarray:
    """Betas whose log-SNR, log(abar / (1 - abar)), is every step's plus `shift` (float64 [T]).

    Hoogeboom et al. 2023 (simple diffusion) shift the cosine schedule's log-SNR by
    2 log(64 / d) for a d-pixel model (negative above 64 px: more noise at every step) so that a
    resolution sees the same signal at a step as 64 px does in the original schedule; a positive
    shift (below 64 px) puts every step at less noise. Betas are capped at `max_beta` as the
    cosine schedule's are.
    """
    abar = np.cumprod(1.0 - np.asarray(betas, np.float64))
    logsnr = np.log(abar) - np.log1p(-abar) + float(shift)
    shifted = 1.0 / (1.0 + np.exp(-logsnr))
    return np.minimum(1.0 - shifted / np.append(1.0, shifted[:-1]), max_beta)


def _check_num_timesteps(num_timesteps):
    if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive int, got {num_timesteps!r}")


def space_timesteps(num_timesteps: int, spec: int | str) -> list[int]:
    """The original timesteps kept by a respacing `spec` (as improved DDPM / guided-diffusion).

    spec:
    - an int K (or "K"): K steps evenly strided over [0, T-1], both ends included: the steps
      round(k (T-1)/(K-1)), k = 0..K-1, with Python's round-half-to-even. This is exactly the
      timestep selection of diffusers' `UnCLIPScheduler.set_timesteps(K)` (numpy's round is
      half-to-even too) for every K, used by the Karlo stages (`diffusion.unclip`). Karlo's own
      code (guided-diffusion's) accumulates the float stride instead of multiplying, which gives
      the same steps for Karlo's K = 7, 25, 50 but moves one step by 1 for some K (21, 23, ...);
    - "ddimK": the steps range(0, T, stride) for the integer stride that gives exactly K steps;
    - "n1,n2,...": T is cut into len(sections) equal sections, section j gets n_j evenly strided
      steps (both section ends included), e.g. GLIDE's upsampler "10,10,3,2,2".
    Returns the sorted list of kept original indices.
    """
    _check_num_timesteps(num_timesteps)
    if isinstance(spec, str) and spec.startswith("ddim"):
        try:
            count = int(spec[len("ddim"):])
        except ValueError:
            raise ValueError(f"respacing spec {spec!r}: expected 'ddimK' with an int K") from None
        for stride in range(1, num_timesteps + 1):
            if len(range(0, num_timesteps, stride)) == count:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"respacing spec {spec!r}: no integer stride gives exactly {count} steps "
                         f"out of {num_timesteps}")
    if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        counts = [int(spec)]
    elif isinstance(spec, str):
        try:
            counts = [int(c) for c in spec.split(",")]
        except ValueError:
            raise ValueError(f"respacing spec {spec!r}: expected an int, 'ddimK' or a comma "
                             "separated list of ints like '10,10,3,2,2'") from None
    else:
        raise ValueError(f"respacing spec must be an int or a str, got {spec!r}")
    if any(c < 0 for c in counts) or sum(counts) == 0:
        raise ValueError(f"respacing spec {spec!r}: step counts must be >= 0 with a positive total")

    size_per, extra = divmod(num_timesteps, len(counts))
    kept, start = [], 0
    for j, count in enumerate(counts):
        size = size_per + (1 if j < extra else 0)
        if count > size:
            raise ValueError(f"respacing spec {spec!r}: section {j} has {size} timesteps, "
                             f"cannot take {count}")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        kept.extend(start + round(k * stride) for k in range(count))
        start += size
    return sorted(set(kept))


@struct.dataclass
class Schedule:
    """Per-step diffusion coefficients, all float32 [num_steps] (`timesteps` int32 [num_steps]).

    A pytree (flax struct), so it can be closed over or passed through `jax.jit`. Build it with
    `Schedule.from_betas`; `respace` derives a shorter schedule for fast sampling.
    """
    betas: Array
    alphas_cumprod: Array
    alphas_cumprod_prev: Array  # abar_{i-1}, with abar_{-1} = 1 (clean data)
    sqrt_alphas_cumprod: Array
    sqrt_one_minus_alphas_cumprod: Array
    log_one_minus_alphas_cumprod: Array
    sqrt_recip_alphas_cumprod: Array
    sqrt_recipm1_alphas_cumprod: Array
    posterior_variance: Array  # beta~_i = beta_i (1 - abar_{i-1}) / (1 - abar_i)
    posterior_log_variance_clipped: Array  # log beta~_i with beta~_0 replaced by beta~_1
    posterior_mean_coef1: Array  # weight of x_0 in the mean of q(x_{i-1} | x_i, x_0)
    posterior_mean_coef2: Array  # weight of x_i in the same mean
    timesteps: Array  # original timestep index of each step
    # The float64 betas as static metadata (a hashable tuple), so that `respace` recomputes from
    # exact values: betas near 1 (the cosine schedule's clipped 0.999) lose ~1e-5 relative
    # precision in 1 - beta when stored as float32.
    betas_float64: tuple = struct.field(pytree_node=False, default=(), repr=False)

    @property
    def num_steps(self) -> int:
        """Number of steps of this schedule (static: the arrays' length)."""
        return self.betas.shape[0]

    @classmethod
    def from_betas(cls, betas, timesteps=None) -> "Schedule":
        """Builds a schedule from betas [N] in (0, 1] (computed in float64, stored float32).

        timesteps: original index of each step, int [N]; defaults to 0..N-1.
        """
        betas = np.asarray(betas, np.float64)
        if betas.ndim != 1 or betas.size == 0:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not np.all((betas > 0) & (betas <= 1)):
            raise ValueError("betas must lie in (0, 1]")
        n = betas.shape[0]
        timesteps = np.arange(n) if timesteps is None else np.asarray(timesteps)
        if timesteps.shape != (n,):
            raise ValueError(f"timesteps has shape {timesteps.shape}; expected ({n},) like betas")

        alphas_cumprod = np.cumprod(1.0 - betas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # beta~_0 = 0: its log is clipped to beta~_1 (for a 1-step schedule, to beta_0).
        first = posterior_variance[1] if n > 1 else betas[0]
        posterior_log_variance_clipped = np.log(np.append(first, posterior_variance[1:]))
        f32 = lambda a: jnp.asarray(a, jnp.float32)
        return cls(
            betas=f32(betas),
            alphas_cumprod=f32(alphas_cumprod),
            alphas_cumprod_prev=f32(alphas_cumprod_prev),
            sqrt_alphas_cumprod=f32(np.sqrt(alphas_cumprod)),
            sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - alphas_cumprod)),
            log_one_minus_alphas_cumprod=f32(np.log(1.0 - alphas_cumprod)),
            sqrt_recip_alphas_cumprod=f32(np.sqrt(1.0 / alphas_cumprod)),
            sqrt_recipm1_alphas_cumprod=f32(np.sqrt(1.0 / alphas_cumprod - 1.0)),
            posterior_variance=f32(posterior_variance),
            posterior_log_variance_clipped=f32(posterior_log_variance_clipped),
            posterior_mean_coef1=f32(betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)),
            posterior_mean_coef2=f32((1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas)
                                     / (1.0 - alphas_cumprod)),
            timesteps=jnp.asarray(timesteps, jnp.int32),
            betas_float64=tuple(float(b) for b in betas),
        )

    @classmethod
    def named(cls, name: str, num_timesteps: int, logsnr_shift: float = 0.0) -> "Schedule":
        """The full schedule called `name` ("cosine" | "linear") with `num_timesteps` steps.

        `logsnr_shift` adds a constant to every step's log-SNR (`shift_logsnr`); 0 leaves the
        named schedule exactly as it is.
        """
        betas = get_betas(name, num_timesteps)
        return cls.from_betas(betas if not logsnr_shift else shift_logsnr(betas, logsnr_shift))

    def respace(self, use_timesteps: Iterable[int] | int | str) -> "Schedule":
        """A schedule that keeps only the steps `use_timesteps` (step indices of THIS schedule).

        `use_timesteps` may also be a spacing spec (int or str) for `space_timesteps`. The kept
        steps keep their alphas_cumprod: new beta_k = 1 - abar_{i_k} / abar_{i_{k-1}}, and
        `timesteps[k]` is the original timestep of kept step k. Needs concrete (non-traced) arrays.
        """
        if isinstance(use_timesteps, (str, int, np.integer)):
            use_timesteps = space_timesteps(self.num_steps, use_timesteps)
        keep = np.asarray(sorted(set(int(i) for i in use_timesteps)), np.int64)
        if keep.size == 0 or keep[0] < 0 or keep[-1] >= self.num_steps:
            raise ValueError(f"use_timesteps must be a non-empty set of steps in "
                             f"[0, {self.num_steps}), got {use_timesteps!r}")
        try:
            timesteps = np.asarray(self.timesteps)
            betas = np.asarray(self.betas_float64 or self.betas, np.float64)
        except jax.errors.TracerArrayConversionError:
            raise ValueError("Schedule.respace needs a concrete schedule; call it outside jax.jit")
        alphas_cumprod = np.cumprod(1.0 - betas)
        kept = alphas_cumprod[keep]
        new_betas = 1.0 - kept / np.append(1.0, kept[:-1])
        return Schedule.from_betas(new_betas, timesteps=timesteps[keep])
