"""Parity of Karlo's sampling settings (`unclip_jax.diffusion.unclip`, options of `samplers.ddpm_*`)
with diffusers' `UnCLIPScheduler` and the way `UnCLIPPipeline` drives it.

How the two sides get the same noise: `UnCLIPScheduler.step` draws its noise with
`randn_tensor(model_output.shape, generator=..., ...)`, a name imported into
`diffusers.schedulers.scheduling_unclip`. The tests replace that name (monkeypatch) with a function
that hands out prescribed float32 noise (and checks the requested shape), so diffusers' own step
code runs unchanged on the same noise the JAX side gets (`ddpm_step`'s `noise`, `ddpm_sample`'s
`step_noise`); a step at t = 0 must not ask for noise at all.

Tables: diffusers keeps betas / alphas_cumprod in float32. Its schedule is the same as this package's
(`betas_for_alpha_bar` computes exactly `Schedule.named("cosine", 1000).betas_float64` before its
float32 cast), but float32 tables cancel badly in 1 - alphas_cumprod[0] = 1 - (1 - beta_0)
(beta_0 = 4e-5: relative error up to eps/2 / beta_0 = 1.5e-3, ~4e3 float32 units in the last step
observed) and in 1 - alpha at t = 999. Karlo's own code (like this package) computes the tables in
float64. So the exact parity tests run diffusers' unchanged `set_timesteps` / `step` /
`_get_variance` code on float64 tables ("exact" scheduler; model outputs, samples and noise stay
float32 and so does diffusers' arithmetic on them) and demand SAME_MATH_F32; the "stock" tests bound
the float32 scheduler's deviation by its own table round-off, SAME_MATH_F32 + 0.5 / beta_0 units.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
scheduling_unclip = pytest.importorskip("diffusers.schedulers.scheduling_unclip")

from tests import numerics  # noqa: E402
from unclip_jax.diffusion import gaussian, samplers, unclip  # noqa: E402
from unclip_jax.diffusion.schedules import Schedule  # noqa: E402

FULL = Schedule.named("cosine", 1000)

# The scheduler configs written by diffusers' Karlo conversion (scripts/convert_kakao_brain_unclip_
# to_diffusers.py; diffusers' UnCLIPPipeline tests use the same); clip_sample defaults to True.
DIFFUSERS_CONFIGS = {
    "prior": dict(variance_type="fixed_small_log", prediction_type="sample",
                  num_train_timesteps=1000, clip_sample_range=5.0),
    "decoder": dict(variance_type="learned_range", prediction_type="epsilon",
                    num_train_timesteps=1000),
    "super_res": dict(variance_type="fixed_small_log", prediction_type="epsilon",
                      num_train_timesteps=1000),
}
# Sample shapes on the JAX side: the prior's embeddings [B, D], images NHWC (diffusers: NCHW).
SHAPES = {"prior": (3, 8), "decoder": (2, 4, 4, 3), "super_res": (2, 4, 4, 3)}
STAGES = ["prior", "decoder", "super_res"]


def _scheduler(stage, exact):
    sched = diffusers.UnCLIPScheduler(**DIFFUSERS_CONFIGS[stage])
    if exact:  # same schedule, float64 tables (see the module docstring)
        betas = torch.tensor(np.asarray(FULL.betas_float64), dtype=torch.float64)
        sched.betas, sched.alphas = betas, 1.0 - betas
        sched.alphas_cumprod = torch.cumprod(sched.alphas, dim=0)
        sched.one = torch.tensor(1.0, dtype=torch.float64)
    return sched


def _stock_ulps():
    """The stock float32 scheduler's own table round-off, in float32 units (see docstring)."""
    beta_0 = float(diffusers.UnCLIPScheduler().betas[0])
    return numerics.SAME_MATH_F32 + 0.5 / beta_0


def _to_torch(x):
    """JAX-side layout -> diffusers' (NHWC -> NCHW for images), float32 torch tensor."""
    x = np.asarray(x, np.float32)
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1) if x.ndim == 4 else x))


def _from_torch(x):
    x = x.numpy()
    return np.moveaxis(x, 1, -1) if x.ndim == 4 else x


class _PrescribedNoise:
    """Stands in for diffusers' `randn_tensor`: hands out the given noise rows in order."""

    def __init__(self, rows):
        self.rows = list(rows)

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        assert self.rows, "diffusers asked for more noise than the steps that add some"
        row = _to_torch(self.rows.pop(0))
        assert tuple(shape) == tuple(row.shape) and dtype in (None, torch.float32)
        return row


def test_karlo_settings_are_the_diffusers_configs():
    """Each stage's sampler options are the mapping of its diffusers scheduler config."""
    for stage in STAGES:
        config = _scheduler(stage, exact=False).config
        settings = unclip.KARLO_STAGES[stage]
        assert settings.sampler_kwargs() == dict(
            param={"sample": "x0", "epsilon": "eps"}[config.prediction_type],
            learned_variance=config.variance_type == "learned_range",
            clip_x0=config.clip_sample_range if config.clip_sample else None,
            clip_variance=False)
        assert settings.num_train_timesteps == config.num_train_timesteps
    assert [unclip.KARLO_STAGES[s].num_inference_steps for s in STAGES] == [25, 25, 7]
    assert [unclip.KARLO_STAGES[s].last_step_model for s in STAGES] == [False, False, True]


@pytest.mark.parametrize("steps", [25, 7, 50, 2])
def test_timesteps_equal_set_timesteps(steps):
    sched = diffusers.UnCLIPScheduler()
    sched.set_timesteps(steps)
    schedule = FULL.respace(steps)
    np.testing.assert_array_equal(np.asarray(schedule.timesteps)[::-1], sched.timesteps.numpy())
    if steps in (25, 7):
        stage = unclip.KARLO_SUPER_RES if steps == 7 else unclip.KARLO_PRIOR
        np.testing.assert_array_equal(stage.schedule().timesteps, schedule.timesteps)


def _step_cases(stage, seed=0):
    """Per step k (visit order): (x_t, model output, noise), JAX layout, float32."""
    settings = unclip.KARLO_STAGES[stage]
    shape = SHAPES[stage]
    out_shape = shape[:-1] + (2 * shape[-1],) if settings.learned_variance else shape
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(settings.num_inference_steps):
        x = rng.standard_normal(shape)
        out = rng.standard_normal(out_shape) * (2.0 if settings.param == "x0" else 1.0)
        if settings.learned_variance:  # v beyond [-1, 1] too: neither side clips it
            out[..., shape[-1]:] = rng.uniform(-1.5, 1.5, shape)
        noise = rng.standard_normal(shape)
        cases.append(tuple(a.astype(np.float32) for a in (x, out, noise)))
    return cases


def _diffusers_step(sched, k, x, out, noise, monkeypatch):
    timesteps = sched.timesteps
    t = timesteps[k]
    prev = timesteps[k + 1] if k + 1 < len(timesteps) else None  # as UnCLIPPipeline passes it
    feed = _PrescribedNoise([noise])
    monkeypatch.setattr(scheduling_unclip, "randn_tensor", feed)
    got = sched.step(_to_torch(out), t, _to_torch(x), prev_timestep=prev,
                     generator=torch.Generator().manual_seed(0)).prev_sample
    assert got.dtype == torch.float32
    assert len(feed.rows) == (1 if int(t) == 0 else 0)  # noise is drawn iff t > 0
    return _from_torch(got)


@pytest.mark.parametrize("exact", [True, False], ids=["float64_tables", "stock_float32"])
@pytest.mark.parametrize("stage", STAGES)
def test_step_equals_unclip_scheduler_step(stage, exact, monkeypatch):
    """`ddpm_step` with the stage's options = `UnCLIPScheduler.step` at every timestep of the
    stage's schedule (the first, t = 999, and the last, t = 0, included), same noise."""
    settings = unclip.KARLO_STAGES[stage]
    schedule = settings.schedule()
    sched = _scheduler(stage, exact)
    sched.set_timesteps(settings.num_inference_steps)
    n = schedule.num_steps

    @jax.jit
    def step(x, i, out, noise):
        return samplers.ddpm_step(lambda x_t, t: out, schedule, x, i, noise,
                                  **settings.sampler_kwargs())

    for k, (x, out, noise) in enumerate(_step_cases(stage)):
        want = _diffusers_step(sched, k, x, out, noise, monkeypatch)
        got = step(x, n - 1 - k, out, noise)
        numerics.assert_close(got, want, ulps=numerics.SAME_MATH_F32 if exact else _stock_ulps(),
                              err_msg=f"{stage} step k={k} t={int(sched.timesteps[k])}")


def test_unclipped_learned_range_is_what_diffusers_does(monkeypatch):
    """v outside [-1, 1]: `clip_variance=False` matches diffusers' learned_range; the default
    (clipped, ADM-style) does not, so the option is needed."""
    schedule = unclip.KARLO_DECODER.schedule()
    sched = _scheduler("decoder", exact=True)
    sched.set_timesteps(25)
    shape = SHAPES["decoder"]
    rng = np.random.default_rng(1)
    x, noise = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    out = np.concatenate([rng.standard_normal(shape), np.full(shape, 1.8)], -1).astype(np.float32)
    want = _diffusers_step(sched, 5, x, out, noise, monkeypatch)
    kwargs = unclip.KARLO_DECODER.sampler_kwargs()
    i = schedule.num_steps - 1 - 5
    got = samplers.ddpm_step(lambda x_t, t: out, schedule, x, i, noise, **kwargs)
    numerics.assert_close(got, want)
    clipped = samplers.ddpm_step(lambda x_t, t: out, schedule, x, i, noise,
                                 **dict(kwargs, clip_variance=True))
    assert np.max(np.abs(np.asarray(clipped) - want)) > 1e-3
    v = jnp.array([-2.0, -1.0, 0.3, 1.0, 2.0])
    lo, hi = schedule.posterior_log_variance_clipped[i], jnp.log(schedule.betas[i])
    numerics.assert_close(gaussian.learned_log_variance(schedule, v, i, clip=False),
                          (v + 1) / 2 * hi + (1 - v) / 2 * lo)


# ---------------------------------------------------------------------------------------------
# Whole loops with a toy deterministic model
# ---------------------------------------------------------------------------------------------

def _toy(xp, x, t, *, param, learned_variance, last=False):
    """A fixed function of (x_t, t), elementwise (the variance channels on the last axis), in
    numpy (xp=np, t an int) or jax (xp=jnp, t [B]); float32. `last` gives another model."""
    s = xp.asarray(t, xp.float32) / 1000.0
    if getattr(s, "ndim", 0):
        s = s.reshape(s.shape + (1,) * (x.ndim - 1))
    if param == "x0":
        out = (0.6 - 0.4 * s) * x + 0.3 * s - 0.2
    else:
        out = (0.7 + 0.25 * s) * x + 0.1 * (1.0 - s)
    if last:
        out = 0.5 * out - 0.05
    if learned_variance:  # v = 1.6 s - 0.8 + 0.3 x: outside [-1, 1] for some elements
        out = xp.concatenate([out, 1.6 * s - 0.8 + 0.3 * x], axis=-1)
    return out.astype(xp.float32)


def _pipeline_loop(stage, sched, x_T, step_noise, monkeypatch, *, swap_last=True):
    """Drives `sched` the way UnCLIPPipeline does (set_timesteps, prev_timestep = next timestep,
    super_res_last at the last step), with the toy model on diffusers' layout."""
    settings = unclip.KARLO_STAGES[stage]
    sched.set_timesteps(settings.num_inference_steps)
    timesteps = sched.timesteps
    monkeypatch.setattr(scheduling_unclip, "randn_tensor", _PrescribedNoise(step_noise))
    latents = _to_torch(x_T)
    for k, t in enumerate(timesteps):
        last = swap_last and settings.last_step_model and k == len(timesteps) - 1
        out = _toy(np, _from_torch(latents), int(t), param=settings.param,
                   learned_variance=settings.learned_variance, last=last)
        prev = timesteps[k + 1] if k + 1 < len(timesteps) else None
        latents = sched.step(_to_torch(out), t, latents, prev_timestep=prev,
                             generator=torch.Generator().manual_seed(0)).prev_sample
    return _from_torch(latents)


def _loop_inputs(stage, seed=2):
    n = unclip.KARLO_STAGES[stage].num_inference_steps
    rng = np.random.default_rng(seed)
    x_T = rng.standard_normal(SHAPES[stage]).astype(np.float32)
    return x_T, rng.standard_normal((n - 1,) + SHAPES[stage]).astype(np.float32)


def _jax_loop(stage, x_T, step_noise, *, swap_last=True):
    settings = unclip.KARLO_STAGES[stage]
    toy = functools.partial(_toy, jnp, param=settings.param,
                            learned_variance=settings.learned_variance)
    last = functools.partial(toy, last=True) if settings.last_step_model else None
    if not swap_last:
        return jax.jit(lambda x_T, z: samplers.ddpm_sample(
            toy, settings.schedule(), None, None, x_T=x_T, step_noise=z,
            **settings.sampler_kwargs()))(x_T, step_noise)
    return jax.jit(lambda x_T, z: settings.sample(toy, None, None, last_step_model_fn=last,
                                                  x_T=x_T, step_noise=z))(x_T, step_noise)


@pytest.mark.parametrize("exact", [True, False], ids=["float64_tables", "stock_float32"])
@pytest.mark.parametrize("stage", STAGES)
def test_loop_equals_pipeline_driven_scheduler(stage, exact, monkeypatch):
    """A whole stage (25 / 25 / 7 steps) from the same x_T with the same per-step noise."""
    x_T, step_noise = _loop_inputs(stage)
    want = _pipeline_loop(stage, _scheduler(stage, exact), x_T, step_noise, monkeypatch)
    got = _jax_loop(stage, x_T, step_noise)
    numerics.assert_close(got, want, ulps=numerics.SAME_MATH_F32 if exact else _stock_ulps())


def test_super_res_last_step_model_swap(monkeypatch):
    """super_res_last takes exactly the last step: the first model is traced once inside the one
    loop and called at the first 6 timesteps, the last model once at t = 0; the result is the
    pipeline's with super_res_last, and differs from the result without the swap."""
    settings = unclip.KARLO_SUPER_RES
    schedule = settings.schedule()
    x_T, step_noise = _loop_inputs("super_res")
    calls, traces = {"first": [], "last": []}, []

    def counted(name, last):
        def model_fn(x, t):
            traces.append(name)
            jax.debug.callback(lambda t: calls[name].append(int(t[0])), t)
            return _toy(jnp, x, t, param="eps", learned_variance=False, last=last)
        return model_fn

    def run(x_T, z):
        return settings.sample(counted("first", False), None, None, x_T=x_T, step_noise=z,
                               last_step_model_fn=counted("last", True), schedule=schedule)

    jaxpr = jax.make_jaxpr(run)(x_T, step_noise).jaxpr
    assert len([e for e in jaxpr.eqns if e.primitive.name in ("while", "scan")]) == 1
    assert sorted(traces) == ["first", "last"]
    got = jax.jit(run)(x_T, step_noise)
    jax.effects_barrier()
    timesteps = [int(t) for t in np.asarray(schedule.timesteps)[::-1]]
    assert calls == {"first": timesteps[:-1], "last": [0]}

    exact = _scheduler("super_res", exact=True)
    want = _pipeline_loop("super_res", exact, x_T, step_noise, monkeypatch)
    numerics.assert_close(got, want)
    no_swap = _pipeline_loop("super_res", exact, x_T, step_noise, monkeypatch, swap_last=False)
    numerics.assert_close(_jax_loop("super_res", x_T, step_noise, swap_last=False), no_swap)
    # The last step's eps enters x0 scaled by sqrt(1 - abar_0) = 6e-3: a small but real change.
    assert np.max(np.abs(no_swap - want)) > 1e-3


def test_step_noise_replays_the_default_rng_draws():
    """`step_noise` row k is the noise of step i = N-1-k: the fold_in(rng, i) draws replay the
    rng-driven sampler."""
    schedule = FULL.respace(6)
    kwargs = unclip.KARLO_PRIOR.sampler_kwargs()
    model_fn = functools.partial(_toy, jnp, param="x0", learned_variance=False)
    rng, x_T = jax.random.key(7), jax.random.normal(jax.random.key(8), (3, 8))
    z = jnp.stack([jax.random.normal(jax.random.fold_in(rng, i), x_T.shape)
                   for i in range(schedule.num_steps - 1, 0, -1)])
    a = samplers.ddpm_sample(model_fn, schedule, None, rng, x_T=x_T, **kwargs)
    b = samplers.ddpm_sample(model_fn, schedule, None, None, x_T=x_T, step_noise=z, **kwargs)
    numerics.assert_close(b, a)


def test_bad_inputs_get_clear_errors():
    toy = functools.partial(_toy, jnp, param="eps", learned_variance=False)
    x_T = jnp.zeros((2, 4, 4, 3))
    with pytest.raises(ValueError, match="pass last_step_model_fn"):
        unclip.KARLO_SUPER_RES.sample(toy, None, jax.random.key(0), x_T=x_T)
    with pytest.raises(ValueError, match="last_step_model_fn must be None"):
        unclip.KARLO_PRIOR.sample(toy, None, jax.random.key(0), x_T=x_T, last_step_model_fn=toy)
    with pytest.raises(ValueError, match=r"step_noise has shape \(7, 2, 4, 4, 3\); expected "
                                         r"\(6, 2, 4, 4, 3\)"):
        unclip.KARLO_SUPER_RES.sample(toy, None, None, x_T=x_T, last_step_model_fn=toy,
                                      step_noise=jnp.zeros((7,) + x_T.shape))
    with pytest.raises(ValueError, match="unless both x_T and step_noise"):
        samplers.ddpm_sample(toy, FULL.respace(7), None, None, param="eps", x_T=x_T)
