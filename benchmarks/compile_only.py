"""Compiles a stage's real train step for a target topology without the hardware; prints JSON.

  python benchmarks/compile_only.py --config configs/paper.py:decoder,v5p256 --topology v5p-256
  python benchmarks/compile_only.py --config configs/paper.py:decoder,gpu8 --topology cpu:8 --hbm_gib 80

`--topology`:
  v5p-N / v4-N   TPU slices named by TensorCores (v5p-256 = 128 chips, 4x4x8), compiled by libtpu's
                 XLA from this CPU host (`pip install -e ".[tpu]"`; libtpu's warnings about
                 TPU_ACCELERATOR_TYPE and worker hostnames are harmless here).
  v5e-N / v6e-N  TPU v5e / Trillium slices of N chips (v5e-256 = 16x16).
  cpu:N          N fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N): the
                 fallback for a target that cannot be compiled here (GPUs); XLA:CPU's memory
                 figures are then an ESTIMATE of another backend's.
The state, batch and step are those of the loop (`unclip_jax.train.aot`); nothing is allocated.
Prints: parameters, mesh, per-device bytes of the state (params, EMA, optimiser), XLA's argument /
output / temporary bytes and the peak, whether it fits the chip's HBM, compile seconds, and the
model TFLOPs per step (analytic, `unclip_jax.flops`) beside XLA's own count.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cpu_devices_from_argv() -> int:
    for i, arg in enumerate(sys.argv):
        value = arg.split("=", 1)[1] if arg.startswith("--topology=") else (
            sys.argv[i + 1] if arg == "--topology" and i + 1 < len(sys.argv) else None)
        if value and value.startswith("cpu:"):
            return int(value.split(":", 1)[1])
    return 0


# Fake CPU devices must be requested before JAX starts its backend. A TPU target is compiled
# through a topology description; the host itself stays on the CPU backend (no TPU attached).
if _cpu_devices_from_argv():
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={_cpu_devices_from_argv()}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from unclip_jax.train import aot  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Stage config, e.g. configs/paper.py:decoder,v5p256",
                                lock_config=True)
flags.DEFINE_string("topology", "v5p-256", "v5p-N, v4-N (TensorCores), v5e-N, v6e-N (chips) or cpu:N.")
flags.DEFINE_float("hbm_gib", 0.0, "Memory per device to fit in, GiB (0: the TPU chip's own; "
                   "for cpu:N, say which accelerator the estimate is for, e.g. 80).")
flags.DEFINE_string("out", "", "Also write the JSON to this file.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS

# HBM per chip, GiB (vendor figures).
HBM_GIB = {"v4": 32.0, "v5p": 95.0, "v5e": 16.0, "v6e": 32.0}
# Chips per 3D torus shape for the TensorCore-named generations (2 TensorCores a chip).
_TORUS = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
          256: "4x8x8", 512: "8x8x8", 1024: "8x8x16"}
_GRID = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}


def topology_devices(name: str):
    """(devices, generation) for a topology name; TPU names go through libtpu's compiler."""
    if name.startswith("cpu:"):
        n = int(name.split(":", 1)[1])
        if len(jax.devices()) < n:
            raise ValueError(f"--topology {name}: only {len(jax.devices())} CPU devices")
        return jax.devices()[:n], "cpu"
    try:
        generation, count = name.split("-")
        count = int(count)
    except ValueError:
        raise ValueError(f"--topology {name!r}: expected e.g. v5p-256, v5e-256 or cpu:8") from None
    if generation in ("v4", "v5p"):
        chips, shape = count // 2, _TORUS.get(count // 2)
    elif generation in ("v5e", "v6e"):
        chips, shape = count, _GRID.get(count)
    else:
        raise ValueError(f"--topology {name!r}: unknown TPU generation {generation!r}")
    if shape is None:
        raise ValueError(f"--topology {name!r}: no slice of {chips} chips is known")
    try:
        from jax.experimental import topologies
    except ImportError as e:
        raise ValueError("TPU topologies need jax.experimental.topologies") from e
    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=f"{generation}:{shape}")
    except Exception as e:  # noqa: BLE001 - libtpu missing or the name unknown to it
        raise ValueError(f"--topology {name}: libtpu could not describe {generation}:{shape} ({e}); "
                         "install it with pip install -e \".[tpu]\" (a separate environment is "
                         "best), or use --topology cpu:N for an estimate") from e
    return topo.devices, generation


def main(argv):
    del argv
    devices, generation = topology_devices(FLAGS.topology)
    result = aot.compile_train_step(FLAGS.config, devices)
    hbm = FLAGS.hbm_gib or HBM_GIB.get(generation, 0.0)
    result["topology"] = FLAGS.topology
    result["estimate_from_cpu"] = generation == "cpu"
    result["rules"] = [list(r) if not isinstance(r, str) else r for r in FLAGS.config.mesh.rules]
    result["remat"] = FLAGS.config.model.get("remat", FLAGS.config.model.get("remat_policy"))
    result["dtype"] = FLAGS.config.model.get("dtype")
    if hbm and "peak_bytes" in result:
        result["hbm_gib"] = hbm
        result["peak_gib"] = round(result["peak_bytes"] / 2**30, 3)
        result["fits"] = result["peak_bytes"] <= hbm * 2**30
    text = json.dumps(result, indent=1)
    print(text)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    app.run(main)
