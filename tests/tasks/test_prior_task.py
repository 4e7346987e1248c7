"""The prior task: loss on the cache, sharding invariance, guidance, best-of-k, evaluation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import shapes as shapes_config
from tests import helpers
from tests.train import tiny_clip
from unclip_jax import parallel
from unclip_jax.diffusion import samplers
from unclip_jax.stages import prior as prior_stage
from unclip_jax.tasks import prior as prior_task
from unclip_jax.train import loop


@pytest.fixture(scope="module")
def clip_with_cache(tmp_path_factory):
    """A tiny trained CLIP and its embedding cache (train, validation, heldout; 64 examples each)."""
    return tiny_clip.tiny_clip_with_cache(tmp_path_factory)


def prior_config(clip_with_cache, **train):
    return helpers.tiny_config("prior", clip_with_cache, **train)


@pytest.mark.slow
def test_prior_trains_on_8_devices_like_on_1(clip_with_cache, tmp_path):
    helpers.assert_same_losses_on_1_and_8_devices(lambda: prior_config(clip_with_cache), tmp_path, steps=3)


@pytest.mark.slow
def test_prior_with_bfloat16_matmuls_trains_on_8_devices_like_on_1(clip_with_cache, tmp_path):
    def config():
        c = prior_config(clip_with_cache)
        with c.unlocked():
            c.model.matmul_dtype = "bfloat16"
        return c
    # Same products on every device, rounded the same way; only the reduction order differs.
    helpers.assert_same_losses_on_1_and_8_devices(config, tmp_path, steps=3, rtol=2e-3)


@pytest.mark.slow
def test_evaluation_reports_prior_and_both_baselines(clip_with_cache, tmp_path):
    config = prior_config(clip_with_cache, num_steps=2)
    result = loop.train_and_evaluate(config, str(tmp_path / "run"))
    for split in ("validation", "heldout"):
        for name in ("prior", "z_t", "nearest_train_z_i"):
            assert -1.0 <= result[f"eval/{split}/cosine_{name}"] <= 1.0
            assert 0.0 <= result[f"eval/{split}/retrieval_top1_{name}"] <= 1.0


def test_best_of_k_keeps_the_candidate_closest_to_z_t():
    z_t = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    z_i = jnp.array([[[0.0, 1.0], [0.6, 0.8]],    # second candidate is closer to z_t[0]
                     [[0.6, 0.8], [1.0, 0.0]]])   # first candidate is closer to z_t[1]
    np.testing.assert_allclose(prior_stage.best_of_k(z_i, z_t), [[0.6, 0.8], [0.6, 0.8]], rtol=1e-6)


@pytest.mark.slow
def test_guidance_scale_one_is_the_conditional_model(clip_with_cache, tmp_path):
    config = prior_config(clip_with_cache)
    task = prior_task.PriorTask(config, str(tmp_path))
    params = task.init_params(jax.random.key(0))
    params = jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x, params,
                          is_leaf=lambda x: hasattr(x, "unbox"))
    rng = np.random.default_rng(0)
    stage = task.stage
    b, length = 4, stage.text_length
    z_t = jnp.asarray(rng.normal(size=(b, stage.embed_dim)), jnp.float32)
    hidden = jnp.asarray(rng.normal(size=(b, length, stage.text_width)), jnp.float32)
    mask = jnp.ones((b, length), bool)
    drop = jnp.concatenate([jnp.zeros((b,), bool), jnp.ones((b,), bool)])
    two = lambda x: jnp.concatenate([x, x])  # noqa: E731

    def cond(x, t):
        return stage.model.apply({"params": params}, x, t, z_t, hidden, mask)

    def cond_uncond(x, t):
        return stage.model.apply({"params": params}, x, t, two(z_t), two(hidden), two(mask), drop)

    x = jnp.asarray(rng.normal(size=(b, stage.embed_dim)), jnp.float32)
    t = jnp.full((b,), 500, jnp.int32)
    # Equal up to float rounding (a batch of 2B is blocked differently from a batch of B).
    np.testing.assert_allclose(samplers.guided(cond_uncond, 1.0)(x, t), cond(x, t), rtol=1e-5, atol=1e-5)
    # A scale != 1 really mixes in the unconditional model.
    assert not np.allclose(samplers.guided(cond_uncond, 3.0)(x, t), cond(x, t))
    # The task's sampler at scale 1 (conditional only) returns unit embeddings, one per caption.
    mesh = parallel.make_mesh((1, 1, 1), jax.devices()[:1])
    records = {"z_t": np.asarray(z_t), "text_hidden": np.asarray(hidden),
               "tokens": np.zeros((b, length), np.int32)}
    z = task.sample_z_i(params, mesh, records, jax.random.key(1), guidance_scale=1.0, best_of=2)
    assert z.shape == (b, stage.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(z, axis=-1), 1.0, rtol=1e-5)


def test_missing_clip_workdir_is_a_clear_error(tmp_path):
    config = shapes_config.get_config("prior,tiny")
    with config.unlocked():
        config.clip_workdir = str(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="holds no trained CLIP"):
        prior_task.PriorTask(config, str(tmp_path / "w"))
