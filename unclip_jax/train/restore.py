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
from flax import linen as nn
from jax.sharding import Mesh

from unclip_jax import parallel
from unclip_jax.tasks.base import Task
from unclip_jax.train import checkpointing
from unclip_jax.train import loop
from unclip_jax.train import state as state_lib

PARAM_KINDS = ("ema", "params")


class NotTrainedError(FileNotFoundError):
    """The workdir does not exist, or holds no config.json or no checkpoint."""


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
    workdir = os.path.abspath(os.path.expanduser(os.fspath(workdir)))
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
        task = loop.get_task(config, workdir)
        mesh = mesh if mesh is not None else parallel.mesh_from_config(config.mesh)
        rules = parallel.rules_from_config(config.mesh.rules)
        tx = state_lib.make_optimizer(config.train)
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            abstract = loop.abstract_train_state(task, tx, jax.random.key(0), mesh, rules)
        state, restored_step = ckpt.restore(abstract, step=step, data_iterator=None)
    params = state.ema_params if which == "ema" else state.params
    del state  # The other params and the optimizer state are freed here.
    return Trained(config=config, task=task, params=params, step=int(restored_step), mesh=mesh,
                   which=which)
