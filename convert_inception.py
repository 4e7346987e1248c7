"""Converts pytorch-fid's InceptionV3 weights (a PyTorch file) once into safetensors for FID.

  python convert_inception.py --torch_weights pt_inception-2015-12-05-6726825d.pth \
      --output weights/fid_inception.safetensors

`--torch_weights` is a local copy of pytorch-fid's FID weights (the TensorFlow
`inception-2015-12-05` graph ported to PyTorch; nothing is downloaded). It is read with
`torch.load(weights_only=True)` here and nowhere else: the evaluation (`python -m
unclip_jax.evaluation.t2i --inception ...`) reads only the safetensors file written here.
Needs torch (`pip install -e ".[parity]"`).
"""
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("torch_weights", None, "pytorch-fid's weights file (pt_inception-2015-12-05-*.pth).")
flags.DEFINE_string("output", None, "The safetensors file to write (must not exist).")
flags.mark_flags_as_required(["torch_weights", "output"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from unclip_jax.convert import ConversionError, inception

    try:
        params = inception.convert(FLAGS.torch_weights, FLAGS.output)
    except (ConversionError, FileNotFoundError, FileExistsError) as e:
        sys.exit(f"convert_inception.py: {e}")
    count = sum(int(p.size) for p in params.values())
    print(f"Wrote {FLAGS.output}: {len(params)} tensors, {count / 1e6:.1f}M values (FID InceptionV3 to pool3)")


if __name__ == "__main__":
    app.run(main)
