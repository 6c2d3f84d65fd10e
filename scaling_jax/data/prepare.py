"""Tokenize a source once into random-access ArrayRecord shards; training reads them with grain.

A prepared directory holds, per split (``train``, ``validation``), the packed token stream the
in-memory pipeline would build from the same documents in source order — every document wrapped
in bos/eos and concatenated — cut into fixed chunks of ``chunk_tokens`` tokens, one ArrayRecord
record per chunk (``group_size:1``, so reading a record decodes only that record). Any training
row (a window of ``seq_len + 1`` tokens) is therefore one or two record reads, whatever the
corpus size, and nothing is held in memory. Document boundaries need no index: bos only ever
starts a document (tokenizers never produce special ids from text), so segment ids are a
running count of bos.

``manifest.json`` records the tokenizer (kind, fingerprint, vocab size; the tokenizer itself is
saved under ``tokenizer/``), the source, the split rule, per-shard chunk/token/document counts
and the byte counts behind the unigram bits/byte baseline. Writing goes to a hidden temporary directory
beside DIR and is renamed at the end, so an interrupted prepare never leaves a directory that looks
complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator

import grain
import numpy as np

from scaling_jax.config import DataConfig
from scaling_jax.data import sources
from scaling_jax.data.tokenizer import Tokenizer
from scaling_jax.errors import DataError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
WRITER_OPTIONS = "group_size:1"
TOKENIZER_DIR = "tokenizer"


def is_prepared(path: str) -> bool:
    return os.path.isfile(os.path.join(os.path.expanduser(path), MANIFEST))


def read_manifest(directory: str) -> dict:
    path = os.path.join(os.path.expanduser(directory), MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not a readable manifest ({e}); run 'scaling-jax data prepare' again") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path} has format_version {manifest.get('format_version')}, this version reads "
                        f"{FORMAT_VERSION}; run 'scaling-jax data prepare' again")
    return manifest


# ----------------------------------------------------------------------------- writing


class _SplitWriter:
    """Appends documents to a split's stream and writes full chunks into rotating ArrayRecord shards."""

    def __init__(self, directory: str, split: str, dtype: np.dtype, chunk_tokens: int, chunks_per_shard: int,
                 bos: int, eos: int):
        self.directory, self.split, self.dtype, self.bos, self.eos = directory, split, dtype, bos, eos
        self.chunk_tokens, self.chunks_per_shard = chunk_tokens, chunks_per_shard
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.shards: list[dict] = []
        self.writer = None
        self.documents = 0
        self.text_tokens = 0
        self.byte_counts = np.zeros(256, dtype=np.int64)

    def add(self, ids: np.ndarray, text: str) -> None:
        self.pending.append(np.concatenate([[self.bos], ids, [self.eos]]).astype(self.dtype))
        self.pending_tokens += ids.size + 2
        self.documents += 1
        self.text_tokens += int(ids.size)
        self.byte_counts += np.bincount(np.frombuffer(text.encode("utf-8", "replace"), np.uint8), minlength=256)
        if self.pending_tokens >= self.chunk_tokens:
            self._flush(final=False)

    def _open_shard(self) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        name = f"{self.split}-{len(self.shards):05d}.array_record"
        self.writer = ArrayRecordWriter(os.path.join(self.directory, name), WRITER_OPTIONS)
        self.shards.append({"file": name, "chunks": 0, "tokens": 0, "documents": 0})

    def _write_chunk(self, chunk: np.ndarray) -> None:
        if self.writer is None or self.shards[-1]["chunks"] >= self.chunks_per_shard:
            self._close_shard()
            self._open_shard()
        self.writer.write(chunk.tobytes())
        self.shards[-1]["chunks"] += 1
        self.shards[-1]["tokens"] += int(chunk.size)
        self.shards[-1]["documents"] += int((chunk == self.bos).sum())  # documents starting in this shard

    def _flush(self, final: bool) -> None:
        stream = np.concatenate(self.pending) if self.pending else np.zeros(0, self.dtype)
        full = stream.size // self.chunk_tokens * self.chunk_tokens
        for start in range(0, full, self.chunk_tokens):
            self._write_chunk(stream[start : start + self.chunk_tokens])
        rest = stream[full:]
        if final and rest.size:
            self._write_chunk(rest)
            rest = rest[:0]
        self.pending, self.pending_tokens = ([rest] if rest.size else []), int(rest.size)

    def _close_shard(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def finish(self) -> dict:
        self._flush(final=True)
        self._close_shard()
        return {"shards": self.shards, "documents": self.documents, "text_tokens": self.text_tokens,
                "tokens": sum(s["tokens"] for s in self.shards), "byte_counts": self.byte_counts.tolist()}


def _batched(docs: Iterable[sources.Document], size: int) -> Iterator[list[sources.Document]]:
    batch: list[sources.Document] = []
    for doc in docs:
        if doc.text:
            batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def prepare(cfg: DataConfig, tokenizer: Tokenizer, output: str, chunk_tokens: int = 8192,
            chunks_per_shard: int = 4096, overwrite: bool = False, log: Callable[[str], None] | None = print) -> dict:
    """Tokenize ``cfg.source`` (split by ``cfg.val_fraction``) into shards under ``output``; returns the manifest.

    ``log`` gets a progress line every 10 s (None: silent)."""
    output = os.path.expanduser(output)
    if os.path.exists(output) and not overwrite:
        raise DataError(f"'{output}' already exists; pass --overwrite or choose another output directory")
    if cfg.mixture or cfg.source.startswith("seqio:") or is_prepared(cfg.source):
        what = "data.mixture" if cfg.mixture else cfg.source
        raise DataError(f"data prepare takes one text source (files, a glob, hf:..., stdlib), not '{what}'; "
                        "prepare each text source of a mixture separately and mix the prepared directories")
    if chunk_tokens < 1 or chunks_per_shard < 1:
        raise DataError("--chunk-tokens and --chunks-per-shard must be positive")
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".tmp-{os.path.basename(output.rstrip('/'))}-")  # never a user's
    try:
        manifest = _write(cfg, tokenizer, tmp, chunk_tokens, chunks_per_shard, log)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed prepare leaves nothing that looks usable
        raise
    if os.path.exists(output):
        shutil.rmtree(output)
    os.replace(tmp, output)
    return manifest


def _write(cfg: DataConfig, tokenizer: Tokenizer, tmp: str, chunk_tokens: int, chunks_per_shard: int, log) -> dict:
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)
    writers = {split: _SplitWriter(tmp, split, dtype, chunk_tokens, chunks_per_shard, tokenizer.bos_id,
                                   tokenizer.eos_id) for split in sources.SPLITS}
    kept = dict.fromkeys(sources.SPLITS, 0)
    started = last_log = time.perf_counter()
    for batch in _batched(sources.source_documents(cfg), 256):
        for doc, ids in zip(batch, tokenizer.encode_batch([d.text for d in batch]), strict=True):
            split = "validation" if sources.is_validation(doc.name, cfg.val_fraction) else "train"
            if cfg.max_docs and kept[split] >= cfg.max_docs:
                continue
            writers[split].add(ids, doc.text)
            kept[split] += 1
        if log is not None and (now := time.perf_counter()) - last_log > 10:
            last_log = now
            log(f"  {sum(kept.values()):,} documents, {sum(w.text_tokens for w in writers.values()):,} tokens, "
                f"{now - started:.0f} s")
        if cfg.max_docs and kept["train"] >= cfg.max_docs:  # validation keeps what the hash gave it so far
            break
    splits = {split: w.finish() for split, w in writers.items()}
    if splits["train"]["documents"] == 0:
        raise DataError(f"data.source='{cfg.source}' gives no training documents; point it at non-empty data")
    tokenizer.save(os.path.join(tmp, TOKENIZER_DIR))
    manifest = {"format_version": FORMAT_VERSION, "source": cfg.source, "format": cfg.format,
                "text_field": cfg.text_field, "val_fraction": cfg.val_fraction, "max_docs": cfg.max_docs,
                "tokenizer": {"kind": tokenizer.kind, "fingerprint": tokenizer.fingerprint(),
                              "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id,
                              "eos_id": tokenizer.eos_id},
                "dtype": dtype.name, "chunk_tokens": chunk_tokens, "splits": splits,
                "seconds": round(time.perf_counter() - started, 2)}
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


# ----------------------------------------------------------------------------- reading


class ShardRows:
    """Random-access packed rows of ``seq_len + 1`` tokens over a prepared split, read through grain.

    Row ``i`` is the window starting at token ``i * seq_len`` of the split's stream: exactly what
    ``pipeline.PackedRows`` gives for the same documents in the same order.
    """

    def __init__(self, directory: str, split: str, seq_len: int, tokenizer: Tokenizer):
        directory = os.path.expanduser(directory)
        manifest = read_manifest(directory)
        saved = manifest["tokenizer"]
        if saved["fingerprint"] != tokenizer.fingerprint():
            raise DataError(f"'{directory}' was prepared with another tokenizer ({saved['kind']}, vocab "
                            f"{saved['vocab_size']}); set data.tokenizer={os.path.join(directory, TOKENIZER_DIR)}")
        info = manifest["splits"][split]
        self.chunk_tokens = int(manifest["chunk_tokens"])
        self.dtype = np.dtype(manifest["dtype"])
        self.num_tokens = int(info["tokens"])
        self.num_documents = int(info["documents"])
        self.byte_counts = np.asarray(info["byte_counts"], dtype=np.int64)
        self.seq_len = seq_len
        self.bos_id = int(saved["bos_id"])
        paths = [os.path.join(directory, s["file"]) for s in info["shards"]]
        self.source = grain.sources.ArrayRecordDataSource(paths) if paths else []

    def __len__(self) -> int:
        return max(0, (self.num_tokens - 1) // self.seq_len)

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Stream tokens ``[start, stop)`` (one or two record reads for a row)."""
        first, last = start // self.chunk_tokens, (stop - 1) // self.chunk_tokens
        raw = self.source.__getitems__(list(range(first, last + 1)))
        chunk = np.concatenate([np.frombuffer(r, dtype=self.dtype) for r in raw])
        offset = start - first * self.chunk_tokens
        return chunk[offset : offset + stop - start]

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        start = int(i) * self.seq_len
        tokens = self.tokens(start, start + self.seq_len + 1).astype(np.int32)
        seg = np.cumsum(tokens == self.bos_id)
        return {"tokens": tokens, "segment_ids": (seg - seg[0] + 1).astype(np.int32)}
