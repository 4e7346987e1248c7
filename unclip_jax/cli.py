"""What every command-line entry (train.py, embed.py, ...) does first."""
from __future__ import annotations

import logging as std_logging

from absl import flags, logging

DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False,
    "Call jax.distributed.initialize() first (multi-host: Cloud TPU, Slurm, Kubernetes; the "
    "cluster is detected from the environment).")
COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0, for clusters JAX does not detect (implies --distributed; also "
    "$JAX_COORDINATOR_ADDRESS).")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job (with --coordinator_address).")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1 "
                                  "(with --coordinator_address).")


XLA_CPU_CONVOLUTIONS = flags.DEFINE_enum(
    "xla_cpu_convolutions", "auto", ["auto", "eigen", "xla_default"],
    "Convolution kernels of XLA's CPU backend (no effect on GPUs and TPUs): eigen (faster for the "
    "UNets on the CPUs measured), xla_default (YNNPACK), auto (eigen on a jaxlib known to have "
    "the option). See unclip_jax/cpu.py.")


class UsageError(ValueError):
    """Bad command-line input (a flag, a file, a mismatched resume): reported as one line, without
    a traceback."""


def read_lines(path: str, flag: str, what: str) -> list[str]:
    """The non-blank lines (stripped) of the text file `path` given by `flag`: one `what` per line;
    UsageError when the file is missing or holds none."""
    import os

    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path} does not exist")
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    if not lines:
        raise UsageError(f"{flag} {path} holds no {what} (one per line expected)")
    return lines


class _QuietLibraries(std_logging.Filter):
    """Drops INFO chatter of orbax, TFDS and grain (warnings and errors still show)."""

    def filter(self, record):
        noisy = ("orbax", "tensorflow_datasets", "grain")
        return record.levelno >= std_logging.WARNING or not any(n in record.pathname for n in noisy)


def start() -> None:
    """Sets the CPU backend's options, quiets library logging and, with --distributed, joins the
    multi-host job. Call before anything uses a device."""
    from unclip_jax import cpu

    cpu.apply_xla_flags(XLA_CPU_CONVOLUTIONS.value)
    logging.get_absl_handler().addFilter(_QuietLibraries())
    if DISTRIBUTED.value or COORDINATOR_ADDRESS.value:
        import jax

        jax.distributed.initialize(coordinator_address=COORDINATOR_ADDRESS.value,
                                   num_processes=NUM_PROCESSES.value, process_id=PROCESS_ID.value)
