"""Trains the whole embedded unCLIP stack on shapes from scratch, then samples it and judges the pixels.

  python train_stack.py [--root runs] [--num_captions 50] [--tiny]

Stages, each an ordinary `train.py` workdir under `--root` (configs/shapes.py variants):

  shapes_clip -> shapes_clip/cache (embed.py) -> shapes_prior -> shapes_decoder -> shapes_upsampler

A stage whose final checkpoint exists is not retrained (nor re-evaluated); an interrupted stage
resumes from its latest checkpoint. Then text -> image for `--num_captions` captions of each of
four sets (training / held-out captions, single / two objects) through `unclip_jax.pipeline`; the
shapes judge's scores are printed and written to `<root>/stack_eval.json`, and a grid of the
samples (one row per set) to `<root>/stack_samples.png`. `--tiny` runs the `,tiny` configs (a
smoke test in a few minutes; its scores mean nothing).
"""
import json
import os

from absl import app, flags, logging

from unclip_jax import cli

FLAGS = flags.FLAGS


def _define_flags():  # Only when run as a script: tests import this module beside sample.py.
    flags.DEFINE_string("root", "runs", "Directory holding one workdir per stage.")
    flags.DEFINE_integer("num_captions", 50, "Captions per caption set for the final judge.")
    flags.DEFINE_integer("grid_columns", 8, "Samples per caption set shown in the grid.")
    flags.DEFINE_integer("seed", 0, "Seed of the final captions and samples.")
    flags.DEFINE_bool("tiny", False, "Use the `,tiny` configs (smoke test).")


STAGES = ("clip", "prior", "decoder", "upsampler")


def stage_workdir(root: str, stage: str) -> str:
    return os.path.join(root, f"shapes_{stage}")


def stage_config(stage: str, root: str, tiny: bool):
    """configs/shapes.py:<stage>[,tiny], reading the CLIP (and its cache) trained under `root`."""
    from configs import shapes

    config = shapes.get_config(stage + (",tiny" if tiny else ""))
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


def train_stages(root: str, tiny: bool) -> dict:
    """Trains every stage that is not complete (and the CLIP embedding cache); returns their metrics."""
    from unclip_jax.tasks import embed
    from unclip_jax.train import loop

    results = {}
    for stage in STAGES:
        config, workdir = stage_config(stage, root, tiny), stage_workdir(root, stage)
        if is_complete(config, workdir):
            logging.info("Stage %s: complete in %s, not retrained", stage, workdir)
        else:
            logging.info("Stage %s: training in %s", stage, workdir)
            results[stage] = loop.train_and_evaluate(config, workdir)
        if stage == "clip":  # Resumable: a complete cache is only checked.
            clip_dir = stage_workdir(root, "clip")
            embed.build_clip_cache(clip_dir, os.path.join(clip_dir, "cache"), progress=True)
    return results


def judge_stack(root: str, num_captions: int, columns: int, seed: int) -> dict:
    """Text -> image through the trained stages; judge rates per caption set, and a sample grid."""
    import numpy as np
    from PIL import Image

    from configs import pipeline_shapes
    from unclip_jax.evaluation import pipeline_eval
    from unclip_jax.pipeline import UnCLIPPipeline
    from unclip_jax.train import metrics

    config = pipeline_shapes.get_config()
    with config.unlocked():
        config.clip_workdir = stage_workdir(root, "clip")
        config.prior_workdir = stage_workdir(root, "prior")
        config.decoder_workdir = stage_workdir(root, "decoder")
        config.upsampler_workdirs = (stage_workdir(root, "upsampler"),)
    pipe = UnCLIPPipeline.from_config(config)
    scores, samples = pipeline_eval.text_to_image(pipe, num_captions, seed=seed, return_samples=True)
    rows = [images[:columns] for _, images, _ in samples.values()]
    if all(len(r) == columns for r in rows):
        grid = metrics.image_grid(np.concatenate(rows), ncols=columns)
        Image.fromarray(grid).save(os.path.join(root, "stack_samples.png"))
    scores["settings"] = pipe.resolved_settings()
    return scores


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cli.start()
    root = os.path.abspath(os.path.expanduser(FLAGS.root))
    os.makedirs(root, exist_ok=True)
    train_stages(root, FLAGS.tiny)
    scores = judge_stack(root, FLAGS.num_captions, FLAGS.grid_columns, FLAGS.seed)
    with open(os.path.join(root, "stack_eval.json"), "w", encoding="utf-8") as f:
        json.dump(scores, f, indent=2)
    print("Text -> image, shapes judge (rate of images whose every attribute matches the caption):")
    for key in sorted(k for k in scores if k.endswith("/exact")):
        print(f"  {key}: {scores[key]:.3f}")
    print(f"Grid: {os.path.join(root, 'stack_samples.png')}; all scores: {os.path.join(root, 'stack_eval.json')}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
