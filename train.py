"""Trains the stage a config names.

  python train.py --config configs/shapes.py:clip --workdir runs/shapes_clip [--config.train.num_steps=100]

Re-running the same command resumes from the workdir's latest checkpoint; a finished stage only
re-evaluates.
"""
from absl import app, flags, logging
from ml_collections import config_flags

from unclip_jax import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/shapes.py:clip", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cli.start()
    import jax

    from unclip_jax.train import loop

    if jax.process_count() > 1:
        logging.info("Process %d of %d", jax.process_index(), jax.process_count())
    result = loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    if jax.process_index() == 0:
        print("Final metrics:")
        for key in sorted(result):
            value = result[key]
            print(f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}")


if __name__ == "__main__":
    app.run(main)
