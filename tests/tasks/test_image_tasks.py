"""Decoder and upsampler tasks: training through the loop, sharding invariance, evaluation, guidance."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import helpers, numerics, pipeline_stages
from tests.train import tiny_clip
from unclip_jax import parallel
from unclip_jax.tasks import decoder as decoder_task
from unclip_jax.train import loop


@pytest.fixture(scope="module")
def clip_with_cache(tmp_path_factory):
    return tiny_clip.tiny_clip_with_cache(tmp_path_factory)


config_for = helpers.tiny_config


@pytest.mark.slow
def test_decoder_trains_on_8_devices_like_on_1(clip_with_cache, tmp_path):
    helpers.assert_same_losses_on_1_and_8_devices(lambda: config_for("decoder", clip_with_cache), tmp_path,
                                                  steps=2)


@pytest.mark.slow
def test_decoder_evaluation_judges_decoded_images_and_writes_a_grid(clip_with_cache, tmp_path):
    config = config_for("decoder", clip_with_cache, num_steps=2)
    result = loop.train_and_evaluate(config, str(tmp_path / "run"))
    assert 0.0 <= result["eval/validation/judge_exact"] <= 1.0
    assert np.isfinite(result["train/loss"]) and np.isfinite(result["train/vb"])
    grids = os.listdir(tmp_path / "run" / "samples")
    assert any(g.startswith("decoded_vs_real") for g in grids)


def _task_with_random_params(config, tmp_path):
    """A decoder stage, random params (a zero-init output would hide the conditioning), the
    conditioning of 4 validation examples, and x_t, t for one model call."""
    task = decoder_task.DecoderTask(config, str(tmp_path))
    # Random params of the init's shapes (no init to run or compile), none of them zero.
    rng = np.random.default_rng(0)
    abstract = parallel.unbox(jax.eval_shape(task.init_params, jax.random.key(0)))
    params = jax.tree_util.tree_map_with_path(
        lambda p, a: jnp.asarray(pipeline_stages.random_leaf(p, a, rng)), abstract)
    source = task.source("validation")
    items = [source[i] for i in range(4)]
    batch = {"z_i": jnp.stack([x["z_i"] for x in items]), "tokens": jnp.stack([x["tokens"] for x in items])}
    x = jax.random.normal(jax.random.key(2), (4, task.stage.side, task.stage.side, 3))
    t = jnp.full((4,), 500, jnp.int32)
    return task.stage, params, batch, x, t


@pytest.mark.slow
def test_decoder_guidance_scale_one_is_the_conditional_model(clip_with_cache, tmp_path):
    config = config_for("decoder", clip_with_cache)
    task, params, batch, x, t = _task_with_random_params(config, tmp_path)
    conditional = task.model.apply({"params": params}, x, t, **task._conditioning(batch))
    two = {k: jnp.concatenate([v, v]) for k, v in batch.items()}
    drop = jnp.concatenate([jnp.zeros((4,), bool), jnp.ones((4,), bool)])
    doubled = task.model.apply({"params": params}, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                               **task._conditioning(two, drop, drop))
    numerics.assert_close(doubled[:4], conditional)
    assert not np.allclose(doubled[4:], conditional, atol=1e-3)  # The unconditional half differs.


@pytest.mark.parametrize("drops", ["all", "z_i"])
def test_decoder_guidance_drops_what_the_config_says(clip_with_cache, tmp_path, drops):
    """Guided output = uncond + s (cond - uncond) on the mean channels, where the unconditional
    model drops z_i and the caption ("all") or z_i only ("z_i"); the variance is the conditional."""
    config = config_for("decoder", clip_with_cache)
    with config.unlocked():
        config.diffusion.guidance_drops = drops
    task, params, batch, x, t = _task_with_random_params(config, tmp_path)
    yes, no = jnp.ones((4,), bool), jnp.zeros((4,), bool)
    cond = task.model.apply({"params": params}, x, t, **task._conditioning(batch, no, no))
    uncond = task.model.apply({"params": params}, x, t,
                              **task._conditioning(batch, yes, yes if drops == "all" else no))
    guided = task.guided_model_fn(params, batch["z_i"], batch["tokens"], 3.0)(x, t)
    numerics.assert_close(guided[..., :3], uncond[..., :3] + 3.0 * (cond[..., :3] - uncond[..., :3]))
    numerics.assert_close(guided[..., 3:], cond[..., 3:])
    with config.unlocked():
        config.diffusion.guidance_drops = "caption"
    with pytest.raises(ValueError, match="guidance_drops='caption'"):
        task.guided_model_fn(params, batch["z_i"], batch["tokens"], 3.0)


@pytest.mark.slow
def test_decoder_without_text_pathway_conditions_on_z_i_only(tmp_path):
    """`text_depth=0` (the benchmark's decoder): no caption inputs reach the UNet; z_i still does."""
    config = config_for("decoder")
    with config.unlocked():
        config.model.text_depth = 0
        config.mesh.num_devices = 1
    task = decoder_task.DecoderTask(config, str(tmp_path), dict(clip_dim=16, text_length=8,
                                                                vocab_size=100, eot_token_id=99))
    params = parallel.unbox(task.init_params(jax.random.key(0)))
    assert not any("text" in k for k in params)
    b, s = 2, task.stage.side
    batch = {"image": jnp.zeros((b, s, s, 3), jnp.uint8), "z_i": jax.random.normal(jax.random.key(1), (b, 16)),
             "tokens": jnp.ones((b, 8), jnp.int32)}
    loss, _ = task.loss_fn(params, batch, jax.random.key(2), 0)
    assert np.isfinite(float(loss))
    images = jax.jit(task.stage.sample_body(guidance_scale=2.0))(params, batch["z_i"], batch["tokens"],
                                                                 jax.random.key(3))
    assert images.shape == (b, s, s, 3) and bool(jnp.all(jnp.abs(images) <= 1))


@pytest.mark.slow
def test_upsampler_trains_on_crops_and_upsamples_full_images(tmp_path):
    config = config_for("upsampler", num_steps=3)
    result = loop.train_and_evaluate(config, str(tmp_path / "up"))
    assert result["step"] == 3 and np.isfinite(result["train/loss"])
    assert result["eval/validation/psnr_upsampled"] > 0
    for key in ("judge_exact_low_res", "judge_exact_upsampled"):
        assert 0.0 <= result[f"eval/validation/{key}"] <= 1.0


def test_residual_upsampler_diffuses_the_difference_to_the_resized_input(tmp_path):
    """`diffusion.residual`: the target is high-res minus the resized input, added back after
    sampling, so a model that predicts x0 = 0 (a fresh one: zero-initialised output) upsamples to
    exactly that resize, and a high-res image equal to it has a zero target."""
    from unclip_jax.models import unet as unet_lib
    from unclip_jax.diffusion import pixels
    from unclip_jax.stages.upsampler import UpsamplerStage

    config = config_for("upsampler")
    with config.unlocked():
        config.diffusion.residual, config.diffusion.param = True, "x0"
    task = UpsamplerStage(config)
    params = parallel.unbox(task.init_params(jax.random.key(0)))
    low = jax.random.randint(jax.random.key(1), (2, 8, 8, 3), 0, 256).astype(jnp.uint8)
    out = task.sample_body()(params, low, jax.random.key(2))
    cond = pixels.to_model_range(low)
    resized = jnp.clip(unet_lib.resize_low_res(cond, 8 * task.scale, 8 * task.scale,
                                               task.model.low_res_resize), -1, 1)
    np.testing.assert_allclose(out, resized, atol=1e-5)
    with config.unlocked():
        config.diffusion.residual = False
    plain = UpsamplerStage(config).sample_body()(params, low, jax.random.key(2))
    np.testing.assert_allclose(plain, 0.0, atol=1e-5)  # the image itself: the zero model's x0
