"""Trains the whole embedded unCLIP stack on shapes from scratch, then samples it and judges the pixels.

  python train_stack.py [--preset fast|full|tiny] [--root runs/stack_<preset>] [--num_captions N]

Stages, each an ordinary `train.py` workdir under `--root` (configs/shapes.py variants):

  shapes_clip -> shapes_clip/cache (embed.py) -> shapes_prior -> shapes_decoder -> shapes_upsampler

Presets: `fast` (the default; the `,fast` configs: ~28 minutes on a 2-core CPU), `full` (the
configs' defaults, the README's quality runs: hours on a CPU, minutes on a GPU), `tiny` (the
`,tiny` configs: a smoke test in a few minutes whose scores mean nothing). A root belongs to one
preset (`<root>/stack.json` says which).

A stage whose final checkpoint exists is not retrained (nor re-evaluated); an interrupted stage
resumes from its latest checkpoint. Then text -> image for `--num_captions` captions of each of
four sets (training / held-out captions, single / two objects) through `unclip_jax.pipeline`; the
shapes judge's scores and each stage's wall-clock seconds are printed and written to
`<root>/stack_eval.json`, and a grid of the samples (one row per set) to `<root>/stack_samples.png`.
"""
from absl import app, flags

from unclip_jax import cli
from unclip_jax.train import stack as command

FLAGS = flags.FLAGS
flags.DEFINE_enum("preset", "fast", command.PRESETS, "fast: ~28 min on a 2-core CPU; full: the "
                  "configs' defaults (the README's quality runs); tiny: smoke test.")
flags.DEFINE_string("root", None, "Directory holding one workdir per stage (default: "
                    "runs/stack_<preset>).")
flags.DEFINE_integer("num_captions", None, "Captions per caption set for the final judge "
                     "(default: 25 for fast, 50 for full, 2 for tiny).")
flags.DEFINE_integer("grid_columns", 8, "Samples per caption set shown in the grid.")
flags.DEFINE_integer("seed", 0, "Seed of the final captions and samples.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cli.start()
    command.run(preset=FLAGS.preset, root=FLAGS.root, num_captions=FLAGS.num_captions,
                grid_columns=FLAGS.grid_columns, seed=FLAGS.seed)


if __name__ == "__main__":
    app.run(main)
