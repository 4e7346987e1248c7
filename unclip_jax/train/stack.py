"""The body of train_stack.py: the whole embedded unCLIP stack trained on shapes, sampled and judged.

Stages, each an ordinary `train.py` workdir under a root (configs/shapes.py variants):

  shapes_clip -> shapes_clip/cache (embed.py) -> shapes_prior -> shapes_decoder -> shapes_upsampler

With `prior_kind="autoregressive"` the prior is the paper's autoregressive one (`shapes_ar_prior`,
configs/shapes.py:ar_prior) instead of the diffusion prior; the other stages are the same, so one
root can hold both priors and judge either.

`train_stages` trains every stage that is not complete (resuming an interrupted one), `judge_stack`
samples the trained stack through `unclip_jax.pipeline` and scores the pixels with the shapes
judge, and `run` does both and reports. As each step finishes, a `Progress` prints its seconds,
the elapsed total and `project_total`'s projection of the whole run, and `budget_warning`'s
warning when that projection is over the preset's budget (`BUDGET_MINUTES`). The configs are read from the repository's `configs/`
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

# Reference wall-clock seconds of each step of a run from scratch, per preset: a `fast` run alone
# on a 2-core AMD EPYC (23.8 minutes; a 2-core Xeon with AMX took 27.8). A reference to scale
# by this machine's measured speed, not a promise of any machine's time. `full` (hours on a CPU,
# minutes on a GPU: too machine-dependent for one table) and `tiny` (a few minutes) have none:
# their progress lines show no projection, and a budget given to them is checked against the
# elapsed seconds alone.
REFERENCE_SECONDS = {
    "fast": {"clip": 218, "embed": 34, "prior": 70, "decoder": 828, "upsampler": 224, "judge": 56},
    "full": None,
    "tiny": None,
}
# Steps without a measurement of their own, scaled as another step: the autoregressive prior's
# fast config is taken to cost about what the diffusion prior's does (a rough guess).
REFERENCE_STEP = {"ar_prior": "prior"}
# The wall-clock budget of a run, per preset (None: none); `--budget_minutes` overrides it.
BUDGET_MINUTES = {"fast": 30, "full": None, "tiny": None}

_clock = time.perf_counter  # Every step's seconds come from here (tests replace it).


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


def run_steps(prior_kind: str = "diffusion", judge: bool = True) -> tuple[str, ...]:
    """The steps a run times, in order: each stage, the embedding cache after the CLIP, the judge."""
    order = stages(prior_kind)
    return order[:1] + ("embed",) + order[1:] + (("judge",) if judge else ())


def _reference(preset: str, step: str) -> float | None:
    table = REFERENCE_SECONDS.get(preset)
    if not table:
        return None
    return table.get(step, table.get(REFERENCE_STEP.get(step, step)))


def project_total(preset: str, timings: dict, skipped=(), steps=None) -> float | None:
    """The projected wall-clock seconds of the whole run, from the steps timed so far.

    projected = elapsed + (reference seconds of the steps still to run) x (seconds / reference
    seconds of the steps run), the reference being REFERENCE_SECONDS[preset]. `timings` holds the
    seconds of the steps done ({step: seconds}); `skipped`, the steps done or still to come that
    are (or will be) skipped because already complete: they count in the elapsed seconds but not
    in the speed (their few seconds of checking say nothing of it), nor among the steps to run.
    `steps` is every step of the run (default: the preset's reference steps). Before any step
    that was run, the speed is taken to be the reference's. None for a preset without a reference.
    """
    if not REFERENCE_SECONDS.get(preset):
        return None
    steps = tuple(REFERENCE_SECONDS[preset]) if steps is None else tuple(steps)
    skipped = set(skipped)
    elapsed = float(sum(timings.values()))
    ran = [s for s in timings if s not in skipped and _reference(preset, s)]
    measured, reference_done = sum(timings[s] for s in ran), sum(_reference(preset, s) for s in ran)
    speed = measured / reference_done if reference_done else 1.0  # Seconds per reference second.
    remaining = sum(_reference(preset, s) or 0.0 for s in steps if s not in timings and s not in skipped)
    return elapsed + remaining * speed


def resolve_budget(preset: str, budget_minutes: float | None = None) -> float | None:
    """The budget in minutes: `budget_minutes` when given (0: none), else BUDGET_MINUTES[preset]."""
    minutes = BUDGET_MINUTES.get(preset) if budget_minutes is None else budget_minutes
    return float(minutes) if minutes else None


def slowest_step(preset: str, timings: dict, skipped=()) -> tuple[str, float] | None:
    """(step, seconds / reference seconds) of the step run slowest relative to its reference."""
    ratios = {s: t / _reference(preset, s) for s, t in timings.items()
              if s not in set(skipped) and _reference(preset, s)}
    return max(ratios.items(), key=lambda kv: kv[1]) if ratios else None


def budget_warning(preset: str, timings: dict, skipped=(), budget_minutes: float | None = None,
                   steps=None) -> str | None:
    """The warning to print when the run is on course to exceed its budget, else None.

    The budget is `resolve_budget(preset, budget_minutes)` (0 or None for a preset without one: no
    warning); the run is over it when `project_total` is (or, for a preset without a reference, when
    the elapsed seconds already are). The warning names the step slowest relative to its reference.
    """
    budget = resolve_budget(preset, budget_minutes)
    if budget is None:
        return None
    projected = project_total(preset, timings, skipped, steps)
    total = float(sum(timings.values())) if projected is None else projected
    if total <= 60.0 * budget:
        return None
    verb = "has taken" if projected is None else "is on course for"
    message = (f"WARNING: this run {verb} {total / 60:.1f} min, over the {budget:g}-minute budget "
               f"of the {preset} preset (--budget_minutes)")
    slowest = slowest_step(preset, timings, skipped)
    if slowest is not None:
        step, ratio = slowest
        message += (f"; slowest relative to its reference: {step}, {timings[step]:.0f} s, "
                    f"{ratio:.2f}x its {_reference(preset, step):.0f} s")
    return message + "."


class Progress:
    """Records each step's seconds into `timings` and prints, as each finishes, one line (its
    seconds, the elapsed total, the projected total) and `budget_warning`'s warning, if any."""

    def __init__(self, preset: str, steps, budget_minutes: float | None = None,
                 timings: dict | None = None):
        self.preset, self.steps, self.budget_minutes = preset, tuple(steps), budget_minutes
        self.timings = {} if timings is None else timings
        self.skipped = set()  # Steps done or to come that are (to be) skipped as complete.

    def expect_skipped(self, step: str, skipped: bool = True) -> None:
        (self.skipped.add if skipped else self.skipped.discard)(step)

    def done(self, step: str, seconds: float, skipped: bool = False) -> None:
        self.timings[step] = round(seconds, 1)
        self.expect_skipped(step, skipped)
        elapsed = sum(self.timings.values())
        line = (f"Stack: {step} {'complete, skipped' if skipped else 'done'} in {seconds:.0f} s; "
                f"elapsed {elapsed:.0f} s ({elapsed / 60:.1f} min)")
        if step != self.steps[-1]:
            projected = project_total(self.preset, self.timings, self.skipped, self.steps)
            if projected is not None:
                line += f"; projected total {projected / 60:.1f} min"
        budget = resolve_budget(self.preset, self.budget_minutes)
        if budget is not None:
            line += f" (budget {budget:g} min)"
        print(line, flush=True)
        warning = budget_warning(self.preset, self.timings, self.skipped, self.budget_minutes, self.steps)
        if warning is not None:
            print(warning, flush=True)


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


def train_stages(root: str, preset: str, timings: dict | None = None, prior_kind: str = "diffusion",
                 progress: Progress | None = None) -> dict:
    """Trains every stage that is not complete (and the CLIP embedding cache); returns their metrics.

    `timings`, when given, receives each step's wall-clock seconds ("clip", "embed", ...). Each
    finished step is reported through `progress` (default: a `Progress` of these steps, recording
    into `timings`, with the preset's budget); `run` passes its own, the judge still to come.
    """
    from unclip_jax.data import embed
    from unclip_jax.train import loop

    _check_preset(preset)  # Before claim_root records it in the root.
    order = stages(prior_kind)
    claim_root(root, preset)
    if progress is None:
        progress = Progress(preset, run_steps(prior_kind, judge=False), timings=timings)
    configs = {stage: stage_config(stage, root, preset) for stage in order}
    complete = {stage: is_complete(configs[stage], stage_workdir(root, stage)) for stage in order}
    for stage in order:  # Known before they run: the projection leaves them out of the work to come.
        progress.expect_skipped(stage, complete[stage])
    # A complete CLIP's cache is taken to be complete too, until building it says otherwise.
    progress.expect_skipped("embed", complete["clip"])
    results = {}
    for stage in order:
        config, workdir = configs[stage], stage_workdir(root, stage)
        start = _clock()
        if complete[stage]:
            logging.info("Stage %s: complete in %s, not retrained", stage, workdir)
        else:
            logging.info("Stage %s: training in %s", stage, workdir)
            results[stage] = loop.train_and_evaluate(config, workdir)
        progress.done(stage, _clock() - start, skipped=complete[stage])
        if stage == "clip":  # Resumable: a complete cache is only checked.
            start = _clock()
            clip_dir = stage_workdir(root, "clip")
            summaries = embed.build_clip_cache(clip_dir, os.path.join(clip_dir, "cache"), progress=True)
            wrote = any(summary.chunks_written for summary in summaries.values())
            progress.done("embed", _clock() - start, skipped=not wrote)
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
        grid_columns: int = 8, seed: int = 0, prior_kind: str = "diffusion",
        budget_minutes: float | None = None) -> dict:
    """Trains the stack under `root` (default runs/stack_<preset>), judges `num_captions` captions
    per caption set (default NUM_CAPTIONS[preset]), writes `<root>/stack_eval.json` and
    `<root>/stack_samples.png`, prints the scores and timings, and returns the scores.

    Each step's seconds are printed as it finishes, with the projected total of the run and a
    warning when that is over the budget: `budget_minutes` (0: none; default BUDGET_MINUTES[preset]).
    """
    _check_preset(preset)
    stages(prior_kind)  # Checked before any training.
    root = os.path.abspath(os.path.expanduser(root or f"runs/stack_{preset}"))
    num_captions = num_captions or NUM_CAPTIONS[preset]
    progress = Progress(preset, run_steps(prior_kind), budget_minutes)
    timings = progress.timings
    train_stages(root, preset, prior_kind=prior_kind, progress=progress)
    start = _clock()
    scores = judge_stack(root, num_captions, grid_columns, seed, prior_kind)
    progress.done("judge", _clock() - start)
    budget = resolve_budget(preset, budget_minutes)
    total = sum(timings.values())
    scores["preset"], scores["seconds"] = preset, timings
    scores["budget_minutes"] = budget
    scores["over_budget"] = None if budget is None else total > 60.0 * budget
    with open(os.path.join(root, "stack_eval.json"), "w", encoding="utf-8") as f:
        json.dump(scores, f, indent=2)
    print("Text -> image, shapes judge (rate of images whose every attribute matches the caption):")
    for key in sorted(k for k in scores if k.endswith("/exact")):
        print(f"  {key}: {scores[key]:.3f}")
    print("Seconds (this run; 0-ish for stages already complete):",
          ", ".join(f"{k} {v:.0f}" for k, v in timings.items()), f"; total {total:.0f}")
    if budget is not None:
        print(f"Budget: {budget:g} min; this run took {total / 60:.1f} min"
              + (" (over budget)" if scores["over_budget"] else ""))
    print(f"Grid: {os.path.join(root, 'stack_samples.png')}; all scores: {os.path.join(root, 'stack_eval.json')}")
    return scores
