"""How a run without a checkpoint of its own begins: where its state comes from, and what came before it.

``StartSpec`` says where (in the spirit of T5X's ``RestoreCheckpointConfig``): fresh weights, or a parent
checkpoint with an optimizer-state policy. It is built once from the config's ``stage`` section (which
``scaling-jax continue`` fills in) and consumed by the trainer, which turns it into a ``StageStart``: the
state itself plus the parent's totals and lineage. A run with a checkpoint of its own always resumes from
that instead, whatever the spec says.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from scaling_jax.train.state import TrainState

NO_OFFSET = {"step": 0, "tokens": 0, "flops": 0.0}


@dataclass(frozen=True)
class StartSpec:
    """Where a fresh run's state comes from.

    ``parent`` empty: fresh weights (``scratch``). Otherwise a checkpoint directory ``RUN/checkpoints/STEP``
    of a finished run, ours or an imported one (``convert --from-hf`` writes a run whose lineage starts with
    its import record), read with ``optimizer_state`` ``reset`` (fresh AdamW state) or ``continue`` (the
    parent's moments), and ``extend_vocab`` (grow the embedding to the tokenizer's vocabulary).
    """

    parent: str = ""
    optimizer_state: str = "reset"
    extend_vocab: bool = False

    @property
    def kind(self) -> str:
        return "parent" if self.parent else "scratch"

    @classmethod
    def from_config(cls, config) -> StartSpec:
        stage = config.stage
        return cls(stage.parent, stage.optimizer_state, stage.extend_vocab)


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
