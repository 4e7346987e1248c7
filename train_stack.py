"""Trains the whole embedded unCLIP stack on shapes from scratch, then samples it and judges the pixels.

  python train_stack.py [--preset fast|full|tiny] [--root runs/stack_<preset>] [--num_captions N]
                        [--prior_kind diffusion|autoregressive] [--budget_minutes M]

Stages, each an ordinary `train.py` workdir under `--root` (configs/shapes.py variants):

  shapes_clip -> shapes_clip/cache (embed.py) -> shapes_prior -> shapes_decoder -> shapes_upsampler

`--prior_kind autoregressive` trains and samples the paper's autoregressive prior
(`shapes_ar_prior`, configs/shapes.py:ar_prior) instead of the diffusion prior (the default); the
other stages are shared, so one root can hold both priors.

Presets: `fast` (the default; the `,fast` configs: a 30-minute budget on a 2-core CPU, measured
~28 minutes on a Xeon with AMX, ~24 on an AMD EPYC, each alone), `full` (the configs' defaults, the README's
quality runs: hours on a CPU, minutes on a GPU), `tiny` (the `,tiny` configs: a smoke test in a
few minutes whose scores mean nothing). A root belongs to one preset (`<root>/stack.json` says
which).

A stage whose final checkpoint exists is not retrained (nor re-evaluated); an interrupted stage
resumes from its latest checkpoint. Then text -> image for `--num_captions` captions of each of
four sets (training / held-out captions, single / two objects) through `unclip_jax.pipeline`; the
shapes judge's scores and each stage's wall-clock seconds are printed and written to
`<root>/stack_eval.json`, and a grid of the samples (one row per set) to `<root>/stack_samples.png`.

As each step finishes it prints the step's seconds, the elapsed total and a projection of the
run's total (reference seconds per step, scaled by this machine's speed on the steps so far;
steps skipped as complete do not count), and a warning whenever that projection is over the
budget (`fast`: 30 minutes; `--budget_minutes` sets another, 0 none), naming the step slowest
relative to its reference. `stack_eval.json` records the budget and whether the run went over.
"""
from absl import app, flags

from unclip_jax import cli
from unclip_jax.train import stack as command

FLAGS = flags.FLAGS
flags.DEFINE_enum("preset", "fast", command.PRESETS, "fast: ~30 min on a 2-core CPU; full: the "
                  "configs' defaults (the README's quality runs); tiny: smoke test.")
flags.DEFINE_string("root", None, "Directory holding one workdir per stage (default: "
                    "runs/stack_<preset>).")
flags.DEFINE_integer("num_captions", None, "Captions per caption set for the final judge "
                     "(default: 25 for fast, 50 for full, 2 for tiny).")
flags.DEFINE_integer("grid_columns", 8, "Samples per caption set shown in the grid.")
flags.DEFINE_integer("seed", 0, "Seed of the final captions and samples.")
flags.DEFINE_enum("prior_kind", "diffusion", list(command.PRIOR_STAGES), "The prior trained and "
                  "sampled: diffusion (shapes_prior) or autoregressive (shapes_ar_prior).")
flags.DEFINE_float("budget_minutes", None, "Warn when the run is on course to take longer "
                   "(default: 30 for fast, none for full and tiny); 0: no warning.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if FLAGS.budget_minutes is not None and FLAGS.budget_minutes < 0:
        raise app.UsageError("--budget_minutes must be >= 0 (0: no budget)")
    cli.start()
    command.run(preset=FLAGS.preset, root=FLAGS.root, num_captions=FLAGS.num_captions,
                grid_columns=FLAGS.grid_columns, seed=FLAGS.seed, prior_kind=FLAGS.prior_kind,
                budget_minutes=FLAGS.budget_minutes)


if __name__ == "__main__":
    app.run(main)
