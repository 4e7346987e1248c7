"""The generic training loop: sharding invariance, kill-and-resume, the NaN guard, accumulation."""
import os
import signal
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs import shapes as shapes_config
from tests import helpers
from tests.helpers import losses, tiny_config
from unclip_jax.data import input_pipeline
from unclip_jax.tasks import clip as clip_task
from unclip_jax.tasks.base import Task
from unclip_jax.train import checkpointing, loop

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_sharded_matches_single_device(tmp_path):
    helpers.assert_same_losses_on_1_and_8_devices(tiny_config, tmp_path, steps=3)


@pytest.mark.slow
def test_kill_and_resume_reproduces_losses(tmp_path):
    config = tiny_config(num_steps=6, checkpoint_every=3)
    loop.train_and_evaluate(config, str(tmp_path / "straight"))
    stopped = loop.train_and_evaluate(config, str(tmp_path / "resumed"), stop_at_step=3)
    assert stopped["step"] == 3
    assert checkpointing.Checkpointer(str(tmp_path / "resumed" / "checkpoints")).latest_step() == 3
    resumed = loop.train_and_evaluate(config, str(tmp_path / "resumed"))
    assert resumed["step"] == 6
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    for step in (4, 5, 6):
        assert a[step] == b[step], (step, a[step], b[step])


class SigtermAt(clip_task.ClipTask):
    """The CLIP task whose data stream delivers SIGTERM to the process while fetching a batch."""

    at_batch = 3

    def train_pipeline(self, **kwargs):
        pipe = super().train_pipeline(**kwargs)
        task, fetched = self, [0]

        class Wrapped:
            def __next__(self):
                fetched[0] += 1
                if fetched[0] == task.at_batch:
                    os.kill(os.getpid(), signal.SIGTERM)
                return next(pipe)

            def get_state(self):
                return pipe.get_state()

            def set_state(self, state):
                pipe.set_state(state)

        return Wrapped()


@pytest.mark.slow
def test_sigterm_checkpoints_and_resumes_exactly(tmp_path):
    config = tiny_config(num_steps=6, checkpoint_every=100)
    loop.train_and_evaluate(config, str(tmp_path / "straight"))
    workdir = str(tmp_path / "preempted")
    stopped = loop.train_and_evaluate(config, workdir, task=SigtermAt(config, workdir))
    assert stopped["step"] == 3
    assert checkpointing.Checkpointer(os.path.join(workdir, "checkpoints")).latest_step() == 3
    assert loop.train_and_evaluate(config, workdir)["step"] == 6
    a, b = losses(tmp_path / "straight"), losses(workdir)
    assert [a[s] for s in (4, 5, 6)] == [b[s] for s in (4, 5, 6)]


class NaNAfter(clip_task.ClipTask):
    """The CLIP task with a NaN injected into the loss from a given (0-based) step on."""

    nan_from = 4

    def loss_fn(self, params, batch, rng, step):
        loss, metrics = super().loss_fn(params, batch, rng, step)
        return loss + jnp.where(step >= self.nan_from, jnp.nan, 0.0), metrics


@pytest.mark.slow
def test_nan_guard_stops_and_keeps_last_good_checkpoint(tmp_path):
    config = tiny_config(num_steps=10, checkpoint_every=2)
    workdir = str(tmp_path / "run")
    with pytest.raises(loop.NonFiniteLossError, match=r"at step 5 .*last good checkpoint \(step 4\)"):
        loop.train_and_evaluate(config, workdir, task=NaNAfter(config, workdir))
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
    assert ckpt.latest_step() == 4
    # The kept checkpoint is good: a clean task resumes from it and trains on to the end.
    result = loop.train_and_evaluate(config, workdir)
    assert result["step"] == 10 and np.isfinite(result["train/loss"])


class Regression(Task):
    """A linear least-squares task whose loss is a plain batch mean (so accumulation is exact)."""

    def init_params(self, rng):
        init = nn.with_logical_partitioning(nn.initializers.normal(1.0), ("embed", "mlp"))
        return {"w": init(rng, (8, 4), jnp.float32)}

    def loss_fn(self, params, batch, rng, step):
        err = batch["x"] @ params["w"] - batch["y"]
        return jnp.mean(err ** 2), {}

    def train_pipeline(self, *, local_batch_size, process_index, process_count):
        rng = np.random.default_rng(0)
        xs = rng.normal(size=(256, 8)).astype(np.float32)
        ys = (xs @ rng.normal(size=(8, 4))).astype(np.float32)
        source = [{"x": x, "y": y} for x, y in zip(xs, ys)]
        return input_pipeline.make_pipeline(source, lambda e: e, local_batch_size=local_batch_size,
                                          shuffle_seed=0, process_index=process_index,
                                          process_count=process_count, num_threads=1)


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2)])
def test_gradient_accumulation_matches_full_batch(tmp_path, mesh_shape):
    results = {}
    for accum in (1, 4):
        config = tiny_config(num_steps=4, grad_accum_steps=accum, ema_decay=0.0)
        with config.unlocked():
            config.mesh.shape = mesh_shape
        workdir = str(tmp_path / f"accum{accum}")
        loop.train_and_evaluate(config, workdir, task=Regression(config, workdir))
        results[accum] = losses(workdir)
    # Micro-batch sums round differently; through Adam's normalised update the losses of later
    # steps agree to a few float32 units per step, far below a wrong accumulation (~1e-2).
    np.testing.assert_allclose([results[1][s] for s in range(1, 5)],
                               [results[4][s] for s in range(1, 5)], rtol=1e-5)


def test_unknown_config_key_is_a_clear_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/shapes.py:clip,tiny",
         "--workdir", str(tmp_path / "w"), "--config.train.not_a_field=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "not_a_field" in proc.stderr
    assert not (tmp_path / "w").exists()


def test_unknown_variant_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown variant 'nope'"):
        shapes_config.get_config("nope")


def test_config_options_are_checked_and_fast_shortens_every_stage():
    with pytest.raises(ValueError, match="unknown option"):
        shapes_config.get_config("clip,huge")
    with pytest.raises(ValueError, match="exclude each other"):
        shapes_config.get_config("clip,fast,tiny")
    for variant in shapes_config.VARIANTS:
        full, fast = shapes_config.get_config(variant), shapes_config.get_config(f"{variant},fast")
        assert fast.train.num_steps < full.train.num_steps
        assert fast.to_dict().keys() == full.to_dict().keys()  # same fields: only values change
