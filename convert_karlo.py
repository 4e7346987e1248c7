"""Imports Kakao Brain's Karlo (a local copy of kakaobrain/karlo-v1-alpha) for sampling and fine-tuning.

  python convert_karlo.py --karlo_dir karlo-v1-alpha --out runs/karlo
  python sample.py --config configs/karlo.py:runs/karlo --prompt "a photo of a red apple" --output_dir samples

With `--clip_dir clip-vit-large-patch14` (a local copy of the CLIP Karlo was trained with, both
towers) the CLIP workdir gets the image tower too, and `sample.py --mode variations /
interpolate / textdiff` run on the imported stack, and the decoder can be fine-tuned
(`embed.py` on the CLIP workdir, then `train.py --config configs/karlo.py:decoder`; the data are
the CLIP workdir's: `--clip_config.data.shards=...`).

`--karlo_dir` is the diffusers layout (prior/, text_proj/, decoder/, super_res_first/,
super_res_last/, text_encoder/, tokenizer/; safetensors weights only: a directory with only pickle
weights is refused before anything is written). `--out` gets one workdir per stage (clip, prior,
decoder, upsampler), written to a temporary directory and renamed when complete; an existing,
non-empty `--out` is never touched. Every mismatch between the directory and the models is listed
in one message.
"""
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from unclip_jax import cli

_CLIP_TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                              "clip_vit_l14.py") + ":clip"

FLAGS = flags.FLAGS
flags.DEFINE_string("karlo_dir", None, "Local diffusers-layout Karlo directory (safetensors).")
flags.DEFINE_string("out", None, "New directory for the stage workdirs (must not exist or be empty).")
flags.DEFINE_string("clip_dir", None, "Optional local Hugging Face CLIP with both towers whose text tower is "
                    "Karlo's text encoder (openai/clip-vit-large-patch14), imported instead of "
                    "text_encoder/ so that variations, interpolations and text diffs can embed images.")
config_flags.DEFINE_config_file("clip_config", _CLIP_TEMPLATE,
                                "CLIP stage config template of the text encoder's workdir (mesh, eval).",
                                lock_config=False)
flags.mark_flags_as_required(["karlo_dir", "out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cli.start()
    from unclip_jax.convert import karlo

    try:
        written = karlo.write_workdirs(FLAGS.karlo_dir, FLAGS.out, clip_template=FLAGS.clip_config,
                                       clip_dir=FLAGS.clip_dir)
    except (karlo.KarloImportError, FileNotFoundError, FileExistsError, ValueError) as e:
        sys.exit(f"convert_karlo.py: {e}")  # The user's input is wrong: the message says how.
    print(f"Imported {os.path.abspath(FLAGS.karlo_dir)} into {os.path.abspath(FLAGS.out)}:")
    for name, workdir in written.items():
        print(f"  {name}: {workdir}")
    print(f"Next: python sample.py --config configs/karlo.py:{FLAGS.out} --prompt \"...\" --output_dir samples")


if __name__ == "__main__":
    app.run(main)
