"""Cost and forward+backward speed of the decoder UNet alone (no data, no optimizer); prints JSON.

  python benchmarks/decoder_model_only.py [--steps 3] [--rounds 2] [--batch 8] ...

Fixed default config: 64 px, base_channels 64, channel_mult (1, 2, 4), 2 res blocks per level,
head_channels 64, learned variance, z_i of dim 256 (added to the timestep embedding and projected
into 4 context tokens), text pathway OFF (`--text_depth 0`; pass e.g. `--text_depth 2` for a tiny
one). With three levels the resolutions are 64, 32 and 16 px, so "attention at 16 and 8 px" can only
mean 16 px here (plus the middle block, also at 16 px); `--attention_resolutions 32,16` adds 32 px.

Reports the parameter count, XLA's cost-analysis GFLOPs per example for the forward pass and for
forward+backward (`common.step_flops`: the HLO before backend passes), and forward+backward
images/s for float32 and bfloat16 activations (params float32) with remat off and on. Every
variant is compiled ahead of time and warmed up; then `--rounds` rounds time `--steps` steps of
each variant in turn (interleaved, so a busy shared machine slows all alike); the median is
reported. Runs on the default JAX device.
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

from benchmarks import common  # noqa: E402
from unclip_jax.models.layers import count_params  # noqa: E402
from unclip_jax.models.unet import UNet  # noqa: E402


def _parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant and round")
    p.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--base_channels", type=int, default=64)
    p.add_argument("--channel_mult", default="1,2,4")
    p.add_argument("--num_res_blocks", type=int, default=2)
    p.add_argument("--attention_resolutions", default="16")
    p.add_argument("--head_channels", type=int, default=64)
    p.add_argument("--clip_dim", type=int, default=256)
    p.add_argument("--text_depth", type=int, default=0, help="0: no text pathway")
    p.add_argument("--text_width", type=int, default=128)
    p.add_argument("--text_length", type=int, default=32)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--remat", default="false,true")
    return p.parse_args()


def _ints(text):
    return tuple(int(v) for v in text.split(",") if v)


def _model(args, dtype, remat):
    text = dict(text_vocab_size=1000, text_length=args.text_length, text_width=args.text_width,
                text_depth=args.text_depth, text_heads=max(1, args.text_width // 64))
    return UNet(base_channels=args.base_channels, channel_mult=_ints(args.channel_mult),
                num_res_blocks=args.num_res_blocks,
                attention_resolutions=_ints(args.attention_resolutions),
                image_size=args.image_size, head_channels=args.head_channels,
                learned_variance=True, clip_dim=args.clip_dim, clip_tokens=4,
                dtype=jnp.dtype(dtype), remat=remat, **(text if args.text_depth else {}))


def _batch(args):
    k = jax.random.split(jax.random.key(0), 5)
    b, s = args.batch, args.image_size
    batch = dict(x_t=jax.random.normal(k[0], (b, s, s, 3)),
                 t=jax.random.randint(k[1], (b,), 0, 1000),
                 z_i=jax.random.normal(k[2], (b, args.clip_dim)),
                 drop_z_i=jax.random.bernoulli(k[3], 0.1, (b,)),
                 target=jax.random.normal(k[4], (b, s, s, 6)))
    if args.text_depth:
        batch["text_tokens"] = jax.random.randint(k[4], (b, args.text_length), 1, 1000)
        batch["text_mask"] = jnp.ones((b, args.text_length), bool)
        batch["drop_text"] = jax.random.bernoulli(k[3], 0.5, (b,))
    return batch


def _forward(model, params, batch):
    cond = {k: v for k, v in batch.items() if k not in ("x_t", "t", "target")}
    return model.apply(params, batch["x_t"], batch["t"], **cond)


def main():
    args = _parse()
    batch = _batch(args)
    reference = _model(args, "float32", False)
    abstract = jax.eval_shape(lambda: reference.init(jax.random.key(0), batch["x_t"], batch["t"],
                                                     **{k: v for k, v in batch.items()
                                                        if k not in ("x_t", "t", "target")}))
    # Random params (not the real init, whose zero output convolution would make the loss trivial;
    # timing does not depend on values). Avoids compiling the initialisers.
    leaves, tree = jax.tree.flatten(nn.meta.unbox(abstract))
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [0.02 * jax.random.normal(k, x.shape, x.dtype)
                                       for k, x in zip(keys, leaves)])

    t0 = time.perf_counter()
    forward_lowered = jax.jit(lambda p, b: _forward(reference, p, b)).lower(params, batch)
    forward = forward_lowered.compile()
    forward_compile_s = time.perf_counter() - t0
    forward_gflops = common.step_flops(forward_lowered, forward) / args.batch / 1e9

    variants = list(itertools.product(args.dtypes.split(","),
                                      [v.lower() == "true" for v in args.remat.split(",")]))
    compiled = []
    for dtype, remat in variants:
        model = _model(args, dtype, remat)

        def loss(p, b, model=model):
            return jnp.mean(jnp.square(_forward(model, p, b) - b["target"]))

        t0 = time.perf_counter()
        step_lowered = jax.jit(jax.value_and_grad(loss)).lower(params, batch)
        step = step_lowered.compile()
        compile_s = time.perf_counter() - t0
        jax.block_until_ready(step(params, batch))  # warm-up
        compiled.append((step, compile_s, common.step_flops(step_lowered, step)))

    rates = [[] for _ in variants]
    for _ in range(args.rounds):
        for i, (step, _, _) in enumerate(compiled):
            t0 = time.perf_counter()
            for _ in range(args.steps):
                out = step(params, batch)
            jax.block_until_ready(out)
            rates[i].append(args.steps * args.batch / (time.perf_counter() - t0))

    results = []
    for (dtype, remat), (step, compile_s, flops), r in zip(variants, compiled, rates):
        results.append(dict(
            dtype=dtype, remat=remat, compile_s=round(compile_s, 1),
            train_gflops_per_example=round(flops / args.batch / 1e9, 2),
            images_per_s=round(statistics.median(r), 2),
            images_per_s_rounds=[round(x, 2) for x in r]))
    print(json.dumps(dict(
        benchmark="decoder_model_only", device=str(jax.devices()[0].device_kind),
        backend=jax.default_backend(), cpu_count=os.cpu_count(), machine=platform.machine(),
        jax=jax.__version__, load_average=os.getloadavg(), config=vars(args),
        text_pathway="off" if not args.text_depth else f"depth {args.text_depth}",
        params=count_params(abstract), forward_gflops_per_example=round(forward_gflops, 2),
        forward_compile_s=round(forward_compile_s, 1), results=results), indent=1))


if __name__ == "__main__":
    main()
