"""Speed settings for XLA's CPU backend, chosen from what the CPU has.

Neither changes results beyond float rounding, and neither touches GPUs or TPUs:

- Convolutions (`xla_flags`): XLA's CPU backend hands convolutions, dots and reductions to the
  YNNPACK library by default; `--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce`
  keeps YNNPACK for dots and reductions and runs convolutions with Eigen's kernels, which are
  faster at every size the UNets use. The command-line entries apply it (`--xla_cpu_convolutions`)
  before JAX starts; it only affects the CPU backend.
- Projection operands (`matmul_dtype`): a config's `model.matmul_dtype = "auto"` multiplies the
  transformers' projections with bfloat16 operands and float32 accumulation (`layers.matmul`) when
  the backend is the CPU and the CPU has bfloat16 matrix instructions (AMX or AVX512-BF16), and in
  the model's own dtype otherwise (GPUs and TPUs pick their own precision for a float32 dot).

Measurements on both CPU kinds: benchmarks/README.md.
"""
from __future__ import annotations

import functools
import os
from importlib import metadata

YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
YNN_FUSION_TYPES = "individual_dot,reduce"
# jaxlib versions whose XLA knows the option (XLA aborts on an unknown flag in XLA_FLAGS).
_TESTED_JAXLIB = ("0.10.",)
CONVOLUTIONS = ("auto", "eigen", "xla_default")
BF16_MATMUL_FEATURES = ("amx_bf16", "avx512_bf16")


@functools.lru_cache(maxsize=None)
def cpu_features() -> frozenset[str]:
    """The CPU's feature flags (/proc/cpuinfo on Linux; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def xla_flags(flags: str, jaxlib_version: str, convolutions: str = "auto") -> str:
    """`flags` (an XLA_FLAGS value) with the convolution choice applied.

    "eigen" adds the YNNPACK fusion option (unless the flags set it already); "xla_default" leaves
    the flags as they are; "auto" is "eigen" on a jaxlib known to have the option, else
    "xla_default".
    """
    if convolutions not in CONVOLUTIONS:
        raise ValueError(f"--xla_cpu_convolutions={convolutions!r}: expected one of {CONVOLUTIONS}")
    if convolutions == "auto":
        convolutions = "eigen" if jaxlib_version.startswith(_TESTED_JAXLIB) else "xla_default"
    if convolutions == "xla_default" or YNN_FUSION_FLAG in flags:
        return flags
    return f"{flags} {YNN_FUSION_FLAG}={YNN_FUSION_TYPES}".strip()


def apply_xla_flags(convolutions: str = "auto") -> None:
    """Sets XLA_FLAGS for `convolutions` (see `xla_flags`); call before JAX starts a backend."""
    try:
        version = metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        version = ""
    os.environ["XLA_FLAGS"] = xla_flags(os.environ.get("XLA_FLAGS", ""), version, convolutions)


def matmul_dtype(value: str | None) -> str | None:
    """A config's `matmul_dtype` resolved: "auto" -> "bfloat16" on a CPU backend with bfloat16
    matrix instructions, else None (the model's dtype); "" -> None; anything else as it is."""
    if value != "auto":
        return value or None
    import jax

    if jax.default_backend() == "cpu" and cpu_features() & set(BF16_MATMUL_FEATURES):
        return "bfloat16"
    return None
