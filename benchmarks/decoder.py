"""The decoder at a fixed size: parameters, GFLOPs, training images/s, compile time, sampling seconds.

  python benchmarks/decoder.py [--steps 10] [--dtype float32]

Fixed config (the size of the PyTorch reference figures in benchmarks/README.md): 64 px,
base channels 64, channel multipliers (1, 2, 4), 2 residual blocks per level, attention (heads of
64 channels) at 16 px, the middle block included (with three levels the resolutions are 64, 32 and
16 px, so "attention at 16 and 8 px" can only mean 16 px), z_i of dim 256 added to the timestep
embedding and projected into 4 context tokens, no text pathway, learned variance with the hybrid
loss, batch 8, AdamW: the real `DecoderTask` train step (EMA, clipping included).
Sampling: 4 images, 50 DDIM steps, classifier-free guidance 3.0 (conditional and unconditional
halves in one batch of 8). Data is random (throughput does not depend on it). Prints one JSON object.

`convolution_floor` (on by default): the UNet's convolutions timed one by one in float32
(`common.convolution_floor`) and summed: the training images/s and sampling seconds the model
would reach if everything but its convolutions took no time. On a CPU it says how much of a step
is convolution arithmetic at this backend's speed, and so how far any other change can go.
"""
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import linen as nn  # noqa: E402

from benchmarks import common  # noqa: E402
from configs import shapes  # noqa: E402
from unclip_jax import parallel  # noqa: E402
from unclip_jax.tasks import decoder as decoder_task  # noqa: E402

flags.DEFINE_integer("steps", 10, "Timed training steps (after one warm-up step).")
flags.DEFINE_integer("sample_repeats", 2, "Timed sampling calls (after one compiling call).")
flags.DEFINE_string("dtype", "float32", "Activation dtype (params stay float32): float32 or bfloat16.")
flags.DEFINE_bool("remat", False, "Rematerialise every block in the backward pass.")
flags.DEFINE_integer("batch_size", 8, "Training batch (the fixed config: 8; larger to fill a GPU).")
flags.DEFINE_bool("conv_floor", True, "Also time the UNet's convolutions one by one (float32): the "
                  "step time and sampling time they alone would take, a bound for this backend.")
flags.DEFINE_float("peak_tflops", 0.0, "The chip's peak TFLOP/s for the activation dtype, to report MFU "
                   "(e.g. 989 for an H100 SXM in bfloat16); 0 = no MFU.")
FLAGS = flags.FLAGS

SIDE, D, L, NUM_SAMPLES, STEPS, GUIDANCE = 64, 256, 77, 4, 50, 3.0


def fixed_config():
    config = shapes.get_config("decoder")
    with config.unlocked():
        m = config.model
        m.image_size, m.base_channels, m.channel_mult = SIDE, 64, (1, 2, 4)
        m.num_res_blocks, m.attention_resolutions, m.head_channels = 2, (16,), 64
        m.text_depth, m.dtype, m.remat = 0, FLAGS.dtype, FLAGS.remat
        m.clip_spatial, m.coord_channels = 0, False  # the paper's conditioning only
        config.diffusion.learned_variance = True
        config.diffusion.sampler, config.diffusion.sample_steps = "ddim", STEPS
        config.train.batch_size = FLAGS.batch_size
        config.eval.batch_size = NUM_SAMPLES
        config.mesh.shape, config.mesh.num_devices = (1, 1, 1), 1
    return config


def random_batch(n, rng):
    z = rng.normal(size=(n, D))
    return {"image": rng.integers(0, 256, size=(n, SIDE, SIDE, 3)).astype(np.uint8),
            "z_i": (z / np.linalg.norm(z, axis=-1, keepdims=True)).astype(np.float32),
            "tokens": rng.integers(1, 1000, size=(n, L)).astype(np.int32)}


def main(_):
    config = fixed_config()
    task = decoder_task.DecoderTask(config, tempfile.mkdtemp(prefix="bench_decoder_"),
                                    dict(clip_dim=D, text_length=L, vocab_size=1024, eot_token_id=1023))
    mesh = parallel.mesh_from_config(config.mesh)
    rng = np.random.default_rng(0)
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.rules_from_config(config.mesh.rules)):
        batch = parallel.global_batch_from_local(random_batch(FLAGS.batch_size, rng), mesh)
        timings = common.time_train_step(task, config, mesh, batch, FLAGS.steps)
        params = jax.jit(lambda r: parallel.unbox(task.init_params(r)))(jax.random.key(0))
        cond = random_batch(NUM_SAMPLES, rng)
        sample = lambda seed: task.stage.decode(params, mesh, cond["z_i"], cond["tokens"],  # noqa: E731
                                                jax.random.key(seed), batch_size=NUM_SAMPLES,
                                                guidance_scale=GUIDANCE)
        sampling = common.time_calls(sample, FLAGS.sample_repeats)
        floor = {}
        if FLAGS.conv_floor:
            init = lambda: task.init_params(jax.random.key(0))  # noqa: E731
            train = common.convolution_floor(init, FLAGS.batch_size)
            # Guided sampling runs the UNet on the conditional and unconditional halves at once.
            sample_floor = (train if FLAGS.batch_size == 2 * NUM_SAMPLES
                            else common.convolution_floor(init, 2 * NUM_SAMPLES))
            floor = {"convolution_floor": {
                **train,
                "train_images_per_sec_if_only_convolutions": round(
                    FLAGS.batch_size / train["forward_backward_seconds"], 2),
                "sampling_seconds_if_only_convolutions": round(
                    STEPS * sample_floor["forward_seconds"], 2)}}
    print(json.dumps({
        "benchmark": "decoder", "image_size": SIDE, "base_channels": 64, "channel_mult": [1, 2, 4],
        "num_res_blocks": 2, "attention_resolutions": [16], "clip_dim": D, "text_pathway": False,
        "learned_variance": True, "batch_size": FLAGS.batch_size, "activation_dtype": FLAGS.dtype,
        "remat": FLAGS.remat, **timings,
        "train_images_per_sec": timings["examples_per_sec_step_only"],
        **common.utilization(timings, FLAGS.peak_tflops),
        "sampling": {"images": NUM_SAMPLES, "sampler": "ddim", "steps": STEPS,
                     "guidance_scale": GUIDANCE,
                     **sampling},
        **floor, **common.machine_info()}, indent=2))


if __name__ == "__main__":
    app.run(main)
