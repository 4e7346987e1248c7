"""Checkpoints of the train state, the data-iterator position and the run config.

One small wrapper around orbax's `CheckpointManager` (V0 API) so that the rest of the code base never
touches orbax directly (its API is moving to V1). A checkpoint directory holds one sub-directory per
step with three items:

- `state`: the train state, any pytree of (sharded) `jax.Array`s, written by every process;
- `data_iterator`: one JSON file per process with that host's data-iterator state
  (`process_{i}-of-{n}.json`, grain's own format);
- `config`: the run config as JSON (written by process 0).

Orbax writes each step into `<step>.orbax-checkpoint-tmp` and renames it when complete, so a failed
or interrupted save never replaces an earlier checkpoint, and leftover temporary directories are
ignored. Nothing is deleted except the checkpoints that `max_to_keep` retires.

Every process must call `save`, `restore`, `wait_until_finished` and `close` (orbax synchronises
the processes inside them).
"""
from __future__ import annotations

import json
import logging
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from grain import checkpoint as grain_checkpoint

STATE_ITEM = "state"
DATA_ITERATOR_ITEM = "data_iterator"
CONFIG_ITEM = "config"
CONFIG_FILENAME = "config.json"

_MAX_LISTED_DIFFERENCES = 20

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Config as JSON.
# ---------------------------------------------------------------------------------------------


def _config_to_dict(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
    """A JSON-safe plain dict of a config (tuples become lists; unknown types their `str`)."""
    if isinstance(config, ml_collections.ConfigDict):
        config = config.to_dict()
    elif not isinstance(config, Mapping):
        raise TypeError(f"config must be an ml_collections.ConfigDict or a dict, got {type(config)}")

    def default(obj):
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
        return str(obj)

    return json.loads(json.dumps(dict(config), default=default))


def save_config(config: ml_collections.ConfigDict | Mapping[str, Any], workdir: str) -> None:
    """Writes `config` as human-readable JSON to `workdir/config.json` (process 0 only).

    The file is written to a temporary name and renamed, so an existing `config.json` (a resumed
    run's) is only ever replaced by a complete one, with a warning if it differs. Tuples come back
    as lists from `load_config`.
    """
    payload = json.dumps(_config_to_dict(config), indent=2, sort_keys=True)
    if jax.process_index() != 0:
        return
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / CONFIG_FILENAME
    if path.exists() and path.read_text().strip() != payload:
        log.warning("%s differs from the config of this run; replacing it", path)
    tmp = workdir / (CONFIG_FILENAME + ".tmp")
    tmp.write_text(payload + "\n")
    tmp.replace(path)


def load_config(workdir: str) -> ml_collections.ConfigDict | None:
    """Reads `workdir/config.json` back into a `ConfigDict`; None if the workdir has none."""
    path = epath.Path(workdir) / CONFIG_FILENAME
    if not path.exists():
        return None
    try:
        return ml_collections.ConfigDict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def with_init_sections(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with the sections `train.init_sections` names (e.g. ("model", "diffusion")) taken
    from the stored config of the workdir it warm-starts from (`train.init_from`), the fields the
    section sets in `config` (other than None) laid over them: a fine-tuning config states what it
    changes, not the imported model's architecture. `config` itself without `init_sections`.

    Raises ValueError (no init_from, no stored config, another stage).
    """
    names = tuple(config.get("train", {}).get("init_sections", ()) or ())
    if not names:
        return config
    source = config.train.get("init_from", "")
    if not source:
        raise ValueError(f"config.train.init_sections={names!r} takes those sections from the workdir "
                         "the run starts from: set config.train.init_from to it")
    stored = load_config(source)
    if stored is None or stored.get("stage") != config.get("stage"):
        what = "holds no config.json" if stored is None else f"holds a {stored.get('stage')!r} stage"
        raise ValueError(f"config.train.init_from={source} {what}; config.train.init_sections={names!r} "
                         f"needs a {config.get('stage')!r} workdir (trained or imported)")
    merged = config.to_dict()
    for name in names:
        ours = {k: v for k, v in (merged.get(name) or {}).items() if v is not None}
        merged[name] = {**stored.get(name, ml_collections.ConfigDict()).to_dict(), **ours}
    result = ml_collections.ConfigDict(merged)
    result.lock()
    return result


# ---------------------------------------------------------------------------------------------
# Data-iterator state, through grain's per-process checkpoint handler.
# ---------------------------------------------------------------------------------------------


class _IteratorStateSnapshot:
    """The state of an iterator taken when `save` is called (the loop keeps iterating meanwhile).

    Quacks like a grain `DataLoaderIterator` for grain's handler: `get_state()` returns bytes,
    which the handler writes verbatim. JSON-able states are stored as indented JSON (the same bytes
    grain writes for a `DatasetIterator`); bytes states (a grain `DataLoaderIterator`) as they are.
    """

    def __init__(self, iterator: Any):
        state = iterator.get_state()
        if isinstance(state, bytes):
            self._payload = state
        else:
            try:
                self._payload = json.dumps(state, indent=4).encode()
            except TypeError as e:
                raise TypeError(
                    f"data_iterator.get_state() must return bytes or a JSON-serialisable object, "
                    f"got {type(state)}: {e}") from e

    def get_state(self) -> bytes:
        return self._payload


class _IteratorStateSetter:
    """Passes the stored bytes to the real iterator's `set_state` in the form it expects."""

    def __init__(self, iterator: Any):
        self._iterator = iterator

    def set_state(self, payload: bytes) -> None:
        if isinstance(self._iterator.get_state(), bytes):
            self._iterator.set_state(payload)
        else:
            self._iterator.set_state(json.loads(payload))

    def start_prefetch(self) -> None:
        start = getattr(self._iterator, "start_prefetch", None)
        if start is not None:
            start()


# ---------------------------------------------------------------------------------------------
# Tree comparison for clear "incompatible checkpoint" errors.
# ---------------------------------------------------------------------------------------------


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """`{"params/encoder/kernel": shape}` in orbax's own key naming (empty nodes dropped).

    Works on the state pytree and on the checkpoint's metadata tree alike (where tuples, named
    tuples and dataclasses are stored as lists and dicts with the same keys).
    """
    flat = ocp.tree.to_flat_dict(tree, sep="/")
    return {k: tuple(getattr(v, "shape", np.shape(v))) for k, v in flat.items()}


def _tree_differences(checkpoint: Mapping[str, tuple], model: Mapping[str, tuple]) -> list[str]:
    lines = []
    for path in sorted(set(checkpoint) | set(model)):
        if path not in model:
            lines.append(f"{path}: in checkpoint {checkpoint[path]}, missing from model")
        elif path not in checkpoint:
            lines.append(f"{path}: missing from checkpoint, model {model[path]}")
        elif checkpoint[path] != model[path]:
            lines.append(f"{path}: checkpoint {checkpoint[path]} vs model {model[path]}")
    return lines


def _raise_if_different(differences: list[str], step_dir, what: str) -> None:
    """One ValueError listing (the first 20 of) every differing entry, if there is any."""
    if differences:
        shown = differences[:_MAX_LISTED_DIFFERENCES]
        more = len(differences) - len(shown)
        raise ValueError(
            f"checkpoint {step_dir} is incompatible with {what} ({len(differences)} differing "
            "entries):\n  " + "\n  ".join(shown) + (f"\n  ... and {more} more" if more else ""))


# ---------------------------------------------------------------------------------------------
# Partial restore: some entries of the state, the rest never read.
# ---------------------------------------------------------------------------------------------


def restore_entries(directory: str, abstract: Mapping[str, Any], *, step: int | None = None
                    ) -> tuple[dict[str, Any], int]:
    """Restores only the top-level state entries named in `abstract` (e.g. `{"ema_params": tree}`)
    of checkpoint `step` (default: the latest) in `directory`, as `(entries, step)`.

    An orbax partial restore: the other entries (the optimiser state, ...) are never read, so
    sampling loads one copy of the params, and a checkpoint written without optimiser state (an
    imported model) restores too. Leaves go to the `.sharding` of the abstract leaves. Raises
    FileNotFoundError (no such checkpoint) or ValueError (listing every differing entry).
    """
    options = ocp.CheckpointManagerOptions(create=False, read_only=True, save_interval_steps=0)
    manager = ocp.CheckpointManager(epath.Path(directory),
                                    item_handlers={STATE_ITEM: ocp.PyTreeCheckpointHandler()},
                                    options=options)
    try:
        steps = sorted(manager.all_steps())
        if not steps:
            raise FileNotFoundError(f"no checkpoint to restore in {directory}")
        step = steps[-1] if step is None else int(step)
        if step not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step} in {directory}; available steps: {steps}")
        metadata = manager.item_metadata(step)[STATE_ITEM]
        stored = _flat_shapes(getattr(metadata, "tree", metadata))
        wanted = _flat_shapes(dict(abstract))
        prefixes = tuple(f"{name}/" for name in abstract)
        differences = _tree_differences({k: v for k, v in stored.items() if k.startswith(prefixes)}, wanted)
        _raise_if_different(differences, epath.Path(directory) / str(step), "the model")
        restore_args = jax.tree.map(
            lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype),
            dict(abstract))
        restored = manager.restore(step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.PyTreeRestore(
            item=dict(abstract), restore_args=restore_args, partial_restore=True)}))
    finally:
        manager.close()
    return dict(restored[STATE_ITEM]), step


# ---------------------------------------------------------------------------------------------
# Checkpointer.
# ---------------------------------------------------------------------------------------------


class Checkpointer:
    """Saves and restores train states (plus data-iterator state and config) in `directory`.

    Args:
      directory: where the step sub-directories live (local path or any `etils.epath` URL such as
        `gs://...`). Created on the first save, not before.
      max_to_keep: number of most recent checkpoints kept (None keeps all).
      async_save: write arrays in a background thread; `save` returns once they are copied off
        the devices.
    """

    def __init__(self, directory: str, *, max_to_keep: int | None = 3, async_save: bool = True):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}")
        self.directory = epath.Path(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            create=False,  # Opening a directory to restore from must not create it.
            # With asynchronous directory creation, a save that fails in its blocking phase (e.g.
            # an unsupported leaf) leaves a thread waiting 300 s for a signal that never comes,
            # which holds the process open at exit (orbax 0.12.8).
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            item_handlers={
                STATE_ITEM: ocp.StandardCheckpointHandler(),
                DATA_ITERATOR_ITEM: grain_checkpoint.CheckpointHandler(),
                CONFIG_ITEM: ocp.JsonCheckpointHandler(),
            },
            options=options,
        )
        self._closed = False

    # -- queries -------------------------------------------------------------------------------

    def latest_step(self) -> int | None:
        """The newest saved step (an asynchronous save in flight counts), or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """All saved steps, ascending."""
        return sorted(self._manager.all_steps())

    def _step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)

    # -- save ----------------------------------------------------------------------------------

    def save(self, step: int, state: Any, *, data_iterator: Any = None,
             config: ml_collections.ConfigDict | Mapping[str, Any] | None = None,
             force: bool = False) -> bool:
        """Starts saving `state` (a pytree of arrays) as checkpoint `step`; returns whether it did.

        `data_iterator` (anything with `get_state()`) has its state captured now, per process.
        `config` is stored as JSON beside the state. Saving a step that already exists is a no-op;
        so is a step older than the latest one unless `force`. With `async_save` the arrays are
        written in the background: call `wait_until_finished` (or `close`) before relying on them.
        """
        self._check_open()
        step = int(step)
        if step in self._manager.all_steps():
            log.info("checkpoint for step %d already exists in %s; not saving again", step,
                     self.directory)
            return False
        latest = self.latest_step()
        if latest is not None and step < latest and not force:
            log.warning("not saving step %d: %s already holds the later step %d", step,
                        self.directory, latest)
            return False
        items = {STATE_ITEM: ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items[DATA_ITERATOR_ITEM] = grain_checkpoint.CheckpointSave(
                _IteratorStateSnapshot(data_iterator))
        if config is not None:
            items[CONFIG_ITEM] = ocp.args.JsonSave(_config_to_dict(config))
        return bool(self._manager.save(step, args=ocp.args.Composite(**items), force=force))

    # -- restore -------------------------------------------------------------------------------

    def restore(self, abstract_state: Any, *, step: int | None = None,
                data_iterator: Any = None) -> tuple[Any, int]:
        """Restores checkpoint `step` (default: the latest) as `(state, step)`.

        `abstract_state` is the model's state tree with `jax.ShapeDtypeStruct` (or array) leaves
        whose `.sharding` says where each restored array goes: a checkpoint written on one mesh
        restores onto any other. Dtypes are cast to the abstract ones. If `data_iterator` is given,
        its position is restored in place (`set_state`).
        """
        self._check_open()
        # Finish our own pending save, then re-list: another process may have written checkpoints.
        self._manager.wait_until_finished()
        self._manager.reload()
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint to restore in {self.directory}")
        if step is None:
            step = steps[-1]
        elif int(step) not in steps:
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; available steps: {steps}")
        step = int(step)
        self._check_compatible(abstract_state, step)

        items = {STATE_ITEM: ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            self._check_iterator_state(step)
            items[DATA_ITERATOR_ITEM] = grain_checkpoint.CheckpointRestore(
                _IteratorStateSetter(data_iterator))
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return restored[STATE_ITEM], step

    def read_config(self, step: int | None = None) -> ml_collections.ConfigDict | None:
        """The config stored with checkpoint `step` (default: the latest), or None if none was."""
        self._check_open()
        step = self.latest_step() if step is None else int(step)
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        self.wait_until_finished()
        path = self._step_dir(step) / CONFIG_ITEM
        if not path.exists():
            return None
        restored = self._manager.restore(step, args=ocp.args.Composite(
            **{CONFIG_ITEM: ocp.args.JsonRestore()}))
        return ml_collections.ConfigDict(restored[CONFIG_ITEM])

    def _check_compatible(self, abstract_state: Any, step: int) -> None:
        """Raises one ValueError listing every path whose structure or shape differs."""
        metadata = self._manager.item_metadata(step)[STATE_ITEM]
        if metadata is None:
            raise ValueError(f"checkpoint {self._step_dir(step)} has no '{STATE_ITEM}' item")
        stored = _flat_shapes(getattr(metadata, "tree", metadata))
        wanted = _flat_shapes(abstract_state)
        _raise_if_different(_tree_differences(stored, wanted), self._step_dir(step), "the model state")

    def _check_iterator_state(self, step: int) -> None:
        item_dir = self._step_dir(step) / DATA_ITERATOR_ITEM
        if not item_dir.exists():
            raise ValueError(
                f"checkpoint {self._step_dir(step)} holds no data-iterator state; "
                "restore with data_iterator=None to start the data from its beginning")
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if not (item_dir / name).exists():
            found = sorted(p.name for p in item_dir.iterdir() if p.name.startswith("process_"))
            raise ValueError(
                f"checkpoint {self._step_dir(step)} has no data-iterator state for this process "
                f"({name}); it holds {found}: it was written by a different number of processes")

    # -- lifetime ------------------------------------------------------------------------------

    def wait_until_finished(self) -> None:
        """Blocks until any asynchronous save has been committed (re-raises its error)."""
        if not self._closed:
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases orbax's resources; later calls are no-ops."""
        if not self._closed:
            self._manager.wait_until_finished()
            self._manager.close()
            self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"Checkpointer for {self.directory} is closed")

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
