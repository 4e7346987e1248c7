"""train_stack.py: the whole tiny stack trains once, samples, judges; a second run retrains nothing.
Each step's seconds, the projected total and the budget warning (on injected seconds)."""
import itertools
import json
import os

import numpy as np
import pytest
from PIL import Image

from unclip_jax.train import stack as train_stack


@pytest.mark.slow
def test_tiny_stack_trains_every_stage_once_then_judges_samples(tmp_path, monkeypatch, capsys):
    # Every step takes 60 s by this clock (its seconds are injected, not measured).
    monkeypatch.setattr(train_stack, "_clock", itertools.count(0.0, 60.0).__next__)
    root = str(tmp_path / "runs")
    timings = {}
    first = train_stack.train_stages(root, "tiny", timings)
    assert timings == dict.fromkeys(train_stack.run_steps(judge=False), 60.0)
    out = capsys.readouterr().out
    assert "Stack: clip done in 60 s; elapsed 60 s (1.0 min)\n" in out  # tiny: no projection
    assert "Stack: upsampler done in 60 s; elapsed 300 s (5.0 min)\n" in out
    assert set(first) == set(train_stack.STAGES)
    assert all(np.isfinite(first[s]["train/loss"]) for s in train_stack.STAGES)
    assert os.path.isdir(os.path.join(root, "shapes_clip", "cache", "train"))

    assert train_stack.train_stages(root, "tiny") == {}  # Complete stages are not retrained.
    with pytest.raises(ValueError, match="holds the 'tiny' stack"):  # Another preset's root.
        train_stack.train_stages(root, "fast")

    capsys.readouterr()
    # The whole run over the complete stages: every step skipped but the judge; a 4-minute budget
    # is exceeded by the 5th step's 60 s (tiny has no reference: the elapsed seconds are checked).
    scores = train_stack.run("tiny", root, num_captions=2, grid_columns=2, seed=0, budget_minutes=4)
    out = capsys.readouterr().out
    assert "Stack: decoder complete, skipped in 60 s" in out and "Stack: judge done in 60 s" in out
    assert out.count("WARNING: this run has taken") == 2  # After the upsampler and the judge.
    assert "Budget: 4 min; this run took 6.0 min (over budget)" in out
    with open(os.path.join(root, "stack_eval.json"), encoding="utf-8") as f:
        written = json.load(f)
    assert written["budget_minutes"] == 4 and written["over_budget"] is True
    assert written["seconds"] == dict.fromkeys(train_stack.run_steps(), 60.0)
    for split in ("train", "heldout"):
        for kind in ("single", "pair"):
            assert 0.0 <= scores[f"{split}/{kind}/exact"] <= 1.0
            assert scores[f"{split}/{kind}/count"] == 2
    grid = np.asarray(Image.open(os.path.join(root, "stack_samples.png")))
    assert grid.ndim == 3 and grid.shape[0] > 4 * 64  # 4 rows of 64 px samples (the tiny upsampler's)
    json.dumps(scores)  # The settings and scores serialise.


# Progress, projection and budget: pure functions on injected seconds (no training, no clock).
# A fixed reference table (not the shipped one, which is re-measured now and then).
FAST = {"clip": 388, "embed": 61, "prior": 155, "decoder": 1347, "upsampler": 337, "judge": 97}
FAST_TOTAL = sum(FAST.values())  # 2385


@pytest.fixture(autouse=True)
def _fixed_reference(monkeypatch):
    monkeypatch.setitem(train_stack.REFERENCE_SECONDS, "fast", dict(FAST))


def test_project_total_scales_the_remaining_reference_by_the_speed_so_far():
    assert train_stack.project_total("fast", {}) == pytest.approx(FAST_TOTAL)  # Reference speed.
    # Twice the reference on the CLIP: the rest is projected at twice the reference too.
    assert train_stack.project_total("fast", {"clip": 776.0}) == pytest.approx(776 + 2 * (FAST_TOTAL - 388))
    # elapsed + remaining reference x (elapsed / reference done), here 0.5x.
    done = {"clip": 194.0, "embed": 30.5, "prior": 77.5}
    assert train_stack.project_total("fast", done) == pytest.approx(302 + 0.5 * (1347 + 337 + 97))
    assert train_stack.project_total("fast", dict(FAST)) == pytest.approx(FAST_TOTAL)  # All done.
    # The autoregressive prior is scaled as the diffusion prior's reference.
    steps = train_stack.run_steps("autoregressive")
    assert steps == ("clip", "embed", "ar_prior", "decoder", "upsampler", "judge")
    assert train_stack.project_total("fast", {"clip": 776.0, "embed": 122.0, "ar_prior": 310.0},
                                     steps=steps) == pytest.approx(1208 + 2 * (1347 + 337 + 97))
    # No reference table: no projection.
    assert train_stack.project_total("tiny", {"clip": 10.0}) is None
    assert train_stack.project_total("full", {"clip": 10.0}) is None


def test_project_total_leaves_out_steps_skipped_as_complete():
    # A resumed run: the CLIP and its cache were complete (a few seconds of checking each).
    timings = {"clip": 3.0, "embed": 2.0, "prior": 310.0}
    projected = train_stack.project_total("fast", timings, skipped={"clip", "embed"})
    assert projected == pytest.approx(315 + 2.0 * (1347 + 337 + 97))  # Speed 310 / 155 alone.
    # Counted as run, their seconds would make this machine look ~100x faster.
    assert train_stack.project_total("fast", timings) < 0.5 * projected
    # A step known to be complete before it runs is not among the work to come either.
    ahead = train_stack.project_total("fast", timings, skipped={"clip", "embed", "decoder"})
    assert ahead == pytest.approx(315 + 2.0 * (337 + 97))
    # Only skipped steps so far: the reference speed is assumed.
    assert train_stack.project_total("fast", {"clip": 3.0}, skipped={"clip", "embed"}) == \
        pytest.approx(3 + FAST_TOTAL - 388 - 61)


def test_budget_warning_only_when_the_projection_is_over_the_budget():
    quick = {"clip": 0.6 * 388, "embed": 0.6 * 61}  # Projected 0.6 x 2385 s = 23.9 min < 30.
    assert train_stack.budget_warning("fast", quick) is None
    slow = {"clip": 1.1 * 388, "embed": 1.2 * 61, "prior": 1.5 * 155}  # Projected > 45 min.
    warning = train_stack.budget_warning("fast", slow)
    assert "30-minute budget" in warning and "fast preset" in warning
    assert f"on course for {train_stack.project_total('fast', slow) / 60:.1f} min" in warning
    assert "prior, 232 s, 1.50x its 155 s" in warning  # The slowest relative to its reference.
    # --budget_minutes: another budget, or 0 for none.
    assert train_stack.budget_warning("fast", slow, budget_minutes=60) is None
    assert "45-minute budget" in train_stack.budget_warning("fast", slow, budget_minutes=45)
    assert train_stack.budget_warning("fast", slow, budget_minutes=0) is None
    # Skipped steps are not named slowest.
    resumed = {"clip": 40.0, "embed": 30.0, "prior": 155.0, "decoder": 2.0 * 1347}
    warning = train_stack.budget_warning("fast", resumed, skipped={"clip", "embed"})
    assert "decoder, 2694 s, 2.00x" in warning
    # No budget by default for full and tiny; one given is checked against the elapsed seconds.
    assert train_stack.budget_warning("tiny", {"clip": 600.0}) is None
    assert train_stack.budget_warning("tiny", {"clip": 600.0}, budget_minutes=11) is None
    assert "has taken 10.0 min" in train_stack.budget_warning("tiny", {"clip": 600.0}, budget_minutes=9)


def test_progress_prints_each_step_and_warns_once_per_step_over(capsys):
    progress = train_stack.Progress("fast", train_stack.run_steps())
    for step in ("clip", "embed"):  # 0.5x the reference: 19.9 min projected.
        progress.done(step, 0.5 * FAST[step])
    out = capsys.readouterr().out
    assert "Stack: clip done in 194 s; elapsed 194 s (3.2 min); projected total 19.9 min (budget 30 min)" in out
    assert "WARNING" not in out
    progress.done("prior", 3.0 * 155)  # Then much slower: over the budget after each step.
    progress.done("decoder", 4.0 * 1347)
    out = capsys.readouterr().out
    assert out.count("WARNING: this run is on course for") == 2
    assert "slowest relative to its reference: prior, 465 s, 3.00x" in out
    assert "slowest relative to its reference: decoder, 5388 s, 4.00x" in out
    assert progress.timings == {"clip": 194.0, "embed": 30.5, "prior": 465.0, "decoder": 5388.0}

    silent = train_stack.Progress("fast", train_stack.run_steps(), budget_minutes=0)
    for step in ("clip", "embed", "prior"):
        silent.done(step, 3.0 * FAST[step])
    out = capsys.readouterr().out
    assert out.count("Stack: ") == 3 and "projected total" in out
    assert "WARNING" not in out and "budget" not in out

    resumed = train_stack.Progress("fast", train_stack.run_steps())
    resumed.expect_skipped("prior")  # Known complete before it runs.
    resumed.done("clip", 194.0)
    resumed.done("embed", 30.5)
    resumed.done("prior", 1.0, skipped=True)
    out = capsys.readouterr().out
    assert "Stack: prior complete, skipped in 1 s" in out
    assert f"projected total {(225.5 + 0.5 * (1347 + 337 + 97)) / 60:.1f} min" in out
    assert "WARNING" not in out


def test_train_stack_flags_reach_run(monkeypatch):
    from absl.testing import flagsaver

    import train_stack as entry

    calls = []
    monkeypatch.setattr(entry.command, "run", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(entry.cli, "start", lambda: None)

    def main(*args):
        was_parsed = entry.FLAGS.is_parsed()
        try:
            with flagsaver.flagsaver():
                entry.FLAGS(["train_stack.py", *args])
                entry.main(["train_stack.py"])
        finally:
            if not was_parsed:
                entry.FLAGS.unparse_flags()

    main("--budget_minutes=0", "--prior_kind=autoregressive", "--preset=tiny")
    assert calls[-1]["budget_minutes"] == 0 and calls[-1]["prior_kind"] == "autoregressive"
    assert calls[-1]["preset"] == "tiny"
    main()
    assert calls[-1]["budget_minutes"] is None and calls[-1]["prior_kind"] == "diffusion"
    with pytest.raises(entry.app.UsageError, match="budget_minutes"):
        main("--budget_minutes=-1")
    with pytest.raises(entry.flags.IllegalFlagValueError, match="diffusion"):
        main("--prior_kind=transformer")
