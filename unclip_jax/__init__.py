"""unclip-jax: unCLIP (DALL-E 2) in JAX/Flax.

Importing the package sets one XLA option for the CPU backend (see `cpu_xla_flags`): it must be in
XLA_FLAGS before JAX starts its first backend, so it happens here, before any entry point
touches a device.
"""
from __future__ import annotations

import os
from importlib import metadata

# XLA's CPU backend hands convolutions, dots and reductions to the YNNPACK library by default.
# Its convolutions are the slow part here: with Eigen's instead (YNNPACK kept for dots and
# reductions), the shapes decoder trains 46 instead of 30 images/s and the upsampler 51 instead
# of 35 on the 2-core CPU; the transformers (no convolutions) keep their speed (benchmarks/README.md).
YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
YNN_FUSION_TYPES = "individual_dot,reduce"
# jaxlib versions whose XLA knows the option (XLA aborts on an unknown flag in XLA_FLAGS).
_TESTED_JAXLIB = ("0.10.",)


def cpu_xla_flags(flags: str, jaxlib_version: str) -> str:
    """XLA_FLAGS with the YNNPACK fusion option added, unless the flags already set it, the jaxlib
    is not one known to have it, or UNCLIP_JAX_KEEP_XLA_FLAGS=1."""
    if (YNN_FUSION_FLAG in flags or os.environ.get("UNCLIP_JAX_KEEP_XLA_FLAGS") == "1"
            or not jaxlib_version.startswith(_TESTED_JAXLIB)):
        return flags
    return f"{flags} {YNN_FUSION_FLAG}={YNN_FUSION_TYPES}".strip()


def _set_cpu_xla_flags() -> None:
    try:
        version = metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        return
    os.environ["XLA_FLAGS"] = cpu_xla_flags(os.environ.get("XLA_FLAGS", ""), version)


_set_cpu_xla_flags()
