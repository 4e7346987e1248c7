"""Tolerances derived from floating-point precision, so that comparisons hold on every CPU kind.

Two evaluations of the same math (remat or not, scanned or unrolled layers, sharded or not, another
CPU's kernels: XLA picks different dot/convolution kernels and reduction orders on Intel with AMX and
on AMD without it) differ by round-off. Round-off in a sum scales with the largest terms summed, not
with the result: a gradient element that is a small difference of large terms carries an absolute
error set by the large ones. So the tolerance here is absolute and scaled to the largest element:

    |actual - desired| <= ulps * eps(dtype) * max|desired|

`ulps` is the number of roundings (units of `eps` at the scale of the largest element) the test
allows; a real bug (a dropped term, a wrong mask) is off by a fraction of the value itself, orders of
magnitude above any budget used here.
"""
from __future__ import annotations

import jax
import ml_dtypes
import numpy as np

# Same math in float32, evaluated with another fusion, reduction order or sharding: observed up to
# ~9 units (a UNet forward sharded over 8 devices vs one) on an AMD EPYC CPU; 64 leaves room for
# other kernels and still fails on anything but round-off (a real error, >= 1e-3 of the value, is
# ~10^4 units).
SAME_MATH_F32 = 64


def eps(dtype) -> float:
    """Machine epsilon of `dtype` (float32: 2**-23, bfloat16: 2**-7)."""
    if np.dtype(dtype) == np.dtype(ml_dtypes.bfloat16):
        return float(ml_dtypes.finfo(ml_dtypes.bfloat16).eps)
    return float(np.finfo(dtype).eps)


def _max_abs(x) -> float:
    return float(np.max(np.abs(np.asarray(x, np.float64)), initial=0.0))


def tolerance(desired, *, ulps: float, dtype=np.float32, scale: float | None = None) -> float:
    """The absolute tolerance `ulps * eps(dtype) * scale` (scale: max|desired| unless given)."""
    return ulps * eps(dtype) * (_max_abs(desired) if scale is None else scale)


def assert_close(actual, desired, *, ulps: float = SAME_MATH_F32, dtype=np.float32,
                 scale: float | None = None, err_msg: str = "") -> None:
    """`actual` equals `desired` up to `ulps` roundings of `dtype` at the largest element's scale."""
    scale = _max_abs(desired) if scale is None else scale
    np.testing.assert_allclose(
        np.asarray(actual, np.float64), np.asarray(desired, np.float64), rtol=0,
        atol=tolerance(desired, ulps=ulps, dtype=dtype, scale=scale),
        err_msg=f"{err_msg} (allowed: {ulps} x eps({np.dtype(dtype).name}) x scale {scale:.4g})")


def assert_trees_close(actual, desired, *, ulps: float = SAME_MATH_F32, dtype=np.float32,
                       per_leaf: bool = False) -> None:
    """`assert_close` leaf by leaf, every leaf scaled by the tree's largest element: gradients
    share the round-off of the activations and cotangents they are built from, and some leaves are
    0 in exact arithmetic (a key-projection bias under softmax, a bias before a normalisation) and
    so hold round-off alone. `per_leaf=True` scales each leaf by its own largest element."""
    leaves_a, leaves_d = jax.tree.leaves(actual), jax.tree.leaves(desired)
    assert jax.tree.structure(actual) == jax.tree.structure(desired)
    scale = None if per_leaf else max(_max_abs(d) for d in leaves_d)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(desired)]
    for path, a, d in zip(paths, leaves_a, leaves_d):
        assert_close(a, d, ulps=ulps, dtype=dtype, scale=scale, err_msg=path)
