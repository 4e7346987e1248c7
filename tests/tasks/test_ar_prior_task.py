"""The AR prior task: its codebook on the cache, sharding invariance, evaluation, reloading."""
import os
import shutil

import jax
import numpy as np
import pytest

from tests import helpers
from tests.train import tiny_clip
from unclip_jax.data import embedding_cache, pca_codes
from unclip_jax.stages import load
from unclip_jax.stages.ar_prior import CODEBOOK_FILENAME
from unclip_jax.tasks import ar_prior as ar_task
from unclip_jax.train import loop


@pytest.fixture(scope="module")
def clip_with_cache(tmp_path_factory):
    """A tiny trained CLIP and its embedding cache (train, validation, heldout; 64 examples each)."""
    return tiny_clip.tiny_clip_with_cache(tmp_path_factory)


def ar_config(clip_with_cache, **train):
    return helpers.tiny_config("ar_prior", clip_with_cache, **train)


@pytest.mark.slow
def test_ar_prior_trains_on_8_devices_like_on_1(clip_with_cache, tmp_path):
    helpers.assert_same_losses_on_1_and_8_devices(lambda: ar_config(clip_with_cache), tmp_path, steps=2)


@pytest.mark.slow
def test_train_evaluate_reload_and_refit_refused(clip_with_cache, tmp_path):
    config = ar_config(clip_with_cache, num_steps=2)
    workdir = str(tmp_path / "run")
    result = loop.train_and_evaluate(config, workdir)
    for split in ("validation", "heldout"):
        for name in ("prior", "z_t", "nearest_train_z_i", "codes"):
            assert -1.0 <= result[f"eval/{split}/cosine_{name}"] <= 1.0
            assert 0.0 <= result[f"eval/{split}/retrieval_top1_{name}"] <= 1.0
    # The codebook was fitted on the cache's training split and stored in the workdir.
    codebook = pca_codes.load(os.path.join(workdir, CODEBOOK_FILENAME))
    train = embedding_cache.CacheSource(clip_with_cache[1], "train")
    refit = pca_codes.fit(pca_codes.cache_chunks(train), num_components=config.codes.num_components,
                          num_buckets=config.codes.num_buckets)
    np.testing.assert_allclose(codebook.centres, refit.centres, rtol=1e-6)
    # The workdir rebuilds the stage with its codebook (what sampling from it needs).
    loaded = load.load_stage(workdir)
    np.testing.assert_array_equal(loaded.stage.codebook.centres, codebook.centres)
    codes = np.random.default_rng(0).integers(0, codebook.num_buckets, (3, codebook.num_components))
    want = pca_codes.decode(codebook.arrays(), codes)
    np.testing.assert_allclose(np.asarray(loaded.stage.decode_codes(jax.numpy.asarray(codes))),
                               want / np.linalg.norm(want, axis=-1, keepdims=True), atol=1e-5)
    # A codebook fitted on other embeddings is refused, with one clear message.
    other = str(tmp_path / "other")
    shutil.copytree(workdir, other)
    stale = pca_codes.load(os.path.join(other, CODEBOOK_FILENAME))
    pca_codes.save(pca_codes.Codebook(**{**stale.__dict__, "source": {**stale.source, "clip_step": -1}}),
                   os.path.join(other, CODEBOOK_FILENAME))
    with pytest.raises(pca_codes.CodebookMismatchError, match="clip_step"):
        ar_task.ARPriorTask(config, other)
