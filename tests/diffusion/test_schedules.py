"""Tests of unclip_jax.diffusion.schedules: closed forms, posterior coefficients, respacing."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.diffusion import schedules
from unclip_jax.diffusion.schedules import Schedule, space_timesteps


def _alpha_bar_cosine(u, s=0.008):
    return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2


def test_cosine_alpha_bar_matches_formula_and_clips_betas():
    T = 1000
    betas = schedules.betas_cosine(T)
    assert betas.dtype == np.float64 and betas.shape == (T,)
    assert betas.max() <= 0.999 and betas[-1] == pytest.approx(0.999)
    abar = np.cumprod(1 - betas)
    expected = np.array([_alpha_bar_cosine((t + 1) / T) / _alpha_bar_cosine(0.0) for t in range(T)])
    unclipped = betas < 0.999
    np.testing.assert_allclose(abar[unclipped], expected[unclipped], rtol=1e-9)
    assert np.all(np.diff(betas) >= 0)


@pytest.mark.parametrize("T", [1000, 4000, 250])
def test_linear_endpoints_scale_with_T(T):
    betas = schedules.betas_linear(T)
    assert betas[0] == pytest.approx(1e-4 * 1000 / T)
    assert betas[-1] == pytest.approx(0.02 * 1000 / T)
    np.testing.assert_allclose(np.diff(betas), np.diff(betas)[0], rtol=1e-9)


def test_get_betas_names_and_unknown_name():
    np.testing.assert_array_equal(schedules.get_betas("cosine", 10), schedules.betas_cosine(10))
    np.testing.assert_array_equal(schedules.get_betas("linear", 10), schedules.betas_linear(10))
    with pytest.raises(ValueError, match="unknown noise schedule 'sigmoid'"):
        schedules.get_betas("sigmoid", 10)
    with pytest.raises(ValueError, match="num_timesteps"):
        schedules.get_betas("cosine", 0)


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_schedule_fields_match_closed_forms(name):
    T = 1000
    betas = schedules.get_betas(name, T)
    sch = Schedule.named(name, T)
    assert sch.num_steps == T
    np.testing.assert_array_equal(np.asarray(sch.timesteps), np.arange(T))
    assert sch.timesteps.dtype == jnp.int32 and sch.betas.dtype == jnp.float32
    abar = np.cumprod(1 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    close = lambda got, want: np.testing.assert_allclose(np.asarray(got), want, rtol=2e-6)
    close(sch.alphas_cumprod, abar)
    close(sch.alphas_cumprod_prev, abar_prev)
    close(sch.sqrt_alphas_cumprod, np.sqrt(abar))
    close(sch.sqrt_one_minus_alphas_cumprod, np.sqrt(1 - abar))
    close(sch.log_one_minus_alphas_cumprod, np.log(1 - abar))
    close(sch.sqrt_recip_alphas_cumprod, 1 / np.sqrt(abar))
    close(sch.sqrt_recipm1_alphas_cumprod, np.sqrt(1 / abar - 1))
    post_var = betas * (1 - abar_prev) / (1 - abar)
    close(sch.posterior_variance, post_var)
    close(sch.posterior_log_variance_clipped[1:], np.log(post_var[1:]))
    close(sch.posterior_log_variance_clipped[0], np.log(post_var[1]))  # beta~_0 = 0 is clipped
    close(sch.posterior_mean_coef1, betas * np.sqrt(abar_prev) / (1 - abar))
    close(sch.posterior_mean_coef2, (1 - abar_prev) * np.sqrt(1 - betas) / (1 - abar))


def test_posterior_is_bayes_rule():
    """q(x_{t-1}|x_t,x0) ∝ N(x_t; sqrt(a_t) x_{t-1}, b_t) N(x_{t-1}; sqrt(abar_{t-1}) x0, 1-abar_{t-1})

    gives precision a_t/b_t + 1/(1-abar_{t-1}) and the mean coefficients below.
    """
    betas = schedules.betas_cosine(100)
    sch = Schedule.from_betas(betas)
    abar = np.cumprod(1 - betas)
    t = np.arange(1, 100)
    precision = (1 - betas[t]) / betas[t] + 1 / (1 - abar[t - 1])
    np.testing.assert_allclose(np.asarray(sch.posterior_variance)[t], 1 / precision, rtol=1e-5)
    coef_xt = np.sqrt(1 - betas[t]) / betas[t] / precision
    coef_x0 = np.sqrt(abar[t - 1]) / (1 - abar[t - 1]) / precision
    np.testing.assert_allclose(np.asarray(sch.posterior_mean_coef2)[t], coef_xt, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(sch.posterior_mean_coef1)[t], coef_x0, rtol=1e-5)


def test_from_betas_rejects_bad_input():
    with pytest.raises(ValueError, match="1-D"):
        Schedule.from_betas(np.ones((2, 2)) * 0.1)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        Schedule.from_betas([0.1, 0.0])


def test_space_timesteps_int_spans_both_ends():
    kept = space_timesteps(1000, 250)
    assert len(kept) == 250 and kept[0] == 0 and kept[-1] == 999
    assert space_timesteps(1000, "250") == kept
    assert space_timesteps(100, 100) == list(range(100))
    assert space_timesteps(1000, 1) == [0]


def test_space_timesteps_ddim_stride():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    kept = space_timesteps(1000, "ddim27")
    assert len(kept) == 27 and kept[0] == 0 and len(set(np.diff(kept))) == 1
    with pytest.raises(ValueError, match="no integer stride"):
        space_timesteps(1000, "ddim999")
    with pytest.raises(ValueError, match="ddimK"):
        space_timesteps(1000, "ddimx")


def test_space_timesteps_sections_like_glide_upsampler():
    kept = space_timesteps(1000, "10,10,3,2,2")
    assert len(kept) == 27
    counts = np.histogram(kept, bins=[0, 200, 400, 600, 800, 1000])[0]
    np.testing.assert_array_equal(counts, [10, 10, 3, 2, 2])
    assert {0, 199, 200, 399, 999} <= set(kept)  # each section keeps both of its ends
    with pytest.raises(ValueError, match="section 0 has 2 timesteps"):
        space_timesteps(10, "3,1,1,1,1")
    with pytest.raises(ValueError, match="comma"):
        space_timesteps(10, "a,b")
    with pytest.raises(ValueError, match="positive total"):
        space_timesteps(10, "0,0")


def test_respace_keeps_alphas_cumprod_and_maps_timesteps():
    full = Schedule.named("cosine", 1000)
    kept = space_timesteps(1000, "10,10,3,2,2")
    sch = full.respace(kept)
    assert sch.num_steps == 27
    np.testing.assert_array_equal(np.asarray(sch.timesteps), kept)
    np.testing.assert_allclose(np.asarray(sch.alphas_cumprod),
                               np.asarray(full.alphas_cumprod)[kept], rtol=1e-5)
    abar = np.cumprod(1 - schedules.betas_cosine(1000))[kept]
    np.testing.assert_allclose(np.asarray(sch.betas), 1 - abar / np.append(1.0, abar[:-1]),
                               rtol=1e-6)
    # The same through a spec string, and respacing the identity changes nothing.
    np.testing.assert_array_equal(np.asarray(full.respace("10,10,3,2,2").betas),
                                  np.asarray(sch.betas))
    same = full.respace(range(1000))
    for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(full)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


def test_respace_of_respaced_composes_timesteps():
    full = Schedule.named("linear", 1000)
    coarse = full.respace("ddim50").respace([0, 10, 49])
    np.testing.assert_array_equal(np.asarray(coarse.timesteps), [0, 200, 980])
    np.testing.assert_allclose(np.asarray(coarse.alphas_cumprod),
                               np.asarray(full.alphas_cumprod)[[0, 200, 980]], rtol=1e-5)
    with pytest.raises(ValueError, match="use_timesteps"):
        full.respace([1000])


def test_schedule_is_a_pytree_usable_under_jit():
    sch = Schedule.named("cosine", 20).respace(5)
    assert len(jax.tree.leaves(sch)) == 13
    total = jax.jit(lambda s: s.alphas_cumprod.sum() + s.timesteps[-1])(sch)
    assert float(total) == pytest.approx(float(sch.alphas_cumprod.sum()) + 19, rel=1e-6)
    with pytest.raises(ValueError, match="outside jax.jit"):
        jax.jit(lambda s: s.respace([0, 1]).betas)(sch)


def test_logsnr_shift_adds_a_constant_to_every_steps_log_snr():
    base, shifted = Schedule.named("cosine", 1000), Schedule.named("cosine", 1000, logsnr_shift=1.5)
    abar0 = np.cumprod(1 - np.asarray(base.betas_float64))
    abar1 = np.cumprod(1 - np.asarray(shifted.betas_float64))
    snr = lambda a: np.log(a) - np.log1p(-a)  # noqa: E731
    uncapped = np.asarray(base.betas_float64) < 0.999  # the capped last steps stay capped
    np.testing.assert_allclose((snr(abar1) - snr(abar0))[uncapped], 1.5, atol=1e-6)
    # 0 is exactly the named schedule; a negative shift is more noise at every step.
    assert Schedule.named("cosine", 1000, logsnr_shift=0.0).betas_float64 == base.betas_float64
    more_noise = np.cumprod(1 - np.asarray(Schedule.named("cosine", 1000, logsnr_shift=-1.0).betas_float64))
    assert np.all(more_noise[uncapped] < abar0[uncapped])
