"""The decoder task's CLIP metrics during training (`eval.metrics = ("fd_clip", "clip_score")`):
equal to computing them directly with `evaluation.features` + `evaluation.frechet` on the same
decodings, the real images' features computed once per run, bad settings refused at build."""
import logging
import os

import jax
import numpy as np
import pytest
from flax import linen as nn

from tests import helpers, pipeline_stages
from unclip_jax.evaluation import features as features_lib
from unclip_jax.evaluation import frechet
from unclip_jax.stages import load
from unclip_jax.tasks import decoder as decoder_task


def _clip_eval_config(decoder_config, **eval_fields):
    config = decoder_config.copy_and_resolve_references()
    with config.unlocked():
        config.eval.metrics = ("fd_clip", "clip_score")
        config.diffusion.sample_steps = 2  # The program compiles the same; fewer steps run faster.
        for k, v in eval_fields.items():
            config.eval[k] = v
    return config


def _direct(clip: features_lib.ClipFeatures, decoded, real, captions) -> dict[str, float]:
    """The two metrics from the evaluation modules alone."""
    fake = frechet.Statistics(clip.identity).update(clip.images(decoded))
    ref = frechet.Statistics(clip.identity).update(clip.images(real))
    return {"fd_clip": frechet.distance(fake, ref),
            "clip_score": float(np.mean(features_lib.clip_score(clip.images(decoded), clip.texts(captions))))}


class _Counted:
    """Wraps a method, recording each call's first argument."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x, *args, **kwargs):
        self.calls.append(x)
        return self.fn(x, *args, **kwargs)


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    workdirs = pipeline_stages.tiny_stage_workdirs(tmp_path_factory)
    # A second CLIP of the same shape but other weights: the evaluation CLIP of `eval.clip_workdir`.
    other = str(tmp_path_factory.mktemp("other_clip") / "clip")
    pipeline_stages.write_random_stage(helpers.tiny_config("clip"), other, seed=1)
    return workdirs, other, load.load_stage(workdirs["decoder"])


def _params_hash(workdir: str) -> str:
    """The SHA-256 of a CLIP workdir's EMA params, loaded on their own (nothing compiled)."""
    loaded = load.load_stage(workdir)
    return features_lib.weights_hash(features_lib._flatten(jax.tree.map(np.asarray, loaded.params)))


@pytest.fixture(scope="module")
def evaluated(stages, tmp_path_factory):
    """A decoder task with the CLIP metrics, evaluated twice, its decodings and the calls into its
    feature CLIP (the stage's own)."""
    _, _, decoder = stages
    task = decoder_task.DecoderTask(_clip_eval_config(decoder.config), str(tmp_path_factory.mktemp("d")))
    with jax.set_mesh(decoder.mesh), nn.logical_axis_rules(decoder.rules):
        clip = task.feature_clip(decoder.mesh)
        images, texts = clip.images, clip.texts
        clip.images, clip.texts = _Counted(images), _Counted(texts)
        decode, decodings = task.decode, []
        task.decode = lambda *a, **k: decodings.append(decode(*a, **k)) or decodings[-1]
        results = [task.evaluate(decoder.params, decoder.mesh) for _ in range(2)]
    calls = {"images": clip.images.calls, "texts": clip.texts.calls}
    clip.images, clip.texts = images, texts
    return task, results, decodings, calls


def test_clip_metrics_equal_the_evaluation_modules_and_reuse_the_real_features(stages, evaluated):
    workdirs, _, decoder = stages
    task, (first, second), decodings, calls = evaluated
    clip = task.feature_clip(decoder.mesh)
    # The stage's own CLIP by default, loaded once.
    assert task.feature_clip_workdir == os.path.abspath(workdirs["clip"])
    assert clip.identity["weights_sha256"] == _params_hash(workdirs["clip"])

    assert set(first) == {"eval/validation/fd_clip", "eval/validation/clip_score"}
    assert all(np.isfinite(v) for v in first.values())
    # The same seed decodes the same images, so the second evaluation (reusing the real images'
    # statistics and the captions' features) gives the same numbers.
    np.testing.assert_array_equal(decodings[0], decodings[1])
    assert second == first
    # The real images' and the captions' features once per run; the decodings' at every evaluation.
    _, _, captions, real = task._eval_examples("validation")
    assert len(calls["images"]) == 3 and len(calls["texts"]) == 1
    np.testing.assert_array_equal(calls["images"][0], real)
    for call, decoded in zip(calls["images"][1:], decodings):
        np.testing.assert_array_equal(call, decoded)
    assert list(calls["texts"][0]) == list(captions)

    # The same numbers from the evaluation modules on the same decodings.
    with jax.set_mesh(decoder.mesh), nn.logical_axis_rules(decoder.rules):
        direct = _direct(clip, decodings[0], real, captions)
    assert direct["fd_clip"] > 0  # Random decodings are not the real images.
    np.testing.assert_allclose(first["eval/validation/fd_clip"], direct["fd_clip"], rtol=1e-6)
    np.testing.assert_allclose(first["eval/validation/clip_score"], direct["clip_score"], rtol=1e-6)


def test_eval_clip_workdir_chooses_the_feature_clip(stages, evaluated, tmp_path):
    workdirs, other, decoder = stages
    own_task, (own, _), decodings, _ = evaluated
    task = decoder_task.DecoderTask(_clip_eval_config(decoder.config, clip_workdir=other), str(tmp_path))
    assert task.feature_clip_workdir == os.path.abspath(other)
    _, _, captions, real = task._eval_examples("validation")
    with jax.set_mesh(decoder.mesh), nn.logical_axis_rules(decoder.rules):
        clip = task.feature_clip(decoder.mesh)
        scores = task.clip_metrics("validation", decodings[0], captions, real, decoder.mesh)
        direct = _direct(clip, decodings[0], real, captions)
    assert clip.identity["weights_sha256"] == _params_hash(other)
    assert clip.identity != own_task.feature_clip(decoder.mesh).identity
    np.testing.assert_allclose(scores["fd_clip"], direct["fd_clip"], rtol=1e-6)
    np.testing.assert_allclose(scores["clip_score"], direct["clip_score"], rtol=1e-6)
    assert not np.isclose(scores["fd_clip"], own["eval/validation/fd_clip"])


def test_a_missing_split_is_skipped_with_a_note(stages, tmp_path, caplog):
    workdirs, _, decoder = stages
    config = _clip_eval_config(decoder.config, splits=("test",))
    task = decoder_task.DecoderTask(config, str(tmp_path))
    with caplog.at_level(logging.WARNING):
        assert task.evaluate(decoder.params, decoder.mesh) == {}
    assert "no 'test' split" in caplog.text
    assert task._feature_clip is None  # Nothing to score: the CLIP was not even loaded.


def test_unknown_metrics_and_a_non_clip_feature_workdir_are_refused_at_build(stages, tmp_path):
    workdirs, _, decoder = stages
    sizes = dict(clip_dim=16, text_length=8, vocab_size=100, eot_token_id=99)
    with pytest.raises(ValueError, match=r"unknown metric\(s\) \['fid'\].*judge.*fd_clip.*clip_score"):
        decoder_task.DecoderTask(_clip_eval_config(decoder.config, metrics=("fd_clip", "fid")),
                                 str(tmp_path), sizes)
    with pytest.raises(ValueError, match=r"eval.clip_workdir=.*holds a 'prior' stage.*CLIP workdir"):
        decoder_task.DecoderTask(_clip_eval_config(decoder.config, clip_workdir=workdirs["prior"]), str(tmp_path))
    with pytest.raises(ValueError, match="at least 2 examples"):
        decoder_task.DecoderTask(_clip_eval_config(decoder.config, num_examples=1), str(tmp_path))
