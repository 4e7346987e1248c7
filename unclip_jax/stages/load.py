"""Rebuilds a trained stage from its workdir and restores only the params asked for.

    clip = load.load_stage("runs/shapes_clip")      # EMA params of the latest step
    z_i = clip.stage.embed(clip.params, clip.mesh, images=images, batch_size=64)

A workdir describes itself: `config.json` (the run's config) and `stage.json`, written when
training starts, with the sizes the model was built with beyond the config (the CLIP's, for the
prior and decoder; the tokenizer's, for a CLIP) and the paths it depends on (its tokenizer, the
CLIP it was trained on, the AR prior's PCA codebook), relative to the workdir when they are inside
the same tree. Loading builds the stage from these, takes the params' shapes and shardings from
`jax.eval_shape`, and restores only those params from the checkpoint (an orbax partial restore): no
optimiser, no training data, no embedding cache, no tokenizer training.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax
import ml_collections
from etils import epath
from flax import linen as nn
from jax.sharding import Mesh

from unclip_jax import parallel, paths
from unclip_jax.stages.ar_prior import CODEBOOK_FILENAME, ARPriorStage
from unclip_jax.stages.clip import ClipStage
from unclip_jax.stages.decoder import DecoderStage
from unclip_jax.stages.prior import PriorStage
from unclip_jax.stages.upsampler import UpsamplerStage
from unclip_jax.train import checkpointing

RECORD_FILENAME = "stage.json"
PARAM_KINDS = {"ema": "ema_params", "params": "params"}
STAGES = {"clip": ClipStage, "prior": PriorStage, "decoder": DecoderStage, "upsampler": UpsamplerStage,
          "ar_prior": ARPriorStage}


class NotTrainedError(FileNotFoundError):
    """The workdir does not exist, or holds no config.json or no checkpoint."""


# ---------------------------------------------------------------------------------------------
# The workdir's record of its model.
# ---------------------------------------------------------------------------------------------
def _relative(path: str, workdir: str) -> str:
    """`path` relative to `workdir` when both are local, else as it is (absolute or a URL)."""
    path = paths.resolve(path)
    if "://" in path or "://" in workdir:
        return path
    return os.path.relpath(path, workdir)


def _from_record(value: str, workdir: str) -> str:
    """A recorded path back to a usable one (relative ones are relative to the workdir)."""
    if "://" in value or os.path.isabs(value):
        return value
    return os.path.normpath(os.path.join(workdir, value))


def write_record(workdir: str, stage: str, sizes: Mapping[str, Any], depends_on: Mapping[str, str]) -> None:
    """Writes `<workdir>/stage.json` (process 0; atomically): the stage, its sizes and the paths
    it depends on ({"tokenizer": dir} or {"clip_workdir": dir}), relative to the workdir if local."""
    if jax.process_index() != 0:
        return
    workdir = paths.resolve(workdir)
    record = {"stage": stage, "sizes": dict(sizes),
              "depends_on": {k: _relative(v, workdir) for k, v in depends_on.items()}}
    path = epath.Path(workdir) / RECORD_FILENAME
    tmp = epath.Path(workdir) / (RECORD_FILENAME + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def read_record(workdir: str) -> dict[str, Any]:
    """The workdir's `stage.json`, with its paths made usable (see `write_record`)."""
    workdir = paths.resolve(workdir)
    path = epath.Path(workdir) / RECORD_FILENAME
    if not path.exists():
        raise NotTrainedError(
            f"workdir {workdir} has no {RECORD_FILENAME} (the sizes its model was built with): "
            "run its train.py command once more (it resumes, writes the file and only re-evaluates "
            "when training is done)")
    record = json.loads(path.read_text())
    record["depends_on"] = {k: _from_record(v, workdir) for k, v in record.get("depends_on", {}).items()}
    return record


def _train_hint(workdir: str, config: ml_collections.ConfigDict | None) -> str:
    stage = f":{config.stage}" if config is not None and "stage" in config else ""
    return f"train it first with python train.py --config <config file>{stage} --workdir {workdir}"


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The config of the run in `workdir`; NotTrainedError if the workdir or its config.json is missing."""
    workdir = paths.resolve(workdir)
    if not epath.Path(workdir).is_dir():
        raise NotTrainedError(f"workdir {workdir} does not exist: {_train_hint(workdir, None)}")
    config = checkpointing.load_config(workdir)
    if config is None:
        raise NotTrainedError(f"workdir {workdir} has no {checkpointing.CONFIG_FILENAME}: is it a "
                              f"train.py workdir? If not, {_train_hint(workdir, None)}")
    return config


# ---------------------------------------------------------------------------------------------
# Stages and their params.
# ---------------------------------------------------------------------------------------------
def build_stage(config: ml_collections.ConfigDict, sizes: Mapping[str, Any], tokenizer=None):
    """The stage `config.stage` names, built from the config and explicit `sizes`."""
    if config.stage not in STAGES:
        raise ValueError(f"config.stage={config.stage!r}: expected one of {', '.join(STAGES)}")
    if config.stage == "clip":
        return ClipStage(config, tokenizer=tokenizer, **sizes)
    return STAGES[config.stage](config, **sizes)


def stage_from_workdir(workdir: str):
    """(config, stage) of the run in `workdir`, from its config.json and stage.json (a CLIP with
    its tokenizer). Nothing is restored or trained."""
    config = read_config(workdir)
    record = read_record(workdir)
    tokenizer = None
    if config.stage == "clip":
        from unclip_jax.data import tokenizer as tokenizer_lib

        tok_dir = record["depends_on"]["tokenizer"]
        try:
            tokenizer = tokenizer_lib.Tokenizer.from_dir(tok_dir, context_length=record["sizes"]["context_length"])
        except (FileNotFoundError, OSError) as e:
            raise NotTrainedError(f"workdir {paths.resolve(workdir)}: its tokenizer ({tok_dir}) cannot be "
                                  f"read: {e}") from e
    sizes = record["sizes"]
    if config.stage == "ar_prior":
        sizes = {**sizes, "codebook_path": _codebook_path(workdir, record)}
    return config, build_stage(config, sizes, tokenizer)


def _codebook_path(workdir: str, record: Mapping[str, Any]) -> str:
    """The AR prior's PCA codebook: `depends_on["codebook"]` (relative to the workdir when it is
    inside it). Records written before the codebook was a dependency hold an absolute
    `sizes["codebook_path"]`; where that file is gone (the workdir moved), the workdir's own
    `ar_codes.npz` is used."""
    path = record["depends_on"].get("codebook") or record["sizes"].get("codebook_path", "")
    own = os.path.join(paths.resolve(workdir), CODEBOOK_FILENAME)
    for candidate in (path, own):
        if candidate and epath.Path(candidate).exists():
            return candidate
    raise NotTrainedError(f"workdir {paths.resolve(workdir)}: the AR prior's PCA codebook "
                          f"({path or own}) is missing; it is written when training starts")


def abstract_params(stage, mesh: Mesh, rules) -> Any:
    """The stage's unboxed params as `ShapeDtypeStruct`s sharded by `rules` on `mesh` (nothing allocated)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(stage.init_params, jax.random.key(0))
        shardings = parallel.logical_shardings(boxed, mesh, rules)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        parallel.unbox(boxed), shardings)


def restore_params(workdir: str, stage, mesh: Mesh, rules, *, which=("ema",), step: int | None = None
                   ) -> tuple[dict[str, Any], int]:
    """{kind: params} for each kind in `which` ("ema", "params") of `workdir`'s checkpoint `step`
    (default: the latest), restored straight onto their shardings; returns (that dict, step)."""
    for kind in which:
        if kind not in PARAM_KINDS:
            raise ValueError(f"which={kind!r}: expected one of {tuple(PARAM_KINDS)}")
    workdir = paths.resolve(workdir)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not epath.Path(ckpt_dir).is_dir():
        raise NotTrainedError(f"workdir {workdir} has no checkpoint: {_train_hint(workdir, stage.config)}")
    abstract = abstract_params(stage, mesh, rules)
    try:
        entries, step = checkpointing.restore_entries(
            ckpt_dir, {PARAM_KINDS[k]: abstract for k in which}, step=step)
    except FileNotFoundError as e:
        if step is not None:
            raise
        raise NotTrainedError(f"workdir {workdir} has no checkpoint: {_train_hint(workdir, stage.config)}") from e
    return {k: entries[PARAM_KINDS[k]] for k in which}, int(step)


@dataclasses.dataclass
class Loaded:
    """A trained stage: the run's config, its stage, the chosen params (sharded on `mesh`), the step."""

    config: ml_collections.ConfigDict
    stage: Any
    params: Any
    step: int
    mesh: Mesh
    which: str = "ema"
    workdir: str = ""

    @property
    def rules(self) -> tuple:
        """The run's logical-axis rules (trace model calls under these and `jax.set_mesh(mesh)`)."""
        return parallel.rules_from_config(self.config.mesh.rules)

    @property
    def depends_on(self) -> dict[str, str]:
        """The paths the workdir records (its tokenizer, the CLIP it was trained on)."""
        return read_record(self.workdir)["depends_on"] if self.workdir else {}


def load_params(workdir: str, which: str = "ema", *, step: int | None = None, mesh: Mesh | None = None) -> Any:
    """The `which` params ("ema" or "params") of the stage trained in `workdir` (see `load_stage`)."""
    return load_stage(workdir, which, step=step, mesh=mesh).params


def load_stage(workdir: str, which: str = "ema", *, step: int | None = None,
               mesh: Mesh | None = None) -> Loaded:
    """Rebuilds the stage trained in `workdir` and restores its `which` params only.

    Args:
      workdir: a `train.py` workdir (config.json, stage.json, checkpoints/) or an imported CLIP.
      which: "ema" (the EMA params, what evaluation and sampling use) or "params" (the raw ones).
      step: the checkpoint step (default: the latest).
      mesh: where the params go (default: the mesh the stored config describes).

    Raises:
      NotTrainedError: the workdir, its config.json, stage.json, tokenizer or checkpoint is missing.
      ValueError: `which` is unknown, or the checkpoint does not fit the stored config (every
        differing entry listed).
    """
    if which not in PARAM_KINDS:
        raise ValueError(f"which={which!r}: expected one of {tuple(PARAM_KINDS)}")
    workdir = paths.resolve(workdir)
    config = read_config(workdir)
    ckpt_dir = epath.Path(workdir) / "checkpoints"
    if not ckpt_dir.is_dir() or not any(p.name.isdigit() for p in ckpt_dir.iterdir()):
        raise NotTrainedError(f"workdir {workdir} has no checkpoint: {_train_hint(workdir, config)}")
    config, stage = stage_from_workdir(workdir)
    mesh = mesh if mesh is not None else parallel.mesh_from_config(config.mesh)
    rules = parallel.rules_from_config(config.mesh.rules)
    params, step = restore_params(workdir, stage, mesh, rules, which=(which,), step=step)
    return Loaded(config=config, stage=stage, params=params[which], step=step, mesh=mesh, which=which,
                  workdir=workdir)
