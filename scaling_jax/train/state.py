"""Train state, optimizer and schedules, and how each piece is sharded.

The state is a plain pytree (params as a pure dict, optax state, step, RNG key data) so it
jits, shards and checkpoints without NNX objects in the way; the model is rebuilt inside the
step with ``nnx.merge(graphdef, params)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from scaling_jax.config import ModelConfig, OptimizerConfig
from scaling_jax.model.transformer import LAYERS, Decoder
from scaling_jax.parallel.sharding import Rules, named_sharding, replicated


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates applied so far
    params: dict
    opt_state: Any
    rng: jax.Array  # uint32[2] key data; per-step keys are fold_in(rng, step), so resume is exact


# ----------------------------------------------------------------------------- optimizer


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup, then cosine to lr*min_lr_ratio, WSD (flat, then linear decay), or flat."""
    peak, final, warm = cfg.lr, cfg.lr * cfg.min_lr_ratio, cfg.warmup_steps
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warm, max(total_steps, warm + 1), final)
    warmup = optax.linear_schedule(0.0, peak, max(warm, 1))
    if cfg.schedule == "constant":
        return optax.join_schedules([warmup, optax.constant_schedule(peak)], [warm])
    # the decay ends at total_steps even where warmup leaves it less than decay_fraction of the run
    decay_start = max(warm, total_steps - round(cfg.decay_fraction * total_steps))
    decay_steps = max(1, total_steps - decay_start)
    return optax.join_schedules(
        [warmup, optax.constant_schedule(peak), optax.linear_schedule(peak, final, decay_steps)],
        [warm, decay_start],
    )


def decay_mask(params: dict) -> dict:
    """Weight decay on matrices only: norms (and biases, if a model has them) are 1-D per layer (scanned
    blocks under ``layers`` carry one more, leading, axis)."""
    def is_matrix(path, p) -> bool:
        stacked = any(getattr(k, "key", None) == LAYERS for k in path)
        return p.ndim - stacked >= 2

    return jax.tree_util.tree_map_with_path(is_matrix, params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(cfg, total_steps)
    adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask)
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw) if cfg.clip_norm > 0 else adamw
    return tx, schedule


# ----------------------------------------------------------------------------- abstract model


def _nest(flat: dict[tuple, Any]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


ModelBuilder = Callable[[ModelConfig, nnx.Rngs], nnx.Module]


def abstract_model(cfg: ModelConfig, build: ModelBuilder = Decoder) -> tuple[nnx.GraphDef, dict, dict]:
    """(graphdef, params as ShapeDtypeStructs, logical axes per param) without allocating.

    ``build`` makes the module: the plain decoder, or an objective's decoder with extra heads.
    """
    graphdef, state = nnx.split(nnx.eval_shape(lambda: build(cfg, nnx.Rngs(0))))
    flat = dict(nnx.to_flat_state(state))
    shapes = _nest({p: v.get_value() for p, v in flat.items()})
    axes = _nest({p: v.get_metadata()["out_sharding"] for p, v in flat.items()})
    return graphdef, shapes, axes


def param_shardings(mesh: Mesh, rules: Rules, shapes: dict, axes: dict) -> dict:
    return jax.tree.map(lambda s, a: named_sharding(mesh, rules, a, s.shape), shapes, axes,
                        is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))


def _key_names(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path)


def state_shardings(mesh: Mesh, abstract: TrainState, params_sharding: dict) -> TrainState:
    """Optimizer moments follow their parameter's sharding (matched by key-path suffix)."""
    by_path = {_key_names(p): s for p, s in jax.tree_util.tree_leaves_with_path(params_sharding)}

    def for_leaf(path, leaf) -> NamedSharding:
        names = _key_names(path)
        for start in range(len(names)):
            if names[start:] in by_path and getattr(leaf, "ndim", 0) > 0:
                return by_path[names[start:]]
        return replicated(mesh)

    opt = jax.tree_util.tree_map_with_path(for_leaf, abstract.opt_state)
    rep = replicated(mesh)
    return TrainState(step=rep, params=params_sharding, opt_state=opt, rng=rep)


@dataclass(frozen=True)
class StateLayout:
    """A train state's shapes and shardings, computed without allocating (training, import, AOT)."""

    graphdef: nnx.GraphDef
    shapes: dict  # params as ShapeDtypeStructs
    abstract: TrainState  # the whole state as ShapeDtypeStructs
    params_sharding: dict
    state_sharding: TrainState


def state_layout(cfg: ModelConfig, tx: optax.GradientTransformation, seed: int, build: ModelBuilder,
                 mesh: Mesh, rules: Rules) -> StateLayout:
    graphdef, shapes, axes = abstract_model(cfg, build)
    params_sharding = param_shardings(mesh, rules, shapes, axes)
    abstract = jax.eval_shape(lambda: init_state(cfg, tx, seed, build))
    return StateLayout(graphdef, shapes, abstract, params_sharding,
                       state_shardings(mesh, abstract, params_sharding))


def init_state(cfg: ModelConfig, tx: optax.GradientTransformation, seed: int,
               build: ModelBuilder = Decoder) -> TrainState:
    """Fresh state; meant to run under ``jax.jit(out_shardings=...)`` so weights are born sharded."""
    _, state = nnx.split(build(cfg, nnx.Rngs(seed)))
    params = nnx.to_pure_dict(state)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(jax.random.key(seed)))
