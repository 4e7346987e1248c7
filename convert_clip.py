"""Imports a published CLIP (a Hugging Face CLIPModel directory) as a frozen-CLIP workdir.

  python convert_clip.py --hf_dir clip-vit-large-patch14 --workdir runs/clip_vit_l14 \
      [--config configs/clip_vit_l14.py:clip] [--config.data.shards='data/shards/{00000..00099}.tar']

`--hf_dir` holds config.json, model.safetensors (never a pickle: pytorch_model.bin is refused),
the tokenizer files and preprocessor_config.json, e.g. a local copy of openai/clip-vit-large-patch14.
The workdir gets config.json (the `--config` template with the checkpoint's sizes and
preprocessing), tokenizer/ and an orbax checkpoint (step 0): pass it as `clip_workdir` to the prior
and decoder configs and to `embed.py --clip_workdir`. The template's `data` block names the data
set those consumers read. A workdir that exists (and is not empty) is never touched.
"""
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from unclip_jax import cli

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                               "clip_vit_l14.py") + ":clip"

FLAGS = flags.FLAGS
flags.DEFINE_string("hf_dir", None, "Hugging Face CLIPModel directory (config.json, model.safetensors, tokenizer).")
flags.DEFINE_string("workdir", None, "New directory for the imported CLIP (must not exist or be empty).")
config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG,
                                "CLIP stage config template (data, eval, mesh); sizes come from the checkpoint.",
                                lock_config=False)
flags.mark_flags_as_required(["hf_dir", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cli.start()
    from unclip_jax.convert import hf_clip

    try:
        config = hf_clip.write_clip_workdir(FLAGS.hf_dir, FLAGS.workdir, FLAGS.config)
    except (hf_clip.CheckpointMismatchError, FileNotFoundError, FileExistsError, ValueError) as e:
        sys.exit(f"convert_clip.py: {e}")  # The user's input is wrong: the message says how.
    m, p = config.model, config.preprocess
    print(f"Imported {config.imported_from} into {os.path.abspath(FLAGS.workdir)}:")
    print(f"  ViT-{m.vision_width}w/{m.patch_size} at {m.image_size} px ({m.vision_depth} blocks), "
          f"text {m.text_width}w x {m.text_depth} blocks, context {m.context_length}, "
          f"embed_dim {m.embed_dim}, activation {m.activation}, pooling {m.eot_pooling}")
    print(f"  preprocessing: shorter side -> {p.resize_size} ({p.resample}), centre crop {p.crop_size}, "
          f"mean {tuple(p.mean)}, std {tuple(p.std)}")
    print(f"  data: {config.data.source} {config.data.get('shards') or config.data.get('tfds_name')}")
    print(f"Next: python embed.py --clip_workdir {FLAGS.workdir} --cache_dir {FLAGS.workdir}/cache")


if __name__ == "__main__":
    app.run(main)
