"""Importers of published checkpoints (Hugging Face CLIP, Karlo) into this project's modules."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Any

MAX_LISTED = 40  # Problems spelled out in one error message (the rest counted).


class ConversionError(ValueError):
    """A checkpoint does not fit this project's modules: `problems` lists every reason found."""

    def __init__(self, what: str, problems: list[str]):
        self.problems = list(problems)
        shown = self.problems[:MAX_LISTED]
        more = len(self.problems) - len(shown)
        super().__init__(
            f"cannot import {what} ({len(self.problems)} problem"
            f"{'s' if len(self.problems) != 1 else ''}):\n  " + "\n  ".join(shown)
            + (f"\n  ... and {more} more" if more else ""))


def nest(flat: dict[tuple[str, ...], Any]) -> dict[str, Any]:
    """{("a", "b"): x} -> {"a": {"b": x}}: a param tree from flat paths."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def write_imported(workdir: str, config, sizes: dict, params, *, what: str, tokenizer=None,
                   depends_on: dict | None = None) -> None:
    """Writes imported weights as a stage workdir into the existing directory `workdir`:
    config.json, stage.json and a step-0 checkpoint holding `params` (numpy) as both params and EMA
    params, no optimiser state. The tree is checked against the stage's module first; a
    difference (a converter bug, not the user's checkpoint) raises ConversionError(what, ...)."""
    import jax
    import numpy as np

    from unclip_jax import parallel
    from unclip_jax.stages import load
    from unclip_jax.train import checkpointing

    checkpointing.save_config(config, workdir)
    load.write_record(workdir, config.stage, sizes, depends_on or {})
    stage = load.build_stage(config, sizes, tokenizer)
    mesh = parallel.mesh_from_config(config.mesh)
    abstract = load.abstract_params(stage, mesh, parallel.rules_from_config(config.mesh.rules))
    differences = checkpointing._tree_differences(checkpointing._flat_shapes(params),
                                                  checkpointing._flat_shapes(abstract))
    if differences:
        raise ConversionError(what, [f"converted params vs the {config.stage} module: {d}"
                                     for d in differences])
    params = jax.tree.map(lambda a, x: jax.device_put(np.asarray(x, a.dtype), a.sharding), abstract, params)
    state = {"step": np.zeros((), np.int32), "params": params, "ema_params": params}
    with checkpointing.Checkpointer(f"{workdir}/checkpoints", max_to_keep=None, async_save=False) as ckpt:
        ckpt.save(0, state, config=config)


@contextlib.contextmanager
def new_directory(path: str):
    """Yields a temporary sibling of `path` that is renamed to `path` when the block completes
    and removed if it fails: an import is whole or absent. `path` must not exist or be empty."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise FileExistsError(f"{path} already exists and is not empty: pick another directory "
                              "(an import never overwrites anything)")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.importing-", dir=parent)
    try:
        yield tmp
        if os.path.isdir(path):
            os.rmdir(path)  # Empty (checked above).
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
