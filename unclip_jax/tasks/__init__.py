"""Trainable stages: each module holds one `Task` (data and evaluation around a stage) for the loop."""
from __future__ import annotations

from typing import Any, Mapping

import ml_collections

from unclip_jax.tasks.ar_prior import ARPriorTask
from unclip_jax.tasks.base import Task
from unclip_jax.tasks.clip import ClipTask
from unclip_jax.tasks.decoder import DecoderTask
from unclip_jax.tasks.prior import PriorTask
from unclip_jax.tasks.upsampler import UpsamplerTask

TASKS: dict[str, type[Task]] = {"clip": ClipTask, "prior": PriorTask, "decoder": DecoderTask,
                                "upsampler": UpsamplerTask, "ar_prior": ARPriorTask}


def get_task(config: ml_collections.ConfigDict, workdir: str, *,
             sizes: Mapping[str, Any] | None = None) -> Task:
    """The task of `config.stage` ("clip", "prior", "decoder", "upsampler" or
    "ar_prior"), built for `workdir`.

    `sizes` (see `stages.load`) builds it without the files it would read them from (a tokenizer,
    a CLIP's embedding cache): for ahead-of-time compiles; such a task cannot train.
    """
    if config.stage not in TASKS:
        raise ValueError(f"config.stage={config.stage!r}: expected one of {', '.join(TASKS)}")
    return TASKS[config.stage](config, workdir, sizes)
