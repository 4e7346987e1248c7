"""Model FLOPs counted from shapes, and model FLOPs utilisation (MFU).

The count is analytic, as MaxText and MaxDiffusion report it: the forward pass's matrix products
and convolutions (attention's QK^T and AV included; they are `dot_general`s) are read off the traced
program with their shapes, 2 FLOPs per multiply-add, and training counts 3x the forward (forward,
and the two backward products). Rematerialisation's recomputation is not counted: MFU measures
useful work, whatever the memory strategy. Element-wise work (norms, activations, softmax) is left
out, as is customary.
"""
from __future__ import annotations

import math
from typing import Any

import jax
from jax.extend import core as jex_core

# Peak dense bfloat16 FLOP/s per device, by `jax.Device.device_kind` (vendor figures).
PEAK_BF16_TFLOPS = {
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,  # v5e
    "TPU v5e": 197.0,
    "TPU v5": 459.0,  # v5p
    "TPU v5p": 459.0,
    "TPU v6 lite": 918.0,  # Trillium (v6e)
    "TPU v6e": 918.0,
    "NVIDIA H100 80GB HBM3": 989.0,  # SXM
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H100 NVL": 835.0,
    "NVIDIA H200": 989.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
}


def peak_tflops(device: Any) -> float | None:
    """The device's peak bfloat16 TFLOP/s, or None for a kind not in the table (CPUs)."""
    kind = getattr(device, "device_kind", "")
    if kind in PEAK_BF16_TFLOPS:
        return PEAK_BF16_TFLOPS[kind]
    for name, value in PEAK_BF16_TFLOPS.items():  # e.g. "NVIDIA H200 NVL" -> "NVIDIA H200"
        if kind.startswith(name):
            return value
    return None


def _eqn_flops(eqn) -> float:
    name = eqn.primitive.name
    if name == "dot_general":
        lhs, rhs = (v.aval for v in eqn.invars)
        (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
        rhs_free = [d for i, d in enumerate(rhs.shape) if i not in rhs_contract and i not in rhs_batch]
        return 2.0 * math.prod(lhs.shape) * math.prod(rhs_free)
    if name == "conv_general_dilated":
        rhs = eqn.invars[1].aval
        out = eqn.outvars[0].aval
        out_features = rhs.shape[eqn.params["dimension_numbers"].rhs_spec[0]]
        return 2.0 * math.prod(out.shape) * math.prod(rhs.shape) / out_features
    return 0.0


def _sub_jaxprs(eqn):
    for value in eqn.params.values():
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(item, jex_core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jex_core.Jaxpr):
                yield item


def jaxpr_flops(jaxpr) -> float:
    """Matmul and convolution FLOPs of a jaxpr, through calls, remat, scans (times their length)
    and conds (the largest branch)."""
    total = 0.0
    for eqn in jaxpr.eqns:
        total += _eqn_flops(eqn)
        subs = [jaxpr_flops(sub) for sub in _sub_jaxprs(eqn)]
        if not subs:
            continue
        if eqn.primitive.name == "scan":
            total += eqn.params["length"] * sum(subs)
        elif eqn.primitive.name == "cond":
            total += max(subs)
        else:
            total += sum(subs)
    return total


def forward_flops(fn, *args) -> float:
    """Matmul and convolution FLOPs of `fn(*args)` (abstract arguments are fine)."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def train_flops_per_example(task, batch_size: int = 2) -> float:
    """Model FLOPs of one training example of `task`: 3x its loss's forward products.

    Traced at `batch_size` rows (the per-device batch, where the count depends on the batch only
    through a contrastive loss's [B, B] logits) and divided by it.
    """
    from unclip_jax import parallel

    params = parallel.unbox(jax.eval_shape(task.init_params, jax.random.key(0)))
    batch = task.batch_spec(batch_size)
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    step = jax.ShapeDtypeStruct((), "int32")
    fwd = forward_flops(lambda p, b, r, s: task.loss_fn(p, b, r, s)[0], params, batch, rng, step)
    return 3.0 * fwd / batch_size
