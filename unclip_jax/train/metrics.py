"""Metric writers: JSON lines, TensorBoard event files and PNG sample grids in the workdir.

Layout written by `MetricWriter(workdir)` (process 0 only by default):

- `workdir/metrics.jsonl`: one `{"step": step, "<name>": value, ...}` object per line, appended
  (a resumed run keeps appending; `read_metrics` keeps the last value of each (step, name));
- `workdir/tb/`: TensorBoard event files (tensorboardX, no TensorFlow needed);
- `workdir/samples/{name}_{step:07d}.png`: image grids.

`plot_metrics` turns a `metrics.jsonl` into a PNG of the loss curves.
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from etils import epath

METRICS_FILENAME = "metrics.jsonl"
TB_DIRNAME = "tb"
SAMPLES_DIRNAME = "samples"

log = logging.getLogger(__name__)


def image_grid(images: np.ndarray, ncols: int | None = None, pad: int = 2) -> np.ndarray:
    """Tiles `images` uint8 `[N, H, W, C]` into one uint8 image with `pad` black pixels around each.

    `ncols` defaults to `ceil(sqrt(N))`. Returns `[pad + rows * (H + pad), pad + ncols * (W + pad), C]`
    with `rows = ceil(N / ncols)`; unused cells stay black.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"image_grid expects images of shape [N, H, W, C] with N >= 1, "
                         f"got {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"image_grid expects uint8 images, got {images.dtype}")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    n, h, w, c = images.shape
    ncols = int(ncols) if ncols else math.ceil(math.sqrt(n))
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    grid = np.zeros((pad + nrows * (h + pad), pad + ncols * (w + pad), c), np.uint8)
    for i, image in enumerate(images):
        row, col = divmod(i, ncols)
        top, left = pad + row * (h + pad), pad + col * (w + pad)
        grid[top:top + h, left:left + w] = image
    return grid


def _as_batch(name: str, images: Any) -> np.ndarray:
    """Validates one `write_images` entry and returns it as uint8 `[N, H, W, C]`."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4) or images.dtype != np.uint8:
        raise ValueError(
            f"write_images: images[{name!r}] must be uint8 [N, H, W, C] or [H, W, C] with C in "
            f"(1, 3, 4), got {images.dtype} of shape {images.shape}")
    return images


def _filename_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "image"


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


class MetricWriter:
    """Writes scalars, images and hyperparameters to `workdir` (see the module docstring).

    `enabled` defaults to `jax.process_index() == 0`; a disabled writer creates nothing and every
    method returns immediately, so all processes can call it unconditionally.
    """

    def __init__(self, workdir: str, *, enabled: bool | None = None):
        self.workdir = os.fspath(workdir)
        self.enabled = (jax.process_index() == 0) if enabled is None else bool(enabled)
        self._jsonl = None
        self._tb = None
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter

        if "://" in self.workdir:
            # An object store (gs://, s3://): no appends there, so the file is rewritten whole.
            self._jsonl = _RewrittenFile(epath.Path(self.workdir) / METRICS_FILENAME)
        else:
            os.makedirs(self.workdir, exist_ok=True)
            # Line-buffered append: a resumed run continues the same file; every line reaches disk.
            self._jsonl = open(os.path.join(self.workdir, METRICS_FILENAME), "a", buffering=1)
        # tensorboardX writes gs:// (google-cloud-storage) and s3:// (boto3) event files itself.
        self._tb = SummaryWriter(logdir=os.path.join(self.workdir, TB_DIRNAME))

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Appends `{"step": step, **scalars}` to metrics.jsonl and each scalar to TensorBoard.

        Values may be Python, numpy or (fully replicated / addressable) jax scalars.
        """
        if not self.enabled or not scalars:
            return
        step = int(step)
        values = {}
        for name, value in scalars.items():
            try:
                values[str(name)] = float(value)
            except (TypeError, ValueError) as e:
                raise ValueError(f"write_scalars: {name!r} is not a scalar: {value!r}") from e
        if "step" in values:
            raise ValueError("write_scalars: 'step' is reserved for the step number")
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        for name, value in values.items():
            self._tb.add_scalar(name, value, global_step=step)

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        """Saves each entry (uint8 `[N, H, W, C]` or `[H, W, C]`) as a PNG grid and to TensorBoard.

        Files go to `workdir/samples/{name}_{step:07d}.png` (characters other than letters, digits,
        `_ . -` in `name` become `_`).
        """
        if not self.enabled or not images:
            return
        from PIL import Image

        step = int(step)
        samples_dir = epath.Path(self.workdir) / SAMPLES_DIRNAME
        samples_dir.mkdir(parents=True, exist_ok=True)
        for name, value in images.items():
            batch = _as_batch(name, value)
            grid = image_grid(batch)
            png = io.BytesIO()
            Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(png, format="png")
            (samples_dir / f"{_filename_safe(name)}_{step:07d}.png").write_bytes(png.getvalue())
            self._tb.add_image(name, grid, global_step=step, dataformats="HWC")

    def write_hparams(self, config_dict: Mapping[str, Any] | Any) -> None:
        """Writes the flattened config (`a.b.c: value`) to TensorBoard as a markdown table."""
        if not self.enabled:
            return
        if hasattr(config_dict, "to_dict"):
            config_dict = config_dict.to_dict()
        flat = _flatten(config_dict)
        rows = ["| key | value |", "| --- | --- |"]
        rows += [f"| {key} | {str(value).replace('|', '/')} |" for key, value in sorted(flat.items())]
        self._tb.add_text("hparams", "\n".join(rows), global_step=0)

    def flush(self) -> None:
        """Pushes buffered TensorBoard events and JSON lines to disk."""
        if not self.enabled:
            return
        self._jsonl.flush()
        self._tb.flush()

    def close(self) -> None:
        """Flushes and closes the files; later calls do nothing."""
        if not self.enabled or self._jsonl is None:
            return
        self._jsonl.close()
        self._tb.close()
        self._jsonl = self._tb = None
        self.enabled = False

    def __enter__(self) -> "MetricWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _RewrittenFile:
    """A text file on an object store, appended to by rewriting it whole on every `flush`."""

    def __init__(self, path: epath.Path):
        self.path = path
        self._text = path.read_text() if path.exists() else ""  # A resumed run keeps the lines.

    def write(self, text: str) -> None:
        self._text += text
        self.flush()

    def flush(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(self._text)

    def close(self) -> None:
        self.flush()


def read_metrics(path: str) -> list[dict[str, float]]:
    """Reads a metrics.jsonl into one dict per step, ascending: `[{"step": s, name: value, ...}]`.

    Records for the same step are merged, and where a (step, name) appears more than once (a run
    resumed from an earlier checkpoint re-logs those steps) the last value written wins. A line
    that is not valid JSON (a crash mid-write) is skipped with a warning.
    """
    by_step: dict[int, dict[str, float]] = {}
    with epath.Path(path).open() as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
                step = int(record.pop("step"))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
                log.warning("%s:%d: skipping malformed metrics line %r", path, lineno, line[:80])
                continue
            by_step.setdefault(step, {}).update(record)
    return [{"step": step, **by_step[step]} for step in sorted(by_step)]


def _panel_name(key: str) -> str:
    """`train/loss` and `eval/loss` (or `train_loss`, `eval_loss`) share the panel `loss`."""
    return re.sub(r"^(train|eval|valid|val|test)[/_.]", "", key)


def plot_metrics(metrics_jsonl: str, out_png: str, keys: Sequence[str] | None = None) -> None:
    """Plots metrics against step into `out_png`, one panel per metric (train and eval together).

    `keys` defaults to every key containing "loss". Keys that differ only in a `train/`, `eval/`
    (or `train_`, `eval_`...) prefix share a panel. The y axis is logarithmic when all plotted values
    are positive and span more than 10x.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(metrics_jsonl)
    available = sorted({k for r in records for k in r if k != "step"})
    if keys is None:
        keys = sorted((k for k in available if "loss" in k),
                      key=lambda k: (not k.startswith("train"), k))
    else:
        missing = [k for k in keys if k not in available]
        if missing:
            raise ValueError(f"plot_metrics: {missing} not in {metrics_jsonl}; "
                             f"available: {available}")
    if not keys:
        raise ValueError(f"plot_metrics: no metrics to plot in {metrics_jsonl} "
                         f"(no key contains 'loss'; available: {available})")

    panels: dict[str, list[str]] = {}
    for key in keys:
        panels.setdefault(_panel_name(key), []).append(key)

    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(5 * ncols, 3.5 * nrows), dpi=100)
    FigureCanvasAgg(fig)
    for i, (panel, panel_keys) in enumerate(panels.items()):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        plotted = []
        for key in panel_keys:
            points = [(r["step"], r[key]) for r in records
                      if key in r and r[key] is not None and math.isfinite(r[key])]
            if not points:
                continue
            steps, values = zip(*points)
            ax.plot(steps, values, marker="." if len(points) < 50 else None, label=key)
            plotted.extend(values)
        if plotted and min(plotted) > 0 and max(plotted) > 10 * min(plotted):
            ax.set_yscale("log")
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if plotted:
            ax.legend(fontsize="small")
    fig.tight_layout()
    out = epath.Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = io.BytesIO()
    fig.savefig(png, format="png")
    out.write_bytes(png.getvalue())
