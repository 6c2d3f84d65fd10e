"""Pure, jitted train and eval steps with explicit shardings (the pjit of the design)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from scaling_jax.objectives.base import Objective, make_loss_fn
from scaling_jax.parallel.sharding import Rules, activation_sharding, named_sharding, replicated
from scaling_jax.train.health import guard_nonfinite, squared_norms
from scaling_jax.train.noise import two_batch_value_and_grad
from scaling_jax.train.state import TrainState

BATCH_AXES = ("batch", "length")


def batch_shardings(mesh: Mesh, rules: Rules, batch: dict[str, np.ndarray]) -> dict[str, NamedSharding]:
    """Shard every batch field over its leading (batch) axis as the rules say."""
    global_shape = lambda a: (a.shape[0] * jax.process_count(),) + a.shape[1:]  # noqa: E731
    return {k: named_sharding(mesh, rules, BATCH_AXES[: v.ndim] + (None,) * (v.ndim - 2), global_shape(v))
            for k, v in batch.items()}


def to_global(batch: dict[str, np.ndarray], shardings: dict[str, NamedSharding]) -> dict[str, jax.Array]:
    """This process's rows -> one global array per field (multi-host safe)."""
    return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in batch.items()}


def make_train_step(graphdef: nnx.GraphDef, objective: Objective, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, mesh: Mesh, rules: Rules, noise_scale: bool = False) -> Callable:
    """``train_step(state, batch) -> (state, metrics)``, not yet jitted.

    The objective computes its own gradient, so one that needs a custom backward (multi-token
    prediction's head-by-head pass) plugs in without the step knowing.
    """

    value_and_grad = objective.value_and_grad
    if noise_scale:  # train.noise_scale: two half-batch gradients (same FLOPs) give McCandlish's B_simple
        value_and_grad = functools.partial(two_batch_value_and_grad, objective.value_and_grad)

    def train_step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict]:
        with activation_sharding(mesh, rules):
            (_, metrics), grads = value_and_grad(graphdef, state.params, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        squares = squared_norms(grads)
        metrics = {**metrics, "grad_norm": jnp.sqrt(sum(squares)), "lr": schedule(state.step)}
        params, opt_state, metrics = guard_nonfinite(state, params, opt_state, squares, metrics)  # train.nan_policy
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def jit_train_step(train_step: Callable, state_sharding: TrainState, batch_sharding: dict, mesh: Mesh) -> Callable:
    """Explicit in/out shardings; the old state is donated so weights are updated in place."""
    return jax.jit(train_step, in_shardings=(state_sharding, batch_sharding),
                   out_shardings=(state_sharding, replicated(mesh)), donate_argnums=0)


def make_eval_step(graphdef: nnx.GraphDef, objective: Objective, mesh: Mesh, rules: Rules,
                   params_sharding: dict, batch_sharding: dict, token_bytes: np.ndarray) -> Callable:
    """``eval_step(params, batch) -> sums`` of nll, target tokens and target bytes.

    Sums (not means) so batches and processes combine exactly; bytes turn nats into bits/byte
    for any tokenizer (``token_bytes[id]`` is the text length an id stands for).
    """
    loss_fn = make_loss_fn(graphdef, objective)
    byte_table = jnp.asarray(token_bytes, jnp.float32)

    def eval_step(params: dict, batch: dict[str, jax.Array]) -> dict:
        with activation_sharding(mesh, rules):
            _, metrics = loss_fn(params, batch)
        target_bytes = (byte_table[batch["targets"]] * batch["loss_mask"]).sum()
        return {"nll_sum": metrics["nll_sum"], "tokens": metrics["tokens"], "bytes": target_bytes}

    return jax.jit(eval_step, in_shardings=(params_sharding, batch_sharding), out_shardings=replicated(mesh))
