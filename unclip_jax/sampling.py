"""The body of sample.py: images from trained unCLIP stages, or manipulations of images with them.

`run` validates its inputs (before loading anything), loads the pipeline from a pipeline config
(configs/pipeline_shapes.py) and runs one mode; `main` is `run` with the user's mistakes turned
into a one-line exit. The per-mode functions (`run_text`, `run_variations`, ...) write through a
`Writer`: every image as a PNG, one grid PNG per prompt (or per input image), and `samples.jsonl`.

Only numpy and the entries' `cli` helpers (absl) are imported at module level; JAX, the pipeline
and the manipulations inside the functions, so that importing this module is quick and never
pulls in training code.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Sequence

import numpy as np

from unclip_jax.cli import UsageError, read_lines

MODES = ("text", "variations", "interpolate", "textdiff", "inpaint")
DEFAULT_THETAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)




# ---------------------------------------------------------------------------------------------
# Inputs and outputs
# ---------------------------------------------------------------------------------------------
def read_prompts(prompts: Sequence[str] | None, prompts_file: str | None) -> list[str]:
    """The prompts of --prompt (repeatable) followed by those of --prompts_file (one per line).

    Blank lines are skipped; a file with no prompt, or no prompt at all, is an error.
    """
    out = [p for p in (prompts or []) if p.strip()]
    if prompts_file:
        out += read_lines(prompts_file, "--prompts_file", "prompt")
    return out


def read_image(path: str) -> np.ndarray:
    """An image file -> uint8 [H, W, 3]."""
    from unclip_jax.data import images as image_lib

    if not os.path.isfile(path):
        raise UsageError(f"--image {path} does not exist")
    with open(path, "rb") as f:
        try:
            return image_lib.decode_image(f.read())
        except ValueError as e:
            raise UsageError(f"--image {path}: {e}") from e


def read_mask(path: str, shape: tuple[int, int]) -> np.ndarray:
    """A mask image (white = regenerate) -> bool [H, W], resized (nearest) to `shape`."""
    from PIL import Image

    if not os.path.isfile(path):
        raise UsageError(f"--mask {path} does not exist")
    with Image.open(path) as img:
        grey = img.convert("L").resize((shape[1], shape[0]), Image.Resampling.NEAREST)
        return np.asarray(grey) > 127


def write_png(path: str, image: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(np.asarray(image, np.uint8)).save(path)


class Writer:
    """Writes PNGs and grids into `output_dir` and one record per image to a new `samples.jsonl`
    (files of an earlier run with the same names are replaced).

    With several processes every process computes every image (the pipeline's outputs are
    replicated) and only process 0 writes (`enabled`), so each file is written once.
    """

    def __init__(self, output_dir: str, settings: dict[str, Any], seed: int, mode: str,
                 enabled: bool = True):
        self.dir, self.settings, self.seed, self.mode = output_dir, settings, int(seed), mode
        self.enabled = bool(enabled)
        self.records: list[dict[str, Any]] = []
        self._jsonl = None
        if self.enabled:
            os.makedirs(output_dir, exist_ok=True)
            self._jsonl = open(os.path.join(output_dir, "samples.jsonl"), "w", encoding="utf-8")

    def image(self, name: str, image: np.ndarray, **fields) -> None:
        record = {"mode": self.mode, **fields, "seed": self.seed, "settings": self.settings, "file": name}
        self.records.append(record)
        if self.enabled:
            write_png(os.path.join(self.dir, name), image)
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()

    def grid(self, name: str, images: np.ndarray, ncols: int | None = None) -> None:
        from unclip_jax.train import metrics

        if self.enabled:
            write_png(os.path.join(self.dir, name), metrics.image_grid(np.asarray(images), ncols=ncols))

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()


def _batches(n: int, size: int):
    return [(i, min(n, i + size)) for i in range(0, n, size)]


def run_text(pipe, writer: Writer, prompts: Sequence[str], *, seed: int, num_per_prompt: int,
             batch_size: int, progress: bool = True) -> None:
    """Text -> images: `num_per_prompt` PNGs per prompt, a grid per prompt, a record per image."""
    from tqdm import tqdm

    from unclip_jax.pipeline import row_keys

    p = np.repeat(np.arange(len(prompts)), num_per_prompt)
    k = np.tile(np.arange(num_per_prompt), len(prompts))
    per_prompt: dict[int, list[np.ndarray]] = {}
    for lo, hi in tqdm(_batches(len(p), batch_size), desc="batches", disable=not progress):
        out = pipe.generate_rows([prompts[i] for i in p[lo:hi]], row_keys(seed, p[lo:hi], k[lo:hi]))
        for row, image in enumerate(out.images):
            pi, ki = int(p[lo + row]), int(k[lo + row])
            writer.image(f"{pi:04d}_{ki:02d}.png", image, caption=prompts[pi], prompt_index=pi, sample_index=ki)
            per_prompt.setdefault(pi, []).append(image)
            if len(per_prompt[pi]) == num_per_prompt:
                writer.grid(f"grid_{pi:04d}.png", np.stack(per_prompt.pop(pi)))


def run_variations(pipe, writer: Writer, images: np.ndarray, names: Sequence[str], *, seed: int,
                   num_per_image: int, batch_size: int, eta: float, progress: bool = True) -> None:
    """Variations of each input image (DDIM at eta > 0); the grid shows the input first."""
    from tqdm import tqdm

    from unclip_jax import manipulations, pipeline as pipeline_lib

    per_batch = max(1, batch_size // num_per_image)
    for lo, hi in tqdm(_batches(len(images), per_batch), desc="batches", disable=not progress):
        out = manipulations.variations(pipe, images[lo:hi], num_variations=num_per_image, eta=eta,
                                       seed=seed, first_index=lo)
        for n, row in enumerate(out):
            for v, image in enumerate(row):
                writer.image(f"variation_{lo + n:03d}_{v:02d}.png", image, source=names[lo + n],
                             image_index=lo + n, sample_index=v, eta=eta)
            source = pipeline_lib.resize(images[lo + n][None], row.shape[1])
            writer.grid(f"grid_{lo + n:03d}.png", np.concatenate([source, row]))


def run_interpolate(pipe, writer: Writer, images: np.ndarray, names: Sequence[str], *, seed: int,
                    num_frames: int, noise: str, progress: bool = True) -> None:
    """Frames between the two input images, and a one-row grid of them."""
    from tqdm import tqdm

    from unclip_jax import manipulations

    if len(images) != 2:
        raise UsageError(f"--mode interpolate needs exactly two --image, got {len(images)}")
    for _ in tqdm(range(1), desc="batches", disable=not progress):
        frames = manipulations.interpolate(pipe, images[0], images[1], num_frames=num_frames, noise=noise,
                                           seed=seed)
    thetas = manipulations.interpolation_thetas(num_frames)
    for f, image in enumerate(frames):
        writer.image(f"frame_{f:02d}.png", image, source=list(names), frame=f, theta=float(thetas[f]),
                     noise=noise)
    writer.grid("grid.png", frames, ncols=len(frames))


def run_textdiff(pipe, writer: Writer, images: np.ndarray, names: Sequence[str], *, seed: int,
                 caption_from: str, caption_to: str, thetas: Sequence[float], batch_size: int,
                 progress: bool = True) -> None:
    """Each image moved along norm(z_t(to) - z_t(from)) at `thetas`; one row grid per image."""
    from tqdm import tqdm

    from unclip_jax import manipulations

    per_batch = max(1, batch_size // len(thetas))
    for lo, hi in tqdm(_batches(len(images), per_batch), desc="batches", disable=not progress):
        out = manipulations.text_diff(pipe, images[lo:hi], caption_from, caption_to, thetas=thetas,
                                      seed=seed, first_index=lo)
        for n, row in enumerate(out):
            for t, image in enumerate(row):
                writer.image(f"textdiff_{lo + n:03d}_{t:02d}.png", image, source=names[lo + n],
                             image_index=lo + n, caption_from=caption_from, caption_to=caption_to,
                             theta=float(thetas[t]))
            writer.grid(f"grid_{lo + n:03d}.png", row, ncols=len(row))


def run_inpaint(pipe, writer: Writer, images: np.ndarray, masks: np.ndarray, names: Sequence[str],
                captions: Sequence[str], *, seed: int, num_per_image: int, batch_size: int,
                num_resample: int, progress: bool = True) -> None:
    """The masked region of each image regenerated for its caption; the grid shows the input first."""
    from tqdm import tqdm

    from unclip_jax import manipulations, pipeline as pipeline_lib

    per_batch = max(1, batch_size // num_per_image)
    for lo, hi in tqdm(_batches(len(images), per_batch), desc="batches", disable=not progress):
        out = manipulations.inpaint(pipe, images[lo:hi], masks[lo:hi], captions[lo:hi],
                                    num_per_image=num_per_image, num_resample=num_resample, seed=seed,
                                    first_index=lo)
        for n, row in enumerate(out):
            for k, image in enumerate(row):
                writer.image(f"inpaint_{lo + n:03d}_{k:02d}.png", image, source=names[lo + n],
                             caption=captions[lo + n], image_index=lo + n, sample_index=k,
                             num_resample=num_resample)
            source = pipeline_lib.resize(images[lo + n][None], row.shape[1])
            writer.grid(f"grid_{lo + n:03d}.png", np.concatenate([source, row]))



# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------
def run(config, output_dir: str, *, mode: str = "text", prompts: Sequence[str] = (),
        prompts_file: str | None = None, image_paths: Sequence[str] = (), mask_paths: Sequence[str] = (),
        caption_from: str | None = None, caption_to: str | None = None,
        thetas: Sequence[float | str] = DEFAULT_THETAS, num_frames: int = 8, interp_noise: str = "inverted",
        eta: float = 1.0, num_resample: int = 5, num_per_prompt: int = 4, batch_size: int = 64,
        seed: int = 0) -> list[dict[str, Any]]:
    """Validates the inputs (before loading anything), loads the pipeline and runs `mode`.

    `config` is a pipeline config (configs/pipeline_shapes.py); the other arguments are sample.py's
    flags (`prompts` its --prompt, `image_paths` its --image, `mask_paths` its --mask). Returns the
    records of the images written (also on processes other than 0, which write nothing).

    Raises:
      UsageError: a bad argument or input file (nothing is loaded or written then).
      unclip_jax.pipeline.StageError, unclip_jax.stages.load.NotTrainedError: a stage workdir is
        wrong or not trained.
    """
    from unclip_jax import pipeline as pipeline_lib

    if mode not in MODES:
        raise UsageError(f"--mode {mode}: expected one of {', '.join(MODES)}")
    for name, value in (("num_per_prompt", num_per_prompt), ("batch_size", batch_size),
                        ("num_frames", num_frames), ("num_resample", num_resample)):
        if value < 1:
            raise UsageError(f"--{name}={value}: expected >= 1")
    try:
        pipeline_lib.Settings.from_config(config)  # Checked before anything is loaded.
        pipeline_lib.prior_kind_from_config(config)
    except ValueError as e:
        raise UsageError(f"--config: {e}") from e
    prompts = read_prompts(prompts, prompts_file)
    images = names = None
    if mode == "text":
        if not prompts:
            raise UsageError("--mode text needs captions: give --prompt or --prompts_file")
    else:
        if not image_paths:
            raise UsageError(f"--mode {mode} needs input images: give --image")
        names = list(image_paths)
        raw = [read_image(p) for p in names]
        side = max(min(x.shape[:2]) for x in raw)
        images = np.stack([pipeline_lib.resize(x[None], side)[0] for x in raw])
    if mode == "interpolate" and len(names) != 2:
        raise UsageError(f"--mode interpolate needs exactly two --image, got {len(names)}")
    try:
        theta_values = [float(t) for t in thetas]
    except ValueError:
        theta_values = []
    if not theta_values or not all(0 <= t <= 1 for t in theta_values):
        raise UsageError(f"--thetas={','.join(str(t) for t in thetas)}: expected numbers in [0, 1]")
    if mode == "variations" and not eta > 0:
        raise UsageError(f"--eta={eta}: variations need eta > 0 (eta = 0 reconstructs the image)")
    masks = None
    if mode == "textdiff" and not (caption_from and caption_to):
        raise UsageError("--mode textdiff needs --caption_from and --caption_to")
    if mode == "inpaint":
        if len(mask_paths) != len(names) or len(prompts) != len(names):
            raise UsageError(f"--mode inpaint needs one --mask and one --prompt per --image: got "
                             f"{len(names)} images, {len(mask_paths)} masks, {len(prompts)} prompts")
        masks = np.stack([read_mask(m, images.shape[1:3]) for m in mask_paths])

    import jax

    pipe = pipeline_lib.UnCLIPPipeline.from_config(config, batch_size=batch_size)
    main_process = jax.process_index() == 0
    writer = Writer(output_dir, pipe.resolved_settings(), seed, mode, enabled=main_process)
    try:
        common = dict(seed=seed, progress=main_process)
        if mode == "text":
            run_text(pipe, writer, prompts, num_per_prompt=num_per_prompt, batch_size=batch_size, **common)
        elif mode == "variations":
            run_variations(pipe, writer, images, names, num_per_image=num_per_prompt, batch_size=batch_size,
                           eta=eta, **common)
        elif mode == "interpolate":
            run_interpolate(pipe, writer, images, names, num_frames=num_frames, noise=interp_noise, **common)
        elif mode == "textdiff":
            run_textdiff(pipe, writer, images, names, caption_from=caption_from, caption_to=caption_to,
                         thetas=theta_values, batch_size=batch_size, **common)
        else:
            run_inpaint(pipe, writer, images, masks, names, prompts, num_per_image=num_per_prompt,
                        batch_size=batch_size, num_resample=num_resample, **common)
    finally:
        writer.close()
    if main_process:
        print(f"Wrote {len(writer.records)} images, their grids and samples.jsonl to {output_dir}")
    return writer.records


def main(config, output_dir: str, **options) -> None:
    """`run(config, output_dir, **options)`; a bad input or stage exits with a one-line message
    (`sample.py: ...`, the message says what to fix) instead of a traceback."""
    from unclip_jax.pipeline import StageError
    from unclip_jax.stages.load import NotTrainedError

    try:
        run(config, output_dir, **options)
    except (UsageError, StageError, NotTrainedError) as e:
        sys.exit(f"sample.py: {e}")
