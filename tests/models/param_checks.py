"""Checks shared by the model tests."""
import jax
from flax import linen as nn


def assert_every_param_named(abstract, unnamed_ok: tuple[str, ...] = ()):
    """Every param of `abstract` (an `init` output) is boxed with logical axis names, at least one of
    them not None unless its own name is in `unnamed_ok`; returns the params' partition specs."""
    boxes = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert all(isinstance(b, nn.Partitioned) for b in boxes), "an unnamed param"
    specs = nn.get_partition_spec(abstract)["params"]
    for path, spec in jax.tree_util.tree_leaves_with_path(specs):
        assert any(name is not None for name in spec) or path[-1].key in unnamed_ok, (
            jax.tree_util.keystr(path))
    return specs
