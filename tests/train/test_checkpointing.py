"""Tests of `unclip_jax.train.checkpointing` on 8 fake CPU devices."""
import json
import os
import shutil

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec as P

from unclip_jax.parallel import make_mesh
from unclip_jax.train import checkpointing
from unclip_jax.train.checkpointing import Checkpointer


@struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    ema_params: dict
    opt_state: optax.OptState


def _specs():
    """PartitionSpecs of the test params: one matrix sharded two ways, one vector, one replicated."""
    return {"text": {"encoder": {"kernel": P("fsdp", "tensor"), "bias": P("tensor")}},
            "scale": P()}


def _params(seed=0, width=16):
    rng = np.random.default_rng(seed)
    return {"text": {"encoder": {"kernel": rng.normal(size=(8, width)).astype(np.float32),
                                 "bias": rng.normal(size=(width,)).astype(np.float32)}},
            "scale": np.float32(rng.normal())}


def _shardings(mesh, tree_specs):
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), tree_specs,
                        is_leaf=lambda x: isinstance(x, P))


def _optimizer():
    # State (EmptyState(), (ScaleByAdamState(...), EmptyState())): empty nodes before arrays.
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))


def make_state(mesh, seed=0, width=16):
    """A sharded TrainState with Adam state (namedtuples inside tuples), like the loop's."""
    shardings = _shardings(mesh, _specs())
    params = jax.device_put(_params(seed, width), shardings)
    ema = jax.tree.map(lambda x: x * 0.5, params)
    opt_state = _optimizer().init(params)
    return TrainState(step=jnp.asarray(seed, jnp.int32), params=params, ema_params=ema,
                      opt_state=opt_state)


def abstract_like(state, mesh, specs=None):
    """The state's ShapeDtypeStructs placed on `mesh` (params by `specs`, everything else replicated)."""
    specs = specs or _specs()
    param_shardings = _shardings(mesh, specs)
    replicated = NamedSharding(mesh, P())

    def to_abstract(x, sharding=replicated):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    params = jax.tree.map(to_abstract, state.params, param_shardings)
    opt_state = optax.tree_map_params(_optimizer(), to_abstract, state.opt_state, param_shardings,
                                      transform_non_params=to_abstract)
    return TrainState(step=to_abstract(state.step), params=params,
                      ema_params=jax.tree.map(to_abstract, state.ema_params, param_shardings),
                      opt_state=opt_state)


def assert_same_values(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.fixture(scope="module")
def mesh8():
    return make_mesh((2, 2, 2))


def test_round_trip_sharded_async(tmp_path, mesh8):
    state = make_state(mesh8, seed=3)
    expected = jax.tree.map(np.asarray, state)
    with Checkpointer(str(tmp_path / "ckpt"), async_save=True) as ckpt:
        assert ckpt.save(3, state)
        # The loop donates the state right after saving: the async write must not need the buffers.
        jax.tree.map(lambda x: x.delete(), state)
        ckpt.wait_until_finished()
        restored, step = ckpt.restore(abstract_like(expected, mesh8))
    assert step == 3
    assert isinstance(restored, TrainState)
    assert_same_values(restored, expected)
    assert restored.params["text"]["encoder"]["kernel"].sharding == NamedSharding(
        mesh8, P("fsdp", "tensor"))
    assert restored.opt_state[1][0].mu["text"]["encoder"]["bias"].sharding == NamedSharding(
        mesh8, P("tensor"))


def test_keep_n_reopen_and_same_step_noop(tmp_path, mesh8):
    directory = str(tmp_path / "ckpt")
    with Checkpointer(directory, max_to_keep=2) as ckpt:
        for step in (1, 2, 3, 4):
            assert ckpt.save(step, {"w": jnp.full((4,), float(step))})
        assert not ckpt.save(4, {"w": jnp.zeros((4,))})  # same step again: a no-op
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [3, 4]
    assert sorted(os.listdir(directory)) == ["3", "4"]

    reopened = Checkpointer(directory)
    assert reopened.latest_step() == 4
    assert reopened.all_steps() == [3, 4]
    assert not reopened.save(4, {"w": jnp.zeros((4,))})
    restored, step = reopened.restore(
        {"w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=NamedSharding(mesh8, P()))})
    reopened.close()
    assert step == 4
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.full((4,), 4.0))


@pytest.mark.parametrize("target", ["1x8x1", "4_devices"])
def test_restore_onto_different_mesh(tmp_path, mesh8, target):
    state = make_state(mesh8, seed=1)
    expected = jax.tree.map(np.asarray, state)
    with Checkpointer(str(tmp_path / "ckpt")) as ckpt:
        ckpt.save(10, state)

    if target == "1x8x1":
        mesh = make_mesh((1, 8, 1))
        specs = {"text": {"encoder": {"kernel": P(None, "fsdp"), "bias": P("fsdp")}}, "scale": P()}
    else:
        mesh = make_mesh((2, 1, 2), devices=jax.devices()[:4])
        specs = {"text": {"encoder": {"kernel": P("data", "tensor"), "bias": P()}}, "scale": P()}
    abstract = abstract_like(expected, mesh, specs)
    with Checkpointer(str(tmp_path / "ckpt")) as ckpt:
        restored, step = ckpt.restore(abstract, step=10)
    assert step == 10
    assert_same_values(restored, expected)
    got = jax.tree.map(lambda x: x.sharding, restored)
    want = jax.tree.map(lambda x: x.sharding, abstract)
    assert jax.tree.leaves(got) == jax.tree.leaves(want)
    assert all(set(s.device_set) <= set(mesh.devices.flat) for s in jax.tree.leaves(got))


def _grain_iterator():
    return iter(grain.MapDataset.range(100).shuffle(seed=0).batch(4).to_iter_dataset())


def test_data_iterator_round_trip(tmp_path):
    it = _grain_iterator()
    for _ in range(3):
        next(it)
    with Checkpointer(str(tmp_path / "ckpt")) as ckpt:
        ckpt.save(3, {"w": jnp.ones(2)}, data_iterator=it)
        expected_next = next(it)  # advancing after save must not change what was saved
        next(it)

    fresh = _grain_iterator()
    abstract = {"w": jax.ShapeDtypeStruct((2,), jnp.float32,
                                          sharding=NamedSharding(make_mesh((8, 1, 1)), P()))}
    with Checkpointer(str(tmp_path / "ckpt")) as ckpt:
        ckpt.restore(abstract, data_iterator=fresh)
    np.testing.assert_array_equal(next(fresh), expected_next)
    state_file = tmp_path / "ckpt" / "3" / "data_iterator" / "process_0-of-1.json"
    assert json.loads(state_file.read_text()) == {"next_index": 3}


class _ListIterator:
    """A duck-typed iterator (the loop's own wrapper) with a dict state."""

    def __init__(self):
        self.position = 0

    def get_state(self):
        return {"position": self.position, "epoch": 1}

    def set_state(self, state):
        self.position = state["position"]


def test_duck_typed_iterator_and_missing_iterator_state(tmp_path):
    abstract = {"w": jax.ShapeDtypeStruct((2,), jnp.float32)}
    it = _ListIterator()
    it.position = 7
    with Checkpointer(str(tmp_path / "ckpt")) as ckpt:
        ckpt.save(1, {"w": jnp.ones(2)}, data_iterator=it)
        ckpt.save(2, {"w": jnp.ones(2)})  # no iterator state in this one
        fresh = _ListIterator()
        ckpt.restore(abstract, step=1, data_iterator=fresh)
        assert fresh.position == 7
        with pytest.raises(ValueError, match="holds no data-iterator state"):
            ckpt.restore(abstract, step=2, data_iterator=_ListIterator())


def test_no_checkpoint_is_a_clear_error(tmp_path):
    directory = tmp_path / "does" / "not" / "exist"
    ckpt = Checkpointer(str(directory))
    assert ckpt.latest_step() is None and ckpt.all_steps() == []
    with pytest.raises(FileNotFoundError, match=f"no checkpoint to restore in {directory}"):
        ckpt.restore({"w": jax.ShapeDtypeStruct((2,), jnp.float32)})
    ckpt.close()
    assert not directory.exists()  # opening to restore creates nothing


def test_missing_step_is_a_clear_error(tmp_path):
    with Checkpointer(str(tmp_path / "ckpt")) as ckpt:
        ckpt.save(5, {"w": jnp.ones(2)})
        with pytest.raises(FileNotFoundError, match=r"step 6 .* available steps: \[5\]"):
            ckpt.restore({"w": jax.ShapeDtypeStruct((2,), jnp.float32)}, step=6)


def test_incompatible_checkpoint_lists_paths(tmp_path, mesh8):
    with Checkpointer(str(tmp_path / "ckpt")) as ckpt:
        ckpt.save(1, make_state(mesh8, width=16))
    wider = jax.tree.map(np.asarray, make_state(mesh8, width=32))
    abstract = abstract_like(wider, mesh8)
    abstract = abstract.replace(params={**abstract.params,
                                        "extra": jax.ShapeDtypeStruct((3,), jnp.float32)})
    with Checkpointer(str(tmp_path / "ckpt")) as ckpt:
        with pytest.raises(ValueError) as info:
            ckpt.restore(abstract)
    message = str(info.value)
    assert "incompatible" in message and str(tmp_path / "ckpt" / "1") in message
    assert "params/text/encoder/kernel: checkpoint (8, 16) vs model (8, 32)" in message
    assert "opt_state/1/0/mu/text/encoder/bias: checkpoint (16,) vs model (32,)" in message
    assert "params/extra: missing from checkpoint, model (3,)" in message


def test_leftover_tmp_dir_and_failed_save_keep_previous_checkpoint(tmp_path):
    directory = tmp_path / "ckpt"
    abstract = {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}
    with Checkpointer(str(directory), max_to_keep=2) as ckpt:
        ckpt.save(1, {"w": jnp.arange(3.0)})
        ckpt.wait_until_finished()
        # A save that fails half way (an unsupported leaf) leaves a temporary directory behind.
        with pytest.raises(ValueError, match="Unsupported type"):
            ckpt.save(2, {"w": jnp.ones(3), "bad": object()})
            ckpt.wait_until_finished()
        assert ckpt.all_steps() == [1]
        assert ckpt.save(3, {"w": jnp.arange(3.0) + 3})  # the manager still works afterwards
    # An interrupted save of step 7 (process killed before the rename): a partial copy.
    shutil.copytree(directory / "3", directory / "7.orbax-checkpoint-tmp")
    (directory / "7.orbax-checkpoint-tmp" / "_CHECKPOINT_METADATA").unlink()

    ckpt = Checkpointer(str(directory), max_to_keep=2)
    assert ckpt.latest_step() == 3 and ckpt.all_steps() == [1, 3]
    restored, step = ckpt.restore(abstract)
    assert step == 3
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(3.0) + 3)
    restored, _ = ckpt.restore(abstract, step=1)
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(3.0))
    ckpt.close()


def test_config_json_round_trip(tmp_path):
    config = ml_collections.ConfigDict({
        "stage": "prior", "seed": 3,
        "train": {"lr": 1e-4, "betas": (0.9, 0.99), "schedule": None, "use_ema": True},
    })
    assert checkpointing.load_config(str(tmp_path)) is None
    checkpointing.save_config(config, str(tmp_path))
    text = (tmp_path / "config.json").read_text()
    assert '\n  "seed": 3' in text  # indented: readable by a person
    loaded = checkpointing.load_config(str(tmp_path))
    assert loaded.train.lr == 1e-4 and loaded.train.schedule is None and loaded.stage == "prior"
    assert list(loaded.train.betas) == [0.9, 0.99]
    config.seed = 4
    checkpointing.save_config(config, str(tmp_path))  # a resumed run replaces the file
    assert checkpointing.load_config(str(tmp_path)).seed == 4
    assert not (tmp_path / "config.json.tmp").exists()

    with Checkpointer(str(tmp_path / "ckpt")) as ckpt:
        ckpt.save(1, {"w": jnp.ones(2)}, config=config)
        ckpt.save(2, {"w": jnp.ones(2)})
        assert ckpt.read_config(1).train.to_dict() == loaded.train.to_dict()
        assert ckpt.read_config(2) is None
