"""WebDataset tar shards: indexing, skipped samples (counted and logged), host sharding, the cache."""
import gzip
import logging
import os
import tarfile

import ml_collections
import numpy as np
import pytest

from unclip_jax.data import embedding_cache as ec
from unclip_jax.data import input_pipeline
from unclip_jax.data import tfds_builders
from unclip_jax.data import webdataset as wds


def _image(seed: int, h: int = 24, w: int = 32) -> np.ndarray:
    """A smooth colour gradient (JPEG keeps it close), different for every seed."""
    colour = np.random.default_rng(seed).uniform(0, 255, 3)
    ramp = np.linspace(0.3, 1.0, w)[None, :, None] * np.linspace(0.5, 1.0, h)[:, None, None]
    return (ramp * colour).astype(np.uint8)


def make_shards(directory, num_shards=3, per_shard=4):
    """Shards 0000..: every sample `<shard><n>` has an image and caption "caption <key>", except that
    shard 0 holds one corrupt jpg (`00001`) and one image without a caption (`00002`)."""
    os.makedirs(directory, exist_ok=True)
    for s in range(num_shards):
        samples = []
        for n in range(per_shard):
            key = f"{s:03d}{n:02d}"
            image, caption = _image(10 * s + n), f"caption {key}"
            if key == "00001":
                image = b"\xff\xd8\xff\xe0 not really a jpeg"
            if key == "00002":
                caption = None
            samples.append((key, image, caption))
        wds.write_shard(os.path.join(directory, f"{s:04d}.tar"), samples)
    return os.path.join(str(directory), "{0000..%04d}.tar" % (num_shards - 1))


def test_indexing_skips_and_counts_missing_captions_and_reads_samples(tmp_path, caplog):
    pattern = make_shards(tmp_path)
    with caplog.at_level(logging.INFO):
        source = wds.WebDatasetSource(pattern)
    assert len(source) == 3 * 4 - 1
    assert source.skipped == {"missing_caption": 1} and source.num_skipped == 1
    assert "skipping 00002" in caplog.text and "missing_caption" in caplog.text
    example = source[0]
    assert example["key"] == "00000" and example["caption"] == "caption 00000"
    image, caption = input_pipeline.decode_example(example, None)
    assert caption == "caption 00000" and image.shape == (24, 32, 3)
    # JPEG is lossy: close to what was written, not equal.
    assert np.abs(image.astype(int) - _image(0).astype(int)).mean() < 4
    assert [source[i]["key"] for i in range(len(source))][:4] == ["00000", "00001", "00003", "00100"]
    assert source[-1]["key"] == "00203"
    with pytest.raises(ValueError, match="could not decode image"):
        input_pipeline.decode_example(source[1], None)  # the corrupt jpg fails when decoded


def test_verify_images_skips_corrupt_images_at_indexing(tmp_path):
    source = wds.WebDatasetSource(make_shards(tmp_path), verify_images=True)
    assert len(source) == 3 * 4 - 2
    assert source.skipped == {"missing_caption": 1, "corrupt_image": 1}
    assert {key for _, key, _, _ in source.skipped_samples} == {"00001", "00002"}


def test_embedding_cache_over_shards_skips_and_counts_the_corrupt_image(tmp_path):
    source = wds.WebDatasetSource(make_shards(tmp_path / "shards"))

    def encode_fn(images, captions):
        b = len(captions)
        z = images.reshape(b, -1)[:, :4].astype(np.float32) + 1
        return {"z_i": z, "z_t": z, "text_hidden": np.zeros((b, 3, 2), np.float32),
                "tokens": np.zeros((b, 3), np.int32)}

    summary = ec.build_cache(source, encode_fn, str(tmp_path / "cache"), "train", batch_size=4,
                             chunk_size=8, image_size=16,
                             metadata={"embed_dim": 4, "context_length": 3, "text_width": 2})
    assert list(summary.invalid) == [1] and "could not decode image" in summary.invalid[1]
    counts = ec.summarize(str(tmp_path / "cache"), "train")
    assert (counts["num_examples"], counts["num_valid"], counts["num_invalid"]) == (11, 10, 1)
    cached = ec.CacheSource(str(tmp_path / "cache"), "train")
    assert [r["caption"] for r in (cached[i] for i in range(2))] == ["caption 00000", "caption 00003"]


def test_truncated_and_non_tar_shards_keep_what_is_readable(tmp_path):
    make_shards(tmp_path, num_shards=2)
    path = tmp_path / "0001.tar"
    data = path.read_bytes()
    # Cut the shard inside the 3rd member's data (00100.jpg, 00100.txt, 00101.jpg, ...).
    with tarfile.open(path) as tar:
        third = tar.getmembers()[2]
    path.write_bytes(data[:third.offset_data + 10])
    (tmp_path / "0002.tar").write_bytes(b"this is not a tar file at all" * 30)
    source = wds.WebDatasetSource(str(tmp_path / "*.tar"))
    # 00101.jpg runs past the end; the header after it is missing (0001.tar stops being a tar);
    # 0002.tar is no tar at all.
    assert source.skipped == {"missing_caption": 1, "truncated_member": 1, "corrupt_shard": 2}
    assert [source[i]["key"] for i in range(len(source))] == ["00000", "00001", "00003", "00100"]


def test_gzip_shards_and_missing_shards_are_clear_errors(tmp_path):
    make_shards(tmp_path, num_shards=1)
    (tmp_path / "z.tar").write_bytes(gzip.compress((tmp_path / "0000.tar").read_bytes()))
    with pytest.raises(ValueError, match="gzip-compressed"):
        wds.WebDatasetSource(str(tmp_path / "z.tar"))
    with pytest.raises(FileNotFoundError, match=r"1 shard\(s\) not found: .*0001.tar"):
        wds.WebDatasetSource(str(tmp_path / "{0000..0001}.tar"))
    with pytest.raises(FileNotFoundError, match="matches no file"):
        wds.WebDatasetSource(str(tmp_path / "nothing-*.tar"))


def test_shard_patterns():
    assert wds._expand_braces("a/{008..010}.tar") == ["a/008.tar", "a/009.tar", "a/010.tar"]
    assert wds._expand_braces("{x,y}{1..2}") == ["x1", "x2", "y1", "y2"]
    assert wds._split_top_level("a.tar, b/{0,1}.tar") == ["a.tar", "b/{0,1}.tar"]
    assert wds.split_key("dir/000123.seg.JPG") == ("dir/000123", "seg.jpg")


def test_hosts_get_whole_shards(tmp_path):
    pattern = make_shards(tmp_path, num_shards=3)
    parts = [wds.WebDatasetSource(pattern, process_index=p, process_count=2) for p in range(2)]
    assert [len(p.shards) for p in parts] == [2, 1]
    keys = [{p[i]["key"][:3] for i in range(len(p))} for p in parts]
    assert keys == [{"000", "002"}, {"001"}]
    with pytest.raises(ValueError, match="process 3 has none"):
        wds.WebDatasetSource(pattern, process_index=3, process_count=4)


def test_make_source_reads_webdataset_splits(tmp_path):
    train = make_shards(tmp_path / "train", num_shards=2)
    validation = make_shards(tmp_path / "validation", num_shards=1)
    data = ml_collections.ConfigDict({"source": "webdataset", "shards": train,
                                      "validation_shards": validation})
    assert len(input_pipeline.make_source(data, "train")) == 7
    assert len(input_pipeline.make_source(data, "validation")) == 3
    with pytest.raises(tfds_builders.MissingSplitError, match="heldout"):
        input_pipeline.make_source(data, "heldout")
    with pytest.raises(ValueError, match="needs config.data.shards"):
        input_pipeline.make_source(ml_collections.ConfigDict({"source": "webdataset", "shards": ""}),
                                 "train")
