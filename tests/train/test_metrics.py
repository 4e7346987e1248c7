"""Tests of `unclip_jax.train.metrics`: JSON lines, TensorBoard files, image grids and plots."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from unclip_jax.train import metrics
from unclip_jax.train.metrics import MetricWriter, image_grid, plot_metrics, read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_writer_writes_jsonl_tensorboard_and_pngs(tmp_path):
    writer = MetricWriter(str(tmp_path), enabled=True)
    writer.write_scalars(1, {"train/loss": np.float32(0.5), "train/lr": jnp.asarray(1e-3)})
    writer.write_scalars(2, {"train/loss": 0.25})
    rng = np.random.default_rng(0)
    writer.write_images(2, {"eval/samples": rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8),
                            "single": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)})
    writer.write_hparams({"train": {"lr": 1e-3, "betas": (0.9, 0.99)}, "seed": 0})
    writer.flush()
    writer.close()
    writer.close()  # idempotent

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 1, "train/loss": 0.5, "train/lr": pytest.approx(1e-3)},
        {"step": 2, "train/loss": 0.25}]
    tb_files = os.listdir(tmp_path / "tb")
    assert any(name.startswith("events.out.tfevents") for name in tb_files)
    assert sum(os.path.getsize(tmp_path / "tb" / name) for name in tb_files) > 0
    grid = np.asarray(Image.open(tmp_path / "samples" / "eval_samples_0000002.png"))
    assert grid.shape == image_grid(np.zeros((5, 8, 8, 3), np.uint8)).shape
    assert np.asarray(Image.open(tmp_path / "samples" / "single_0000002.png")).shape == (12, 12, 3)


def test_disabled_writer_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    writer = MetricWriter(str(workdir), enabled=False)
    writer.write_scalars(1, {"loss": 1.0})
    writer.write_images(1, {"x": np.zeros((2, 4, 4, 3), np.uint8)})
    writer.write_hparams({"a": 1})
    writer.flush()
    writer.close()
    assert not workdir.exists()


def test_bad_inputs_are_named(tmp_path):
    writer = MetricWriter(str(tmp_path), enabled=True)
    with pytest.raises(ValueError, match=r"images\['x'\] must be uint8"):
        writer.write_images(0, {"x": np.zeros((2, 4, 4, 3), np.float32)})
    with pytest.raises(ValueError, match="'loss' is not a scalar"):
        writer.write_scalars(0, {"loss": np.zeros(3)})
    writer.close()


def test_image_grid_shape_and_layout():
    images = np.stack([np.full((4, 6, 3), i + 1, np.uint8) for i in range(5)])
    grid = image_grid(images, ncols=3, pad=1)
    assert grid.shape == (1 + 2 * (4 + 1), 1 + 3 * (6 + 1), 3) and grid.dtype == np.uint8
    assert grid[1, 1, 0] == 1 and grid[1, 8, 0] == 2 and grid[6, 1, 0] == 4
    assert grid[6, 15, 0] == 0  # the sixth cell is empty
    assert image_grid(images).shape == (2 + 2 * 6, 2 + 3 * 8, 3)  # ncols = ceil(sqrt(5)) = 3
    assert image_grid(images[:1], pad=0).shape == (4, 6, 3)
    with pytest.raises(ValueError, match="uint8"):
        image_grid(images.astype(np.float32))


def _write(path, records):
    with open(path, "a") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def test_read_metrics_keeps_last_record_after_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    # First run reaches step 30; it is resumed from the checkpoint at step 20 and re-logs 30.
    _write(path, [{"step": 10, "train/loss": 4.0}, {"step": 20, "train/loss": 3.0},
                  {"step": 20, "eval/loss": 3.5}, {"step": 30, "train/loss": 2.9}])
    with open(path, "a") as f:
        f.write('{"step": 3')  # a line cut short by a crash
        f.write("\n")
    _write(path, [{"step": 30, "train/loss": 2.0}, {"step": 40, "train/loss": 1.0}])
    assert read_metrics(str(path)) == [
        {"step": 10, "train/loss": 4.0},
        {"step": 20, "train/loss": 3.0, "eval/loss": 3.5},
        {"step": 30, "train/loss": 2.0},
        {"step": 40, "train/loss": 1.0}]


def test_plot_metrics_writes_png(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, [{"step": s, "train/loss": 100.0 / s, "train/lr": 1e-3} for s in range(1, 21)])
    _write(path, [{"step": s, "eval/loss": 90.0 / s, "eval/loss_prior": 1.0} for s in (10, 20)])
    out = tmp_path / "plots" / "metrics.png"
    plot_metrics(str(path), str(out))
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    width, height = Image.open(out).size
    assert width > height > 0  # two panels side by side: "loss" and "loss_prior"
    assert metrics._panel_name("train/loss") == metrics._panel_name("eval/loss") == "loss"

    plot_metrics(str(path), str(tmp_path / "lr.png"), keys=["train/lr"])
    assert (tmp_path / "lr.png").read_bytes()[:8] == PNG_SIGNATURE
    with pytest.raises(ValueError, match="not in"):
        plot_metrics(str(path), str(tmp_path / "x.png"), keys=["nope"])
