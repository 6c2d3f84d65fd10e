"""Synthetic rows: random tokens in packed documents, for benchmarks and compile-only work (``data.source=synthetic``).

MaxText's ``dataset_type=synthetic`` plays the same part: measuring step time, MFU and memory needs the
shapes of real batches, not a corpus. Row ``i`` is a pure function of (seed, i), so the source is
random-access like ``pipeline.PackedRows`` and resume stays exact. Documents have random lengths
(geometric, mean ``mean_doc_len``), so attention masks and positions look like packed text, not one
document per row.
"""

from __future__ import annotations

import numpy as np

Rows = dict[str, np.ndarray]

FIRST_ID = 3  # ids 0..2 are pad / bos / eos in every tokenizer layout here (data/vocab.py)
LENGTH = 2**31 - 1  # rows a synthetic source pretends to hold: never exhausted
SOURCE = "synthetic"  # the data.source value


class SyntheticRows:
    """Random-access rows of ``seq_len + 1`` tokens drawn uniformly from ``ids``, in packed documents."""

    def __init__(self, seq_len: int, ids: np.ndarray, seed: int = 0, mean_doc_len: int = 256,
                 num_rows: int = LENGTH):
        if len(ids) == 0:
            raise ValueError("no token ids to draw synthetic tokens from")
        self.seq_len, self.ids, self.seed = seq_len, np.asarray(ids, np.int32), seed
        self.mean_doc_len, self.num_rows = max(1, mean_doc_len), num_rows
        self.num_documents = max(1, num_rows * (seq_len + 1) // self.mean_doc_len)

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, i: int) -> Rows:
        rng = np.random.default_rng((self.seed, int(i)))
        width = self.seq_len + 1
        tokens = self.ids[rng.integers(0, len(self.ids), size=width)]
        starts = rng.random(width) < 1.0 / self.mean_doc_len  # a document begins here
        starts[0] = True
        return {"tokens": tokens, "segment_ids": np.cumsum(starts).astype(np.int32)}


def text_ids(byte_lengths: np.ndarray) -> np.ndarray:
    """The ids that stand for text (``tokenizer.token_byte_lengths() > 0``): no specials, sentinels or modes."""
    return np.flatnonzero(np.asarray(byte_lengths) > 0).astype(np.int32)


def uniform_bits_per_byte(byte_lengths: np.ndarray) -> float:
    """The best any model can do on uniform tokens over ``text_ids``: log2(#ids) bits per token, over the
    mean bytes per token (the unigram baseline and the optimum coincide for i.i.d. uniform tokens)."""
    lengths = np.asarray(byte_lengths)[text_ids(byte_lengths)]
    return float(np.log2(len(lengths)) / lengths.mean())


def example_batch(batch_size: int, seq_len: int, vocab_size: int, seed: int = 0) -> Rows:
    """One batch of synthetic rows (what an objective's ``prepare`` takes): shapes for AOT compiles and benches."""
    rows = SyntheticRows(seq_len, np.arange(FIRST_ID, vocab_size), seed)
    picked = [rows[i] for i in range(batch_size)]
    return {k: np.stack([r[k] for r in picked]) for k in picked[0]}
