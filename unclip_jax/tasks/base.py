"""The contract between the generic training loop and a trainable stage."""
from __future__ import annotations

from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from unclip_jax.data import input_pipeline


class Task:
    """One trainable stage: its data and its evaluation around `self.stage` (unclip_jax/stages/),
    which holds the model, the loss and the samplers.

    The loop knows nothing else about a stage. Methods that run under `jax.jit` are pure functions of
    their arguments; the others run on the host. Subclasses set `self.stage` and implement
    `train_pipeline` and `batch_spec`, and usually `evaluate`.
    """

    stage: Any

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        self.config = config
        self.workdir = workdir

    def init_params(self, rng: jax.Array) -> Any:
        """Returns the model params (boxed with logical axis names). Runs under eval_shape and jit."""
        return self.stage.init_params(rng)

    def loss_fn(self, params: Any, batch: Mapping[str, jax.Array], rng: jax.Array,
                step: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Scalar training loss and a dict of scalar metrics for one (micro-)batch. Runs under jit."""
        del step
        return self.stage.loss(params, batch, rng)

    def describe(self) -> dict[str, Any]:
        """What the workdir records to rebuild the stage without this task (`stages.load`): the
        sizes beyond the config, and the paths the stage depends on. A task without a stage
        (`init_params` and `loss_fn` of its own) records nothing to rebuild."""
        stage = getattr(self, "stage", None)
        return {"sizes": dict(stage.sizes) if stage is not None else {}, "depends_on": {}}

    def train_pipeline(self, *, local_batch_size: int, process_index: int,
                       process_count: int) -> input_pipeline.Pipeline:
        """This process's stream of training batches (numpy dicts), with get_state/set_state."""
        raise NotImplementedError

    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes and dtypes of a training batch of `batch_size` rows (what `train_pipeline` yields):
        the train step compiles ahead of time against these, with no data behind them."""
        raise NotImplementedError(f"{type(self).__name__} does not describe its batches "
                                  "(batch_spec), so it cannot be compiled ahead of time")

    def evaluate(self, params: Any, mesh: Mesh) -> dict[str, float]:
        """Evaluation metrics for `params` (the EMA params unless the config says otherwise)."""
        return {}

    def sample_images(self, params: Any, mesh: Mesh) -> dict[str, np.ndarray]:
        """Optional image grids to write to the workdir ({name: uint8 [N, H, W, 3]})."""
        return {}
