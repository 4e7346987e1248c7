"""The CLIP embedding cache: build, read back, resume, refuse mismatches, hosts, corrupt examples."""
import json
import os
import pickle
import zlib

import grain
import numpy as np
import pytest

from unclip_jax.data import embedding_cache as ec
from unclip_jax.data import images as image_lib
from unclip_jax.data import input_pipeline
from unclip_jax.data import shapes

D, L, W = 4, 6, 3
SIDE = 16
METADATA = {"clip_workdir": "/fake/clip", "clip_step": 2, "embed_dim": D, "context_length": L,
            "text_width": W, "source": "fake shapes"}


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def fake_encode(images, captions):
    """Deterministic, row-wise: each row depends on its own image and caption only."""
    pixels = images.reshape(len(images), -1).astype(np.float64)
    stats = np.stack([pixels.mean(1), pixels.std(1), pixels[:, :7].sum(1), pixels.max(1)], 1)
    codes = np.array([zlib.crc32(c.encode()) % 1000 for c in captions], np.float64)
    tokens = np.array([[(zlib.crc32(c.encode()) + k) % 97 for k in range(L)] for c in captions],
                      np.int32)
    hidden = np.sin(codes[:, None, None] + np.arange(L * W).reshape(1, L, W))
    return {"z_i": unit(stats + 1.0).astype(np.float32),
            "z_t": unit(np.cos(codes[:, None] + np.arange(D))).astype(np.float32),
            "text_hidden": hidden.astype(np.float32), "tokens": tokens}


class Counting:
    """Wraps an encode_fn; records the batch sizes and the images' first pixels it saw."""

    def __init__(self, fail_after=None):
        self.batch_sizes, self.fail_after = [], fail_after

    def __call__(self, images, captions):
        if self.fail_after is not None and len(self.batch_sizes) >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.batch_sizes.append(len(images))
        return fake_encode(images, captions)


class Corrupt:
    """A shapes source whose examples `bad` hold undecodable image bytes."""

    def __init__(self, source, bad):
        self.source, self.bad = source, set(bad)

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        ex = dict(self.source[i])
        ex["image"] = b"not an image" if i in self.bad else image_lib.encode_png(ex["image"])
        return ex


@pytest.fixture(scope="module")
def source():
    return shapes.ShapesSource(split="train", side=SIDE, num_examples=48, seed=0)


def build(source, cache_dir, encode=fake_encode, **kwargs):
    args = dict(num_examples=40, chunk_size=16, batch_size=8, metadata=METADATA, num_threads=2)
    args.update(kwargs)
    return ec.build_cache(source, encode, str(cache_dir), "train", **args)


def expected(source, i, hidden_dtype=np.float16):
    image, caption = input_pipeline.decode_example(source[i], SIDE)
    out = {k: v[0] for k, v in fake_encode(image[None], [caption]).items()}
    out["text_hidden"] = out["text_hidden"].astype(hidden_dtype)
    return out, caption


def assert_record(record, source, i, hidden_dtype=np.float16):
    want, caption = expected(source, i, hidden_dtype)
    assert record["index"] == i and record["valid"] and record["caption"] == caption
    for key in ec.ARRAY_FIELDS:
        assert record[key].dtype == want[key].dtype, key
        np.testing.assert_array_equal(record[key], want[key], err_msg=key)


def chunk_files(cache_dir):
    return sorted(os.listdir(os.path.join(cache_dir, "train")))


def test_build_and_read_back(source, tmp_path):
    encode = Counting()
    summary = build(source, tmp_path, encode)
    assert (summary.num_chunks, summary.chunks_written, summary.chunks_skipped) == (3, 3, 0)
    assert summary.examples_written == 40 and summary.invalid == {}
    assert set(encode.batch_sizes) == {8}  # Always full batches (the 8-example tail is padded).
    assert chunk_files(tmp_path) == [
        "chunk-00000.array_record", "chunk-00000.json", "chunk-00001.array_record",
        "chunk-00001.json", "chunk-00002.array_record", "chunk-00002.json", "metadata.json"]
    meta = ec.read_metadata(str(tmp_path), "train")
    assert meta["num_examples"] == 40 and meta["chunk_size"] == 16 and meta["clip_step"] == 2
    assert (meta["embed_dim"], meta["context_length"], meta["text_width"]) == (D, L, W)
    assert "time" in meta["created"]

    cache = ec.CacheSource(str(tmp_path), "train")
    assert len(cache) == 40 and cache.num_invalid == 0 and cache.valid_mask.all()
    for i in (0, 15, 16, 39, -1):
        assert_record(cache[i], source, i % 40)
    with pytest.raises(IndexError):
        cache[40]
    # grain batches it; it survives pickling (worker processes).
    batch = next(iter(grain.MapDataset.source(cache).batch(8).to_iter_dataset()))
    assert batch["z_i"].shape == (8, D) and batch["text_hidden"].shape == (8, L, W)
    assert batch["tokens"].dtype == np.int32 and list(batch["index"]) == list(range(8))
    assert_record(pickle.loads(pickle.dumps(cache))[3], source, 3)


def test_float32_hidden_states(source, tmp_path):
    build(source, tmp_path, num_examples=8, text_hidden_dtype="float32")
    assert_record(ec.CacheSource(str(tmp_path), "train")[5], source, 5, np.float32)


def with_norms(images, captions):
    out = fake_encode(images, captions)
    return dict(out, z_i_norm=np.arange(len(images), dtype=np.float32) + 2.0,
                z_t_norm=np.full(len(images), 3.0, np.float32))


def test_norms_are_a_format_2_addition_and_format_1_still_reads(source, tmp_path):
    build(source, tmp_path / "new", with_norms, num_examples=8, norms=True)
    cache = ec.CacheSource(str(tmp_path / "new"), "train")
    assert cache.norms and cache.metadata["format_version"] == 2
    assert cache[3]["z_i_norm"] == 5.0 and cache[3]["z_t_norm"] == 3.0
    ec.require_norms(cache.metadata, str(tmp_path / "new"), "train", "the test")
    with pytest.raises(ValueError, match=r"z_i_norm', 'z_t_norm'\] missing"):
        build(source, tmp_path / "bad", num_examples=8, norms=True)

    # A format-1 cache (written before the norms): read as before, refused where norms are needed.
    old = tmp_path / "old"
    build(source, old, num_examples=8)
    meta = ec.read_metadata(str(old), "train")
    del meta["norms"]
    meta["format_version"] = 1
    (old / "train" / ec.METADATA_FILENAME).write_text(json.dumps(meta))
    index = json.loads((old / "train" / "chunk-00000.json").read_text())
    (old / "train" / "chunk-00000.json").write_text(json.dumps(dict(index, fingerprint=ec._fingerprint(meta))))
    cache = ec.CacheSource(str(old), "train")
    assert not cache.norms and "z_i_norm" not in cache[5]
    assert_record(cache[5], source, 5)
    with pytest.raises(ValueError, match=r"\(format 1\) stores unit embeddings without their norms, "
                                         r"which the test needs: rebuild it .*python embed.py"):
        ec.require_norms(cache.metadata, str(old), "train", "the test")


def test_resume_rebuilds_only_what_is_missing(source, tmp_path):
    cache_dir = str(tmp_path)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build(source, cache_dir, Counting(fail_after=3))  # Dies inside chunk 1.
    assert "chunk-00001.array_record" not in chunk_files(cache_dir)
    with pytest.raises(ec.CacheNotFoundError, match=r"incomplete: 2 of 3 chunks missing(.|\n)*"
                                                    r"python embed.py --clip_workdir /fake/clip"):
        ec.CacheSource(cache_dir, "train")
    # Also a half-written chunk left behind under its temporary name.
    split_dir = os.path.join(cache_dir, "train")
    with open(os.path.join(split_dir, "chunk-00002.array_record.tmp"), "wb") as f:
        f.write(b"half a chunk")
    before = os.path.getmtime(os.path.join(split_dir, "chunk-00000.array_record"))

    encode = Counting()
    summary = build(source, cache_dir, encode)
    assert (summary.chunks_written, summary.chunks_skipped) == (2, 1)
    assert len(encode.batch_sizes) == 3  # Chunk 1: 2 batches, chunk 2: 1 batch.
    assert os.path.getmtime(os.path.join(split_dir, "chunk-00000.array_record")) == before
    assert not [f for f in chunk_files(cache_dir) if f.endswith(".tmp")]
    cache = ec.CacheSource(cache_dir, "train")
    for i in (0, 20, 39):
        assert_record(cache[i], source, i)

    # A deleted chunk is rebuilt alone; a finished cache is left untouched.
    os.remove(os.path.join(split_dir, "chunk-00001.array_record"))
    assert ec.missing_chunks(cache_dir, "train") == [1]
    assert build(source, cache_dir).chunks_written == 1
    assert build(source, cache_dir).chunks_written == 0
    assert_record(ec.CacheSource(cache_dir, "train")[17], source, 17)


def test_metadata_mismatch_is_a_clear_error_and_overwrites_nothing(source, tmp_path):
    build(source, tmp_path)
    files = {f: os.path.getmtime(os.path.join(tmp_path, "train", f)) for f in chunk_files(tmp_path)}
    with pytest.raises(ec.CacheMismatchError,
                       match=r"clip_step: cached 2, now 3(.|\n)*Pick another cache_dir"):
        build(source, tmp_path, metadata=dict(METADATA, clip_step=3))
    with pytest.raises(ec.CacheMismatchError, match="num_examples: cached 40, now 48"):
        build(source, tmp_path, num_examples=48)
    with pytest.raises(ec.CacheMismatchError, match="embed_dim: cached 4, now 8"):
        build(source, tmp_path, metadata=dict(METADATA, embed_dim=8))
    assert {f: os.path.getmtime(os.path.join(tmp_path, "train", f))
            for f in chunk_files(tmp_path)} == files


def test_bad_arguments_and_encoder_outputs(source, tmp_path):
    with pytest.raises(ValueError, match=r"missing \['text_width'\]"):
        build(source, tmp_path / "a", metadata={"embed_dim": D, "context_length": L})
    with pytest.raises(ValueError, match="only 48"):
        build(source, tmp_path / "b", num_examples=100)
    wrong = {**METADATA, "embed_dim": 5}
    with pytest.raises(ValueError, match=r"z_i of shape \(8, 4\); expected \(8, 5\)"):
        build(source, tmp_path / "c", metadata=wrong)


def test_two_processes_build_the_whole_cache(source, tmp_path):
    first = build(source, tmp_path / "split", process_index=0, process_count=2)
    assert first.chunks_written == 2  # Chunks 0 and 2.
    with pytest.raises(ec.CacheNotFoundError, match=r"1 of 3 chunks missing \(first: \[1\]\)"):
        ec.CacheSource(str(tmp_path / "split"), "train")
    second = build(source, tmp_path / "split", process_index=1, process_count=2)
    assert second.chunks_written == 1
    build(source, tmp_path / "single")
    split, single = (ec.CacheSource(str(tmp_path / d), "train") for d in ("split", "single"))
    assert len(split) == len(single) == 40
    for i in range(0, 40, 3):
        a, b = split[i], single[i]
        assert a["caption"] == b["caption"]
        for key in ec.ARRAY_FIELDS:
            np.testing.assert_array_equal(a[key], b[key])


def test_corrupt_examples_are_skipped_and_counted(source, tmp_path):
    corrupt = Corrupt(source, bad=[3, 17, 18])
    summary = build(corrupt, tmp_path)
    assert sorted(summary.invalid) == [3, 17, 18]
    assert "could not decode image" in summary.invalid[3]

    cache = ec.CacheSource(str(tmp_path), "train")
    assert len(cache) == 37 and cache.num_invalid == 3
    assert [cache[i]["index"] for i in (2, 3, 15, 16)] == [2, 4, 16, 19]
    assert_record(cache[3], source, 4)

    everything = ec.CacheSource(str(tmp_path), "train", valid_only=False)
    assert len(everything) == 40
    assert list(np.flatnonzero(~everything.valid_mask)) == [3, 17, 18]
    bad = everything[17]
    assert not bad["valid"] and bad["index"] == 17 and bad["caption"] == ""
    assert bad["z_i"].shape == (D,) and not bad["z_i"].any()
    assert_record(everything[19], source, 19)
    assert ec.summarize(str(tmp_path), "train")["num_invalid"] == 3


def test_missing_cache_names_the_directory_and_the_command(tmp_path):
    with pytest.raises(ec.CacheNotFoundError,
                       match=rf"no embedding cache for split 'validation' in {tmp_path}/validation"
                             r"(.|\n)*python embed.py --clip_workdir"):
        ec.CacheSource(str(tmp_path), "validation")
