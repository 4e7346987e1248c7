"""What every command-line entry (train.py, embed.py, ...) does first."""
from __future__ import annotations

import logging as std_logging

from absl import flags, logging

DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False,
    "Call jax.distributed.initialize() first (multi-host: Cloud TPU, Slurm, Kubernetes).")


class _QuietLibraries(std_logging.Filter):
    """Drops INFO chatter of orbax, TFDS and grain (warnings and errors still show)."""

    def filter(self, record):
        noisy = ("orbax", "tensorflow_datasets", "grain")
        return record.levelno >= std_logging.WARNING or not any(n in record.pathname for n in noisy)


def start() -> None:
    """Quiets library logging and, with --distributed, joins the multi-host job (before any device use)."""
    logging.get_absl_handler().addFilter(_QuietLibraries())
    if DISTRIBUTED.value:
        import jax

        jax.distributed.initialize()
