"""The body of train_stack.py: the whole embedded unCLIP stack trained on shapes, sampled and judged.

Stages, each an ordinary `train.py` workdir under a root (configs/shapes.py variants):

  shapes_clip -> shapes_clip/cache (embed.py) -> shapes_prior -> shapes_decoder -> shapes_upsampler

With `prior_kind="autoregressive"` the prior is the paper's autoregressive one (`shapes_ar_prior`,
configs/shapes.py:ar_prior) instead of the diffusion prior; the other stages are the same, so one
root can hold both priors and judge either.

`train_stages` trains every stage that is not complete (resuming an interrupted one), `judge_stack`
samples the trained stack through `unclip_jax.pipeline` and scores the pixels with the shapes
judge, and `run` does both and reports. The configs are read from the repository's `configs/`
(imported inside the functions: the repository root must be on the path to call them).
"""
import json
import os
import time

from absl import logging

STAGES = ("clip", "prior", "decoder", "upsampler")
# The pipeline's `prior.kind` -> the prior stage trained.
PRIOR_STAGES = {"diffusion": "prior", "autoregressive": "ar_prior"}
PRESETS = ("fast", "full", "tiny")
NUM_CAPTIONS = {"fast": 25, "full": 50, "tiny": 2}


def stage_workdir(root: str, stage: str) -> str:
    return os.path.join(root, f"shapes_{stage}")


def stage_config(stage: str, root: str, preset: str):
    """configs/shapes.py:<stage>[,fast|,tiny], reading the CLIP (and its cache) trained under `root`."""
    from configs import shapes

    config = shapes.get_config(stage + ("" if preset == "full" else f",{preset}"))
    if "clip_workdir" in config:
        with config.unlocked():
            config.clip_workdir, config.cache_dir = stage_workdir(root, "clip"), ""
    return config


def is_complete(config, workdir: str) -> bool:
    """True when `workdir` holds a checkpoint of the config's final step."""
    from unclip_jax.train import checkpointing

    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        return False
    with checkpointing.Checkpointer(ckpt_dir, max_to_keep=None, async_save=False) as ckpt:
        latest = ckpt.latest_step()
    return latest is not None and latest >= int(config.train.num_steps)


def _check_preset(preset: str) -> None:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {PRESETS}")


def stages(prior_kind: str = "diffusion") -> tuple[str, ...]:
    """The stages trained, in order, with the prior of `prior_kind` ("diffusion" | "autoregressive")."""
    if prior_kind not in PRIOR_STAGES:
        raise ValueError(f"unknown prior_kind {prior_kind!r}; expected one of {tuple(PRIOR_STAGES)}")
    return tuple(PRIOR_STAGES[prior_kind] if s == "prior" else s for s in STAGES)


def claim_root(root: str, preset: str) -> None:
    """Records `preset` in `<root>/stack.json`; a root holding another preset's stages is an error
    (their checkpoints would resume into configs they were not trained with)."""
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, "stack.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            held = json.load(f).get("preset")
        if held != preset:
            raise ValueError(f"{root} holds the {held!r} stack; --preset {preset} needs another "
                             f"--root (e.g. runs/stack_{preset})")
        return
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"preset": preset}, f)


def train_stages(root: str, preset: str, timings: dict | None = None, prior_kind: str = "diffusion") -> dict:
    """Trains every stage that is not complete (and the CLIP embedding cache); returns their metrics.

    `timings`, when given, receives each step's wall-clock seconds ("clip", "embed", ...).
    """
    from unclip_jax.data import embed
    from unclip_jax.train import loop

    _check_preset(preset)  # Before claim_root records it in the root.
    order = stages(prior_kind)
    claim_root(root, preset)
    timings = {} if timings is None else timings
    results = {}
    for stage in order:
        config, workdir = stage_config(stage, root, preset), stage_workdir(root, stage)
        start = time.perf_counter()
        if is_complete(config, workdir):
            logging.info("Stage %s: complete in %s, not retrained", stage, workdir)
        else:
            logging.info("Stage %s: training in %s", stage, workdir)
            results[stage] = loop.train_and_evaluate(config, workdir)
        timings[stage] = round(time.perf_counter() - start, 1)
        if stage == "clip":  # Resumable: a complete cache is only checked.
            start = time.perf_counter()
            clip_dir = stage_workdir(root, "clip")
            embed.build_clip_cache(clip_dir, os.path.join(clip_dir, "cache"), progress=True)
            timings["embed"] = round(time.perf_counter() - start, 1)
    return results


def judge_stack(root: str, num_captions: int, columns: int, seed: int, prior_kind: str = "diffusion") -> dict:
    """Text -> image through the trained stages (the prior of `prior_kind`); judge rates per
    caption set, and a sample grid."""
    import numpy as np
    from PIL import Image

    from configs import pipeline_shapes
    from unclip_jax.evaluation import pipeline_eval
    from unclip_jax.pipeline import UnCLIPPipeline
    from unclip_jax.train import metrics

    config = pipeline_shapes.get_config(root)  # <root>/shapes_<stage>, as stage_workdir names them
    with config.unlocked():
        config.prior.kind = prior_kind
        config.prior_workdir = stage_workdir(root, stages(prior_kind)[1])
    pipe = UnCLIPPipeline.from_config(config)
    scores, samples = pipeline_eval.text_to_image(pipe, num_captions, seed=seed, return_samples=True)
    rows = [images[:columns] for _, images, _ in samples.values()]
    if all(len(r) == columns for r in rows):
        grid = metrics.image_grid(np.concatenate(rows), ncols=columns)
        Image.fromarray(grid).save(os.path.join(root, "stack_samples.png"))
    scores["settings"] = pipe.resolved_settings()
    return scores


def run(preset: str = "fast", root: str | None = None, num_captions: int | None = None,
        grid_columns: int = 8, seed: int = 0, prior_kind: str = "diffusion") -> dict:
    """Trains the stack under `root` (default runs/stack_<preset>), judges `num_captions` captions
    per caption set (default NUM_CAPTIONS[preset]), writes `<root>/stack_eval.json` and
    `<root>/stack_samples.png`, prints the scores and timings, and returns the scores."""
    _check_preset(preset)
    root = os.path.abspath(os.path.expanduser(root or f"runs/stack_{preset}"))
    num_captions = num_captions or NUM_CAPTIONS[preset]
    timings = {}
    train_stages(root, preset, timings, prior_kind)
    start = time.perf_counter()
    scores = judge_stack(root, num_captions, grid_columns, seed, prior_kind)
    timings["judge"] = round(time.perf_counter() - start, 1)
    scores["preset"], scores["seconds"] = preset, timings
    with open(os.path.join(root, "stack_eval.json"), "w", encoding="utf-8") as f:
        json.dump(scores, f, indent=2)
    print("Text -> image, shapes judge (rate of images whose every attribute matches the caption):")
    for key in sorted(k for k in scores if k.endswith("/exact")):
        print(f"  {key}: {scores[key]:.3f}")
    print("Seconds (this run; 0-ish for stages already complete):",
          ", ".join(f"{k} {v:.0f}" for k, v in timings.items()), f"; total {sum(timings.values()):.0f}")
    print(f"Grid: {os.path.join(root, 'stack_samples.png')}; all scores: {os.path.join(root, 'stack_eval.json')}")
    return scores
