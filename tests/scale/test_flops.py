"""Analytic model FLOPs (unclip_jax.flops) and their use in the training loop's metrics."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import helpers
from unclip_jax import flops
from unclip_jax.train import loop
from unclip_jax.train import metrics as metrics_lib


def test_products_are_counted_from_their_shapes():
    x, w = jnp.zeros((4, 8, 16)), jnp.zeros((16, 32))
    assert flops.forward_flops(lambda x, w: jnp.tanh(x @ w), x, w) == 2 * 4 * 8 * 16 * 32
    img, k = jnp.zeros((2, 10, 10, 3)), jnp.zeros((3, 3, 3, 5))
    conv = lambda a, b: jax.lax.conv_general_dilated(a, b, (1, 1), "SAME",  # noqa: E731
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert flops.forward_flops(conv, img, k) == 2 * (2 * 10 * 10 * 5) * (3 * 3 * 3)

    def scanned(x, w):  # 3 layers in a scan, one of them under remat: counted once each.
        body = jax.checkpoint(lambda c, _: (c @ w, None))
        return jax.lax.scan(body, x, None, length=3)[0]

    assert flops.forward_flops(scanned, jnp.zeros((4, 16)), jnp.zeros((16, 16))) == 3 * 2 * 4 * 16 * 16


def test_peak_table_by_device_kind():
    class Device:
        device_kind = "TPU v5"

    assert flops.peak_tflops(Device()) == 459.0
    Device.device_kind = "NVIDIA H200 NVL"
    assert flops.peak_tflops(Device()) == 989.0
    assert flops.peak_tflops(jax.devices()[0]) is None  # CPUs: no MFU


@pytest.mark.slow
def test_training_logs_model_tflops_per_device(tmp_path):
    config = helpers.tiny_config("clip", num_steps=2)
    with config.unlocked():
        config.eval.splits = ()
    loop.train_and_evaluate(config, str(tmp_path / "run"))
    records = [r for r in metrics_lib.read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
               if "perf/tflops_per_device" in r]
    assert records and all(np.isfinite(r["perf/tflops_per_device"]) and r["perf/tflops_per_device"] > 0
                           for r in records)
    assert all("perf/mfu" not in r for r in records)  # no peak known for a CPU
