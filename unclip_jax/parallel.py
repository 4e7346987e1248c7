"""Device mesh, logical-axis rules and sharding helpers.

Every parameter and activation in `unclip_jax.models` carries *logical* axis names; the rules below
(overridable from the config) map them onto the three physical mesh axes:

- `data`: pure data parallelism (parameters replicated),
- `fsdp`: data parallelism with parameters and optimizer state sharded (ZeRO-3 style),
- `tensor`: tensor (model) parallelism over heads and MLP hidden units.

Parameter names: `embed` (model width), `mlp` (MLP hidden), `heads`, `kv` (per-head width), `vocab`,
`conv_in`/`conv_out` (convolution channels). Activation names carry an `act_` prefix so that a batch
sharded over `fsdp` never collides with a parameter dimension sharded over the same axis.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
from absl import logging
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # Activations.
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_vocab", "tensor"),
    # Parameters.
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("norm", None),
)


def mesh_shape(spec: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Resolves a mesh shape with at most one `-1` ("the rest") against `num_devices`."""
    spec = tuple(int(s) for s in spec)
    if len(spec) != len(MESH_AXES):
        raise ValueError(f"mesh shape {spec} must have {len(MESH_AXES)} entries for axes {MESH_AXES}")
    if sum(s == -1 for s in spec) > 1:
        raise ValueError(f"mesh shape {spec}: at most one axis may be -1")
    known = math.prod(s for s in spec if s != -1)
    if any(s == 0 or s < -1 for s in spec) or num_devices % known:
        raise ValueError(f"mesh shape {spec} does not divide the {num_devices} available devices")
    shape = tuple(num_devices // known if s == -1 else s for s in spec)
    if math.prod(shape) != num_devices:
        raise ValueError(
            f"mesh shape {spec} uses {math.prod(shape)} devices but {num_devices} are available; "
            "use -1 on one axis to take the rest")
    return shape


def make_mesh(spec: Sequence[int] = (-1, 1, 1), devices: Sequence[jax.Device] | None = None,
              dcn_spec: Sequence[int] | None = None) -> Mesh:
    """Builds a `data/fsdp/tensor` mesh with `Auto` axes (what linen's logical rules need).

    `spec` is the whole mesh's shape. `dcn_spec` is the part of it that spans *granules* (TPU
    slices, or processes where devices name no slice: GPU nodes, CPU hosts), which talk over the
    data-centre network instead of ICI / NVLink; `-1` there is the number of granules. With one
    granule it is ignored.
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(spec, len(devices))
    granules = _granules(devices)
    if len(granules) > 1 and dcn_spec is not None:
        dcn = mesh_shape(dcn_spec, len(granules))
        if any(s % d for s, d in zip(shape, dcn)):
            raise ValueError(
                f"config.mesh.dcn_shape={tuple(dcn_spec)} puts {dict(zip(MESH_AXES, dcn))} of the "
                f"{len(granules)} hosts/slices on the axes of mesh {dict(zip(MESH_AXES, shape))}, "
                "which they do not divide; choose mesh.shape and mesh.dcn_shape so that each axis of "
                "the mesh is a multiple of its dcn_shape entry")
        from jax.experimental import mesh_utils

        ici = tuple(s // d for s, d in zip(shape, dcn))
        grid = mesh_utils.create_hybrid_device_mesh(
            ici, dcn, devices, process_is_granule=not _is_tpu(devices),
            allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    if len(devices) == len(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    # An explicit device list: a subset (tests comparing 1 device with 8), or a TPU topology
    # description compiled from a CPU host. TPUs get a layout that follows the physical torus.
    grid = np.asarray(devices).reshape(shape)
    if devices[0].platform == "tpu":
        from jax.experimental import mesh_utils

        try:
            grid = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
        except (ValueError, NotImplementedError, AssertionError):
            pass  # No torus-aware layout for this shape: the plain order.
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _is_tpu(devices: Sequence[jax.Device]) -> bool:
    return devices[0].platform == "tpu"


def _granules(devices: Sequence[jax.Device]) -> set[int]:
    """TPU slices (ICI within a slice, however many hosts it has); else processes (GPU nodes)."""
    if _is_tpu(devices):
        return {getattr(d, "slice_index", 0) for d in devices}
    return {d.process_index for d in devices}


def mesh_from_config(mesh_config) -> Mesh:
    """The mesh a config's `mesh` block describes (`shape`, optional `dcn_shape`, `num_devices`)."""
    n = int(mesh_config.get("num_devices", 0) or 0)
    devices = jax.devices()[:n] if n else None
    if n and jax.process_count() > 1:
        raise ValueError("config.mesh.num_devices is for single-process runs; leave it at 0 on multi-host")
    dcn = mesh_config.get("dcn_shape") or (-1, 1, 1)
    return make_mesh(mesh_config.shape, devices, dcn)


def rules_from_config(rules: Sequence[Sequence[Any]] | None) -> tuple[tuple[str, Any], ...]:
    """Normalises config rules (lists from a ConfigDict) into the tuple form linen expects."""
    if not rules:
        return DEFAULT_RULES
    out = []
    for rule in rules:
        name, axes = rule
        out.append((str(name), tuple(axes) if isinstance(axes, (list, tuple)) else axes))
    return tuple(out)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a batch: leading dimension over every data-parallel axis."""
    return NamedSharding(mesh, P(("data", "fsdp")))


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def unbox(tree: Any) -> Any:
    """Strips logical-axis boxes without the sharding constraint (usable outside jit too)."""
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
    return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if is_box(x) else x, tree,
                        is_leaf=is_box)


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules) -> Any:
    """Maps a tree of (possibly `nn.Partitioned`-boxed) abstract values to `NamedSharding`s.

    The rules say which mesh axes a logical dimension goes on; where a dimension's size is not
    divisible by those axes (a 3-channel output convolution on `fsdp`=8, 320 channels on 128
    chips), `fit_spec` moves them to another dimension that they divide, or replicates. Every such
    change is logged once per distinct shape.
    """
    specs = nn.get_partition_spec(abstract_tree)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    values = unbox(abstract_tree)
    refitted: dict[tuple, tuple] = {}

    def fit(sharding, value):
        if not isinstance(sharding, NamedSharding) or not hasattr(value, "shape"):
            return sharding
        spec = fit_spec(tuple(sharding.spec), tuple(value.shape), dict(mesh.shape))
        if spec != tuple(sharding.spec):
            refitted[(tuple(value.shape), tuple(sharding.spec))] = spec
            return NamedSharding(mesh, P(*spec))
        return sharding

    out = jax.tree.map(fit, shardings, values, is_leaf=lambda x: isinstance(x, NamedSharding))
    for (shape, before), after in sorted(refitted.items(), key=str):
        logging.info("sharding: %s of shape %s does not divide; using %s", P(*before), shape, P(*after))
    return out


def _axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def fit_spec(spec: Sequence[Any], shape: Sequence[int], mesh_shape: dict[str, int]) -> tuple:
    """`spec` with every mesh axis that does not divide its dimension moved or dropped.

    An axis that does not divide its dimension's size (after the axes before it on that dimension)
    goes to the largest dimension it divides (unsharded ones first), as big_vision's fsdp strategy
    shards the largest divisible dimension; with none, the tensor is replicated along it.
    """
    spec = list(spec) + [None] * (len(shape) - len(spec))
    kept: list[list[str]] = [[] for _ in shape]
    left = list(shape)  # Each dimension's size per shard so far.
    dropped: list[str] = []
    for dim, entry in enumerate(spec):
        for axis in _axes(entry):
            n = mesh_shape.get(axis, 1)
            if left[dim] % n == 0:
                kept[dim].append(axis)
                left[dim] //= n
            else:
                dropped.append(axis)
    for axis in dropped:
        n = mesh_shape.get(axis, 1)
        fits = [d for d in range(len(shape)) if left[d] % n == 0 and left[d] >= n]
        if fits:  # Prefer an unsharded dimension, then the largest per-shard size.
            dim = max(fits, key=lambda d: (not kept[d], left[d]))
            kept[dim].append(axis)
            left[dim] //= n
    out = [None if not axes else axes[0] if len(axes) == 1 else tuple(axes) for axes in kept]
    return tuple(out)


@functools.lru_cache(maxsize=16)  # Asked every step (global_batch_from_local); fixed per mesh.
def data_slice(mesh: Mesh) -> tuple[int, int]:
    """(index, count): this process feeds block `index` of `count` equal, contiguous row blocks of
    every global batch (`batch_sharding(mesh)`).

    The batch is split over `data` and `fsdp` only; when `tensor` (or part of `fsdp`) spans
    processes, several processes hold the same rows and must read the same examples: they get the
    same index. One process: (0, 1).
    """
    dp = data_parallel_size(mesh)  # One row per data-parallel shard.
    indices = batch_sharding(mesh).addressable_devices_indices_map((dp,))
    rows = sorted({idx[0].start or 0 for idx in indices.values()})
    if rows != list(range(rows[0], rows[0] + len(rows))) or dp % len(rows):
        raise ValueError(
            f"process {jax.process_index()} holds data-parallel shards {rows} of {dp}: not one "
            "contiguous block; order the mesh so that each process's devices are adjacent on the "
            "data axes (config.mesh.dcn_shape)")
    return rows[0] // len(rows), dp // len(rows)


def global_batch_from_local(local: Any, mesh: Mesh) -> Any:
    """Assembles per-process numpy batches (each this process's `data_slice` block of rows) into
    global `jax.Array`s sharded over the data axes."""
    sharding = batch_sharding(mesh)
    _, count = data_slice(mesh)

    def assemble(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(sharding, x, (len(x) * count, *x.shape[1:]))

    return jax.tree.map(assemble, local)


def process_zero_first(fn, name: str):
    """`fn()` on process 0, then on the others once it has returned (a barrier between): for work
    that writes shared files (preparing a data set, training a tokenizer, a cache's metadata), so
    the others find and check it instead of racing to write it. One process: just `fn()`."""
    if jax.process_count() == 1:
        return fn()
    from jax.experimental import multihost_utils

    result = fn() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices(name)
    return result if jax.process_index() == 0 else fn()


def to_host(x: jax.Array) -> np.ndarray:
    """A global array as numpy on every process: the local copy when it is replicated, else
    gathered from every process (`process_allgather`). Never `np.asarray` a sharded global array:
    on several processes it raises, as a part of it lives on another host."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places a host tree on every device of the mesh (replicated)."""
    sharding = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: jax.device_put(jnp.asarray(x), sharding), tree)


def pad_rows(x: np.ndarray, multiple: int) -> np.ndarray:
    """Pads the leading dimension to a multiple of `multiple` by repeating the last row."""
    pad = (-x.shape[0]) % multiple
    return np.concatenate([x, np.repeat(x[-1:], pad, axis=0)], axis=0) if pad else x


def map_batches(fn, arrays: Sequence[np.ndarray], mesh: Mesh, batch_size: int) -> np.ndarray:
    """Runs `fn(offset, *device_chunks)` over host arrays in chunks of `batch_size` rows.

    Each chunk is padded to a multiple of the data-parallel size and sharded over the data axes;
    `offset` is the chunk's first row (to fold into an rng). Returns the concatenated numpy
    results without the padding rows.
    """
    dp, n, out = data_parallel_size(mesh), len(arrays[0]), []
    for i in range(0, n, int(batch_size)):
        chunks = [a[i:i + int(batch_size)] for a in arrays]
        rows = len(chunks[0])
        chunks = [jax.device_put(pad_rows(np.asarray(c), dp), batch_sharding(mesh)) for c in chunks]
        out.append(to_host(fn(i, *chunks))[:rows])
    return np.concatenate(out, axis=0)


class JitCache:
    """Jitted functions built on first use, one per (mesh, key); outputs replicated on the mesh.

    `cache(mesh, key, build)` returns `jax.jit(build(), out_shardings=<replicated on mesh>)`,
    building it only the first time `key` (a tuple of the settings `build` depends on) is seen.
    """

    def __init__(self):
        self._fns: dict = {}

    def __call__(self, mesh: Mesh, key: tuple, build):
        full_key = (mesh, *key)
        if full_key not in self._fns:
            self._fns[full_key] = jax.jit(build(), out_shardings=NamedSharding(mesh, P()))
        return self._fns[full_key]
