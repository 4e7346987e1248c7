"""Tests of unclip_jax.diffusion.samplers against an exactly known model.

The data distribution is a Gaussian N(mu, diag(s^2)) in D dims. Its optimal denoiser is analytic:
with a = sqrt(abar_t), E[x0 | x_t] = mu + a s^2 / (abar s^2 + 1 - abar) (x_t - a mu), and the
optimal reverse variance is beta~ + coef1^2 Var[x0 | x_t] with Var[x0|x_t] = s^2 (1-abar) /
(abar s^2 + 1 - abar). So every sampler can be checked for the distribution it produces, free of
any training error. The model functions index the FULL schedule with the original timestep, which
also checks that samplers on respaced schedules call the model with original timesteps.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import numerics
from unclip_jax.diffusion import samplers
from unclip_jax.diffusion.schedules import Schedule

FULL = Schedule.named("cosine", 1000)
STEPS = 100
SCHEDULE = FULL.respace(STEPS)
MU = jnp.array([0.5, -1.0, 0.25])
STD = jnp.array([0.3, 0.5, 0.4])
N = 4096


def denoiser(mu, std, param, *, learned_variance=False, schedule=SCHEDULE):
    """Exact model_fn(x_t [B, D], t [B] original timesteps) for data N(mu, diag(std^2))."""

    def model_fn(x, t):
        abar = FULL.alphas_cumprod[t][:, None]
        a, sigma = jnp.sqrt(abar), jnp.sqrt(1.0 - abar)
        x0 = mu + a * std**2 / (abar * std**2 + 1.0 - abar) * (x - a * mu)
        eps = (x - a * x0) / sigma
        out = {"x0": x0, "eps": eps, "v": a * eps - sigma * x0}[param]
        if not learned_variance:
            return out
        # Optimal variance of step i of `schedule` (the one being sampled), as ADM's v_var.
        i = jnp.searchsorted(schedule.timesteps, t)
        var_x0 = std**2 * (1.0 - abar) / (abar * std**2 + 1.0 - abar)
        log_var = jnp.log(schedule.posterior_variance[i][:, None]
                          + schedule.posterior_mean_coef1[i][:, None] ** 2 * var_x0)
        lo = schedule.posterior_log_variance_clipped[i][:, None]
        hi = jnp.log(schedule.betas[i])[:, None]
        frac = (log_var - lo) / jnp.maximum(hi - lo, 1e-12)
        return jnp.concatenate([out, 2.0 * frac - 1.0], axis=-1)

    return model_fn


def _run(name, param, *, learned_variance=False, seed=0, **kwargs):
    model_fn = denoiser(MU, STD, param, learned_variance=learned_variance)
    run = jax.jit(lambda rng: samplers.sample(name, model_fn, SCHEDULE, (N, 3), rng, param=param,
                                              learned_variance=learned_variance, clip_x0=None,
                                              **kwargs))
    return np.asarray(run(jax.random.key(seed)))


# Tolerances. Sampling error with N=4096: the mean's standard error is std/64 <= 0.008 (atol 0.03
# is ~4 SE); a std's relative standard error is 1/sqrt(2N) = 1.1%. On top of it each sampler has a
# discretisation bias at 100 cosine-strided steps, which for this target (measured; first order for
# DDPM/DDIM, second order for DPM-Solver++: at 50 steps it doubles resp. nearly quadruples) is up to
# -6% (DDPM with fixed small variance and DDIM eta=1: beta~ misses coef1^2 Var[x0|x_t]), -2%
# (DDIM eta=0) and +2% (DPM-Solver++ 2M). Each tolerance is that bias plus ~3 SE.
CASES = [
    ("ddpm", "eps", {}, 0.09),
    ("ddim", "eps", {"eta": 1.0}, 0.09),
    ("ddim", "eps", {}, 0.05),
    ("ddim", "x0", {}, 0.05),
    ("ddim", "v", {}, 0.05),
    ("dpm++2m", "eps", {}, 0.05),
    ("dpm++2m", "x0", {}, 0.05),
]


@pytest.mark.parametrize("name,param,kwargs,std_rtol", CASES)
def test_sampler_recovers_gaussian_target(name, param, kwargs, std_rtol):
    x = _run(name, param, **kwargs)
    assert x.shape == (N, 3) and np.all(np.isfinite(x))
    np.testing.assert_allclose(x.mean(0), MU, atol=0.03)
    np.testing.assert_allclose(x.std(0), STD, rtol=std_rtol)


def test_ddim_eta_one_is_ddpm_with_fixed_small_variance():
    """sigma = eta sqrt(beta~) makes DDIM eta=1 the same Markov chain as DDPM (same noise draws)."""
    model_fn = denoiser(MU, STD, "eps")
    schedule = FULL.respace(10)

    @jax.jit
    def run(rng):
        return (samplers.ddim_sample(model_fn, schedule, (64, 3), rng, param="eps", eta=1.0),
                samplers.ddpm_sample(model_fn, schedule, (64, 3), rng, param="eps"))

    ddim, ddpm = run(jax.random.key(5))
    # Two algebraically equal update rules: round-off in the eps -> x0 step is multiplied by
    # 1/sqrt(abar_t), up to 2e4 at the last of these 10 steps (~100 units observed; 1024 allowed).
    numerics.assert_close(ddim, ddpm, ulps=1024)


def test_ddpm_sample_is_a_loop_of_ddpm_steps():
    """`ddpm_step` (also RePaint's step) is ddpm_sample's step: step i's noise is fold_in(rng, i),
    and the last step (i = 0) adds none: the posterior mean."""
    # x0-prediction: no eps -> x0 step amplifying the two programs' different round-off.
    model_fn = denoiser(MU, STD, "x0", learned_variance=True, schedule=FULL.respace(5))
    schedule, rng = FULL.respace(5), jax.random.key(3)
    kwargs = dict(param="x0", learned_variance=True, clip_x0=None)
    x_T = jax.random.normal(jax.random.key(4), (8, 3))
    x = x_T
    for i in reversed(range(schedule.num_steps)):
        noise = jax.random.normal(jax.random.fold_in(rng, i), x.shape, jnp.float32)
        x = samplers.ddpm_step(model_fn, schedule, x, i, noise, **kwargs)
    expected = samplers.ddpm_sample(model_fn, schedule, None, rng, x_T=x_T, **kwargs)
    numerics.assert_close(x, expected, ulps=64)
    last = [samplers.ddpm_step(model_fn, schedule, x_T, 0, noise, **kwargs)
            for noise in (jnp.zeros_like(x_T), jnp.full_like(x_T, 1e3))]
    np.testing.assert_array_equal(last[0], last[1])


def test_ddpm_with_optimal_learned_variance_is_unbiased():
    """With the optimal variance of every step DDPM loses its fixed-small bias (<1% here)."""
    x = _run("ddpm", "eps", learned_variance=True)
    np.testing.assert_allclose(x.mean(0), MU, atol=0.03)
    np.testing.assert_allclose(x.std(0), STD, rtol=0.03)


def test_clip_x0_bounds_every_sampler():
    model_fn = denoiser(jnp.array([-1.0, 0.9]), jnp.array([0.5, 0.5]), "eps")

    @jax.jit
    def run(rng):
        return [samplers.sample(name, model_fn, SCHEDULE.respace(10), (256, 2), rng, param="eps",
                                clip_x0=1.0) for name in ("ddpm", "ddim", "dpm++2m")]

    for x in run(jax.random.key(0)):
        assert float(jnp.max(jnp.abs(x))) <= 1.0
        assert float(jnp.max(jnp.abs(x))) == 1.0  # the clip is active for this target


def _round_trip(param, steps, iters):
    model_fn = denoiser(MU, STD, param)
    schedule = FULL.respace(steps)

    @jax.jit
    def run(y):
        x_T = samplers.ddim_invert(model_fn, schedule, y, param=param, num_fixed_point_iters=iters)
        return samplers.ddim_sample(model_fn, schedule, x_T, None, param=param, clip_x0=None), x_T

    y = MU + STD * jax.random.normal(jax.random.key(1), (256, 3))
    y_again, x_T = run(y)
    return float(jnp.max(jnp.abs(y_again - y))), x_T


@pytest.mark.parametrize("param", ["eps", "x0", "v"])
def test_ddim_inversion_regenerates_input(param):
    """DDIM eta=0 from the inverted x_T gives the input back, to 1e-3 at 50 steps.

    The explicit inversion (ADM's) evaluates the model at the other end of each step than the
    sampler, so its round trip has an O(1/steps) error (about 0.1 at 50 steps for this target);
    three fixed-point iterations per step remove it.
    """
    err, x_T = _round_trip(param, 50, iters=3)
    assert err < 1e-3
    assert abs(float(jnp.std(x_T)) - 1.0) < 0.1  # x_T looks like unit noise


def test_explicit_ddim_inversion_error_is_first_order():
    err_50, _ = _round_trip("eps", 50, iters=0)
    err_100, _ = _round_trip("eps", 100, iters=0)
    assert err_50 < 0.15
    assert 1.7 < err_50 / err_100 < 2.3


# ---------------------------------------------------------------------------------------------
# Classifier-free guidance
# ---------------------------------------------------------------------------------------------

MU_UNCOND = jnp.array([0.0, 0.0, 0.0])


def _doubled(param, learned_variance=False):
    """A batched model: first half conditional (target MU), second half unconditional."""
    cond = denoiser(MU, STD, param, learned_variance=learned_variance)
    uncond = denoiser(MU_UNCOND, 2 * STD, param, learned_variance=learned_variance)

    def model_fn(x2, t2):
        b = x2.shape[0] // 2
        return jnp.concatenate([cond(x2[:b], t2[:b]), uncond(x2[b:], t2[b:])], axis=0)

    return cond, uncond, model_fn


@pytest.mark.parametrize("learned_variance", [False, True])
def test_guidance_formula_and_scale_one(learned_variance):
    cond, uncond, model_fn = _doubled("eps", learned_variance)
    x = jax.random.normal(jax.random.key(2), (8, 3))
    t = jnp.arange(8, dtype=jnp.int32) * 120
    c, u = cond(x, t), uncond(x, t)
    np.testing.assert_array_equal(samplers.guided(model_fn, 1.0, learned_variance=learned_variance)(
        x, t), c)
    numerics.assert_close(samplers.guided(model_fn, jnp.float32(1.0),
                                          learned_variance=learned_variance)(x, t), c)
    got = samplers.guided(model_fn, 3.0, learned_variance=learned_variance)(x, t)
    if learned_variance:
        c, c_var = c[:, :3], c[:, 3:]
        u = u[:, :3]
        np.testing.assert_array_equal(got[:, 3:], c_var)  # the conditional variance is kept
        got = got[:, :3]
    numerics.assert_close(got, u + 3.0 * (c - u))


def test_guided_sampler_with_scale_one_equals_conditional_sampler():
    cond, _, model_fn = _doubled("v")
    x_T = jax.random.normal(jax.random.key(3), (64, 3))

    @jax.jit
    def run(x_T):
        guided = samplers.ddim_sample(samplers.guided(model_fn, 1.0), SCHEDULE, x_T, param="v",
                                      clip_x0=None)
        plain = samplers.ddim_sample(cond, SCHEDULE, x_T, param="v", clip_x0=None)
        return guided, plain

    guided, plain = run(x_T)
    numerics.assert_close(guided, plain)


def test_guided_rejects_undoubled_model():
    with pytest.raises(ValueError, match=r"expected 2 \* 4"):
        samplers.guided(lambda x, t: x[: x.shape[0] // 2], 2.0)(jnp.zeros((4, 3)),
                                                                jnp.zeros((4,), jnp.int32))


# ---------------------------------------------------------------------------------------------
# One compiled loop, one model call per step
# ---------------------------------------------------------------------------------------------

def _loops(jaxpr):
    return [e for e in jaxpr.eqns if e.primitive.name in ("while", "scan")]


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpm++2m"])
def test_sampler_is_one_loop_under_jit_with_traced_params(name):
    schedule = FULL.respace(7)
    traces, calls = [], []

    def run(params, rng, schedule):
        def model_fn(x, t):
            traces.append(1)
            jax.debug.callback(lambda: calls.append(1))
            return denoiser(params["mu"], params["std"], "x0")(x, t)

        return samplers.sample(name, model_fn, schedule, (4, 3), rng, param="x0", clip_x0=None)

    params = {"mu": MU, "std": STD}
    assert len(_loops(jax.make_jaxpr(run)(params, jax.random.key(0), schedule).jaxpr)) == 1
    assert len(traces) == 1  # the model is traced once, inside the loop body
    x = jax.jit(run)(params, jax.random.key(0), schedule)  # params and schedule both traced
    jax.effects_barrier()
    assert x.shape == (4, 3) and len(calls) == schedule.num_steps


def test_ddim_invert_model_calls():
    schedule = FULL.respace(6)
    calls = []

    def model_fn(x, t):
        jax.debug.callback(lambda: calls.append(1))
        return denoiser(MU, STD, "eps")(x, t)

    for iters, expected in [(0, 5), (2, 5 + 2 * 6)]:
        calls.clear()
        jax.jit(lambda y: samplers.ddim_invert(model_fn, schedule, y, param="eps",
                                               num_fixed_point_iters=iters))(jnp.zeros((2, 3)))
        jax.effects_barrier()
        assert len(calls) == expected


def test_bad_inputs_get_clear_errors():
    model_fn = denoiser(MU, STD, "eps")
    with pytest.raises(ValueError, match="unknown sampler 'euler'.*dpm\\+\\+2m"):
        samplers.sample("euler", model_fn, SCHEDULE, (2, 3), jax.random.key(0), param="eps")
    with pytest.raises(ValueError, match="param='noise'"):
        samplers.ddpm_sample(model_fn, SCHEDULE, (2, 3), jax.random.key(0), param="noise")
    with pytest.raises(ValueError, match=r"model_fn returned shape \(2, 3\); expected \(2, 6\)"):
        samplers.ddim_sample(model_fn, SCHEDULE, (2, 3), jax.random.key(0), param="eps",
                             learned_variance=True)
    with pytest.raises(ValueError, match="needs an rng"):
        samplers.ddim_sample(model_fn, SCHEDULE, jnp.zeros((2, 3)), None, param="eps", eta=0.5)
    with pytest.raises(ValueError, match="needs an rng"):
        samplers.ddpm_sample(model_fn, SCHEDULE, (2, 3), None, param="eps")
    with pytest.raises(ValueError, match=r"x_T has shape \(2, 3\); expected \(4, 3\)"):
        samplers.dpm_solver_pp_2m_sample(model_fn, SCHEDULE, (4, 3), None, param="eps",
                                         x_T=jnp.zeros((2, 3)))
