"""Loads a trained stage back from its workdir: config, task (model + tokenizer) and params.

    trained = restore.load_trained("runs/shapes_clip")          # EMA params of the latest step
    z_i = trained.task.embed(trained.params, trained.mesh, images=images)

The state is never initialised: its shapes and shardings come from `jax.eval_shape`, and the
checkpoint is restored straight onto them (any mesh; see `Checkpointer.restore`).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import linen as nn
from jax.sharding import Mesh

from unclip_jax import parallel, paths, tasks
from unclip_jax.stages import load as load_lib
from unclip_jax.tasks.base import Task
from unclip_jax.train import checkpointing
from unclip_jax.train import state as state_lib

PARAM_KINDS = ("ema", "params")


NotTrainedError = load_lib.NotTrainedError


@dataclasses.dataclass
class Trained:
    """A trained stage: the run's config, its task, the chosen params (sharded on `mesh`), the step."""

    config: ml_collections.ConfigDict
    task: Task
    params: Any
    step: int
    mesh: Mesh
    which: str = "ema"

    @property
    def rules(self) -> tuple:
        """The run's logical-axis rules (trace model calls under these and `jax.set_mesh(mesh)`)."""
        return parallel.rules_from_config(self.config.mesh.rules)


def _train_hint(workdir: str, config: ml_collections.ConfigDict | None) -> str:
    stage = f":{config.stage}" if config is not None and "stage" in config else ""
    return (f"train it first with python train.py --config <config file>{stage} "
            f"--workdir {workdir}")


def load_trained(workdir: str, *, which: str = "ema", step: int | None = None,
                 mesh: Mesh | None = None) -> Trained:
    """Restores the stage trained in `workdir`.

    Args:
      workdir: a `train.py` workdir (holds config.json and checkpoints/).
      which: "ema" (the EMA params, what evaluation and sampling use) or "params" (the raw ones).
      step: the checkpoint step (default: the latest).
      mesh: where the params go (default: the mesh the stored config describes).

    Returns:
      `Trained(config, task, params, step, mesh)`; `params` is the unboxed param tree of
      `jax.Array`s sharded by the run's logical-axis rules.

    Raises:
      NotTrainedError: the workdir, its config.json or its checkpoints are missing.
      ValueError: `which` is unknown, or the checkpoint does not fit the stored config (the
        checkpointer's message, listing every differing entry).
    """
    if which not in PARAM_KINDS:
        raise ValueError(f"which={which!r}: expected one of {PARAM_KINDS}")
    config, task, state, restored_step, mesh = _load_state(workdir, step, mesh)
    params = state.ema_params if which == "ema" else state.params
    del state  # The other params and the optimizer state are freed here.
    return Trained(config=config, task=task, params=params, step=restored_step, mesh=mesh,
                   which=which)


def _load_state(workdir: str, step: int | None, mesh: Mesh | None):
    """(config, task, full train state, step, mesh) of the run in `workdir` (see `load_trained`)."""
    workdir = paths.resolve(workdir)
    if not os.path.isdir(workdir):
        raise NotTrainedError(f"workdir {workdir} does not exist: {_train_hint(workdir, None)}")
    config = checkpointing.load_config(workdir)
    if config is None:
        raise NotTrainedError(
            f"workdir {workdir} has no {checkpointing.CONFIG_FILENAME}: is it a train.py workdir? "
            f"If not, {_train_hint(workdir, None)}")
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise NotTrainedError(f"workdir {workdir} has no checkpoint: {_train_hint(workdir, config)}")

    with checkpointing.Checkpointer(ckpt_dir, max_to_keep=None, async_save=False) as ckpt:
        # Checked before the task is built: building it may write into the workdir (a tokenizer).
        if ckpt.latest_step() is None:
            raise NotTrainedError(
                f"workdir {workdir} has no checkpoint: {_train_hint(workdir, config)}")
        task = tasks.get_task(config, workdir)
        mesh = mesh if mesh is not None else parallel.mesh_from_config(config.mesh)
        rules = parallel.rules_from_config(config.mesh.rules)
        tx = state_lib.make_optimizer(config.train)
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            abstract = state_lib.abstract_train_state(task, tx, jax.random.key(0), mesh, rules)
        state, restored_step = ckpt.restore(abstract, step=step, data_iterator=None)
    return config, task, state, int(restored_step), mesh


def merge_params(target: Any, source: Any, *, what: str = "source") -> tuple[Any, list[str]]:
    """`target`'s tree with every leaf that `source` has at the same path taken from it.

    Returns (merged tree, the target paths `source` lacks: they keep their values). Leaves go to
    the target leaf's sharding (and dtype).

    Raises:
      ValueError: a shared path has different shapes, or `source` has paths `target` lacks (the
        new model would silently drop trained weights), listing them all (as a restore does).
    """
    have, want = checkpointing._flat_shapes(source), checkpointing._flat_shapes(target)
    differences = checkpointing._tree_differences(have, {k: v for k, v in want.items() if k in have})
    if differences:
        raise ValueError(f"cannot warm-start from {what}: the params differ in {len(differences)} "
                         "entries:\n  " + "\n  ".join(differences))
    flat, stored = ocp.tree.to_flat_dict(target, sep="/"), ocp.tree.to_flat_dict(source, sep="/")
    merged = {k: (jax.device_put(jax.numpy.asarray(stored[k], v.dtype), v.sharding)
                  if k in stored else v) for k, v in flat.items()}
    return ocp.tree.from_flat_dict(merged, target=target, sep="/"), sorted(set(want) - set(have))


def warm_start(state: state_lib.TrainState, source_workdir: str, mesh: Mesh) -> tuple[
        state_lib.TrainState, list[str]]:
    """A fresh train state with the params and EMA params of `source_workdir`'s latest checkpoint.

    For fine-tuning (`config.train.init_from`): the step, the optimizer state and the params the
    source lacks (new modules) stay as initialised. Returns (state, the newly initialised paths).
    Raises NotTrainedError / ValueError as `load_trained` and `merge_params` do.
    """
    _, _, source, step, _ = _load_state(source_workdir, None, mesh)
    what = f"{source_workdir} (step {step})"
    params, new = merge_params(state.params, source.params, what=what)
    ema, _ = merge_params(state.ema_params, source.ema_params, what=what)
    return state.replace(params=params, ema_params=ema), new
