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
import os

from absl import app, flags
from ml_collections import config_flags

from unclip_jax import cli
from unclip_jax import sampling as command

FLAGS = flags.FLAGS
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "pipeline_shapes.py")

config_flags.DEFINE_config_file("config", DEFAULT_CONFIG,
                                "Pipeline config: the stage workdirs and sampling settings.",
                                lock_config=True)
flags.DEFINE_enum("mode", "text", command.MODES, "What to do.")
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
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cli.start()
    command.main(FLAGS.config, FLAGS.output_dir, mode=FLAGS.mode, prompts=FLAGS.prompt,
                 prompts_file=FLAGS.prompts_file, image_paths=FLAGS.image, mask_paths=FLAGS.mask,
                 caption_from=FLAGS.caption_from, caption_to=FLAGS.caption_to, thetas=FLAGS.thetas,
                 num_frames=FLAGS.num_frames, interp_noise=FLAGS.interp_noise, eta=FLAGS.eta,
                 num_resample=FLAGS.num_resample, num_per_prompt=FLAGS.num_per_prompt,
                 batch_size=FLAGS.batch_size, seed=FLAGS.seed)


if __name__ == "__main__":
    app.run(main)
