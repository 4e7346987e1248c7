"""The unCLIP pipeline at a fixed config: seconds per batch for each stage and end to end.

  python benchmarks/sample.py [--batch_size 16] [--repeats 2]

Stages: configs/shapes.py's real (non-tiny) clip, prior, decoder and upsampler variants with
RANDOMLY INITIALISED params (timing does not depend on the weights; no trained workdir needed),
at each stage config's sampling settings: prior 64 DDPM steps with best-of-2, decoder 32 px with
50 DDIM steps and guidance 3 (conditional and unconditional halves in one batch), upsampler
32 -> 128 px with 27 DDIM steps. One batch = `batch_size` captions, one image each. Every stage
is timed after one compiling call (reported separately), as the median of `repeats` calls; the
decoder is also timed through `DecoderTask.decode` (the task's batched sampler, one key per batch)
to show what the pipeline's per-row keys cost. Prints one JSON object.
"""
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import linen as nn  # noqa: E402

from benchmarks import common  # noqa: E402
from configs import shapes as shapes_config  # noqa: E402
from unclip_jax import parallel, pipeline as pipeline_lib  # noqa: E402
from unclip_jax.data import shapes  # noqa: E402
from unclip_jax.stages import load  # noqa: E402
from unclip_jax.tasks import clip as clip_task  # noqa: E402

flags.DEFINE_integer("batch_size", 16, "Captions per batch (one image each).")
flags.DEFINE_integer("repeats", 2, "Timed calls per stage (after one compiling call).")
FLAGS = flags.FLAGS


def random_stage(config, stage, mesh, seed: int) -> load.Loaded:
    """A `load.Loaded` with the stage's initialised params, replicated on `mesh`."""
    rules = parallel.rules_from_config(config.mesh.rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        params = jax.jit(lambda r: parallel.unbox(stage.init_params(r)))(jax.random.key(seed))
    return load.Loaded(config=config, stage=stage, params=parallel.replicate(params, mesh), step=0, mesh=mesh)


def build_pipeline(mesh, batch_size: int) -> pipeline_lib.UnCLIPPipeline:
    root = tempfile.mkdtemp(prefix="bench_sample_")
    clip_cfg = shapes_config.get_config("clip")
    clip = clip_task.ClipTask(clip_cfg, os.path.join(root, "clip")).stage  # Trains its BPE (seconds).
    tok = clip.tokenizer
    prior_cfg, dec_cfg = shapes_config.get_config("prior"), shapes_config.get_config("decoder")
    prior = load.build_stage(prior_cfg, dict(embed_dim=clip.model.embed_dim, text_length=tok.context_length,
                                             text_width=clip.model.text_width, eot_token_id=tok.eot_token_id))
    dec = load.build_stage(dec_cfg, dict(clip_dim=clip.model.embed_dim, text_length=tok.context_length,
                                         vocab_size=tok.vocab_size, eot_token_id=tok.eot_token_id))
    up_cfg = shapes_config.get_config("upsampler")
    up = load.build_stage(up_cfg, {})
    stages = [random_stage(cfg, task, mesh, i) for i, (cfg, task) in
              enumerate(((clip_cfg, clip), (prior_cfg, prior), (dec_cfg, dec), (up_cfg, up)))]
    return pipeline_lib.UnCLIPPipeline(*stages[:3], stages[3:], mesh=mesh, batch_size=batch_size)


def seconds(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def median_seconds(fn, repeats: int) -> float:
    return round(float(np.median([seconds(fn)[0] for _ in range(repeats)])), 3)


def main(_):
    mesh = parallel.make_mesh((-1, 1, 1))
    n = FLAGS.batch_size
    pipe = build_pipeline(mesh, n)
    rng = np.random.default_rng(0)
    captions = [shapes.all_captions()[i] for i in rng.choice(len(shapes.all_captions()), n, replace=False)]
    keys = pipeline_lib.row_keys(0, np.arange(n), np.zeros(n, int))
    tokens = pipe.tokenize(captions)
    # First calls (they compile), then the timed repeats.
    first, (z_t, hidden) = seconds(lambda: pipe.encode_text(tokens))
    calls = {"clip_text": (first, lambda: pipe.encode_text(tokens))}
    first, z_i = seconds(lambda: pipe.sample_z_i(z_t, hidden, tokens, keys))
    calls["prior"] = (first, lambda: pipe.sample_z_i(z_t, hidden, tokens, keys))
    first, base = seconds(lambda: pipe.decode(z_i, tokens, keys))
    calls["decoder"] = (first, lambda: pipe.decode(z_i, tokens, keys))
    first, _ = seconds(lambda: pipe.upsample(base, keys))
    calls["upsampler"] = (first, lambda: pipe.upsample(base, keys))
    dec = pipe.decoder
    with jax.set_mesh(mesh), nn.logical_axis_rules(dec.rules):
        batched = lambda: dec.stage.decode(dec.params, mesh, z_i, tokens, jax.random.key(0),  # noqa: E731
                                           batch_size=n)
        calls["decoder_task_batched"] = (seconds(batched)[0], batched)
        results = {name: {"seconds_per_batch": median_seconds(fn, FLAGS.repeats),
                          "first_call_seconds_with_compile": round(first, 2)}
                   for name, (first, fn) in calls.items()}
    results["end_to_end"] = {"seconds_per_batch": median_seconds(lambda: pipe.generate_rows(captions, keys),
                                                                 FLAGS.repeats)}
    print(json.dumps({
        "benchmark": "sample", "weights": "random init (configs/shapes.py real variants; timing only)",
        "batch_size": n, "image_size": pipe.image_size, "base_size": pipe.base_size,
        "settings": {k: v for k, v in pipe.resolved_settings().items() if k != "stages"},
        "decoder_task_batched_note": "DecoderTask.decode: one rng per batch, eval.batch_size "
                                     f"{dec.config.eval.batch_size}, config guidance",
        **results, **common.machine_info()}, indent=2))


if __name__ == "__main__":
    app.run(main)
