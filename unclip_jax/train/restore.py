"""Warm starts: a fresh train state with the params of another trained (or imported) workdir."""
from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from unclip_jax import parallel
from unclip_jax.stages import load
from unclip_jax.train import checkpointing
from unclip_jax.train import state as state_lib


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
    source lacks (new modules) stay as initialised; the source's optimizer state is never read.
    Returns (state, the newly initialised paths). Raises load.NotTrainedError / ValueError.
    """
    config, stage = load.stage_from_workdir(source_workdir)
    rules = parallel.rules_from_config(config.mesh.rules)
    source, step = load.restore_params(source_workdir, stage, mesh, rules, which=("params", "ema"))
    what = f"{source_workdir} (step {step})"
    params, new = merge_params(state.params, source["params"], what=what)
    ema, _ = merge_params(state.ema_params, source["ema"], what=what)
    return state.replace(params=params, ema_params=ema), new
