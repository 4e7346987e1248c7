"""Shared pieces of the benchmark scripts (each prints one JSON object)."""
import os
import platform
import statistics
import time

from unclip_jax import cpu

# As the command-line entries (--xla_cpu_convolutions); set before JAX starts its backend.
cpu.apply_xla_flags(os.environ.get("UNCLIP_JAX_XLA_CPU_CONVOLUTIONS", "auto"))

import jax  # noqa: E402

from unclip_jax import flops as flops_lib
from unclip_jax import parallel
from unclip_jax.models import layers
from unclip_jax.train import loop, state as state_lib


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine_info() -> dict:
    bf16 = sorted(cpu.cpu_features() & set(cpu.BF16_MATMUL_FEATURES))
    return {"devices": [str(d) for d in jax.devices()], "cpu_count": os.cpu_count(),
            "cpu_model": cpu_model(), "cpu_bf16_matmul": bf16, "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "jax": jax.__version__, "machine": platform.machine()}


def step_flops(lowered, compiled) -> float:
    """XLA's FLOP count of one step, from the HLO before backend passes where it can be had.

    After GPU compilation, convolutions and matmuls are cuDNN / cuBLAS custom calls that the
    compiled module's cost analysis does not count (an H100 reported 2.5-4.3 GFLOPs per example
    for the decoder whose CPU count is 58.4); the unoptimised HLO still holds them as XLA ops.
    """
    for stage in (lowered, compiled):
        try:
            cost = stage.cost_analysis()
        except Exception:  # noqa: BLE001 - not every backend analyses every stage
            continue
        if isinstance(cost, (list, tuple)):  # one dict per module in some jax versions
            cost = cost[0] if cost else {}
        flops = (cost or {}).get("flops")
        if flops:
            return float(flops)
    return float("nan")


def time_train_step(task, config, mesh, batch, steps: int, next_batch=None) -> dict:
    """Compiles the real train step (AOT) and times it.

    Must run under `jax.set_mesh(mesh)` and the logical-axis rules. `batch` is a global device batch
    fed again and again; with `next_batch` (a callable returning a new device batch) a second
    timing includes the input pipeline. Returns compile seconds, examples/s and the parameter count.
    """
    rules = parallel.rules_from_config(config.mesh.rules)
    tx = state_lib.make_optimizer(config.train)
    state, abstract = state_lib.init_state(task, tx, jax.random.key(0), mesh, rules)
    step_fn = loop.jit_train_step(task, tx, config, abstract, mesh)
    rng = jax.random.key(1)
    t0 = time.perf_counter()
    lowered = step_fn.lower(abstract, batch, rng)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    flops = step_flops(lowered, compiled)
    batch_size = int(config.train.batch_size)

    state, m = compiled(state, batch, rng)  # Warm-up.
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = compiled(state, batch, rng)
    jax.block_until_ready(m)
    elapsed = time.perf_counter() - t0
    out = {"params": layers.count_params(abstract.params), "compile_seconds": round(compile_s, 2),
           "train_step_gflops_per_example": round(flops / batch_size / 1e9, 3),
           "examples_per_sec_step_only": round(steps * batch_size / elapsed, 1),
           # XLA's FLOP count of the step over its measured time (what MFU divides by the peak).
           "train_tflops_per_sec": round(flops * steps / elapsed / 1e12, 4)}
    # The analytic model FLOPs (what the training loop logs as perf/tflops_per_device and perf/mfu).
    devices = mesh.devices.size
    per_example = flops_lib.train_flops_per_example(task, max(batch_size // devices, 1))
    out["model_gflops_per_example"] = round(per_example / 1e9, 3)
    out["model_tflops_per_device"] = round(per_example * steps * batch_size / elapsed / devices / 1e12, 4)
    peak = flops_lib.peak_tflops(mesh.devices.flat[0])
    if peak:
        out["model_mfu"] = round(out["model_tflops_per_device"] / peak, 4)
    if next_batch is not None:
        t0 = time.perf_counter()
        for _ in range(steps):
            state, m = compiled(state, next_batch(), rng)
        jax.block_until_ready(m)
        out["examples_per_sec_with_input_pipeline"] = round(steps * batch_size / (time.perf_counter() - t0), 1)
    return out


def utilization(timings: dict, peak_tflops: float) -> dict:
    """Model FLOPs utilisation against a chip's peak (`peak_tflops` <= 0: none reported)."""
    if peak_tflops <= 0:
        return {}
    return {"peak_tflops": peak_tflops,
            "mfu": round(timings["train_tflops_per_sec"] / peak_tflops, 4)}


def time_calls(fn, repeats: int) -> dict:
    """Times `fn(seed)`: the first call (seed 0, compile included), then the median of `repeats`."""
    t0 = time.perf_counter()
    fn(0)
    first = time.perf_counter() - t0
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(i + 1)
        times.append(time.perf_counter() - t0)
    return {"seconds_first_call_with_compile": round(first, 2),
            "seconds": round(statistics.median(times), 3)}


def convolution_floor(init_fn, batch_size: int, repeats: int = 5) -> dict:
    """The model's convolutions alone, each timed on its own: a lower bound for a step's time.

    `init_fn()` initialises the model (traced with `jax.eval_shape`, never run); every
    `flax.linen.Conv` it calls is recorded with its input shape, at batch `batch_size`. Each
    distinct one is then compiled and timed in float32 forward, and forward plus both gradients
    (input and kernel), on random data. Summed over the model's calls, these say how fast a step
    could be if everything but the convolutions were free: the ceiling this backend's convolutions
    set, against which the step's own time is read.
    """
    from flax import linen as nn
    import numpy as np

    calls = []

    def record(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, nn.Conv) and context.method_name == "__call__":
            if (module.padding != "SAME" or module.strides not in (None, 1, (1, 1))
                    or module.feature_group_count != 1):
                raise ValueError(f"convolution_floor times stride-1 'SAME' convolutions only; "
                                 f"{module.name} is not one")
            calls.append(((batch_size,) + tuple(args[0].shape[1:]), module.features,
                          tuple(module.kernel_size)))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(init_fn)

    def median_seconds(fn, *args):
        jax.block_until_ready(fn(*args))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    timed = {}
    forward = backward = flops = 0.0
    for call in calls:
        if call not in timed:
            shape, features, kernel = call
            keys = jax.random.split(jax.random.key(0), 3)
            x = jax.random.normal(keys[0], shape)
            w = jax.random.normal(keys[1], kernel + (shape[-1], features)) * 0.05
            cot = jax.random.normal(keys[2], shape[:-1] + (features,))
            grads = jax.jit(jax.grad(lambda x, w: (conv(x, w) * cot).sum(), argnums=(0, 1)))
            timed[call] = (median_seconds(jax.jit(conv), x, w), median_seconds(grads, x, w),
                           2.0 * np.prod(shape) * features * np.prod(kernel))
        f, b, n = timed[call]
        forward, backward, flops = forward + f, backward + b, flops + n
    return {"convolutions": len(calls), "distinct": len(timed),
            "forward_gflops_per_example": round(float(flops) / batch_size / 1e9, 3),
            "forward_seconds": round(forward, 3),
            "forward_backward_seconds": round(backward, 3)}


def random_prior_records(n: int, rng, *, embed_dim: int, text_length: int, text_width: int) -> dict:
    """Random cache records for the priors' benchmarks: unit z_i and z_t [n, embed_dim], captions of
    5..text_length-1 tokens padded with the end-of-text id 1023, hidden states [n, L, W]."""
    import numpy as np

    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    tokens = rng.integers(1, 1000, size=(n, text_length)).astype(np.int32)
    lengths = rng.integers(5, text_length, size=n)
    tokens[np.arange(text_length)[None] >= lengths[:, None]] = 1023  # EOT then padding with EOT.
    return {"z_i": unit(rng.normal(size=(n, embed_dim))).astype(np.float32),
            "z_t": unit(rng.normal(size=(n, embed_dim))).astype(np.float32),
            "text_hidden": rng.normal(size=(n, text_length, text_width)).astype(np.float32),
            "tokens": tokens}
