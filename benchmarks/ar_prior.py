"""The AR prior at the diffusion prior's benchmark size: training samples/s, sampling seconds.

  python benchmarks/ar_prior.py [--steps 20]

The same fixed size as benchmarks/prior.py (width 256, depth 6, 8 heads of 64, CLIP embedding 256,
77 text tokens of width 256, batch 32, AdamW; no separate text encoder), so the two print
comparable JSON. Codes: 80 principal components (the paper's 319/1024 of the embedding) of 1024
buckets, fitted on random embeddings. Sampling: 8 captions, 81 tokens each (the dot token and
the codes) in one compiled loop with a KV cache, classifier-free guidance 3.0 (conditional and
unconditional halves in one batch, as the diffusion benchmark), temperature 1. The data is random
(throughput does not depend on it). Prints one JSON object.
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
from unclip_jax import cpu, parallel  # noqa: E402
from unclip_jax.data import pca_codes  # noqa: E402
from unclip_jax.tasks import ar_prior as ar_task  # noqa: E402

flags.DEFINE_integer("steps", 20, "Timed training steps (after one warm-up step).")
flags.DEFINE_integer("sample_repeats", 3, "Timed sampling calls (after one compiling call).")
flags.DEFINE_string("matmul_dtype", None, "Operand dtype of the projections; unset = the shapes "
                    "config's (auto: see unclip_jax/cpu.py).")
FLAGS = flags.FLAGS

D, L, W, BATCH, NUM_SAMPLES = 256, 77, 256, 32, 8  # As benchmarks/prior.py.
NUM_COMPONENTS, NUM_BUCKETS, GUIDANCE = 80, 1024, 3.0


def random_records(n, rng):
    return common.random_prior_records(n, rng, embed_dim=D, text_length=L, text_width=W)


def fixed_config():
    config = shapes.get_config("ar_prior")
    with config.unlocked():
        config.model.width, config.model.depth = 256, 6
        config.model.num_heads, config.model.head_dim = 8, 64
        if FLAGS.matmul_dtype is not None:
            config.model.matmul_dtype = FLAGS.matmul_dtype
        config.codes.num_components, config.codes.num_buckets = NUM_COMPONENTS, NUM_BUCKETS
        config.train.batch_size = BATCH
        config.mesh.shape, config.mesh.num_devices = (1, 1, 1), 1
    return config


def main(_):
    config = fixed_config()
    task = ar_task.ARPriorTask(config, tempfile.mkdtemp(prefix="bench_ar_prior_"),
                               dict(embed_dim=D, text_length=L, text_width=W, eot_token_id=1023))
    rng = np.random.default_rng(0)
    fit_data = random_records(4 * NUM_BUCKETS, rng)
    task.stage.set_codebook(pca_codes.fit([(fit_data["z_i"], fit_data["z_t"])],
                                          num_components=NUM_COMPONENTS, num_buckets=NUM_BUCKETS))
    mesh = parallel.mesh_from_config(config.mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.rules_from_config(config.mesh.rules)):
        batch = parallel.global_batch_from_local(random_records(BATCH, rng), mesh)
        timings = common.time_train_step(task, config, mesh, batch, FLAGS.steps)
        params = jax.jit(lambda r: parallel.unbox(task.init_params(r)))(jax.random.key(0))
        records = random_records(NUM_SAMPLES, rng)
        sample = lambda seed: task.stage.sample(  # noqa: E731
            params, mesh, records["z_t"], records["text_hidden"], records["tokens"], jax.random.key(seed),
            batch_size=NUM_SAMPLES, guidance_scale=GUIDANCE)
        sampling = common.time_calls(sample, FLAGS.sample_repeats)
    print(json.dumps({
        "benchmark": "ar_prior", "width": 256, "depth": 6, "heads": 8, "head_dim": 64, "embed_dim": D,
        "text_tokens": L, "num_components": NUM_COMPONENTS, "num_buckets": NUM_BUCKETS,
        "batch_size": BATCH, "scan_layers": bool(config.model.scan_layers),
        "remat_policy": config.model.remat_policy,
        "matmul_dtype": cpu.matmul_dtype(config.model.matmul_dtype) or "float32", **timings,
        "train_samples_per_sec": timings["examples_per_sec_step_only"],
        "sampling": {"captions": NUM_SAMPLES, "tokens": NUM_COMPONENTS + 1, "guidance_scale": GUIDANCE,
                     "temperature": 1.0, **sampling},
        **common.machine_info()}, indent=2))


if __name__ == "__main__":
    app.run(main)
