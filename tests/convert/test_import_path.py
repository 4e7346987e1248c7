"""The README's real-data path at tiny size: import a (random) published-format CLIP, cache its
embeddings of WebDataset shards, train the prior and the decoder on them, sample an image."""
import logging
import os
import subprocess
import sys

import jax
import numpy as np
from flax import linen as nn
import pytest

from configs import clip_vit_l14
from tests import helpers
from tests.convert import hf_fixtures
from unclip_jax.data import embedding_cache
from unclip_jax.data import webdataset
from unclip_jax.data import embed
from unclip_jax.train import loop
from unclip_jax.stages import load

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _write_shards(directory) -> str:
    """3 shards of 8 samples of various sizes; shard 1 holds a corrupt jpg and an image with no caption."""
    os.makedirs(directory)
    rng = np.random.default_rng(0)
    words = ["red", "green", "blue", "cat", "dog", "star", "circle", "square"]
    for s in range(3):
        samples = []
        for n in range(8):
            h, w = rng.integers(24, 64, 2)
            yy, xx = np.mgrid[0:h, 0:w]
            image = np.stack([(xx * (c + 1) * 7 + yy * 5 * s) % 256 for c in range(3)], -1)
            caption = f"a {words[(s + n) % 8]} {words[(3 * n) % 8]}"
            if (s, n) == (1, 2):
                image = b"\xff\xd8\xff\xe0 corrupt"
            samples.append((f"{s:02d}{n:03d}", image if isinstance(image, bytes) else image.astype(np.uint8),
                            None if (s, n) == (1, 5) else caption))
        webdataset.write_shard(os.path.join(directory, f"{s:05d}.tar"), samples)
    return os.path.join(str(directory), "{00000..00002}.tar")


def _tiny(variant, clip_workdir, cache_dir):
    config = clip_vit_l14.get_config(f"{variant},tiny")
    with config.unlocked():
        config.clip_workdir, config.cache_dir = clip_workdir, cache_dir
        config.train.num_steps, config.train.batch_size, config.train.log_every = 2, 16, 1
        config.eval.splits = ()
        config.eval.batch_size = 8
        config.diffusion.sample_steps = 4
        if variant == "decoder":  # The smallest UNet: this test is about the data path, not the model.
            config.model.channel_mult, config.model.attention_resolutions = (1,), ()
            config.model.base_channels, config.model.text_depth = 8, 0
    return config


@pytest.mark.slow
def test_import_cache_train_and_sample_on_shards(tmp_path, caplog):
    hf_dir = str(tmp_path / "hf")
    hf_fixtures.write_hf_clip(hf_dir, image_size=32, patch_size=8, resize=36)
    shards = _write_shards(tmp_path / "shards")

    # 1. Import (the command-line entry, with the shards named on the command line).
    clip_workdir = str(tmp_path / "clip")
    subprocess.run([sys.executable, os.path.join(ROOT, "convert_clip.py"), f"--hf_dir={hf_dir}",
                    f"--workdir={clip_workdir}", f"--config.data.shards={shards}"],
                   check=True, cwd=ROOT, capture_output=True)

    # 2. Embedding cache over the shards: the corrupt jpg and the missing caption are skipped,
    # counted and logged.
    cache_dir = str(tmp_path / "cache")
    with caplog.at_level(logging.INFO):
        summaries = embed.build_clip_cache(clip_workdir, cache_dir, splits=("train", "validation"),
                                           batch_size=8, chunk_size=8)
    assert list(summaries) == ["train"]  # no validation shards: skipped
    assert "missing_caption" in caplog.text and "01005" in caplog.text
    counts = embedding_cache.summarize(cache_dir, "train")
    assert (counts["num_examples"], counts["num_valid"], counts["num_invalid"]) == (23, 22, 1)
    assert counts["metadata"]["source"].startswith("webdataset:") and counts["metadata"]["image_size"] == 32

    # 3. The prior and 4. the decoder train on it (the decoder reads the shards' images at 16 px).
    prior_dir, decoder_dir = str(tmp_path / "prior"), str(tmp_path / "decoder")
    for variant, workdir in (("prior", prior_dir), ("decoder", decoder_dir)):
        result = loop.train_and_evaluate(_tiny(variant, clip_workdir, cache_dir), workdir)
        losses = helpers.losses(workdir)
        assert result["step"] == 2 and sorted(losses) == [1, 2]
        assert all(np.isfinite(v) for v in losses.values())

    # 5. Sample: caption -> imported CLIP text tower -> prior z_i -> decoder image.
    clip = load.load_stage(clip_workdir)
    prior, decoder = load.load_stage(prior_dir), load.load_stage(decoder_dir)
    tokens = clip.stage.tokenizer(["a red cat", "a blue square"] * 4)
    model = clip.stage.model
    with jax.set_mesh(clip.mesh), nn.logical_axis_rules(clip.rules):
        z_t, hidden = model.apply({"params": clip.params}, tokens, return_hidden=True,
                                  method=model.encode_text)
    z_i = prior.stage.sample(prior.params, prior.mesh, np.asarray(z_t), np.asarray(hidden), tokens,
                             jax.random.key(0))
    np.testing.assert_allclose(np.linalg.norm(z_i, axis=-1), 1.0, rtol=1e-4)
    images = decoder.stage.decode(decoder.params, decoder.mesh, z_i, tokens, jax.random.key(1))
    assert images.shape == (8, 16, 16, 3) and images.dtype == np.uint8
