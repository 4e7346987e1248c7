"""Every stage initialises and trains on every mesh shape of 8 devices, with the shardings the rules
mean: large matrices split over `fsdp` / `tensor`, a dimension an axis cannot divide left whole."""
import math

import jax
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from configs import paper
from unclip_jax import parallel
from unclip_jax.train import aot, loop
from unclip_jax.train import state as state_lib

MESHES = [(1, 8, 1), (2, 4, 1), (2, 2, 2), (1, 4, 2)]
STAGES = ["clip", "prior", "decoder", "upsampler64"]


def test_fit_spec_moves_or_drops_axes_that_do_not_divide():
    mesh = {"data": 2, "fsdp": 8, "tensor": 2}
    # A 3x3 convolution to 6 channels: fsdp goes to the 512 input channels instead.
    assert parallel.fit_spec((None, None, None, "fsdp"), (3, 3, 512, 6), mesh) == (None, None, "fsdp", None)
    # Nothing divisible by 8: replicated.
    assert parallel.fit_spec(("fsdp",), (6,), mesh) == (None,)
    # A dimension already on tensor takes fsdp too when the product divides it.
    assert parallel.fit_spec(("fsdp", "tensor"), (12, 64), mesh) == (None, ("tensor", "fsdp"))
    # Divisible specs are left alone, multi-axis entries included.
    assert parallel.fit_spec((("data", "fsdp"), "tensor"), (32, 4), mesh) == (("data", "fsdp"), "tensor")
    assert parallel.fit_spec((("data", "fsdp"),), (6,), mesh) == ("data",)


def _batch(task, batch_size):
    rng = np.random.default_rng(0)
    out = {}
    for name, spec in task.batch_spec(batch_size).items():
        if np.issubdtype(spec.dtype, np.integer):
            out[name] = rng.integers(0, 255, spec.shape).astype(spec.dtype)
        else:
            x = rng.normal(size=spec.shape)
            out[name] = (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(spec.dtype)
    return out


def _check_sharded(path, value, mesh):
    """A parameter whose dimensions `fsdp` (or `tensor`) could split must not be replicated on it."""
    spec = value.sharding.spec
    used = {a for entry in spec if entry for a in ((entry,) if isinstance(entry, str) else entry)}
    for axis in ("fsdp",):
        n = mesh.shape[axis]
        if n > 1 and value.ndim >= 2 and math.prod(value.shape) >= 4096:
            if any(d % n == 0 and d >= n for d in value.shape):
                assert axis in used, f"{path} {value.shape} is not sharded over {axis}: {spec}"
    for dim, entry in enumerate(spec):  # Every sharded dimension is really divisible.
        axes = (entry,) if isinstance(entry, str) else (entry or ())
        assert value.shape[dim] % math.prod(mesh.shape[a] for a in axes) == 0, (path, spec)


def _setup(variant, mesh_shape):
    config = paper.get_config(f"{variant},tiny")
    with config.unlocked():
        config.mesh.shape = mesh_shape
    task = aot.task_from_sizes(config)
    mesh = parallel.make_mesh(mesh_shape)
    rules = parallel.rules_from_config(config.mesh.rules)
    return config, task, mesh, rules, state_lib.make_optimizer(config.train)


def _check_state(state, mesh):
    for path, value in jax.tree_util.tree_leaves_with_path(state.params):
        _check_sharded(jax.tree_util.keystr(path), value, mesh)
    # EMA and Adam's moments live where their params do.
    param_specs = jax.tree.map(lambda x: x.sharding.spec, state.params)
    assert jax.tree.map(lambda x: x.sharding.spec, state.ema_params) == param_specs
    adam = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
            if hasattr(s, "mu")][0]
    assert jax.tree.map(lambda x: x.sharding.spec, adam.mu) == param_specs
    assert jax.tree.map(lambda x: x.sharding.spec, adam.nu) == param_specs
    if mesh.shape["fsdp"] > 1:  # Something large really is split (not all replicated).
        assert any(v.sharding.spec != P() and math.prod(v.shape) >= 4096
                   for v in jax.tree.leaves(state.params))


# The shardings the loop initialises into, on every mesh (abstract: nothing compiled); a real
# sharded initialisation and train step on the mesh that splits both parameter axes at once (a
# UNet's sharded gradient takes 1-2 min to compile on 2 CPU cores).
@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("variant", STAGES)
def test_tiny_stage_state_shardings_on_8_devices(variant, mesh_shape):
    _, task, mesh, rules, tx = _setup(variant, mesh_shape)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        abstract = state_lib.abstract_train_state(task, tx, jax.random.key(0), mesh, rules)
    _check_state(abstract, mesh)


@pytest.mark.slow
@pytest.mark.parametrize("variant", STAGES)
def test_tiny_stage_initialises_and_steps_on_fsdp_and_tensor(variant):
    config, task, mesh, rules, tx = _setup(variant, (1, 4, 2))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state, abstract = state_lib.init_state(task, tx, jax.random.key(0), mesh, rules)
        _check_state(state, mesh)
        step = loop.jit_train_step(task, tx, config, abstract, mesh)
        batch = parallel.global_batch_from_local(_batch(task, int(config.train.batch_size)), mesh)
        state, metrics = step(state, batch, jax.random.key(1))
    assert np.isfinite(float(metrics["loss"]))
    assert jax.tree.map(lambda x: x.sharding, state.params) == jax.tree.map(
        lambda a: a.sharding, abstract.params)
