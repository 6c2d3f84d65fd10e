"""The compute half of a run: mesh, sharding rules, optimizer, state layout and the jitted train step.

Built from a config, an objective and the shapes of one batch, with no data and no files, so the trainer
(``session.build_session`` adds the data), the AOT compiler for TPU topologies, the compile and MTP
benchmarks and the tests all get the very step the trainer runs, assembled in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import numpy as np
import optax
from jax.sharding import Mesh

from scaling_jax.config import Config
from scaling_jax.errors import ConfigError
from scaling_jax.objectives.base import Objective
from scaling_jax.parallel.mesh import build_mesh
from scaling_jax.parallel.sharding import Rules, requested_split, rules_from_config
from scaling_jax.train.state import StateLayout, TrainState, init_state, make_optimizer, state_layout
from scaling_jax.train.step import batch_shardings, jit_train_step, make_train_step


def check_batch_fits_mesh(config: Config, mesh: Mesh, rules: Rules) -> None:
    """Batch and sequence length must split evenly over the mesh axes their logical axes map to."""
    d = config.data
    for field, value, logical in (("data.batch_size", d.batch_size, "batch"), ("data.seq_len", d.seq_len, "length")):
        split = requested_split(logical, rules, mesh)
        if value % split:
            raise ConfigError(f"{field}={value} must be divisible by {split}, the mesh axes that shard '{logical}' "
                              f"(mesh {dict(mesh.shape)}); change {field} or the mesh")
        if logical == "batch" and config.train.noise_scale and (value // 2) % split:
            # each half-batch must split like the batch, else every device would compute a whole half
            raise ConfigError(f"train.noise_scale measures on two halves of data.batch_size={value}, which must "
                              f"each split over the {split} devices that shard 'batch'; make data.batch_size a "
                              f"multiple of {2 * split}")


def abstract_args(state, state_sharding, batch: dict[str, np.ndarray], batch_sharding: dict) -> tuple:
    """(state, global batch) as ShapeDtypeStructs carrying their shardings, as the train step receives them."""
    def leaf(x, sharding, shape=None):
        return jax.ShapeDtypeStruct(shape or x.shape, x.dtype, sharding=sharding,
                                    weak_type=getattr(x, "weak_type", False))

    global_shape = lambda v: (v.shape[0] * jax.process_count(), *v.shape[1:])  # this process's rows -> all
    return (jax.tree.map(leaf, state, state_sharding),
            {k: leaf(v, batch_sharding[k], global_shape(v)) for k, v in batch.items()})


@dataclass
class Compute:
    """What runs on the devices: the mesh, the state's layout and the jitted ``step_fn(state, batch)``."""

    config: Config
    objective: Objective
    mesh: Mesh
    rules: Rules
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    layout: StateLayout
    batch_sharding: dict
    step_fn: Callable

    @property
    def abstract(self) -> TrainState:
        return self.layout.abstract

    @property
    def state_sharding(self) -> TrainState:
        return self.layout.state_sharding

    def init_state(self) -> TrainState:
        """Fresh weights and optimizer state, born sharded (no full copy on one device)."""
        cfg, build = self.config, self.objective.build_model
        return jax.jit(lambda: init_state(cfg.model, self.tx, cfg.train.seed, build),
                       out_shardings=self.state_sharding)()

    def abstract_args(self, batch: dict[str, np.ndarray]) -> tuple:
        return abstract_args(self.abstract, self.state_sharding, batch, self.batch_sharding)

    def lower(self, batch: dict[str, np.ndarray]):
        """The train step lowered from shapes alone (compile it for memory analysis or a TPU topology)."""
        return self.step_fn.lower(*self.abstract_args(batch))


def build_compute(config: Config, objective: Objective, example_batch: dict[str, np.ndarray],
                  devices: Sequence[jax.Device] | None = None, mesh: Mesh | None = None) -> Compute:
    """The trainer's step for ``config``: ``example_batch`` is one prepared batch of this process (its shapes
    and fields fix the batch shardings); ``devices`` (default: all) or a ready ``mesh`` place it."""
    t = config.train
    mesh = mesh if mesh is not None else build_mesh(config.mesh, devices)
    rules = rules_from_config(config.mesh.rules)
    check_batch_fits_mesh(config, mesh, rules)
    tx, schedule = make_optimizer(config.optimizer, t.steps)
    layout = state_layout(config.model, tx, t.seed, objective.build_model, mesh, rules)
    batch_sharding = batch_shardings(mesh, rules, example_batch)
    step_fn = jit_train_step(make_train_step(layout.graphdef, objective, tx, schedule, mesh, rules, t.noise_scale),
                             layout.state_sharding, batch_sharding, mesh)
    return Compute(config, objective, mesh, rules, tx, schedule, layout, batch_sharding, step_fn)
