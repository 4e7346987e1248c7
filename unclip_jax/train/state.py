"""Train state (params, EMA params, optimizer state, step) and the optimizer built from a config."""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn

from unclip_jax import parallel


@flax.struct.dataclass
class TrainState:
    """Everything a training step updates; a pytree, checkpointed as a whole."""

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any


def learning_rate_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup to `learning_rate`, then cosine decay to `end_lr_fraction * learning_rate`."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=train.learning_rate,
        warmup_steps=max(int(train.warmup_steps), 1),
        decay_steps=max(int(train.num_steps), int(train.warmup_steps) + 1),
        end_value=train.learning_rate * train.end_lr_fraction,
    )


def _decay_mask(params: Any) -> Any:
    """Weight decay on matrices and conv kernels only (not biases, norms, scalars)."""
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW with warmup + cosine schedule and global-norm clipping, from `config.train`."""
    parts = []
    if train.grad_clip and train.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(train.grad_clip))
    parts.append(optax.adamw(
        learning_rate=learning_rate_schedule(train),
        b1=train.b1, b2=train.b2, eps=train.eps,
        weight_decay=train.weight_decay, mask=_decay_mask,
    ))
    return optax.chain(*parts)


def create_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
    """A fresh state at step 0 with EMA params equal to the params."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      ema_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params))


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
    """EMA decay warmed up as min(decay, (1 + t) / (10 + t)), so short runs' EMA is not stuck at init."""
    t = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + t) / (10.0 + t))


# ---------------------------------------------------------------------------------------------
# The state's shapes and shardings, and its sharded initialisation.
# ---------------------------------------------------------------------------------------------
def _boxed_init_fn(task, tx):
    def boxed_init(r):
        return create_state(task.init_params(r), tx)

    return boxed_init


def abstract_train_state(task, tx, rng: jax.Array, mesh, rules):
    """The train state's unboxed tree of `ShapeDtypeStruct`s with shardings, allocating nothing.

    This is what `init_state` initialises into and what a checkpoint restores onto.
    Must be called under `jax.set_mesh(mesh)` and `nn.logical_axis_rules(rules)`.
    """
    abstract_boxed = jax.eval_shape(_boxed_init_fn(task, tx), rng)
    shardings = parallel.logical_shardings(abstract_boxed, mesh, rules)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        parallel.unbox(abstract_boxed), shardings)


def init_state(task, tx, rng: jax.Array, mesh, rules):
    """Initialises the train state directly into its shardings; returns (state, abstract_state).

    `abstract_state` is `abstract_train_state(...)` (what restore needs).
    Must be called under `jax.set_mesh(mesh)` and `nn.logical_axis_rules(rules)`.
    """
    abstract = abstract_train_state(task, tx, rng, mesh, rules)
    boxed_init = _boxed_init_fn(task, tx)
    init = jax.jit(lambda r: nn.meta.unbox(boxed_init(r)), out_shardings=state_shardings(abstract))
    return init(rng), abstract


def state_shardings(abstract_state):
    return jax.tree.map(lambda a: a.sharding, abstract_state)
