"""How a run without a checkpoint of its own begins: the state it starts from, and what came before it.

The trainer takes a ``StageStart`` from a start function (fresh weights, or a parent's checkpoint for a
continuation stage); a run with its own checkpoint resumes from that instead.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from scaling_jax.train.state import TrainState

NO_OFFSET = {"step": 0, "tokens": 0, "flops": 0.0}


@dataclass
class StageStart:
    """How a run without a checkpoint of its own begins: a state, and what the stages before it spent.

    ``offset`` (step, tokens, FLOPs of all earlier stages) is added to every metric row so a
    continuation's curves extend its parent's on one compute axis.
    """

    state: TrainState
    offset: dict = dataclasses.field(default_factory=lambda: dict(NO_OFFSET))
    history: list = dataclasses.field(default_factory=list)  # lineage records of the earlier stages, oldest first
    parent: str | None = None  # checkpoint directory the state came from
    parent_step: int | None = None
    data_index: int = 0  # global batch the stream starts at (where the parent stopped, if it read the same data)
