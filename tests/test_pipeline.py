"""The unCLIP pipeline over tiny random stages: outputs, seeds, settings, stage loading errors."""
import dataclasses
import logging

import numpy as np
import pytest

from configs import pipeline_shapes
from tests import helpers, numerics, pipeline_stages
from unclip_jax import pipeline as pipeline_lib
from unclip_jax.stages import load
from unclip_jax.stages.prior import PriorStage
from unclip_jax.stages.upsampler import UpsamplerStage

CAPTIONS = ["a large red circle in the center on a white background",
            "a blue triangle above a yellow cross on a gray background"]


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    return pipeline_stages.tiny_stage_workdirs(tmp_path_factory)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return pipeline_stages.tiny_pipeline(tmp_path_factory)


@pytest.fixture(scope="module")
def samples(pipe):
    return pipe.generate(CAPTIONS, seed=0, num_per_prompt=3)


def test_generate_gives_uint8_images_of_every_stage(pipe, samples):
    assert pipe.base_size == 16 and pipe.image_size == 64
    assert samples.images.shape == (6, 64, 64, 3) and samples.images.dtype == np.uint8
    assert samples.base_images.shape == (6, 16, 16, 3) and samples.base_images.dtype == np.uint8
    np.testing.assert_allclose(np.linalg.norm(samples.z_i, axis=-1), 1.0, rtol=1e-5)
    assert samples.captions == [CAPTIONS[0]] * 3 + [CAPTIONS[1]] * 3
    np.testing.assert_array_equal(samples.prompt_index, [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(samples.sample_index, [0, 1, 2, 0, 1, 2])
    assert samples.images.min() < samples.images.max()  # Not a constant image.
    assert len({im.tobytes() for im in samples.images}) == 6  # Every sample differs.


def test_same_seed_same_images_other_seed_other_images(pipe, samples):
    again = pipe.generate(CAPTIONS, seed=0, num_per_prompt=3)
    np.testing.assert_array_equal(again.images, samples.images)
    np.testing.assert_array_equal(again.z_i, samples.z_i)
    other = pipe.generate(CAPTIONS, seed=1, num_per_prompt=3)
    assert not np.array_equal(other.images, samples.images)


@pytest.mark.slow
def test_a_sample_depends_on_seed_prompt_and_index_only(pipe, samples):
    """Rows (prompt 1, sample 2) and (prompt 0, sample 1) among other rows, in batches of 16 rows
    instead of 8, give the same images as before."""
    p, k = [1, 5, 5, 5, 5, 5, 5, 5, 0], [2, 0, 1, 2, 3, 4, 5, 6, 1]
    captions = [CAPTIONS[1]] + ["a small green square on the left on a black background"] * 7 + [CAPTIONS[0]]
    old = pipe.batch_size
    try:
        pipe.batch_size = 16
        out = pipe.generate_rows(captions, pipeline_lib.row_keys(0, p, k))
    finally:
        pipe.batch_size = old
    for row, want in ((0, 1 * 3 + 2), (8, 0 * 3 + 1)):
        assert np.abs(out.images[row].astype(int) - samples.images[want]).max() <= 1
        numerics.assert_close(out.z_i[row], samples.z_i[want])


def test_row_keys_are_distinct_and_reproducible():
    a = pipeline_lib.row_keys(3, [0, 0, 1, 1], [0, 1, 0, 1])
    assert a.dtype == np.uint32 and len({r.tobytes() for r in a}) == 4
    np.testing.assert_array_equal(a, pipeline_lib.row_keys(3, [0, 0, 1, 1], [0, 1, 0, 1]))
    assert not np.array_equal(a, pipeline_lib.row_keys(4, [0, 0, 1, 1], [0, 1, 0, 1]))
    with pytest.raises(ValueError, match="prompt indices"):
        pipeline_lib.row_keys(0, [0, 1], [0])


def test_over_long_prompt_is_truncated_with_a_warning(pipe, caplog):
    long = " and ".join(CAPTIONS * 4)
    with caplog.at_level(logging.WARNING):
        tokens = pipe.tokenize([long, CAPTIONS[0]])
    assert tokens.shape == (2, pipe.tokenizer.context_length)
    assert tokens[0, -1] == pipe.tokenizer.eot_token_id  # End-of-text kept last.
    assert "truncated" in caplog.text
    out = pipe.generate([long], seed=0)
    assert out.images.shape == (1, 64, 64, 3)


def test_guidance_scale_changes_the_decoder_output(pipe, samples):
    keys = pipeline_lib.row_keys(0, [0], [0])
    z_i, tokens = samples.z_i[:1], pipe.tokenize(CAPTIONS[:1])
    default = pipe.decode(z_i, tokens, keys)
    np.testing.assert_array_equal(default, samples.base_images[:1])
    unguided = pipe.decode(z_i, tokens, keys, dataclasses.replace(pipe.settings.decoder, guidance_scale=1.0))
    assert not np.array_equal(unguided, default)


def test_resolved_settings_fill_in_the_stage_configs(pipe, workdirs):
    s = pipe.resolved_settings()
    assert s["prior"] == {"guidance_scale": 1.0, "best_of": 2, "sampler": "ddpm", "steps": 4}
    assert s["decoder"] == {"guidance_scale": pipeline_stages.DECODER_GUIDANCE, "sampler": "ddim",
                            "steps": 4, "eta": 0.0}
    assert s["upsamplers"] == [{"sampler": "ddim", "steps": 2, "eta": 0.0}]
    assert s["stages"]["decoder"]["workdir"] == workdirs["decoder"] and s["stages"]["decoder"]["step"] == 1
    other = pipe.resolved_settings(pipeline_lib.Settings(decoder=pipeline_lib.DecoderSettings(sampler="ddpm")))
    assert other["decoder"]["sampler"] == "ddpm" and other["decoder"]["eta"] is None
    assert other["decoder"]["steps"] == 8  # The tiny decoder config's.


def test_settings_from_the_pipeline_config():
    config = pipeline_shapes.get_config()
    assert pipeline_lib.Settings.from_config(config) == pipeline_lib.Settings()
    with config.unlocked():
        config.prior.steps, config.decoder.guidance_scale, config.upsampler.sampler = "32", 2.0, "dpm++2m"
    s = pipeline_lib.Settings.from_config(config)
    assert s.prior.steps == 32 and s.decoder.guidance_scale == 2.0 and s.upsampler.sampler == "dpm++2m"
    assert config.upsampler_workdirs == ("runs/shapes_upsampler",)
    stack = pipeline_shapes.get_config("runs/stack_fast/")  # a train_stack.py root
    assert stack.decoder_workdir == "runs/stack_fast/shapes_decoder"
    assert stack.upsampler_workdirs == ("runs/stack_fast/shapes_upsampler",)


@pytest.mark.parametrize("make, match", [
    (lambda: pipeline_lib.PriorSettings(sampler="euler"), "prior.sampler"),
    (lambda: pipeline_lib.PriorSettings(best_of=0), "prior.best_of"),
    (lambda: pipeline_lib.DecoderSettings(steps=0), "decoder.steps"),
    (lambda: pipeline_lib.DecoderSettings(guidance_scale=-1.0), "decoder.guidance_scale"),
    (lambda: pipeline_lib.UpsamplerSettings(eta=-0.5), "upsampler.eta"),
])
def test_bad_settings_are_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_missing_stage_checkpoint_names_the_stage_and_workdir(workdirs, tmp_path):
    missing = str(tmp_path / "no_decoder")
    with pytest.raises(load.NotTrainedError, match=r"stage 'decoder'.*no_decoder"):
        pipeline_lib.UnCLIPPipeline.from_workdirs(workdirs["clip"], workdirs["prior"], missing)
    empty = tmp_path / "empty_prior"
    empty.mkdir()
    with pytest.raises(load.NotTrainedError, match=r"stage 'prior'.*empty_prior"):
        pipeline_lib.UnCLIPPipeline.from_workdirs(workdirs["clip"], str(empty), workdirs["decoder"])


@pytest.mark.slow
def test_sampling_reads_no_embedding_cache_and_builds_no_optimiser(pipe, workdirs, tmp_path, monkeypatch):
    """Stage workdirs copied elsewhere, the CLIP's embedding cache deleted: the copies load (EMA
    params only) and sample the same images as the originals."""
    import shutil

    from unclip_jax.train import state as state_lib

    for name, path in workdirs.items():
        shutil.copytree(path, tmp_path / name)
    shutil.rmtree(tmp_path / "clip" / "cache")

    def no_optimiser(*args, **kwargs):
        raise AssertionError("sampling must not build an optimiser")

    monkeypatch.setattr(state_lib, "make_optimizer", no_optimiser)
    copy = pipeline_lib.UnCLIPPipeline.from_workdirs(
        *(str(tmp_path / n) for n in ("clip", "prior", "decoder")), [str(tmp_path / "upsampler")],
        batch_size=8, settings=pipeline_stages.fast_settings())
    assert copy.resolved_settings()["stages"]["decoder"]["workdir"] == str(tmp_path / "decoder")
    # The decoder records its CLIP relative to itself: the copy points at the copied CLIP.
    assert copy.decoder.depends_on["clip_workdir"] == str(tmp_path / "clip")
    ours = copy.generate([CAPTIONS[0]], seed=3)
    theirs = pipe.generate([CAPTIONS[0]], seed=3)
    np.testing.assert_array_equal(ours.base_images, theirs.base_images)


def test_a_workdir_of_another_stage_is_named(workdirs):
    with pytest.raises(pipeline_lib.StageError, match=r"stage 'prior' \(workdir .*decoder\).*'decoder'"):
        pipeline_lib.load_stage("prior", workdirs["decoder"])


def test_incompatible_stages_are_named(pipe, workdirs, tmp_path):
    config = helpers.tiny_config("upsampler")
    with config.unlocked():
        config.data.side, config.data.crop_size = 128, 32  # 32 -> 128 px after a 16 px decoder.
    wrong_up = load.Loaded(config, UpsamplerStage(config), None, 0, pipe.mesh)
    with pytest.raises(pipeline_lib.StageError, match=r"upsampler0.*32 px.*16 px"):
        pipeline_lib.UnCLIPPipeline(pipe.clip, pipe.prior, pipe.decoder, [wrong_up], mesh=pipe.mesh)

    prior_cfg = pipe.prior.config
    other = PriorStage(prior_cfg, embed_dim=16, text_length=20, text_width=32,
                       eot_token_id=pipe.tokenizer.eot_token_id)
    wrong_prior = load.Loaded(prior_cfg, other, None, 0, pipe.mesh)
    with pytest.raises(pipeline_lib.StageError, match=r"stage 'prior'.*embed_dim"):
        pipeline_lib.UnCLIPPipeline(pipe.clip, wrong_prior, pipe.decoder, mesh=pipe.mesh)
    with pytest.raises(pipeline_lib.StageError, match=r"stage 'decoder'.*expected a trained DecoderStage"):
        pipeline_lib.UnCLIPPipeline(pipe.clip, pipe.prior, pipe.prior, mesh=pipe.mesh)


def test_bad_requests_get_clear_errors(pipe):
    with pytest.raises(TypeError, match="single string"):
        pipe.generate(CAPTIONS[0])
    with pytest.raises(ValueError, match="num_per_prompt"):
        pipe.generate(CAPTIONS, num_per_prompt=0)
    with pytest.raises(ValueError, match="captions is empty"):
        pipe.generate_rows([], np.zeros((0, 2), np.uint32))
    with pytest.raises(ValueError, match="images must be uint8"):
        pipe.encode_image(np.zeros((2, 8, 8, 3), np.float32))


def test_slerp_stays_on_the_sphere():
    rng = np.random.default_rng(0)
    a, b = (x / np.linalg.norm(x) for x in rng.normal(size=(2, 8)))
    out = pipeline_lib.slerp(np.stack([a] * 3), np.stack([b] * 3), np.array([0.0, 0.5, 1.0]))
    np.testing.assert_allclose(out[0], a, atol=1e-6)
    np.testing.assert_allclose(out[2], b, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, atol=1e-6)
    # The midpoint is equally far from both ends.
    np.testing.assert_allclose(out[1] @ a, out[1] @ b, atol=1e-6)
    np.testing.assert_allclose(pipeline_lib.slerp(a, a, 0.3), a, atol=1e-6)  # Parallel: no NaN.
