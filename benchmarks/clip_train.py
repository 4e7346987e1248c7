"""Training throughput of the shapes CLIP on this machine; prints one JSON object.

  python benchmarks/clip_train.py [--config configs/shapes.py:clip] [--steps 30]

Reports the ahead-of-time compile time of the train step, examples/s of the step alone (the same
device batch fed again and again) and examples/s with the input pipeline (rendering/decoding,
tokenizing, batching, host->device) in the loop.
"""
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import linen as nn  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from unclip_jax import parallel  # noqa: E402
from unclip_jax.train import loop, state as state_lib  # noqa: E402

config_flags.DEFINE_config_file("config", "configs/shapes.py:clip", "Config to benchmark.")
flags.DEFINE_integer("steps", 30, "Timed steps (after one warm-up step).")
FLAGS = flags.FLAGS


def main(_):
    config = FLAGS.config
    workdir = tempfile.mkdtemp(prefix="bench_clip_")
    task = loop.get_task(config, workdir)
    mesh = parallel.mesh_from_config(config.mesh)
    rules = parallel.rules_from_config(config.mesh.rules)
    tx = state_lib.make_optimizer(config.train)
    batch_size = int(config.train.batch_size)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state, abstract = loop.init_state(task, tx, jax.random.key(0), mesh, rules)
        pipeline = task.train_pipeline(local_batch_size=batch_size, process_index=0, process_count=1)
        batch = parallel.global_batch_from_local(next(pipeline), mesh)
        shardings = loop.state_shardings(abstract)
        step_fn = jax.jit(loop.make_train_step(task, tx, config),
                          in_shardings=(shardings, parallel.batch_sharding(mesh), NamedSharding(mesh, P())),
                          out_shardings=(shardings, NamedSharding(mesh, P())), donate_argnums=(0,))
        rng = jax.random.key(1)
        t0 = time.perf_counter()
        compiled = step_fn.lower(abstract, batch, rng).compile()
        compile_s = time.perf_counter() - t0
        flops = (compiled.cost_analysis() or {}).get("flops", float("nan"))

        state, m = compiled(state, batch, rng)  # Warm-up.
        jax.block_until_ready(m)
        t0 = time.perf_counter()
        for _ in range(FLAGS.steps):
            state, m = compiled(state, batch, rng)
        jax.block_until_ready(m)
        step_only = FLAGS.steps * batch_size / (time.perf_counter() - t0)

        t0 = time.perf_counter()
        for _ in range(FLAGS.steps):
            batch = parallel.global_batch_from_local(next(pipeline), mesh)
            state, m = compiled(state, batch, rng)
        jax.block_until_ready(m)
        with_input = FLAGS.steps * batch_size / (time.perf_counter() - t0)

    print(json.dumps({
        "benchmark": "clip_train",
        "config": "configs/shapes.py:clip",
        "params": loop.count_params(abstract.params),
        "batch_size": batch_size,
        "image_size": int(config.model.image_size),
        "compile_seconds": round(compile_s, 2),
        "train_step_gflops_per_example": round(flops / batch_size / 1e9, 3),
        "examples_per_sec_step_only": round(step_only, 1),
        "examples_per_sec_with_input_pipeline": round(with_input, 1),
        "steps_timed": FLAGS.steps,
        "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "machine": platform.machine(),
    }, indent=2))


if __name__ == "__main__":
    app.run(main)
