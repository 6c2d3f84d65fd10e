"""Causal language modelling on packed rows: predict each next token of the same document."""

from __future__ import annotations

import jax
import numpy as np

from scaling_jax.data.pipeline import segment_positions
from scaling_jax.objectives.base import Batch, Metrics, ObjectiveBase, masked_cross_entropy


def shift_rows(rows: Batch) -> Batch:
    """Inputs are tokens[:-1], targets tokens[1:]; a target counts only inside its document."""
    tokens, seg = rows["tokens"], rows["segment_ids"]
    inputs_seg, target_seg = seg[..., :-1], seg[..., 1:]
    return {
        "inputs": tokens[..., :-1],
        "targets": tokens[..., 1:],
        "segment_ids": inputs_seg,
        "positions": segment_positions(inputs_seg),
        "loss_mask": ((inputs_seg == target_seg) & (inputs_seg != 0)).astype(np.int32),
    }


class CausalLM(ObjectiveBase):
    name = "causal"

    def prepare(self, rows: Batch) -> Batch:
        return shift_rows(rows)

    def loss(self, model, batch: dict[str, jax.Array]) -> tuple[jax.Array, Metrics]:
        hidden = model(batch["inputs"], batch["positions"], batch["segment_ids"])
        metrics = masked_cross_entropy(model.logits(hidden), batch["targets"], batch["loss_mask"])
        return metrics["loss"], metrics
