"""Helpers shared by the training tests: tiny configs, per-step losses, the 1-vs-8-device check."""
import os

import numpy as np

from configs import shapes as shapes_config
from unclip_jax.train import loop
from unclip_jax.train import metrics as metrics_lib


def tiny_config(variant: str = "clip", clip_with_cache=None, **train):
    """`configs/shapes.py:<variant>,tiny`, logging every step, with `train` fields overridden."""
    config = shapes_config.get_config(f"{variant},tiny")
    with config.unlocked():
        if clip_with_cache is not None:
            config.clip_workdir, config.cache_dir = clip_with_cache
        config.train.log_every = 1
        for k, v in train.items():
            setattr(config.train, k, v)
    return config


def losses(workdir) -> dict[int, float]:
    """Per-step train loss (after a resume, the last record of a step wins)."""
    records = metrics_lib.read_metrics(os.path.join(workdir, "metrics.jsonl"))
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def assert_same_losses_on_1_and_8_devices(make_config, tmp_path, steps: int, rtol: float = 1e-4):
    """Trains `make_config()` for `steps` on one device and on a (2, 2, 2) mesh; losses must agree.

    Not to float32 round-off: the sharded reductions round differently, and Adam's normalised
    update turns a round-off difference in a near-zero gradient into one of up to the learning rate,
    so after a few steps the losses agree to ~1e-5 relative; `rtol` 1e-4 keeps a 10x margin."""
    results = {}
    for name, shape, n in (("one", (1, 1, 1), 1), ("eight", (2, 2, 2), 0)):
        config = make_config()
        with config.unlocked():
            config.train.num_steps = steps
            config.mesh.shape, config.mesh.num_devices = shape, n
            config.eval.splits = ()
        loop.train_and_evaluate(config, str(tmp_path / name))
        results[name] = losses(tmp_path / name)
    expected = list(range(1, steps + 1))
    assert sorted(results["one"]) == sorted(results["eight"]) == expected
    np.testing.assert_allclose([results["one"][s] for s in expected],
                               [results["eight"][s] for s in expected], rtol=rtol)
