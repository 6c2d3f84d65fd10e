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

import json
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


class BatchStream:
    """The training batches from any global index, read by grain threads or by worker processes.

    The stream is a random-access ``MapDataset``, so its whole position is the index of the next batch: the
    checkpointed state is ``{"next_index": i}`` whatever reads it, a continuation seeks by index, and a run may
    change ``data.worker_processes`` between resumes. With ``worker_processes > 0`` grain's ``mp_prefetch``
    runs the host transforms (packing, the objective's ``prepare``, e.g. UL2's denoisers) in that many
    processes, out of reach of the trainer's GIL; batches arrive in the same order as with threads (worker w
    computes batches w, w + W, ..., delivered round robin). Seeking reopens the pipeline at the new index.
    """

    def __init__(self, ds: grain.MapDataset, cfg: DataConfig, index: int = 0):
        self.ds, self.cfg, self.index = ds, cfg, index
        self._it: grain.DatasetIterator | None = None

    def _open(self) -> grain.DatasetIterator:
        options = grain.ReadOptions(num_threads=self.cfg.num_threads, prefetch_buffer_size=self.cfg.prefetch)
        ds = (self.ds[self.index:] if self.index else self.ds).to_iter_dataset(options)
        if self.cfg.worker_processes:
            _absl_flags_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.cfg.worker_processes,
                                                             per_worker_buffer_size=max(1, self.cfg.prefetch // 2)))
        return iter(ds)

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Rows:
        if self._it is None:
            self._it = self._open()
        batch = next(self._it)
        self.index += 1
        return batch

    def seek(self, index: int) -> None:
        """Continue from global batch ``index`` (a continuation reads on from where its parent stopped)."""
        if index != self.index:
            self.close()
            self.index = int(index)

    def close(self) -> None:
        """Stop worker processes (a thread pipeline just ends)."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, "close"):
            it.close()

    # grain's orbax CheckpointHandler treats any iterator that is not its own DatasetIterator as one whose
    # state is bytes; the file it writes holds the same JSON ({"next_index": i}) as for grain's own iterators.
    def get_state(self) -> bytes:
        return json.dumps({"next_index": self.index}, indent=4).encode()

    def set_state(self, state: bytes) -> None:
        self.seek(next_index(json.loads(state), 0))

    def start_prefetch(self) -> None:
        """Called by grain's checkpoint handler after a restore; the pipeline opens on the next batch."""


def _absl_flags_parsed() -> None:
    """grain's worker processes read absl flags, which a program that never ran absl's ``app.run`` has not
    parsed; parse none (all defaults) once."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_iterator(ds: grain.MapDataset, cfg: DataConfig) -> BatchStream:
    return BatchStream(ds, cfg)


def next_index(state: object, default: int) -> int:
    """The next global batch named by a training iterator's state (as saved in a checkpoint's ``data`` item),
    ``default`` if the state does not say."""
    return int(state.get("next_index", default)) if isinstance(state, dict) else default


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
