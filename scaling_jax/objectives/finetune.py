"""Instruction finetuning (Flan-style): loss on the targets only, the prompt attended bidirectionally.

Rows come from ``data.instructions`` (``scaling_jax/data/instructions.py``): whole examples
``[bos] prompt target [eos]`` packed side by side, with a ``target_mask``. Each example becomes
exactly the prefix-LM layout of the UL2 denoisers (the prompt plays the denoiser's inputs), built
by the same ``pack_examples`` and scored by the same loss, so a UL2R-continued model is finetuned
in the format it was continued with.
"""

from __future__ import annotations

import numpy as np

from scaling_jax.errors import ConfigError
from scaling_jax.objectives.base import Batch, ObjectiveBase
from scaling_jax.objectives.denoisers import MixtureOfDenoisers, pack_examples


def row_examples(tokens: np.ndarray, segment_ids: np.ndarray, target_mask: np.ndarray) -> list[tuple]:
    """One packed row -> ``(sequence, prompt_length, 0)`` per example, as ``pack_examples`` takes them."""
    out = []
    for seg in np.unique(segment_ids[segment_ids != 0]):
        where = segment_ids == seg
        out.append((tokens[where], int((target_mask[where] == 0).sum()), 0))
    return out


class InstructionFinetune(ObjectiveBase):
    name = "finetune"
    next_token_eval = True  # the loss is next-token prediction of the targets: validation uses it as is

    loss = MixtureOfDenoisers.loss  # prefix-LM loss over ``loss_mask`` (shared, not copied)

    def prepare(self, rows: Batch) -> Batch:
        if "target_mask" not in rows:
            raise ConfigError("objective=finetune trains on instruction examples; set data.instructions "
                              "(e.g. [{source: generated:arithmetic}] or your {inputs, targets} JSONL files)")
        tokens, seg, mask = (np.asarray(rows[k]) for k in ("tokens", "segment_ids", "target_mask"))
        examples = [row_examples(*r) for r in zip(tokens, seg, mask, strict=True)]
        pad = self.tokenizer.pad_id if self.tokenizer is not None else 0
        return pack_examples(examples, tokens.shape[-1] - 1, pad)
