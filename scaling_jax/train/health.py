"""Non-finite losses and gradients: an in-graph guard plus the host-side policy.

The guard runs inside the jitted step for every policy: an update whose loss or gradient norm is
not finite is not applied (parameters and optimizer moments keep their previous values, the step
counter still advances), so no checkpoint can ever hold NaN weights. It also names the first
non-finite tensor, in the order the step computes them (loss, gradients), so a halt can name it.

The host learns about a bad step one step late (metrics are fetched after the next step is queued)
and then acts on ``train.nan_policy``: ``halt`` raises ``TrainingDiverged``; ``skip_batch`` warns
and goes on (the update was already dropped); ``rollback`` asks the loop to restore the last
checkpoint and skip the data from it through the bad batch (PaLM's remedy for loss spikes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from scaling_jax import log
from scaling_jax.errors import UserError
from scaling_jax.train.metrics import ROLLBACK_WINDOW

SKIPPED = "skipped"  # metric: 1.0 when the step's update was dropped
CULPRIT = "nonfinite_tensor"  # metric: index of the first non-finite tensor (-1: none); never logged


class TrainingDiverged(UserError):
    """The loss or gradients became non-finite and the policy says stop."""


def tensor_names(params: dict) -> list[str]:
    """Names matching ``first_nonfinite``'s index: every parameter, the loss, every gradient."""
    paths = [jax.tree_util.keystr(path, simple=True, separator="/")
             for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    return [f"params/{p}" for p in paths] + ["loss"] + [f"grads/{p}" for p in paths]


def squared_norms(grads: dict) -> list[jax.Array]:
    """Each gradient's float32 sum of squares: the step's global norm and the guard's culprit both read them."""
    return [jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads)]


def first_nonfinite(loss: jax.Array, grad_squares: list[jax.Array], num_params: int) -> jax.Array:
    """Index (into ``tensor_names``) of the first non-finite tensor after the parameters: the loss, then each
    gradient by its sum of squares (non-finite when the gradient holds a NaN or Inf, or when its norm overflows
    float32, which makes the update non-finite too); -1 if all are finite. Scalars only, so it costs the
    compiler nothing measurable, where a search over the whole tensors (under a ``lax.cond``) took ~15% of a
    small train step's compile (docs/benchmarks.md). The parameters are not searched: the guard never writes a
    non-finite one, so only a run started from such weights has them, and its loss is then the one named."""
    bad = jnp.stack([~jnp.isfinite(loss)] + [~jnp.isfinite(s) for s in grad_squares])
    return jnp.where(bad.any(), num_params + jnp.argmax(bad), -1).astype(jnp.int32)


def guard_nonfinite(state, params: dict, opt_state, grad_squares: list[jax.Array],
                    metrics: dict) -> tuple[dict, object, dict]:
    """Keep ``state``'s parameters and optimizer state when the new ones came from a non-finite step, except the
    learning-rate schedule's step count: the schedule follows the training step (the logged ``lr``) through a
    skipped update, so a run still ends at its final learning rate. Adam's moments and their count stay."""
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
    params = jax.tree.map(keep, params, state.params)
    is_schedule = lambda node: isinstance(node, optax.ScaleByScheduleState)  # noqa: E731
    opt_state = jax.tree.map(lambda new, old: new if is_schedule(new) else keep(new, old), opt_state,
                             state.opt_state, is_leaf=is_schedule)
    culprit = first_nonfinite(metrics["loss"], grad_squares, len(jax.tree.leaves(state.params)))
    return params, opt_state, {**metrics, SKIPPED: 1.0 - finite.astype(jnp.float32), CULPRIT: culprit}


class NonFinitePolicy:
    """Host side of ``train.nan_policy``: reads a finished step's flags and says what the loop must do."""

    def __init__(self, policy: str, names: list[str], max_rollbacks: int):
        self.policy, self.names, self.max_rollbacks = policy, names, max_rollbacks
        self.skipped = 0  # updates dropped in this process's lifetime
        self.rollbacks: dict[int, int] = {}  # checkpoint step -> rollbacks to it

    def count_logged(self, rows: list[dict]) -> None:
        """Start from the updates the kept log says were dropped (skipped steps, rollbacks) before this process."""
        self.skipped = sum(1 for r in rows if r.get(SKIPPED) == 1.0 or ROLLBACK_WINDOW in r)

    def inspect(self, step: int, metrics: dict, batch_index: int) -> str | None:
        """Pops the culprit index off the step's host ``metrics``; returns None (fine), 'skip', 'rollback' or 'halt'
        (the loop raises ``self.diverged(...)`` after logging the row)."""
        culprit = int(metrics.pop(CULPRIT))
        if culprit < 0:
            return None
        self.skipped += 1
        self.last = (step, batch_index, self.names[culprit] if culprit < len(self.names) else f"#{culprit}")
        if self.policy == "skip_batch":
            log.warning(f"step {step}: non-finite {self.last[2]} on data batch {batch_index}; update skipped "
                      f"({self.skipped} so far, train.nan_policy=skip_batch)")
            return "skip"
        return "rollback" if self.policy == "rollback" else "halt"

    def diverged(self, extra: str = "") -> TrainingDiverged:
        step, batch_index, name = self.last
        return TrainingDiverged(
            f"non-finite values at step {step} (data batch {batch_index}): first non-finite tensor is {name}; "
            f"the update was not applied{extra}. Lower optimizer.lr or raise optimizer.warmup_steps, or set "
            "train.nan_policy=skip_batch or rollback to continue past it")

    def rollback_target(self, checkpoint_step: int | None) -> int:
        """The step to roll back to, or raise when there is none or it keeps failing."""
        if checkpoint_step is None:
            raise self.diverged("; train.nan_policy=rollback found no checkpoint to roll back to "
                                "(lower train.checkpoint_every)")
        self.rollbacks[checkpoint_step] = self.rollbacks.get(checkpoint_step, 0) + 1
        if self.rollbacks[checkpoint_step] > self.max_rollbacks:
            raise self.diverged(f"; already rolled back to the step-{checkpoint_step} checkpoint "
                                f"{self.max_rollbacks} times (train.max_rollbacks)")
        return checkpoint_step
