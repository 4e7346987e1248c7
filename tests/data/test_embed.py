"""Caching a trained CLIP's embeddings: the cache holds exactly what the CLIP task computes."""
import shutil

import jax
import numpy as np
import pytest

from tests import numerics
from tests.train import tiny_clip
from unclip_jax.data import embedding_cache as ec
from unclip_jax.data import input_pipeline
from unclip_jax.data import embed
from unclip_jax.stages import load


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tiny_clip.trained_tiny_clip(tmp_path_factory)


@pytest.mark.slow
def test_cached_embeddings_equal_the_clip_task(workdir, tmp_path):
    cache_dir = str(tmp_path / "cache")
    summaries = embed.build_clip_cache(workdir, cache_dir, splits=("train", "validation"),
                                       num_examples=40, batch_size=12, chunk_size=16)
    assert sorted(summaries) == ["train", "validation"]
    assert summaries["train"].chunks_written == 3 and summaries["train"].invalid == {}

    trained = load.load_stage(workdir)
    task, model = trained.stage, trained.stage.model
    meta = ec.read_metadata(cache_dir, "train")
    assert meta["clip_step"] == 2 and meta["clip_workdir"] == workdir
    assert (meta["embed_dim"], meta["context_length"], meta["text_width"]) == (
        model.embed_dim, model.context_length, model.text_width)

    for split in ("train", "validation"):
        cache = ec.CacheSource(cache_dir, split)
        assert len(cache) == 40
        records = [cache[i] for i in range(len(cache))]
        source = input_pipeline.make_source(trained.config.data, split)
        decoded = [input_pipeline.decode_example(source[i], task.side) for i in range(40)]
        images = np.stack([image for image, _ in decoded])
        captions = [caption for _, caption in decoded]
        assert [r["caption"] for r in records] == captions
        tokens = np.stack([r["tokens"] for r in records])
        np.testing.assert_array_equal(tokens, task.tokenizer(captions))

        z_i = np.stack([r["z_i"] for r in records])
        z_t = np.stack([r["z_t"] for r in records])
        assert z_i.shape == z_t.shape == (40, model.embed_dim) and z_i.dtype == np.float32
        numerics.assert_close(z_i, task.embed(trained.params, trained.mesh, images=images))
        numerics.assert_close(z_t, task.embed(trained.params, trained.mesh, tokens=tokens))
        np.testing.assert_allclose(np.linalg.norm(z_i, axis=-1), 1.0, rtol=1e-5)
        # The norms give back the projections as they are (what an imported Karlo decoder takes).
        assert cache.norms
        norms = np.stack([[r["z_i_norm"], r["z_t_norm"]] for r in records])
        numerics.assert_close(z_i * norms[:, :1], task.embed(trained.params, trained.mesh, images=images,
                                                             normalize=False), ulps=16)
        numerics.assert_close(z_t * norms[:, 1:], task.embed(trained.params, trained.mesh, tokens=tokens,
                                                             normalize=False), ulps=16)

    hidden = np.stack([r["text_hidden"] for r in records])
    assert hidden.shape == (40, model.context_length, model.text_width)
    assert hidden.dtype == np.float16
    _, want = model.apply({"params": jax.device_get(trained.params)}, tokens, return_hidden=True,
                          method=model.encode_text)
    # Stored as float16: half a float16 unit of each element, at most, beyond float32 round-off.
    numerics.assert_close(hidden.astype(np.float32), np.asarray(want), ulps=1, dtype=np.float16)

    # Re-running resumes: every chunk is already there.
    again = embed.build_clip_cache(workdir, cache_dir, splits=("train",), num_examples=40,
                                   batch_size=12, chunk_size=16)
    assert (again["train"].chunks_written, again["train"].chunks_skipped) == (0, 3)


def test_non_clip_workdir_is_a_clear_error(workdir, tmp_path):
    with pytest.raises(load.NotTrainedError, match="does not exist"):
        embed.build_clip_cache(str(tmp_path / "nowhere"), str(tmp_path / "cache"))
    other = tmp_path / "prior"
    shutil.copytree(workdir, other, ignore=shutil.ignore_patterns("checkpoints"))
    text = (other / "config.json").read_text().replace('"stage": "clip"', '"stage": "prior"')
    (other / "config.json").write_text(text)
    with pytest.raises(ValueError, match="trained stage 'prior', not 'clip'"):
        embed.build_clip_cache(str(other), str(tmp_path / "cache"))
