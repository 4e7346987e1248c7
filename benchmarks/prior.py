"""The diffusion prior at a fixed size: training samples/s, compile time, sampling seconds.

  python benchmarks/prior.py [--steps 20]

Fixed config (the size of the PyTorch reference figures in benchmarks/README.md): width 256,
depth 6, 8 heads of 64 (attention inner width 512), CLIP embedding 256, 77 text tokens of width
256, batch 32, AdamW. Sampling: 8 captions, 64 strided DDPM steps, classifier-free guidance 3.0
(conditional and unconditional halves in one batch) and best-of-2, so 32 rows per model call.
The data is random (throughput does not depend on it). Prints one JSON object.
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
from unclip_jax import cpu  # noqa: E402
from configs import shapes  # noqa: E402
from unclip_jax import parallel  # noqa: E402
from unclip_jax.tasks import prior as prior_task  # noqa: E402

flags.DEFINE_integer("steps", 20, "Timed training steps (after one warm-up step).")
flags.DEFINE_integer("sample_repeats", 3, "Timed sampling calls (after one compiling call).")
flags.DEFINE_string("remat_policy", "nothing_saveable", "Per-block remat policy.")
flags.DEFINE_bool("scan_layers", True, "Scan over the transformer blocks.")
flags.DEFINE_string("dtype", "float32", "Activation dtype (params stay float32): float32 or bfloat16.")
flags.DEFINE_string("matmul_dtype", None, "Operand dtype of the transformer's projections "
                    "(float32 accumulation, forward and backward): bfloat16, or float32 / \"\" for the "
                    "activation dtype; unset = the shapes prior config's (auto: see unclip_jax/cpu.py).")
FLAGS = flags.FLAGS

D, L, W, BATCH, NUM_SAMPLES = 256, 77, 256, 32, 8


def fixed_config():
    config = shapes.get_config("prior")
    with config.unlocked():
        config.model.width, config.model.depth = 256, 6
        config.model.num_heads, config.model.head_dim = 8, 64
        config.model.scan_layers, config.model.remat_policy = FLAGS.scan_layers, FLAGS.remat_policy
        config.model.dtype = FLAGS.dtype
        if FLAGS.matmul_dtype is not None:
            config.model.matmul_dtype = FLAGS.matmul_dtype
        config.train.batch_size = BATCH
        config.mesh.shape, config.mesh.num_devices = (1, 1, 1), 1
    return config


def random_records(n, rng):
    return common.random_prior_records(n, rng, embed_dim=D, text_length=L, text_width=W)


def main(_):
    config = fixed_config()
    task = prior_task.PriorTask(config, tempfile.mkdtemp(prefix="bench_prior_"),
                                dict(embed_dim=D, text_length=L, text_width=W, eot_token_id=1023))
    mesh = parallel.mesh_from_config(config.mesh)
    rng = np.random.default_rng(0)
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.rules_from_config(config.mesh.rules)):
        batch = parallel.global_batch_from_local(random_records(BATCH, rng), mesh)
        timings = common.time_train_step(task, config, mesh, batch, FLAGS.steps)
        params = jax.jit(lambda r: parallel.unbox(task.init_params(r)))(jax.random.key(0))
        records = random_records(NUM_SAMPLES, rng)
        sample = lambda seed: task.stage.sample(  # noqa: E731
            params, mesh, records["z_t"], records["text_hidden"], records["tokens"], jax.random.key(seed),
            batch_size=NUM_SAMPLES, guidance_scale=3.0, best_of=2)
        sampling = common.time_calls(sample, FLAGS.sample_repeats)
    print(json.dumps({
        "benchmark": "prior", "width": 256, "depth": 6, "heads": 8, "head_dim": 64, "embed_dim": D,
        "text_tokens": L, "batch_size": BATCH, "scan_layers": FLAGS.scan_layers,
        "remat_policy": FLAGS.remat_policy, "activation_dtype": FLAGS.dtype,
        "matmul_dtype": cpu.matmul_dtype(config.model.matmul_dtype) or FLAGS.dtype, **timings,
        "train_samples_per_sec": timings["examples_per_sec_step_only"],
        "sampling": {"captions": NUM_SAMPLES, "steps": 64, "guidance_scale": 3.0, "best_of": 2,
                     **sampling},
        **common.machine_info()}, indent=2))


if __name__ == "__main__":
    app.run(main)
