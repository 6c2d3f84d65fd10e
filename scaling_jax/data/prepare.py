"""Tokenize a source once into random-access ArrayRecord shards; training reads them with grain.

The source's files are grouped, in source order, into *parts* of about ``part_bytes`` (64 MiB) of input; an
``hf:`` data set is one part. Each part is tokenized on its own into one packed stream per split (``train``,
``validation``) — every document wrapped in bos/eos and concatenated, as the in-memory pipeline does — cut into
chunks of ``chunk_tokens`` tokens (the part's last chunk may be short), one ArrayRecord record per chunk
(``group_size:1``, so reading a record decodes only that record), in the part's own rotating shard files
``SPLIT-PART-SHARD.array_record``. Parts depend on nothing but their own files, so they can be written by
independent tasks (``parallel_map``: the Ray executor gives one task per part) or one after another in this
process, and both write the same bytes. The split's stream is the parts' streams in order: exactly the stream
the in-memory path builds from the same documents. Any training row (a window of ``seq_len + 1`` tokens) is a
few record reads, whatever the corpus size, and nothing is held in memory. Document boundaries need no index:
bos only ever starts a document (tokenizers never produce special ids from text), so segment ids are a
running count of bos.

``manifest.json`` records the tokenizer (kind, fingerprint, vocab size; the tokenizer itself is saved under
``tokenizer/``), the source, the split rule, the parts, per-shard chunk/token/document counts and the byte counts
behind the unigram bits/byte baseline — and nothing that depends on the run (no timings, hosts or executor),
so the same input gives the same manifest. Writing goes to a hidden temporary directory beside DIR and is
renamed at the end, so an interrupted prepare never leaves a directory that looks complete. Format 1 (before
parts: one stream of full chunks) is read as one part.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grain
import numpy as np

from scaling_jax.config import DataConfig
from scaling_jax.data import sources
from scaling_jax.data.tokenizer import Tokenizer, build_tokenizer
from scaling_jax.errors import DataError
from scaling_jax.paths import umask

MANIFEST = "manifest.json"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, FORMAT_VERSION)  # 1: one stream of full chunks, read as a single part
WRITER_OPTIONS = "group_size:1"
TOKENIZER_DIR = "tokenizer"
PART_BYTES = 64 << 20  # input bytes per part: a task's work (tens of seconds to a minute for BPE)
ParallelMap = Callable[[Callable[[Any], Any], Sequence[Any]], list]  # [fn(x) for x in items], in any place


def is_prepared(path: str) -> bool:
    return os.path.isfile(os.path.join(os.path.expanduser(path), MANIFEST))


def check_output(output: str, overwrite: bool) -> None:
    """``--output`` must be new, or with ``--overwrite`` an empty directory or one ``data prepare`` wrote."""
    if os.path.exists(output) and not overwrite:
        raise DataError(f"'{output}' already exists; pass --overwrite or choose another output directory")
    if os.path.exists(output) and not _replaceable(output):
        raise DataError(f"--output '{output}' exists and is not a prepared data directory; --overwrite only "
                        "replaces one that `data prepare` wrote: choose another --output")


def _replaceable(path: str) -> bool:
    """What ``--overwrite`` may delete: an empty directory, or one ``data prepare`` wrote (a readable manifest
    of a version it knows; any directory holding a file named manifest.json is not enough)."""
    if not os.path.isdir(path):
        return False
    if not os.listdir(path):
        return True
    try:
        return is_prepared(path) and isinstance(read_manifest(path), dict)
    except DataError:
        return False


def read_manifest(directory: str) -> dict:
    path = os.path.join(os.path.expanduser(directory), MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not a readable manifest ({e}); run 'scaling-jax data prepare' again") from None
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise DataError(f"{path} has format_version {manifest.get('format_version')}, this version reads "
                        f"{', '.join(map(str, READABLE_VERSIONS))}; run 'scaling-jax data prepare' again")
    return manifest


# ----------------------------------------------------------------------------- writing one part


class _SplitWriter:
    """Appends one part's documents of a split to its stream and writes chunks into the part's rotating shards."""

    def __init__(self, directory: str, split: str, part: int, dtype: np.dtype, chunk_tokens: int,
                 chunks_per_shard: int, bos: int, eos: int):
        self.directory, self.split, self.part, self.dtype, self.bos, self.eos = directory, split, part, dtype, bos, eos
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

        name = f"{self.split}-{self.part:05d}-{len(self.shards):05d}.array_record"
        self.writer = ArrayRecordWriter(os.path.join(self.directory, name), WRITER_OPTIONS)
        self.shards.append({"file": name, "part": self.part, "chunks": 0, "tokens": 0, "documents": 0})

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
            self._write_chunk(rest)  # the part's last chunk: short, so the next part starts a chunk of its own
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


@dataclass(frozen=True)
class PartJob:
    """Everything one task needs to write one part; small and picklable (the tokenizer travels as its saved copy)."""

    index: int
    files: tuple[sources.SourceFile, ...] | None  # None: the whole source (an hf: data set is one part)
    cfg: DataConfig
    directory: str  # the prepare's temporary directory: every task writes its part's files there
    chunk_tokens: int
    chunks_per_shard: int
    dtype: str
    fingerprint: str  # of the tokenizer saved under directory/tokenizer


@functools.lru_cache(maxsize=2)
def _saved_tokenizer(directory: str, fingerprint: str) -> Tokenizer:
    """The driver's tokenizer, loaded once per worker process from the copy the driver saved."""
    tokenizer = build_tokenizer(os.path.join(directory, TOKENIZER_DIR))
    if tokenizer.fingerprint() != fingerprint:
        raise DataError(f"the tokenizer saved in {directory} loads with another fingerprint on "
                        f"{socket.gethostname()}; install the same tokenizer libraries on every Ray node")
    return tokenizer


def _fill(writers: dict[str, _SplitWriter], docs: Iterable[sources.Document], tokenizer: Tokenizer,
          val_fraction: float, quota: dict[str, int] | None, say: Callable[[str], None] | None) -> None:
    """Tokenize ``docs`` into their splits' writers; ``quota`` (documents still wanted per split) is spent in
    place and writing stops at once when train's is used up."""
    started = last_log = time.perf_counter()
    for batch in _batched(docs, 256):
        for doc, ids in zip(batch, tokenizer.encode_batch([d.text for d in batch]), strict=True):
            split = "validation" if sources.is_validation(doc.name, val_fraction) else "train"
            if quota is not None:
                if quota[split] == 0:
                    continue
                quota[split] -= 1
            writers[split].add(ids, doc.text)
            if quota is not None and quota["train"] == 0:
                return
        if say is not None and (now := time.perf_counter()) - last_log > 10:
            last_log = now
            say(f"{sum(w.documents for w in writers.values()):,} documents, "
                f"{sum(w.text_tokens for w in writers.values()):,} tokens, {now - started:.0f} s")


def write_part(job: PartJob, tokenizer: Tokenizer | None = None, quota: dict[str, int] | None = None,
               log: Callable[[str], None] | None = None) -> dict:
    """Tokenize one part into its own shards under ``job.directory`` and return its manifest entry.

    Runs as a Ray task (``tokenizer`` None: the saved copy) or in order in this process, which alone passes
    ``quota`` (``data.max_docs``: documents per split still wanted, spent in place) and ``log`` (progress)."""
    if not os.path.isdir(job.directory):
        raise DataError(f"'{job.directory}' (the prepare's temporary output) does not exist on "
                        f"{socket.gethostname()}; put --output on storage every Ray node mounts at the same path")
    tokenizer = tokenizer or _saved_tokenizer(job.directory, job.fingerprint)
    writers = {split: _SplitWriter(job.directory, split, job.index, np.dtype(job.dtype), job.chunk_tokens,
                                   job.chunks_per_shard, tokenizer.bos_id, tokenizer.eos_id)
               for split in sources.SPLITS}
    docs = sources.source_documents(job.cfg) if job.files is None else sources.file_documents(job.cfg, job.files)
    say = None if log is None else (lambda line: log(f"  part {job.index}: {line}"))
    _fill(writers, docs, tokenizer, job.cfg.val_fraction, quota, say)
    return {"part": job.index, "splits": {split: w.finish() for split, w in writers.items()}}


# ----------------------------------------------------------------------------- planning and assembling


def plan_parts(cfg: DataConfig, part_bytes: int = PART_BYTES) -> list[tuple[sources.SourceFile, ...] | None]:
    """The source's files grouped in source order; a part closes once its files reach ``part_bytes`` (a file is
    never split). An ``hf:`` data set is one part (None). Only file names and sizes are read here."""
    if cfg.source.startswith("hf:"):
        return [None]
    parts: list[tuple[sources.SourceFile, ...] | None] = []
    current: list[sources.SourceFile] = []
    size = 0
    for file in sources.source_files(cfg):
        current.append(file)
        size += file.size
        if size >= part_bytes:
            parts.append(tuple(current))
            current, size = [], 0
    return [*parts, tuple(current)] if current else parts


def check_parallel(cfg: DataConfig) -> None:
    """Refuse, before anything is written, what independent part tasks cannot do exactly as ``prepare`` does."""
    if cfg.source.startswith("hf:"):
        raise DataError(f"data prepare --executor ray reads files or stdlib, not data.source='{cfg.source}' (one "
                        "part); write the data set to parquet files (Dataset.to_parquet) and prepare those, or use "
                        "--executor local")
    if cfg.max_docs:
        raise DataError(f"data.max_docs={cfg.max_docs} keeps the first documents of the whole stream, which "
                        "independent parts cannot know; drop data.max_docs or use --executor local")


def _part_info(files: tuple[sources.SourceFile, ...] | None) -> dict:
    if files is None:
        return {"files": 0, "bytes": 0, "first": ""}
    return {"files": len(files), "bytes": sum(f.size for f in files), "first": files[0].name}


def _merge_split(entries: list[dict]) -> dict:
    """One split's manifest entry from its parts' entries, in part order."""
    return {"shards": [s for e in entries for s in e["shards"]],
            "documents": sum(e["documents"] for e in entries), "text_tokens": sum(e["text_tokens"] for e in entries),
            "tokens": sum(e["tokens"] for e in entries),
            "byte_counts": np.sum([e["byte_counts"] for e in entries], axis=0, dtype=np.int64).tolist()}


def assemble_manifest(cfg: DataConfig, tokenizer: Tokenizer, jobs: Sequence[PartJob], part_bytes: int,
                      written: Sequence[dict]) -> dict:
    """The manifest of the parts ``written`` (``write_part``'s entries, in part order)."""
    splits = {split: _merge_split([w["splits"][split] for w in written]) for split in sources.SPLITS}
    if splits["train"]["documents"] == 0:
        raise DataError(f"data.source='{cfg.source}' gives no training documents; point it at non-empty data")
    job = jobs[0]
    return {"format_version": FORMAT_VERSION, "source": cfg.source, "format": cfg.format,
            "text_field": cfg.text_field, "val_fraction": cfg.val_fraction, "max_docs": cfg.max_docs,
            "tokenizer": {"kind": tokenizer.kind, "fingerprint": tokenizer.fingerprint(),
                          "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id,
                          "eos_id": tokenizer.eos_id},
            "dtype": job.dtype, "chunk_tokens": job.chunk_tokens, "chunks_per_shard": job.chunks_per_shard,
            "part_bytes": part_bytes, "parts": [_part_info(jobs[w["part"]].files) for w in written],
            "splits": splits}


def _check_written(directory: str, manifest: dict) -> None:
    """Every shard the tasks reported must be where this process reads: a worker may see another disk."""
    for split in manifest["splits"].values():
        missing = [s["file"] for s in split["shards"] if not os.path.isfile(os.path.join(directory, s["file"]))]
        if missing:
            raise DataError(f"{len(missing)} shard file(s) such as {missing[0]} were written where {directory} is "
                            "not this machine's; put --output on storage every Ray node mounts at the same path")


# ----------------------------------------------------------------------------- prepare


def _check_request(cfg: DataConfig, output: str, overwrite: bool, chunk_tokens: int, chunks_per_shard: int,
                   part_bytes: int) -> None:
    check_output(output, overwrite)
    if sources.is_url(output):
        raise DataError(f"--output '{output}' must be a local or mounted directory; prepare locally and copy it up")
    if cfg.mixture or cfg.source.startswith("seqio:") or is_prepared(cfg.source):
        what = "data.mixture" if cfg.mixture else cfg.source
        raise DataError(f"data prepare takes one text source (files, a glob, hf:..., stdlib), not '{what}'; "
                        "prepare each text source of a mixture separately and mix the prepared directories")
    if chunk_tokens < 1 or chunks_per_shard < 1 or part_bytes < 1:
        raise DataError("--chunk-tokens, --chunks-per-shard and --part-mib must be positive")


def _write_in_order(jobs: Sequence[PartJob], tokenizer: Tokenizer, max_docs: int,
                    log: Callable[[str], None] | None) -> list[dict]:
    """The parts one after another in this process; ``max_docs`` stops at the max_docs-th training document."""
    quota = dict.fromkeys(sources.SPLITS, max_docs) if max_docs else None
    written: list[dict] = []
    started = last_log = time.perf_counter()
    for job in jobs:
        written.append(write_part(job, tokenizer, quota, log))
        if log is not None and (now := time.perf_counter()) - last_log > 10:
            last_log = now
            done = [w["splits"][split] for w in written for split in sources.SPLITS]
            log(f"  {len(written)}/{len(jobs)} parts, {sum(d['documents'] for d in done):,} documents, "
                f"{sum(d['text_tokens'] for d in done):,} tokens, {now - started:.0f} s")
        if quota is not None and quota["train"] == 0:
            break
    return written


def prepare(cfg: DataConfig, tokenizer: Tokenizer, output: str, chunk_tokens: int = 8192,
            chunks_per_shard: int = 4096, overwrite: bool = False, log: Callable[[str], None] | None = print,
            part_bytes: int = PART_BYTES, parallel_map: ParallelMap | None = None) -> dict:
    """Tokenize ``cfg.source`` (split by ``cfg.val_fraction``) into shards under ``output``; returns the manifest.

    ``parallel_map`` (e.g. the Ray executor's ``map``) writes the parts as independent tasks, which must see
    ``output``'s parent directory; without it they are written in order here. ``log`` gets a progress line
    every 10 s of a part written here (None: silent)."""
    output = os.path.realpath(os.path.expanduser(output))  # through a link: the directory it names is replaced
    _check_request(cfg, output, overwrite, chunk_tokens, chunks_per_shard, part_bytes)
    if parallel_map is not None:
        check_parallel(cfg)
    plan = plan_parts(cfg, part_bytes)
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    name = os.path.basename(output.rstrip("/"))
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".tmp-{name}-")  # never a user's
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp's 0700 would hide a shared data set from its team
    try:
        manifest = _write(cfg, tokenizer, tmp, plan, chunk_tokens, chunks_per_shard, part_bytes, parallel_map, log)
        old = None
        if os.path.exists(output):  # moved aside, removed once the new one is in place
            old = tempfile.mkdtemp(dir=parent, prefix=f".old-{name}-")
            os.replace(output, old)
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed prepare leaves nothing that looks usable
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return manifest


def _write(cfg: DataConfig, tokenizer: Tokenizer, tmp: str, plan: list, chunk_tokens: int, chunks_per_shard: int,
           part_bytes: int, parallel_map: ParallelMap | None, log: Callable[[str], None] | None) -> dict:
    tokenizer.save(os.path.join(tmp, TOKENIZER_DIR))  # first: tasks load it from there
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32).name
    jobs = [PartJob(i, files, cfg, tmp, chunk_tokens, chunks_per_shard, dtype, tokenizer.fingerprint())
            for i, files in enumerate(plan)]
    if parallel_map is None:
        written = _write_in_order(jobs, tokenizer, cfg.max_docs, log)
    else:
        written = list(parallel_map(write_part, jobs))
    manifest = assemble_manifest(cfg, tokenizer, jobs, part_bytes, written)
    _check_written(tmp, manifest)
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


# ----------------------------------------------------------------------------- reading


class ShardRows:
    """Random-access packed rows of ``seq_len + 1`` tokens over a prepared split, read through grain.

    Row ``i`` is the window starting at token ``i * seq_len`` of the split's stream: exactly what
    ``pipeline.PackedRows`` gives for the same documents in the same order. Every chunk of a shard is full but
    its last, so a table of shard start offsets (one entry per shard, not per chunk) locates any token; a row
    may cross short chunks and parts.
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
        shards = info["shards"]
        self.shard_starts = np.cumsum([0] + [int(s["tokens"]) for s in shards[:-1]], dtype=np.int64)
        self.shard_records = np.cumsum([0] + [int(s["chunks"]) for s in shards[:-1]], dtype=np.int64)
        paths = [os.path.join(directory, s["file"]) for s in shards]
        self.source = grain.sources.ArrayRecordDataSource(paths) if paths else []

    def __len__(self) -> int:
        return max(0, (self.num_tokens - 1) // self.seq_len)

    def _record(self, position: int) -> tuple[int, int]:
        """The record holding stream token ``position``, and the stream offset of that record's first token."""
        shard = int(np.searchsorted(self.shard_starts, position, side="right")) - 1
        within = (position - int(self.shard_starts[shard])) // self.chunk_tokens
        return int(self.shard_records[shard]) + within, int(self.shard_starts[shard]) + within * self.chunk_tokens

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Stream tokens ``[start, stop)`` (a row is one or two record reads, more where it crosses short chunks)."""
        (first, offset), (last, _) = self._record(start), self._record(stop - 1)
        raw = self.source.__getitems__(list(range(first, last + 1)))
        chunk = np.concatenate([np.frombuffer(r, dtype=self.dtype) for r in raw])
        return chunk[start - offset : stop - offset]

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        start = int(i) * self.seq_len
        tokens = self.tokens(start, start + self.seq_len + 1).astype(np.int32)
        seg = np.cumsum(tokens == self.bos_id)
        return {"tokens": tokens, "segment_ids": (seg - seg[0] + 1).astype(np.int32)}
