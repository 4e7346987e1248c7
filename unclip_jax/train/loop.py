"""The one training loop: every stage trains through `train_and_evaluate(config, workdir)`.

A *task* (unclip_jax/tasks/) supplies the model params, the loss, the data and the evaluation; this
module owns the rest: mesh and shardings, sharded init, the jitted donated train step (with gradient
accumulation and EMA), checkpoints (resume from the latest), metrics, the NaN guard and preemption.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from unclip_jax import flops as flops_lib
from unclip_jax import parallel, paths
from unclip_jax import tasks
from unclip_jax.models import layers
from unclip_jax.stages import load
from unclip_jax.tasks.base import Task
from unclip_jax.train import checkpointing, restore
from unclip_jax.train import metrics as metrics_lib
from unclip_jax.train import state as state_lib


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or Inf; the last good checkpoint is kept."""


# ---------------------------------------------------------------------------------------------
# The train step.
# ---------------------------------------------------------------------------------------------
def make_train_step(task: Task, tx, config: ml_collections.ConfigDict):
    """Returns `train_step(state, batch, rng) -> (state, metrics)` (to be jitted with donation)."""
    accum = int(config.train.grad_accum_steps)
    ema_decay = float(config.train.ema_decay)
    schedule = state_lib.learning_rate_schedule(config.train)
    grad_fn = jax.value_and_grad(task.loss_fn, has_aux=True)

    def loss_and_grads(params, batch, rng, step):
        (loss, metrics), grads = grad_fn(params, batch, rng, step)
        return grads, dict(metrics, loss=loss)

    def train_step(state: state_lib.TrainState, batch, base_rng):
        rng = jax.random.fold_in(base_rng, state.step)
        if accum == 1:
            grads, metrics = loss_and_grads(state.params, batch, rng, state.step)
        else:
            # Micro-batch j takes rows j, j+accum, ...: every device keeps its own rows (no transfer).
            def split(x):
                x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
                return jax.lax.with_sharding_constraint(x, P(None, ("data", "fsdp")))

            micro = jax.tree.map(split, batch)

            def body(grad_sum, xs):
                mb, j = xs
                grads, metrics = loss_and_grads(state.params, mb, jax.random.fold_in(rng, j), state.step)
                return jax.tree.map(jnp.add, grad_sum, grads), metrics

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            grad_sum, metrics = jax.lax.scan(body, zeros, (micro, jnp.arange(accum)))
            grads = jax.tree.map(lambda g: g / accum, grad_sum)
            metrics = jax.tree.map(lambda m: m.mean(0), metrics)

        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = jax.tree.map(lambda p, u: p + u, state.params, updates)
        decay = state_lib.ema_decay_at(state.step, ema_decay)
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
        metrics = dict(metrics, grad_norm=optax.global_norm(grads), learning_rate=schedule(state.step))
        new_state = state_lib.TrainState(step=state.step + 1, params=params, ema_params=ema,
                                         opt_state=opt_state)
        return new_state, metrics

    return train_step


def jit_train_step(task: Task, tx, config: ml_collections.ConfigDict, abstract_state, mesh):
    """The train step jitted with the state's shardings, the batch sharding and donation: what the
    loop runs, and what the benchmarks and ahead-of-time compiles lower."""
    shardings = state_lib.state_shardings(abstract_state)
    replicated = NamedSharding(mesh, P())
    return jax.jit(make_train_step(task, tx, config),
                   in_shardings=(shardings, parallel.batch_sharding(mesh), replicated),
                   out_shardings=(shardings, replicated), donate_argnums=(0,))


# ---------------------------------------------------------------------------------------------
# Preemption: SIGTERM asks the loop to checkpoint and exit at the next step boundary.
# ---------------------------------------------------------------------------------------------
class _PreemptionFlag:
    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        except ValueError:  # Not the main thread: no handler.
            self._previous = None
        return self

    def _handler(self, signum, frame):
        logging.warning("SIGTERM received: checkpointing and stopping at the next step.")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def agreed(self) -> bool:
        """True when any process was asked to stop (all processes must take the same decision)."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.array(self.requested))
        return bool(np.any(flags))


# ---------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _PendingMetrics:
    """Device metrics of the steps since the last log, fetched together (one host sync per log)."""

    steps: list = dataclasses.field(default_factory=list)
    values: list = dataclasses.field(default_factory=list)
    start_time: float = 0.0

    def fetch(self) -> tuple[list[int], dict[str, np.ndarray]]:
        values = jax.device_get(self.values)
        steps, self.steps, self.values = self.steps, [], []
        stacked = {k: np.stack([np.asarray(v[k], np.float64) for v in values]) for k in values[0]} if values else {}
        return steps, stacked


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, task: Task | None = None,
                       stop_at_step: int | None = None) -> dict[str, Any]:
    """Trains `config.stage` in `workdir` (resuming from its latest checkpoint) and evaluates it.

    Args:
      config: a full run config (see configs/).
      workdir: where checkpoints, metrics, TensorBoard events, sample grids and the config live.
      task: a prebuilt task (tests inject one); by default built from `config.stage`.
      stop_at_step: checkpoint and return once this step is reached (simulated preemption; the run
        resumes from there when called again).

    Returns:
      A dict with `step`, the last logged train metrics (`train/...`) and evaluation metrics.
    """
    workdir = paths.resolve(workdir)  # gs:// and other URLs are kept as they are.
    config = checkpointing.with_init_sections(config)  # Sections inherited from train.init_from.
    paths.makedirs(workdir)
    is_main = jax.process_index() == 0
    if is_main:
        checkpointing.save_config(config, workdir)
    task = task or tasks.get_task(config, workdir)
    described = task.describe()  # What sampling needs to rebuild the model (stage.json).
    load.write_record(workdir, config.stage, described["sizes"], described["depends_on"])
    num_steps = int(config.train.num_steps)
    last_step = num_steps if stop_at_step is None else min(num_steps, int(stop_at_step))

    mesh = parallel.mesh_from_config(config.mesh)
    rules = parallel.rules_from_config(config.mesh.rules)
    dp = parallel.data_parallel_size(mesh)
    global_batch = int(config.train.batch_size)
    accum = int(config.train.grad_accum_steps)
    if global_batch % (dp * accum):
        raise ValueError(
            f"config.train.batch_size={global_batch} must be divisible by the data-parallel size "
            f"({dp}) times grad_accum_steps ({accum})")
    # Processes holding the same batch rows (a `tensor` axis across hosts) read the same examples.
    slice_index, num_slices = parallel.data_slice(mesh)
    local_batch = global_batch // num_slices

    writer = metrics_lib.MetricWriter(workdir)
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                      max_to_keep=int(config.train.keep_checkpoints))
    tx = state_lib.make_optimizer(config.train)
    rng = jax.random.key(int(config.seed))
    init_rng, train_rng = jax.random.split(rng)
    result: dict[str, Any] = {}

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        # ------------------------------------------------------------------ state and data
        state, abstract_state = state_lib.init_state(task, tx, init_rng, mesh, rules)
        pipeline = task.train_pipeline(local_batch_size=local_batch, process_index=slice_index,
                                       process_count=num_slices)
        start_step = 0
        if ckpt.latest_step() is not None:
            del state
            state, start_step = ckpt.restore(abstract_state, data_iterator=pipeline)
            logging.info("Resumed from step %d in %s", start_step, ckpt.directory)
        elif config.train.get("init_from"):
            state, new = restore.warm_start(state, config.train.init_from, mesh)
            logging.info("Warm start: params and EMA params from %s; newly initialised: %s",
                         config.train.init_from, ", ".join(new) or "none")
        num_params = layers.count_params(abstract_state.params)
        logging.info("%s: %s parameters on mesh %s", config.stage, f"{num_params:,}", dict(mesh.shape))
        logging.info("process %d of %d reads data slice %d of %d (%d examples a step)",
                     jax.process_index(), jax.process_count(), slice_index, num_slices, local_batch)
        perf = _Throughput.for_task(task, global_batch // dp // accum, mesh)

        # ------------------------------------------------------------------ compile
        step_fn = jit_train_step(task, tx, config, abstract_state, mesh)
        compiled = None
        pending = _PendingMetrics()
        pbar = tqdm(total=last_step, initial=start_step, disable=not is_main, desc=config.stage,
                    dynamic_ncols=True)
        step = start_step
        good_step = ckpt.latest_step()
        t_log, step_log = time.perf_counter(), step

        def check_and_log(step):
            nonlocal t_log, step_log
            if not pending.values:
                return
            steps, values = pending.fetch()
            bad = [s for s, loss in zip(steps, values["loss"]) if not np.isfinite(loss)]
            if bad:
                ckpt.wait_until_finished()
                where = (f"the last good checkpoint (step {good_step}) in {ckpt.directory} is kept"
                         if good_step is not None else "no checkpoint had been written yet")
                raise NonFiniteLossError(
                    f"Training stopped: the loss is {values['loss'][steps.index(bad[0])]} at step {bad[0]} "
                    f"(not finite); {where}. Lower the learning rate, check the data, or fall back to "
                    "float32 activations.")
            now = time.perf_counter()
            scalars = {f"train/{k}": float(v.mean()) for k, v in values.items()}
            scalars["train/examples_per_sec"] = (step - step_log) * global_batch / max(now - t_log, 1e-9)
            scalars.update(perf.metrics(scalars["train/examples_per_sec"]))
            t_log, step_log = now, step
            writer.write_scalars(step, scalars)
            postfix = dict(loss=f"{scalars['train/loss']:.4f}", ex_s=f"{scalars['train/examples_per_sec']:.0f}")
            if "perf/mfu" in scalars:
                postfix["mfu"] = f"{scalars['perf/mfu']:.1%}"
            pbar.set_postfix(**postfix)
            result.update(scalars)

        def run_eval(step):
            params = state.ema_params if config.eval.get("use_ema", True) else state.params
            eval_metrics = task.evaluate(params, mesh)
            if eval_metrics:
                writer.write_scalars(step, eval_metrics)
                result.update(eval_metrics)
                logging.info("step %d eval: %s", step,
                             ", ".join(f"{k}={v:.4f}" for k, v in sorted(eval_metrics.items())))
            images = task.sample_images(params, mesh)
            if images:
                writer.write_images(step, images)

        # ------------------------------------------------------------------ train
        with _PreemptionFlag() as preemption:
            while step < last_step:
                batch = parallel.global_batch_from_local(next(pipeline), mesh)
                if compiled is None:
                    compiled = _compile(step_fn, abstract_state, batch, train_rng, writer, step)
                    result["compile_seconds"] = compiled.seconds
                    t_log = time.perf_counter()
                state, metrics = compiled.fn(state, batch, train_rng)
                step += 1
                pending.steps.append(step)
                pending.values.append(metrics)
                pbar.update(1)
                at_checkpoint = step % int(config.train.checkpoint_every) == 0 or step == last_step
                at_log = step % int(config.train.log_every) == 0 or at_checkpoint
                if at_log:
                    check_and_log(step)
                # Multi-host: every process must agree to stop, so they only decide at log steps.
                stop = preemption.requested if jax.process_count() == 1 else (at_log and preemption.agreed())
                if stop and not at_log:
                    check_and_log(step)  # Losses are checked before any checkpoint is written.
                if at_checkpoint or stop:
                    ckpt.save(step, state, data_iterator=pipeline, config=config)
                    good_step = step
                if config.train.eval_every and step % int(config.train.eval_every) == 0 and step < num_steps:
                    run_eval(step)
                if stop:
                    logging.warning("Stopped at step %d after a preemption request.", step)
                    last_step = step
                    break
        pbar.close()
        ckpt.wait_until_finished()

        # ------------------------------------------------------------------ evaluate
        if step >= num_steps:
            run_eval(step)
        result["step"] = step
        result["num_params"] = num_params

    ckpt.close()
    writer.flush()
    if is_main and step >= num_steps and epath.Path(workdir, "metrics.jsonl").exists():
        metrics_lib.plot_metrics(os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "metrics.png"))
    writer.close()
    return result


@dataclasses.dataclass
class _Throughput:
    """Model FLOP/s per device and MFU from examples/s (`unclip_jax.flops`' analytic count)."""

    flops_per_example: float | None
    num_devices: int
    peak_tflops: float | None

    @classmethod
    def for_task(cls, task: Task, per_device_batch: int, mesh) -> "_Throughput":
        devices = mesh.devices.size
        try:
            per_example = flops_lib.train_flops_per_example(task, max(int(per_device_batch), 1))
        except NotImplementedError:  # A task that does not describe its batches: no FLOP count.
            per_example = None
        return cls(per_example, devices, flops_lib.peak_tflops(mesh.devices.flat[0]))

    def metrics(self, examples_per_sec: float) -> dict[str, float]:
        if self.flops_per_example is None:
            return {}
        tflops = self.flops_per_example * examples_per_sec / self.num_devices / 1e12
        out = {"perf/tflops_per_device": tflops}
        if self.peak_tflops:
            out["perf/mfu"] = tflops / self.peak_tflops
        return out


@dataclasses.dataclass
class _Compiled:
    fn: Any
    seconds: float


def _compile(step_fn, abstract_state, batch, rng, writer, step) -> _Compiled:
    """Compiles the train step ahead of time and logs its time and XLA's memory estimate."""
    t0 = time.perf_counter()
    abstract_batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), batch)
    compiled = step_fn.lower(abstract_state, abstract_batch, rng).compile()
    seconds = time.perf_counter() - t0
    info = {"compile/seconds": seconds}
    try:
        mem = compiled.memory_analysis()
        if mem is not None:
            info["compile/temp_bytes_per_device"] = float(mem.temp_size_in_bytes)
            info["compile/argument_bytes_per_device"] = float(mem.argument_size_in_bytes)
    except Exception:  # Not every backend reports memory.
        pass
    logging.info("Train step compiled in %.1fs: %s", seconds, info)
    writer.write_scalars(step, info)
    return _Compiled(fn=compiled, seconds=seconds)
