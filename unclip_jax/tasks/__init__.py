"""Trainable stages: each module holds one `Task` (data, loss, evaluation) for the training loop."""
from __future__ import annotations

import ml_collections

from unclip_jax.tasks.base import Task


def _registry() -> dict[str, type[Task]]:
    # Imported on use: each stage pulls in its models and data code.
    from unclip_jax.tasks.clip import ClipTask
    from unclip_jax.tasks.decoder import DecoderTask
    from unclip_jax.tasks.prior import PriorTask
    from unclip_jax.tasks.upsampler import UpsamplerTask

    return {"clip": ClipTask, "prior": PriorTask, "decoder": DecoderTask, "upsampler": UpsamplerTask}


def get_task(config: ml_collections.ConfigDict, workdir: str) -> Task:
    """The task of `config.stage` ("clip", "prior", "decoder" or "upsampler"), built for `workdir`."""
    registry = _registry()
    if config.stage not in registry:
        raise ValueError(f"config.stage={config.stage!r}: expected one of {', '.join(registry)}")
    return registry[config.stage](config, workdir)
