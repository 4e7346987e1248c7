"""Forward+backward speed of the diffusion prior alone (no data, no optimizer); prints JSON.

  python benchmarks/prior_model_only.py [--steps 10] [--width 256] [--num_heads 8] ...

For each combination of scan_layers (True/False) and remat_policy ("none"/"nothing_saveable") it
compiles `jax.value_and_grad` of an x0 MSE loss ahead of time and runs one warm-up step; then
`--rounds` rounds time `--steps` steps of every variant in turn (interleaved, so that a busy shared
machine slows all variants alike) and report the median steps/s and examples/s. Runs on the default
JAX device.
"""
import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import linen as nn  # noqa: E402

from unclip_jax.models.prior import DiffusionPrior  # noqa: E402


def _parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant and round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--num_heads", type=int, default=8)
    p.add_argument("--embed_dim", type=int, default=256, help="CLIP embedding size D")
    p.add_argument("--text_width", type=int, default=256)
    p.add_argument("--text_length", type=int, default=77)
    p.add_argument("--dtype", default="float32")
    return p.parse_args()


def _batch(args):
    k = jax.random.split(jax.random.key(0), 6)
    b, d, length = args.batch, args.embed_dim, args.text_length
    lengths = jax.random.randint(k[4], (b,), 5, length + 1)
    return dict(
        z_i_t=jax.random.normal(k[0], (b, d)), t=jax.random.randint(k[1], (b,), 0, 1000),
        z_t=jax.random.normal(k[2], (b, d)),
        text_hidden=jax.random.normal(k[3], (b, length, args.text_width)),
        text_mask=jnp.arange(length)[None] < lengths[:, None],
        drop_text=jax.random.bernoulli(k[5], 0.1, (b,)),
        z_i=jax.random.normal(k[5], (b, d)))


def _compile(args, scan_layers, remat_policy, batch):
    """Returns (compiled value_and_grad step, params, compile seconds)."""
    model = DiffusionPrior(
        embed_dim=args.embed_dim, text_width=args.text_width, text_length=args.text_length,
        width=args.width, depth=args.depth, num_heads=args.num_heads, dtype=jnp.dtype(args.dtype),
        scan_layers=scan_layers, remat_policy=remat_policy)
    inputs = [batch[k] for k in ("z_i_t", "t", "z_t", "text_hidden", "text_mask", "drop_text")]
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), *inputs))

    def loss(p):
        return jnp.mean(jnp.square(model.apply(p, *inputs) - batch["z_i"]))

    t0 = time.perf_counter()
    step = jax.jit(jax.value_and_grad(loss)).lower(params).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(step(params))  # warm-up
    return step, params, compile_s


def _time(step, params, steps):
    t0 = time.perf_counter()
    for _ in range(steps):
        out = step(params)
    jax.block_until_ready(out)
    return steps / (time.perf_counter() - t0)


def main():
    args = _parse()
    batch = _batch(args)
    variants = list(itertools.product((True, False), ("none", "nothing_saveable")))
    compiled = [_compile(args, scan, remat, batch) for scan, remat in variants]
    rates = [[] for _ in variants]
    for _ in range(args.rounds):
        for i, (step, params, _) in enumerate(compiled):
            rates[i].append(_time(step, params, args.steps))
    results = []
    for (scan, remat), (_, params, compile_s), r in zip(variants, compiled, rates):
        median = statistics.median(r)
        results.append(dict(
            scan_layers=scan, remat_policy=remat, compile_s=round(compile_s, 2),
            steps_per_s=round(median, 3), examples_per_s=round(median * args.batch, 1),
            steps_per_s_rounds=[round(x, 3) for x in r],
            params=int(sum(x.size for x in jax.tree.leaves(params)))))
    fastest = max(results, key=lambda r: r["steps_per_s"])
    print(json.dumps(dict(
        benchmark="prior_model_only", device=str(jax.devices()[0].device_kind),
        backend=jax.default_backend(), cpu_count=os.cpu_count(), machine=platform.machine(),
        load_average=os.getloadavg(), config=vars(args), results=results,
        fastest=dict(scan_layers=fastest["scan_layers"], remat_policy=fastest["remat_policy"])),
        indent=1))


if __name__ == "__main__":
    main()
