"""Ahead-of-time compilation of a stage's real train step, with nothing allocated.

`compile_train_step(config, devices)` builds the stage from explicit sizes (no CLIP, tokenizer or
data on disk), describes the train state and a global batch as abstract arrays carrying the
shardings the loop would give them, and lowers and compiles `loop.make_train_step` (the function
the loop runs) for `devices`. The devices may be a TPU topology description compiled from a CPU
host (`jax.experimental.topologies` with libtpu installed), or this process's own devices.
`benchmarks/compile_only.py` prints the result as JSON.
"""
from __future__ import annotations

import math
import time
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

from unclip_jax import flops as flops_lib
from unclip_jax import parallel, tasks
from unclip_jax.models import layers
from unclip_jax.stages.ar_prior import placeholder_codebook
from unclip_jax.train import loop
from unclip_jax.train import state as state_lib


def sizes_from_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The sizes `config.stage` needs beyond its config, from the config itself (no files on disk).

    The priors and decoder take the CLIP's sizes from `config.clip_sizes` (embed_dim, text_length,
    text_width, vocab_size, eot_token_id); the CLIP takes its tokenizer's from `config.tokenizer`.
    """
    stage = config.stage
    if stage in ("prior", "ar_prior", "decoder") and "clip_sizes" not in config:
        raise ValueError(f"config.clip_sizes is needed to build the {stage} without a CLIP workdir "
                         "(embed_dim, text_length, text_width, vocab_size, eot_token_id)")
    s = config.get("clip_sizes")
    if stage in ("prior", "ar_prior"):  # The AR prior's codebook: see `task_from_sizes`.
        return {"embed_dim": s.embed_dim, "text_length": s.text_length, "text_width": s.text_width,
                "eot_token_id": s.eot_token_id}
    if stage == "decoder":
        return {"clip_dim": s.embed_dim, "text_length": s.text_length, "vocab_size": s.vocab_size,
                "eot_token_id": s.eot_token_id}
    if stage == "clip":
        vocab = int(config.tokenizer.vocab_size)
        return {"vocab_size": vocab, "eot_token_id": vocab - 1,
                "context_length": int(config.tokenizer.context_length)}
    if stage == "upsampler":
        return {}
    raise ValueError(f"config.stage={stage!r} cannot be built from sizes")


def task_from_sizes(config: ml_collections.ConfigDict, workdir: str = ""):
    """The task `config.stage` names, built from `sizes_from_config` instead of files on disk.
    Such a task compiles and counts parameters; it has no data to train on. The AR prior gets a
    placeholder PCA codebook of the config's shapes (its loss encodes z_i through one; the
    compiled step depends on the shapes alone)."""
    task = tasks.get_task(config, workdir, sizes=sizes_from_config(config))
    if config.stage == "ar_prior":
        task.stage.set_codebook(placeholder_codebook(
            config.codes.num_components, config.codes.num_buckets, task.stage.embed_dim))
    return task


def count_params(config: ml_collections.ConfigDict) -> int:
    """Parameters of the stage's model, from `jax.eval_shape` (nothing allocated)."""
    task = task_from_sizes(config)
    abstract = jax.eval_shape(task.init_params, jax.random.key(0))
    return layers.count_params(abstract)


def _tree_bytes(tree) -> int:
    """Bytes per device of a tree of sharded abstract arrays (each leaf's shard shape)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return int(total)


def _xla_flops(lowered, compiled, num_devices: int) -> float:
    """XLA's FLOP count of the whole step: the unoptimised global module where it can be had (after
    GPU compilation, products are library calls it does not count), else the compiled per-device
    module times the device count. XLA counts the body of a loop once: for a layer stack under
    `nn.scan` (the CLIP towers) or gradient accumulation it is far below the step's real count;
    the analytic `model_tflops_per_step` is the figure MFU uses."""
    for stage, times in ((lowered, 1), (compiled, num_devices)):
        try:
            cost = stage.cost_analysis()
        except Exception:  # noqa: BLE001 - not every backend analyses every stage
            continue
        if isinstance(cost, (list, tuple)):
            cost = cost[0] if cost else {}
        if (cost or {}).get("flops"):
            return float(cost["flops"]) * times
    return float("nan")


def compile_train_step(config: ml_collections.ConfigDict, devices: Sequence[Any]) -> dict[str, Any]:
    """Lowers and compiles the stage's train step for `devices`; returns sizes, memory and FLOPs.

    The mesh is `config.mesh.shape` over `devices`; params, EMA and optimiser state get the
    shardings `loop.abstract_train_state` gives them in training, the batch the loop's batch
    sharding. Memory figures are XLA's per-device estimate of the compiled step.
    """
    task = task_from_sizes(config)
    mesh = parallel.make_mesh(config.mesh.shape, devices)
    rules = parallel.rules_from_config(config.mesh.rules)
    tx = state_lib.make_optimizer(config.train)
    global_batch, accum = int(config.train.batch_size), int(config.train.grad_accum_steps)
    dp = parallel.data_parallel_size(mesh)
    if global_batch % (dp * accum):
        raise ValueError(f"config.train.batch_size={global_batch} is not divisible by the data-parallel "
                         f"size {dp} times grad_accum_steps {accum}")
    key = jax.random.key(0)  # Made on this host, outside the (maybe remote) mesh.
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        abstract_state = state_lib.abstract_train_state(task, tx, key, mesh, rules)
        batch_sharding = parallel.batch_sharding(mesh)
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
                 for k, v in task.batch_spec(global_batch).items()}
        rng = jax.ShapeDtypeStruct((), key.dtype, sharding=NamedSharding(mesh, P()))
        step_fn = loop.jit_train_step(task, tx, config, abstract_state, mesh)
        t0 = time.perf_counter()
        lowered = step_fn.lower(abstract_state, batch, rng)
        lower_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        compiled = lowered.compile()
        compile_s = time.perf_counter() - t0
        xla_flops = _xla_flops(lowered, compiled, len(devices))

    model_flops = flops_lib.train_flops_per_example(task, global_batch // dp // accum) * global_batch
    mem = compiled.memory_analysis()
    state_bytes = {name: _tree_bytes(getattr(abstract_state, name))
                   for name in ("params", "ema_params", "opt_state")}
    out = {
        "stage": config.stage,
        "params": layers.count_params(abstract_state.params),
        "devices": len(devices),
        "device_kind": getattr(devices[0], "device_kind", str(devices[0].platform)),
        "mesh": dict(mesh.shape),
        "global_batch": global_batch,
        "grad_accum_steps": accum,
        "per_device_batch": global_batch // dp // accum,
        "state_bytes_per_device": state_bytes,
        "lower_seconds": round(lower_s, 2),
        "compile_seconds": round(compile_s, 2),
        "model_gflops_per_example": round(model_flops / global_batch / 1e9, 3),
        "model_tflops_per_step": round(model_flops / 1e12, 3),
        "xla_tflops_per_step": round(xla_flops / 1e12, 3),
    }
    if mem is not None:
        out.update({
            "argument_bytes": int(mem.argument_size_in_bytes),
            "output_bytes": int(mem.output_size_in_bytes),
            "alias_bytes": int(mem.alias_size_in_bytes),
            "temp_bytes": int(mem.temp_size_in_bytes),
            "generated_code_bytes": int(mem.generated_code_size_in_bytes),
        })
        # Donated state: outputs alias the arguments, so the peak is arguments + outputs not aliased
        # + temporaries (+ code).
        out["peak_bytes"] = int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                                - mem.alias_size_in_bytes + mem.temp_size_in_bytes
                                + mem.generated_code_size_in_bytes)
    return out
