"""Periodic tasks of the training loop: evaluation, checkpoints, a profiler trace, and any a caller adds.

As Levanter's ``Trainer.add_hook(fn, every=N)`` and clu's periodic actions do, a task that runs every N
steps is a hook handed to the trainer, not an edit of its loop. Hooks run after an update is dispatched,
in the order they were added; one marked ``after_log`` first waits for that step's metrics (so it never
sees an update the non-finite policy is about to roll back).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax


@dataclass
class Hook:
    """``fn(step)`` after every ``every``-th update (0: never periodically) and, with ``at_end``, after the last."""

    fn: Callable[[int], None]
    every: int
    at_end: bool = True
    after_log: bool = False
    name: str = ""

    def due(self, step: int, last_step: int) -> bool:
        return (self.every > 0 and step % self.every == 0) or (self.at_end and step == last_step)


class ProfileTrace:
    """A ``jax.profiler`` trace of updates ``skip + 1 .. skip + steps``: compilation (the first update) and
    warm-up stay out of it. The device is synchronised at both ends so the trace holds exactly those steps.
    Written under ``directory`` (the run's TensorBoard directory: its profile tab reads ``plugins/profile``)."""

    def __init__(self, directory: str, skip: int, steps: int, sync: Callable[[], None],
                 say: Callable[[str], None]):
        self.directory, self.first, self.last = directory, skip, skip + steps
        self.sync, self.say, self.active = sync, say, False

    def hook(self) -> Hook:
        return Hook(self, every=1, at_end=False, name="profile")

    def __call__(self, step: int) -> None:
        if step == self.first and not self.active:
            self.sync()
            jax.profiler.start_trace(self.directory)
            self.active = True
        elif step == self.last and self.active:
            self.stop(step)

    def stop(self, step: int) -> None:
        """End the trace (also when the run ends or stops inside the traced window)."""
        if not self.active:
            return
        self.sync()
        jax.profiler.stop_trace()
        self.active = False
        self.say(f"profile of steps {self.first + 1}..{step} written to {self.directory} "
                 "(TensorBoard's profile tab, or xprof)")
