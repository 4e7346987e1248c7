"""Training throughput of the shapes CLIP on this machine; prints one JSON object.

  python benchmarks/clip_train.py [--config configs/shapes.py:clip] [--steps 30]

Reports the ahead-of-time compile time of the train step, examples/s of the step alone (the same
device batch fed again and again) and examples/s with the input pipeline (rendering/decoding,
tokenizing, batching, host->device) in the loop.
"""
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import linen as nn  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from benchmarks import common  # noqa: E402
from unclip_jax import cpu  # noqa: E402
from unclip_jax import parallel, tasks  # noqa: E402

config_flags.DEFINE_config_file("config", "configs/shapes.py:clip", "Config to benchmark.")
flags.DEFINE_integer("steps", 30, "Timed steps (after one warm-up step).")
FLAGS = flags.FLAGS


def main(_):
    config = FLAGS.config
    task = tasks.get_task(config, tempfile.mkdtemp(prefix="bench_clip_"))
    mesh = parallel.mesh_from_config(config.mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.rules_from_config(config.mesh.rules)):
        pipeline = task.train_pipeline(local_batch_size=int(config.train.batch_size), process_index=0,
                                       process_count=1)
        next_batch = lambda: parallel.global_batch_from_local(next(pipeline), mesh)  # noqa: E731
        timings = common.time_train_step(task, config, mesh, next_batch(), FLAGS.steps, next_batch)
    print(json.dumps({
        "benchmark": "clip_train", "config": "configs/shapes.py:clip",
        "batch_size": int(config.train.batch_size), "image_size": int(config.model.image_size),
        "matmul_dtype": cpu.matmul_dtype(config.model.matmul_dtype) or config.model.dtype,
        **timings, "steps_timed": FLAGS.steps, **common.machine_info()}, indent=2))

if __name__ == "__main__":
    app.run(main)
