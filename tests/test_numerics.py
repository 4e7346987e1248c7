"""The tolerance helper the numerical tests share (tests/numerics.py)."""
import jax.numpy as jnp
import numpy as np
import pytest

from tests import numerics


def test_eps_per_dtype():
    assert numerics.eps(np.float32) == 2.0 ** -23
    assert numerics.eps(jnp.bfloat16) == 2.0 ** -7
    assert numerics.eps(np.float16) == 2.0 ** -10


def test_tolerance_is_scaled_to_the_largest_element():
    desired = np.array([100.0, 1e-3, -0.5])
    step = 10 * 2.0 ** -23 * 100.0  # 10 units at the scale of the largest element
    numerics.assert_close(desired + [0, 0.9 * step, -0.9 * step], desired, ulps=10)
    with pytest.raises(AssertionError, match="10 x eps"):
        numerics.assert_close(desired + [0, 1.5 * step, 0], desired, ulps=10)


def test_trees_scale_by_the_tree_or_by_each_leaf():
    desired = {"big": np.array([1000.0]), "zero": np.array([0.0])}
    actual = {"big": np.array([1000.0]), "zero": np.array([1e-5])}  # round-off in a true 0
    numerics.assert_trees_close(actual, desired)
    with pytest.raises(AssertionError, match="zero"):
        numerics.assert_trees_close(actual, desired, per_leaf=True)
