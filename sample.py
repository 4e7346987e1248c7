"""Samples images from trained unCLIP stages, or manipulates images with them.

  python sample.py --config configs/pipeline_shapes.py --output_dir samples/ \
      --prompt "a large red circle in the center on a white background" --num_per_prompt 4
  python sample.py --prompts_file captions.txt --output_dir samples/ --seed 1 \
      --config.decoder.guidance_scale=2 --config.prior.steps=32
  python sample.py --mode variations --image a.png --output_dir out/        # DDIM eta > 0
  python sample.py --mode interpolate --image a.png --image b.png --num_frames 8 --output_dir out/
  python sample.py --mode textdiff --image a.png --caption_from "a red circle" \
      --caption_to "a blue circle" --output_dir out/
  python sample.py --mode inpaint --image a.png --mask m.png --prompt "..." --output_dir out/

Writes every image as a PNG, one grid PNG per prompt (or per input image), and `samples.jsonl`
(one line per image: mode, caption, seed, indices, the resolved sampling settings, file). The
stage workdirs and the per-stage sampling settings (guidance, sampler, steps, eta) come from the
pipeline config and are overridden with `--config.<field>=...`. The same seed gives the same
images, whatever --batch_size.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Sequence

import numpy as np

MODES = ("text", "variations", "interpolate", "textdiff", "inpaint")
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "pipeline_shapes.py")


class UsageError(ValueError):
    """Bad command-line input (a flag, a file): reported as one line, without a traceback."""


# ---------------------------------------------------------------------------------------------
# Inputs and outputs (no flags: importable by tests)
# ---------------------------------------------------------------------------------------------
def read_prompts(prompts: Sequence[str] | None, prompts_file: str | None) -> list[str]:
    """The prompts of --prompt (repeatable) followed by those of --prompts_file (one per line).

    Blank lines are skipped; a file with no prompt, or no prompt at all, is an error.
    """
    out = [p for p in (prompts or []) if p.strip()]
    if prompts_file:
        if not os.path.isfile(prompts_file):
            raise UsageError(f"--prompts_file {prompts_file} does not exist")
        with open(prompts_file, encoding="utf-8") as f:
            from_file = [line.strip() for line in f if line.strip()]
        if not from_file:
            raise UsageError(f"--prompts_file {prompts_file} holds no prompt (one per line expected)")
        out += from_file
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
# Command line
# ---------------------------------------------------------------------------------------------
def define_flags():
    from absl import flags
    from ml_collections import config_flags

    from unclip_jax import cli  # noqa: F401  (--distributed and the coordinator flags)

    config_flags.DEFINE_config_file("config", DEFAULT_CONFIG,
                                    "Pipeline config: the stage workdirs and sampling settings.",
                                    lock_config=True)
    flags.DEFINE_enum("mode", "text", MODES, "What to do.")
    flags.DEFINE_multi_string("prompt", [], "A caption (repeatable). In inpaint mode, one per --image.")
    flags.DEFINE_string("prompts_file", None, "A text file of captions, one per line.")
    flags.DEFINE_multi_string("image", [], "Input image (repeatable): variations, interpolate (two), "
                                           "textdiff, inpaint.")
    flags.DEFINE_multi_string("mask", [], "Inpaint mask per --image (white = regenerate).")
    flags.DEFINE_string("caption_from", None, "textdiff: a caption of the input image(s).")
    flags.DEFINE_string("caption_to", None, "textdiff: the caption to move toward.")
    flags.DEFINE_list("thetas", ["0", "0.1", "0.2", "0.3", "0.4", "0.5"], "textdiff: slerp fractions.")
    flags.DEFINE_integer("num_frames", 8, "interpolate: frames, both inputs included.")
    flags.DEFINE_enum("interp_noise", "inverted", ["inverted", "fixed"],
                      "interpolate: slerp the inverted x_T of the two images, or one fixed noise.")
    flags.DEFINE_float("eta", 1.0, "variations: DDIM eta (> 0).")
    flags.DEFINE_integer("num_resample", 5, "inpaint: RePaint tries per step.")
    flags.DEFINE_integer("num_per_prompt", 4, "Images per prompt (variations and inpaintings per image).")
    flags.DEFINE_integer("batch_size", 64, "Rows per batch (all devices together).")
    flags.DEFINE_integer("seed", 0, "Sampling seed: the same seed gives the same images.")
    flags.DEFINE_string("output_dir", None, "Where the PNGs, grids and samples.jsonl go.")
    flags.mark_flags_as_required(["output_dir"])


def main(argv):
    from absl import app, flags

    from unclip_jax import cli

    FLAGS = flags.FLAGS
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cli.start()
    from unclip_jax.pipeline import StageError
    from unclip_jax.train.restore import NotTrainedError

    try:
        run_from_flags(FLAGS)
    except (UsageError, StageError, NotTrainedError) as e:  # The message says what to fix.
        sys.exit(f"sample.py: {e}")


def run_from_flags(FLAGS) -> None:
    """Validates the inputs (before loading anything), loads the pipeline and runs --mode."""
    mode = FLAGS.mode
    from unclip_jax import pipeline as pipeline_lib

    for name in ("num_per_prompt", "batch_size", "num_frames", "num_resample"):
        if getattr(FLAGS, name) < 1:
            raise UsageError(f"--{name}={getattr(FLAGS, name)}: expected >= 1")
    try:
        pipeline_lib.Settings.from_config(FLAGS.config)  # Checked before anything is loaded.
    except ValueError as e:
        raise UsageError(f"--config: {e}") from e
    prompts = read_prompts(FLAGS.prompt, FLAGS.prompts_file)
    images = names = None
    if mode == "text":
        if not prompts:
            raise UsageError("--mode text needs captions: give --prompt or --prompts_file")
    else:
        if not FLAGS.image:
            raise UsageError(f"--mode {mode} needs input images: give --image")
        names = list(FLAGS.image)
        raw = [read_image(p) for p in names]
        side = max(min(x.shape[:2]) for x in raw)
        images = np.stack([pipeline_lib.resize(x[None], side)[0] for x in raw])
    if mode == "interpolate" and len(names) != 2:
        raise UsageError(f"--mode interpolate needs exactly two --image, got {len(names)}")
    try:
        thetas = [float(t) for t in FLAGS.thetas]
    except ValueError:
        thetas = []
    if not thetas or not all(0 <= t <= 1 for t in thetas):
        raise UsageError(f"--thetas={','.join(FLAGS.thetas)}: expected numbers in [0, 1]")
    if mode == "variations" and not FLAGS.eta > 0:
        raise UsageError(f"--eta={FLAGS.eta}: variations need eta > 0 (eta = 0 reconstructs the image)")
    masks = None
    if mode == "textdiff" and not (FLAGS.caption_from and FLAGS.caption_to):
        raise UsageError("--mode textdiff needs --caption_from and --caption_to")
    if mode == "inpaint":
        if len(FLAGS.mask) != len(names) or len(prompts) != len(names):
            raise UsageError(f"--mode inpaint needs one --mask and one --prompt per --image: got "
                             f"{len(names)} images, {len(FLAGS.mask)} masks, {len(prompts)} prompts")
        masks = np.stack([read_mask(m, images.shape[1:3]) for m in FLAGS.mask])

    import jax

    pipe = pipeline_lib.UnCLIPPipeline.from_config(FLAGS.config, batch_size=FLAGS.batch_size)
    main_process = jax.process_index() == 0
    writer = Writer(FLAGS.output_dir, pipe.resolved_settings(), FLAGS.seed, mode, enabled=main_process)
    try:
        common = dict(seed=FLAGS.seed, progress=main_process)
        if mode == "text":
            run_text(pipe, writer, prompts, num_per_prompt=FLAGS.num_per_prompt,
                     batch_size=FLAGS.batch_size, **common)
        elif mode == "variations":
            run_variations(pipe, writer, images, names, num_per_image=FLAGS.num_per_prompt,
                           batch_size=FLAGS.batch_size, eta=FLAGS.eta, **common)
        elif mode == "interpolate":
            run_interpolate(pipe, writer, images, names, num_frames=FLAGS.num_frames,
                            noise=FLAGS.interp_noise, **common)
        elif mode == "textdiff":
            run_textdiff(pipe, writer, images, names, caption_from=FLAGS.caption_from,
                         caption_to=FLAGS.caption_to, thetas=thetas, batch_size=FLAGS.batch_size, **common)
        else:
            run_inpaint(pipe, writer, images, masks, names, prompts, num_per_image=FLAGS.num_per_prompt,
                        batch_size=FLAGS.batch_size, num_resample=FLAGS.num_resample, **common)
    finally:
        writer.close()
    if main_process:
        print(f"Wrote {len(writer.records)} images, their grids and samples.jsonl to {FLAGS.output_dir}")


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
