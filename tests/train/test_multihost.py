"""Two JAX processes on this machine (4 fake CPU devices each) run train.py, embed.py and sample.py
as two hosts of a pod slice would, and must do what one process with 8 devices does.

Each command is the user's own (`tests/multihost.py` starts the processes with
`--coordinator_address`, `--num_processes`, `--process_id`). The reference run is one process
with the same 8-device mesh, the same global batch and the same data order, so losses agree to
float round-off (the cross-process all-reduce sums in another order).
"""
import json
import os
import signal
import time

import numpy as np
import pytest

from tests import helpers, multihost, pipeline_stages
from tests.numerics import assert_close
from tests.train import tiny_clip
from unclip_jax.data import embedding_cache
from unclip_jax.train import metrics as metrics_lib

# Same program, same data; only the all-reduce order differs between 1 and 2 processes, and Adam
# turns round-off in a near-zero gradient into up to a learning rate: see helpers' 1-vs-8 check.
LOSS_RTOL = 1e-4


def _train_args(variant, workdir, *extra):
    return ["train.py", "--config", f"configs/shapes.py:{variant},tiny", "--workdir", str(workdir),
            "--config.train.log_every=1", *extra]


def _records(workdir):
    return metrics_lib.read_metrics(os.path.join(workdir, "metrics.jsonl"))


def _eval_metrics(workdir):
    out = {}
    for r in _records(workdir):
        out.update({k: v for k, v in r.items() if k.startswith("eval/")})
    return out


def _assert_same_losses(workdir, reference, steps):
    got, want = helpers.losses(workdir), helpers.losses(reference)
    assert sorted(got) == sorted(want) == list(range(1, steps + 1))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)],
                               rtol=LOSS_RTOL)


def _run_with_sigterm_to_process_1(argv, workdir, after_step):
    """Starts the 2 processes and sends SIGTERM to process 1 alone once `after_step` is logged."""
    import threading

    def preempt(procs):
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and all(p.poll() is None for p in procs):
            path = os.path.join(workdir, "metrics.jsonl")
            if os.path.exists(path) and any(r.get("step", 0) >= after_step and "train/loss" in r
                                            for r in metrics_lib.read_metrics(path)):
                procs[1].send_signal(signal.SIGTERM)
                return
            time.sleep(0.05)

    return multihost.run_processes(argv, on_start=lambda procs: threading.Thread(
        target=preempt, args=(procs,), daemon=True).start())


@pytest.mark.slow
def test_clip_two_processes_preempted_resumed_and_evaluated_like_one(tmp_path):
    steps = 10
    one, two = tmp_path / "one", tmp_path / "two"
    multihost.run_single(_train_args("clip", one, f"--config.train.num_steps={steps}")).check()

    # Only process 1 is told to stop: both must agree, checkpoint the same step and exit 0.
    first = _run_with_sigterm_to_process_1(
        _train_args("clip", two, f"--config.train.num_steps={steps}"), two, after_step=2).check()
    assert all("after a preemption request" in out for out in first.outputs), first.outputs[0][-2000:]
    for i, out in enumerate(first.outputs):  # The default dcn_shape: the processes split `data`.
        assert f"process {i} of 2 reads data slice {i} of 2 (16 examples a step)" in out
    stopped = max(r["step"] for r in _records(two) if "train/loss" in r)
    assert 2 <= stopped < steps
    assert sorted(os.listdir(two / "checkpoints")) == [str(stopped)]
    # Each process saved its own position in the data stream.
    data_state = os.listdir(two / "checkpoints" / str(stopped) / "data_iterator")
    assert sorted(f for f in data_state if f.endswith(".json")) == ["process_0-of-2.json", "process_1-of-2.json"]

    second = multihost.run_processes(_train_args("clip", two, f"--config.train.num_steps={steps}")).check()
    assert all(f"Resumed from step {stopped}" in out for out in second.outputs)
    _assert_same_losses(two, one, steps)
    # Evaluation ran on both processes over the global arrays; process 0 alone wrote the metrics.
    got, want = _eval_metrics(two), _eval_metrics(one)
    assert got.keys() == want.keys() and any("retrieval" in k for k in got)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-6), key


@pytest.mark.slow
def test_tensor_axis_across_processes_feeds_both_the_same_rows(tmp_path):
    """Mesh (data 1, fsdp 4, tensor 2) with `tensor` across the two processes: each process holds
    every row of the batch (on its 4 fsdp shards), so both must read the same examples."""
    args = ["--config.train.num_steps=3", "--config.eval.splits=()", "--config.mesh.shape=(1,4,2)"]
    multihost.run_single(_train_args("clip", tmp_path / "one", *args)).check()
    two = multihost.run_processes(_train_args("clip", tmp_path / "two", *args,
                                              "--config.mesh.dcn_shape=(1,1,2)")).check()
    for i, out in enumerate(two.outputs):
        assert f"process {i} of 2 reads data slice 0 of 1 (32 examples a step)" in out, out[-3000:]
    _assert_same_losses(tmp_path / "two", tmp_path / "one", 3)


@pytest.mark.slow
def test_cache_and_prior_on_two_processes(tmp_path, tmp_path_factory):
    """embed.py on two processes writes the one-process cache; the prior trains on it as on one.

    The decoder is not repeated here (its compile is the suite's most expensive): its batches are
    the same cache records through the same global stream, with images read as in the CLIP test."""
    clip_dir, reference_cache = tiny_clip.tiny_clip_with_cache(tmp_path_factory)
    cache = tmp_path / "cache"
    multihost.run_processes(["embed.py", f"--clip_workdir={clip_dir}", f"--cache_dir={cache}",
                             "--num_examples=64", "--chunk_size=32", "--batch_size=32"]).check()
    for split in ("train", "validation", "heldout"):
        got = embedding_cache.CacheSource(str(cache), split, valid_only=False)
        want = embedding_cache.CacheSource(reference_cache, split, valid_only=False)
        assert len(got) == len(want) == 64
        for i in range(0, 64, 7):
            a, b = got[i], want[i]
            assert a["caption"] == b["caption"] and a["index"] == b["index"]
            np.testing.assert_array_equal(a["tokens"], b["tokens"])
            assert_close(a["z_i"], b["z_i"])
            assert_close(a["text_hidden"], b["text_hidden"], dtype=np.float16, ulps=1)
        meta = json.loads((cache / split / "metadata.json").read_text())
        assert meta["num_examples"] == 64
    assert not [f for f in os.listdir(cache / "train") if f.endswith(".tmp")]

    args = [f"--config.clip_workdir={clip_dir}", f"--config.cache_dir={cache}",
            "--config.train.num_steps=2", "--config.eval.splits=()"]
    multihost.run_single(_train_args("prior", tmp_path / "prior_one", *args)).check()
    multihost.run_processes(_train_args("prior", tmp_path / "prior_two", *args)).check()
    _assert_same_losses(tmp_path / "prior_two", tmp_path / "prior_one", 2)


@pytest.mark.slow
def test_sample_py_on_two_processes_writes_each_image_once(tmp_path, tmp_path_factory):
    from tests.test_sample_cli import CAPTION, stage_flags

    workdirs = pipeline_stages.tiny_stage_workdirs(tmp_path_factory)
    args = ["sample.py", *stage_flags(workdirs), "--prompt", CAPTION, "--num_per_prompt=4",
            "--batch_size=8", "--seed=3"]
    multihost.run_single([*args, f"--output_dir={tmp_path / 'one'}"]).check()
    two = multihost.run_processes([*args, f"--output_dir={tmp_path / 'two'}"]).check()
    assert sum("Wrote 4 images" in out for out in two.outputs) == 1  # Process 0 reports.
    files = sorted(os.listdir(tmp_path / "two"))
    assert files == sorted(os.listdir(tmp_path / "one"))
    lines = (tmp_path / "two" / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 4
    from PIL import Image

    for name in files:
        if name.endswith(".png"):
            a = np.asarray(Image.open(tmp_path / "two" / name), np.float32)
            b = np.asarray(Image.open(tmp_path / "one" / name), np.float32)
            assert np.abs(a - b).max() <= 1, name  # uint8 rounding of float round-off.
