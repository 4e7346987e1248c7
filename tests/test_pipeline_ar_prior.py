"""The pipeline with the autoregressive prior (`prior.kind = "autoregressive"`), its workdir's
codebook found relative to the workdir, and its ahead-of-time build from sizes.

The AR prior is a tiny random stage next to `tests/pipeline_stages.py`'s (same CLIP and decoder).
"""
import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import linen as nn

from configs import paper, pipeline_shapes
from tests import helpers, pipeline_stages
from unclip_jax import pipeline as pipeline_lib
from unclip_jax.data import pca_codes
from unclip_jax.stages import load
from unclip_jax.stages.ar_prior import CODEBOOK_FILENAME, ARPriorStage
from unclip_jax.train import aot

CAPTIONS = ["a large red circle in the center on a white background",
            "a small blue square at the top left on a black background"]
AR = pipeline_lib.PriorSettings(guidance_scale=2.0, temperature=0.8, top_k=5)


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    """The tiny random stages, and a tiny random AR prior on the same CLIP ("ar_prior")."""
    w = pipeline_stages.tiny_stage_workdirs(tmp_path_factory)
    clip = w["clip"]
    config = helpers.tiny_config("ar_prior", (clip, os.path.join(clip, "cache")))
    w["ar_prior"] = pipeline_stages.write_random_stage(config, str(tmp_path_factory.mktemp("ar") / "ar_prior"))
    return w


@pytest.fixture(scope="module")
def pipe(workdirs, tmp_path_factory):
    """CLIP -> AR prior -> decoder (no upsampler) on 8 devices, rows in batches of 8: the session's
    tiny pipeline's CLIP and decoder with the AR prior loaded as the pipeline loads its prior.

    It reuses that pipeline's compiled CLIP and decoder programs (same mesh, rules and settings;
    programs take the params as arguments), which the diffusion-prior tests compiled already."""
    base = pipeline_stages.tiny_pipeline(tmp_path_factory)
    prior = pipeline_lib.load_stage("prior", workdirs["ar_prior"], mesh=base.mesh, prior_kind="autoregressive")
    settings = pipeline_lib.Settings(AR, base.settings.decoder)
    pipe = pipeline_lib.UnCLIPPipeline(base.clip, prior, base.decoder, mesh=base.mesh, batch_size=8,
                                       settings=settings, prior_kind="autoregressive")
    pipe._programs.update({k: v for k, v in base._programs.items() if k[0] in ("clip_text", "decoder")})
    return pipe


@pytest.mark.slow
def test_the_ar_pipeline_generates_images(pipe):
    out = pipe.generate(CAPTIONS, seed=1, num_per_prompt=3)
    assert out.images.shape == (6, pipe.base_size, pipe.base_size, 3) and out.images.dtype == np.uint8
    np.testing.assert_allclose(np.linalg.norm(out.z_i, axis=-1), 1.0, atol=1e-5)
    assert isinstance(pipe.prior.stage, ARPriorStage) and pipe.prior_kind == "autoregressive"
    resolved = pipe.resolved_settings()
    assert resolved["stages"]["prior"]["kind"] == "autoregressive"
    ar = pipe.prior.config.ar
    assert resolved["prior"] == {"guidance_scale": 2.0, "temperature": 0.8, "top_k": 5,
                                 "top_p": ar.top_p, "dot_percentile": ar.dot_percentile}


def test_the_pipeline_z_i_are_the_stage_sampler_s_for_the_row_keys(pipe):
    """Row by row, the AR stage's own `sample_body` with the key the pipeline gives the row (its
    key with the prior's stream folded in) draws the pipeline's z_i: the pipeline adds nothing."""
    captions = [CAPTIONS[0], CAPTIONS[1], CAPTIONS[0]]
    keys = pipeline_lib.row_keys(5, [0, 1, 0], [0, 0, 1])
    tokens = pipe.tokenize(captions)
    z_t, hidden = pipe.encode_text(tokens)
    got = pipe.sample_z_i(z_t, hidden, tokens, keys)

    stage = pipe.prior.stage
    body = jax.jit(stage.sample_body(guidance_scale=2.0, temperature=0.8, top_k=5,
                                     top_p=float(pipe.prior.config.ar.top_p),
                                     dot_percentile=float(pipe.prior.config.ar.dot_percentile)))
    with jax.set_mesh(pipe.mesh), nn.logical_axis_rules(pipe.prior.rules):
        want = np.concatenate([
            np.asarray(body(pipe.prior.params, z_t[r:r + 1], hidden[r:r + 1], tokens[r:r + 1],
                            jax.random.fold_in(jax.random.wrap_key_data(keys[r]), pipeline_lib.PRIOR_STREAM)))
            for r in range(len(captions))])
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert not np.allclose(got[0], got[2], atol=1e-3)  # Same caption, other sample: another draw.


def test_a_prior_of_the_other_kind_is_one_clear_error(pipe, workdirs):
    with pytest.raises(pipeline_lib.StageError,
                       match=r"stage 'prior' \(workdir .*ar_prior\).*autoregressive prior.*"
                             r"prior.kind='diffusion'.*set prior.kind='autoregressive'"):
        pipeline_lib.UnCLIPPipeline.from_workdirs(workdirs["clip"], workdirs["ar_prior"], workdirs["decoder"],
                                                  prior_kind="diffusion")
    with pytest.raises(pipeline_lib.StageError, match=r"stage 'prior'.*the diffusion prior.*"
                                                      r"prior.kind='autoregressive'"):
        pipeline_lib.UnCLIPPipeline.from_workdirs(workdirs["clip"], workdirs["prior"], workdirs["decoder"],
                                                  prior_kind="autoregressive")
    # Stages given directly are checked too.
    with pytest.raises(pipeline_lib.StageError, match=r"autoregressive prior.*prior.kind='diffusion'"):
        pipeline_lib.UnCLIPPipeline(pipe.clip, pipe.prior, pipe.decoder, mesh=pipe.mesh, prior_kind="diffusion")
    # Settings of the other prior are named, at construction and per call.
    steps = pipeline_lib.Settings(pipeline_lib.PriorSettings(steps=8))
    with pytest.raises(pipeline_lib.StageError, match=r"prior.steps=8 is a setting of the diffusion prior"):
        pipeline_lib.UnCLIPPipeline(pipe.clip, pipe.prior, pipe.decoder, mesh=pipe.mesh, settings=steps)
    with pytest.raises(ValueError, match=r"prior.sampler='ddim' is a setting of the diffusion"):
        pipe.generate(CAPTIONS, settings=pipeline_lib.Settings(pipeline_lib.PriorSettings(sampler="ddim")))
    with pytest.raises(ValueError, match=r"prior.top_p"):
        pipeline_lib.PriorSettings(top_p=0.0)
    with pytest.raises(ValueError, match=r"prior.kind='ar'"):
        pipeline_lib.UnCLIPPipeline.from_workdirs(workdirs["clip"], workdirs["ar_prior"], workdirs["decoder"],
                                                  prior_kind="ar")


def test_the_pipeline_config_switches_the_prior():
    """`prior.kind` of configs/pipeline_shapes.py, checked with the settings of its kind before
    anything is loaded."""
    config = pipeline_shapes.get_config()
    assert pipeline_lib.prior_kind_from_config(config) == "diffusion"
    with config.unlocked():
        config.prior.kind, config.prior.top_p = "autoregressive", 0.9
    assert pipeline_lib.prior_kind_from_config(config) == "autoregressive"
    assert pipeline_lib.Settings.from_config(config).prior.top_p == 0.9
    with config.unlocked():
        config.prior.kind = "diffusion"
    with pytest.raises(ValueError, match=r"prior.top_p=0.9 is a setting of the autoregressive prior"):
        pipeline_lib.prior_kind_from_config(config)
    with config.unlocked():
        config.prior.kind = "bogus"
    with pytest.raises(ValueError, match=r"prior.kind='bogus'"):
        pipeline_lib.prior_kind_from_config(config)


def test_a_moved_ar_prior_workdir_keeps_its_codebook(workdirs, tmp_path):
    """stage.json records the codebook relative to the workdir: a copy elsewhere reads its own."""
    record = json.loads(open(os.path.join(workdirs["ar_prior"], load.RECORD_FILENAME)).read())
    assert record["depends_on"]["codebook"] == CODEBOOK_FILENAME and "codebook_path" not in record["sizes"]
    moved = str(tmp_path / "elsewhere" / "ar")
    shutil.copytree(workdirs["ar_prior"], moved)
    original = pca_codes.load(os.path.join(moved, CODEBOOK_FILENAME))
    # The copy's codebook differs from the original's: the loaded stage must read the copy's.
    changed = pca_codes.Codebook(**{**original.__dict__, "centres": original.centres * 2.0})
    pca_codes.save(changed, os.path.join(moved, CODEBOOK_FILENAME))
    loaded = load.load_stage(moved)
    assert loaded.stage.sizes["codebook_path"] == os.path.join(moved, CODEBOOK_FILENAME)
    np.testing.assert_array_equal(loaded.stage.codebook.centres, changed.centres)

    # A record from before the codebook was a dependency (an absolute path, now gone): the
    # workdir's own codebook.
    old = {**record, "depends_on": {k: v for k, v in record["depends_on"].items() if k != "codebook"},
           "sizes": {**record["sizes"], "codebook_path": str(tmp_path / "gone" / CODEBOOK_FILENAME)}}
    with open(os.path.join(moved, load.RECORD_FILENAME), "w") as f:
        json.dump(old, f)
    _, stage = load.stage_from_workdir(moved)
    np.testing.assert_array_equal(stage.codebook.centres, changed.centres)
    os.remove(os.path.join(moved, CODEBOOK_FILENAME))
    with pytest.raises(load.NotTrainedError, match="PCA codebook"):
        load.stage_from_workdir(moved)


def test_aot_builds_the_ar_prior_from_sizes():
    """The AR prior's train step traces from config.clip_sizes alone (a placeholder codebook of the
    config's shapes): its parameters and loss, as the ahead-of-time compile builds them."""
    config = paper.get_config("ar_prior,tiny")
    task = aot.task_from_sizes(config)
    assert task.stage.codebook.arrays()["centres"].shape == (config.codes.num_components, config.codes.num_buckets)
    params = jax.eval_shape(task.init_params, jax.random.key(0))
    assert aot.count_params(config) > 0
    batch = task.batch_spec(2)
    loss, _ = jax.eval_shape(lambda p, b: task.loss_fn(nn.unbox(p), b, jax.random.key(0), 0), params, batch)
    assert loss.shape == ()


def test_the_stack_trains_and_judges_either_prior(tmp_path):
    from unclip_jax.train import stack

    assert stack.stages() == stack.STAGES
    assert stack.stages("autoregressive") == ("clip", "ar_prior", "decoder", "upsampler")
    config = stack.stage_config("ar_prior", str(tmp_path), "tiny")
    assert config.stage == "ar_prior" and config.clip_workdir == stack.stage_workdir(str(tmp_path), "clip")
    with pytest.raises(ValueError, match="prior_kind 'ar'"):
        stack.train_stages(str(tmp_path), "tiny", prior_kind="ar")
    assert not os.path.exists(tmp_path / "stack.json")  # Refused before anything is written.
