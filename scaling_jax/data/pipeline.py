"""grain pipeline: documents -> tokens -> packed rows -> shuffle -> batch -> per-process slice.

Rows are fixed windows over the concatenation of all documents (each wrapped in bos/eos),
so nothing is wasted on padding and any row is computed in O(seq_len) from its index. That
makes the whole pipeline a random-access ``grain.MapDataset``: its iterator state is a
single index, resume is exact, and process ``p`` of ``P`` reading batches ``p, p+P, ...``
covers the single-process stream with no overlap.

A row holds ``seq_len + 1`` tokens and the segment id of each (1, 2, ... per document in the
window, so documents never attend to each other); objectives turn rows into model batches.

A mixture of sources is a list of ``(rows, rate)``: each source's rows are shuffled and repeated
on their own, then ``grain.MapDataset.mix`` interleaves whole rows in proportion to the rates. The
interleaving is a fixed function of the index, so a mixture stays random-access: same seed, same
batches; its checkpointed state is still one index.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import grain
import numpy as np

from scaling_jax.config import DataConfig
from scaling_jax.data.tokenizer import Tokenizer
from scaling_jax.errors import DataError

Rows = dict[str, np.ndarray]


def segment_positions(segment_ids: np.ndarray) -> np.ndarray:
    """Position of each token inside its segment (restarting at 0 where the id changes)."""
    seg = np.asarray(segment_ids)
    idx = np.broadcast_to(np.arange(seg.shape[-1]), seg.shape)
    starts = np.ones(seg.shape, dtype=bool)
    starts[..., 1:] = seg[..., 1:] != seg[..., :-1]
    return (idx - np.maximum.accumulate(np.where(starts, idx, 0), axis=-1)).astype(np.int32)


class PackedRows:
    """Random-access windows of ``seq_len + 1`` tokens over concatenated documents."""

    def __init__(self, docs: Sequence[np.ndarray], seq_len: int, bos_id: int, eos_id: int):
        parts = []
        for doc in docs:
            parts += [np.array([bos_id], np.int32), doc.astype(np.int32), np.array([eos_id], np.int32)]
        stream = np.concatenate(parts) if parts else np.zeros(0, np.int32)
        small = stream.size and int(stream.max()) < 2**16
        self.stream = stream.astype(np.uint16) if small else stream
        lengths = np.array([doc.size + 2 for doc in docs], dtype=np.int64)
        self.doc_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(docs) else np.zeros(0, np.int64)
        self.seq_len = seq_len
        self.num_tokens = int(stream.size)

    def __len__(self) -> int:
        return max(0, (self.num_tokens - 1) // self.seq_len)

    def __getitem__(self, i: int) -> Rows:
        start = int(i) * self.seq_len
        span = np.arange(start, start + self.seq_len + 1)
        doc = np.searchsorted(self.doc_starts, span, side="right")
        return {"tokens": self.stream[span].astype(np.int32), "segment_ids": (doc - doc[0] + 1).astype(np.int32)}


def tokenize_documents(docs: Sequence, tokenizer: Tokenizer) -> list[np.ndarray]:
    """Batched: the Hugging Face and SentencePiece tokenizers encode a batch on several threads."""
    return tokenizer.encode_batch([doc.text for doc in docs])


def shuffled(items: Sequence, seed: int) -> list:
    """A fixed document order for a seed, so rows mix files while staying reproducible."""
    order = np.random.default_rng(seed).permutation(len(items))
    return [items[i] for i in order]


def mixed_rows(components: Sequence[tuple[Sequence, float]], seed: int | None) -> grain.MapDataset:
    """Rows of several sources interleaved by rate; each source shuffled per epoch (``seed``) or kept in order."""
    parts = []
    for i, (rows, _) in enumerate(components):
        part = grain.MapDataset.source(rows)
        parts.append((part if seed is None else part.shuffle(seed=seed + i)).repeat())
    return grain.MapDataset.mix(parts, [rate for _, rate in components])


def train_dataset(rows: Sequence | list[tuple[Sequence, float]], cfg: DataConfig, process_index: int,
                  process_count: int, transform: Callable[[Rows], Rows]) -> grain.MapDataset:
    """Infinite, reshuffled every epoch, batched per process and turned into model batches.

    ``rows`` is one source's rows, or a mixture ``[(rows, rate), ...]``."""
    if cfg.batch_size % process_count:
        raise DataError(f"data.batch_size={cfg.batch_size} must be divisible by the {process_count} processes")
    parts = rows if isinstance(rows, list) and rows and isinstance(rows[0], tuple) else [(rows, 1.0)]
    if len(parts) == 1 and len(parts[0][0]) < cfg.batch_size:
        raise DataError(f"training split packs into {len(parts[0][0])} rows of data.seq_len={cfg.seq_len}, fewer "
                        f"than data.batch_size={cfg.batch_size}; use more data or smaller seq_len / batch_size")
    for i, (part, _) in enumerate(parts):
        if len(part) == 0:
            raise DataError(f"data.mixture[{i}] packs into no row of data.seq_len={cfg.seq_len}; give that "
                            "source more data or lower data.seq_len")
    if len(parts) == 1:
        ds = grain.MapDataset.source(parts[0][0]).shuffle(seed=cfg.shuffle_seed).repeat()
    else:
        ds = mixed_rows(parts, cfg.shuffle_seed)
    ds = ds.batch(cfg.batch_size // process_count, drop_remainder=True)
    return ds[process_index::process_count].map(transform)


def make_iterator(ds: grain.MapDataset, cfg: DataConfig) -> grain.DatasetIterator:
    options = grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=cfg.prefetch)
    return iter(ds.to_iter_dataset(options))


def next_index(state: object, default: int) -> int:
    """The next global batch named by a training iterator's state (live or as saved in a checkpoint's
    ``data`` item), ``default`` if the state does not say."""
    return int(state.get("next_index", default)) if isinstance(state, dict) else default


def position(data_iter: grain.DatasetIterator, default: int) -> int:
    """Index of the next global batch the training iterator yields (``default`` if its state does not say)."""
    return next_index(data_iter.get_state(), default)


def seek(data_iter: grain.DatasetIterator, index: int) -> None:
    """Move a training iterator to global batch ``index`` (a continuation reads on from where its parent
    stopped). The stream is a random-access ``MapDataset``, so its iterator state is the next index."""
    state = data_iter.get_state()
    if not (isinstance(state, dict) and "next_index" in state):
        raise DataError(f"cannot move this data iterator to batch {index}: its state {state!r} has no next_index")
    data_iter.set_state({**state, "next_index": int(index)})


def eval_batches(rows: PackedRows, cfg: DataConfig, num_batches: int, process_index: int, process_count: int,
                 transform: Callable[[Rows], Rows]) -> list[Rows]:
    """The first ``num_batches`` global batches of the validation rows, in order (no shuffle)."""
    per_process = cfg.batch_size // process_count
    available = len(rows) // cfg.batch_size
    if available == 0:
        raise DataError(f"validation split packs into {len(rows)} rows, fewer than data.batch_size={cfg.batch_size}; "
                        "raise data.val_fraction or lower data.batch_size")
    out = []
    for b in range(min(num_batches, available)):
        first = b * cfg.batch_size + process_index * per_process
        items = [rows[first + j] for j in range(per_process)]
        out.append(transform({k: np.stack([it[k] for it in items]) for k in items[0]}))
    return out
