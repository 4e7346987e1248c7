"""Tests of unclip_jax.diffusion.gaussian: forward process, conversions, targets and losses."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.diffusion import gaussian as g
from unclip_jax.diffusion.schedules import Schedule

T = 1000
SCHEDULE = Schedule.named("cosine", T)
B, H, W, C = 4, 3, 3, 2
T_IDX = jnp.array([0, 1, 500, T - 1], jnp.int32)  # both ends included


def _data(seed=0, dtype=jnp.float32):
    k1, k2 = jax.random.split(jax.random.key(seed))
    x0 = jnp.clip(jax.random.normal(k1, (B, H, W, C)) * 0.5, -1, 1).astype(dtype)
    noise = jax.random.normal(k2, (B, H, W, C)).astype(dtype)
    return x0, noise


def test_q_sample_broadcasts_per_example_t():
    x0, noise = _data()
    x_t = g.q_sample(SCHEDULE, x0, T_IDX, noise)
    abar = np.asarray(SCHEDULE.alphas_cumprod)[np.asarray(T_IDX)][:, None, None, None]
    want = np.sqrt(abar) * np.asarray(x0) + np.sqrt(1 - abar) * np.asarray(noise)
    np.testing.assert_allclose(np.asarray(x_t), want, rtol=1e-5, atol=1e-6)
    assert g.extract(SCHEDULE.betas, T_IDX, x0).shape == (B, 1, 1, 1)
    assert g.extract(SCHEDULE.betas, jnp.int32(3), x0).shape == ()


def test_conversions_invert_each_other():
    x0, noise = _data(1)
    t = jnp.array([3, 100, 600, 900], jnp.int32)  # away from abar ~ 0 where x0 is ill-conditioned
    x_t = g.q_sample(SCHEDULE, x0, t, noise)
    close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-4)
    close(g.predict_x0_from_eps(SCHEDULE, x_t, t, noise), x0)
    close(g.predict_eps_from_x0(SCHEDULE, x_t, t, x0), noise)
    v = g.v_target(SCHEDULE, x0, t, noise)
    close(g.predict_x0_from_v(SCHEDULE, x_t, t, v), x0)
    close(g.predict_eps_from_v(SCHEDULE, x_t, t, v), noise)
    for param in g.PARAMS:
        target = g.training_targets(param, SCHEDULE, x0, t, noise)
        x0_hat, eps_hat = g.predict_x0_eps(param, SCHEDULE, x_t, t, target)
        close(x0_hat, x0)
        close(eps_hat, noise)
        np.testing.assert_allclose(g.mse_loss(param, SCHEDULE, target, x0, t, noise), 0, atol=1e-12)


def test_predict_x0_eps_clip_keeps_eps_consistent():
    x0, noise = _data(2)
    t = jnp.full((B,), 400, jnp.int32)
    x_t = g.q_sample(SCHEDULE, 3.0 * x0, t, noise)  # x0 well outside [-1, 1]
    x0_hat, eps_hat = g.predict_x0_eps("x0", SCHEDULE, x_t, t, 3.0 * x0, clip_x0=1.0)
    assert float(jnp.max(jnp.abs(x0_hat))) <= 1.0
    np.testing.assert_allclose(g.q_sample(SCHEDULE, x0_hat, t, eps_hat), x_t, atol=1e-5)


def test_mse_loss_is_per_example_and_checks_input():
    x0, noise = _data(3)
    out = jnp.zeros_like(x0)
    loss = g.mse_loss("eps", SCHEDULE, out, x0, T_IDX, noise)
    assert loss.shape == (B,)
    np.testing.assert_allclose(loss, jnp.mean(noise**2, axis=(1, 2, 3)), rtol=1e-6)
    with pytest.raises(ValueError, match="param='score'"):
        g.mse_loss("score", SCHEDULE, out, x0, T_IDX, noise)
    with pytest.raises(ValueError, match="hybrid_loss"):
        g.mse_loss("eps", SCHEDULE, jnp.concatenate([out, out], -1), x0, T_IDX, noise)


def test_learned_log_variance_interpolates_between_bounds():
    t = jnp.array([1, 10, 500, 999], jnp.int32)
    shape = (4, 2)
    lo = np.asarray(SCHEDULE.posterior_log_variance_clipped)[np.asarray(t)][:, None]
    hi = np.log(np.asarray(SCHEDULE.betas))[np.asarray(t)][:, None]
    get = lambda v: np.asarray(g.learned_log_variance(SCHEDULE, jnp.full(shape, v), t))
    np.testing.assert_allclose(get(-1.0), np.broadcast_to(lo, shape), rtol=1e-6)
    np.testing.assert_allclose(get(1.0), np.broadcast_to(hi, shape), rtol=1e-6)
    np.testing.assert_allclose(get(0.0), np.broadcast_to((lo + hi) / 2, shape), rtol=1e-6)
    np.testing.assert_allclose(get(50.0), get(1.0))  # clipped to the upper bound


def test_normal_kl_closed_form():
    assert float(g.normal_kl(0.3, 0.2, 0.3, 0.2)) == pytest.approx(0.0, abs=1e-7)
    # KL(N(0,1) || N(1,4)) = log 2 + (1 + 1)/8 - 1/2
    got = g.normal_kl(0.0, 0.0, 1.0, math.log(4.0))
    assert float(got) == pytest.approx(math.log(2) + 0.25 - 0.5, rel=1e-6)


@pytest.mark.parametrize("mean,log_scale", [(0.0, -1.0), (0.93, -4.0), (-1.0, -6.0), (0.2, 1.0)])
def test_discretized_likelihood_is_a_distribution_over_256_bins(mean, log_scale):
    centres = jnp.linspace(-1.0, 1.0, 256)
    log_p = g.discretized_gaussian_log_likelihood(centres, jnp.full_like(centres, mean),
                                                  jnp.full_like(centres, log_scale))
    assert np.all(np.isfinite(np.asarray(log_p)))
    assert float(jnp.sum(jnp.exp(log_p))) == pytest.approx(1.0, abs=1e-4)


def _hybrid_inputs(dtype, scale=1.0, seed=4):
    x0, noise = _data(seed, dtype)
    x_t = g.q_sample(SCHEDULE, x0.astype(jnp.float32), T_IDX, noise.astype(jnp.float32))
    out = scale * jax.random.normal(jax.random.key(seed + 1), (B, H, W, 2 * C))
    return out.astype(dtype), x0, x_t.astype(dtype), noise


@jax.jit
def _hybrid_all_params(out, x0, x_t, noise):
    """(loss, terms, d loss / d out) for every param, in one compiled call (fast on a busy CPU)."""
    results = {}
    for param in g.PARAMS:
        loss_fn = lambda o: g.hybrid_loss(param, SCHEDULE, o, x0, x_t, T_IDX, noise)
        (loss, terms) = loss_fn(out)
        grads = jax.grad(lambda o: loss_fn(o)[0].sum())(out.astype(jnp.float32))
        results[param] = (loss, terms, grads)
    return results


@pytest.mark.parametrize("scale", [1.0, 1e3])
def test_hybrid_loss_finite_for_bf16(scale):
    out, x0, x_t, noise = _hybrid_inputs(jnp.bfloat16, scale)
    for param, (loss, terms, grads) in _hybrid_all_params(out, x0, x_t, noise).items():
        assert loss.shape == (B,) and loss.dtype == jnp.float32, param
        assert np.all(np.isfinite(np.asarray(loss))), param
        np.testing.assert_allclose(loss, terms["mse"] + T / 1000 * terms["vb"], rtol=1e-6)
        assert np.all(np.isfinite(np.asarray(grads))), param


def test_hybrid_vb_trains_only_the_variance():
    out, x0, x_t, noise = _hybrid_inputs(jnp.float32)
    terms = lambda o: g.hybrid_loss("eps", SCHEDULE, o, x0, x_t, T_IDX, noise)[1]
    vb_grad, mse_grad = jax.jit(lambda o: (jax.grad(lambda o: terms(o)["vb"].sum())(o),
                                           jax.grad(lambda o: terms(o)["mse"].sum())(o)))(out)
    assert np.all(np.asarray(vb_grad[..., :C]) == 0)  # stop-gradient on the mean part
    assert np.any(np.asarray(vb_grad[..., C:]) != 0)
    assert np.all(np.asarray(mse_grad[..., C:]) == 0)
    assert np.any(np.asarray(mse_grad[..., :C]) != 0)


def test_hybrid_vb_is_zero_for_the_true_posterior():
    x0, noise = _data(5)
    t = jnp.array([1, 7, 300, 999], jnp.int32)
    x_t = g.q_sample(SCHEDULE, x0, t, noise)
    # Exact eps and v_var = -1 (log-variance = log beta~_t, the true posterior's for t >= 1).
    out = jnp.concatenate([noise, -jnp.ones_like(noise)], axis=-1)
    loss, terms = g.hybrid_loss("eps", SCHEDULE, out, x0, x_t, t, noise)
    np.testing.assert_allclose(terms["vb"], 0.0, atol=2e-3)
    np.testing.assert_allclose(terms["mse"], 0.0, atol=1e-10)
    with pytest.raises(ValueError, match="even number of channels"):
        g.hybrid_loss("eps", SCHEDULE, out[..., :3], x0, x_t, t, noise)


@pytest.mark.parametrize("param", ["eps", "x0", "v"])
def test_min_snr_weighted_loss_is_min_snr_times_the_x0_error(param):
    """For every parameterisation, weight * ||param error||^2 == min(snr, gamma) * ||x0 error||^2."""
    x0, noise = _data()
    x_t = g.q_sample(SCHEDULE, x0, T_IDX, noise)
    x0_hat = x0 + 0.1 * jax.random.normal(jax.random.key(5), x0.shape)
    eps_hat = g.predict_eps_from_x0(SCHEDULE, x_t, T_IDX, x0_hat)
    abar = g.extract(SCHEDULE.alphas_cumprod, T_IDX, x0)
    outputs = {"eps": eps_hat, "x0": x0_hat,
               "v": jnp.sqrt(abar) * eps_hat - jnp.sqrt(1 - abar) * x0_hat}
    gamma = 5.0
    weighted = g.mse_loss(param, SCHEDULE, outputs[param], x0, T_IDX, noise, min_snr_gamma=gamma)
    snr = SCHEDULE.alphas_cumprod[T_IDX] / (1 - SCHEDULE.alphas_cumprod[T_IDX])
    x0_err = jnp.mean(jnp.square(x0_hat - x0), axis=(1, 2, 3))
    np.testing.assert_allclose(weighted, jnp.minimum(snr, gamma) * x0_err, rtol=2e-3, atol=1e-6)
    plain = g.mse_loss(param, SCHEDULE, outputs[param], x0, T_IDX, noise)
    np.testing.assert_allclose(g.mse_loss(param, SCHEDULE, outputs[param], x0, T_IDX, noise, 0.0), plain)


def test_lognormal_noise_levels_follow_edm_and_uniform_stays_uniform():
    import ml_collections
    from unclip_jax.stages import image_diffusion
    schedule = Schedule.named("cosine", 1000)
    cfg = ml_collections.ConfigDict({"t_sampling": "lognormal", "t_lognormal_mean": -1.2,
                                     "t_lognormal_std": 1.2})
    t = np.asarray(image_diffusion.sample_t(schedule, jax.random.key(0), 200_000, cfg))
    assert t.dtype == np.int32 and t.min() >= 0 and t.max() <= 999
    # Each draw is the step with the nearest sigma at or above it, so the steps' sigmas follow EDM's
    # log-normal up to the schedule's spacing: the median sigma is exp(-1.2), the quartiles +-0.81 std.
    sigma = np.sqrt(1.0 / np.asarray(schedule.alphas_cumprod, np.float64) - 1.0)[t]
    np.testing.assert_allclose(np.median(np.log(sigma)), -1.2, atol=0.02)
    q1, q3 = np.percentile(np.log(sigma), [25, 75])
    np.testing.assert_allclose([q1, q3], [-1.2 - 0.809, -1.2 + 0.809], atol=0.03)
    uniform = np.asarray(image_diffusion.sample_t(schedule, jax.random.key(0), 200_000))
    np.testing.assert_allclose(np.bincount(uniform // 100) / 200_000, 0.1, atol=0.005)
    with pytest.raises(ValueError, match="t_sampling='edm'"):
        image_diffusion.sample_t(schedule, jax.random.key(0), 4, ml_collections.ConfigDict({"t_sampling": "edm"}))
