"""Documents from the embedded stdlib corpus or from text / jsonl / parquet files.

Every document carries a stable name, and the train/validation split is a hash of that
name, so the same data gives the same split on every machine, run and ``PYTHONHASHSEED``.
Names of file documents are relative to the source's fixed directory part (the path before
the first wildcard), so moving a data set elsewhere does not reshuffle its split.

``unigram_bits_per_byte`` is the floor any trained model has to beat: a byte-frequency table.
"""

from __future__ import annotations

import glob
import json
import os
import pathlib
import sysconfig
import zlib
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import numpy as np

from scaling_jax.config import DataConfig
from scaling_jax.errors import DataError

SPLITS = ("train", "validation")
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_FORMAT_BY_EXT = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


class Document(NamedTuple):
    name: str  # stable identifier; the split is decided by it
    text: str


# ----------------------------------------------------------------------------- split


def is_validation(name: str, val_fraction: float) -> bool:
    """crc32 rather than ``hash()``: the split must not change with ``PYTHONHASHSEED``."""
    return zlib.crc32(name.encode("utf-8", "surrogateescape")) / 2**32 < val_fraction


# ----------------------------------------------------------------------------- stdlib corpus


def _stdlib_dir() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[pathlib.Path]:
    """Every stdlib ``*.py`` (no third-party packages), sorted by relative posix path so the
    corpus is the same list on every machine with the same Python."""
    root = _stdlib_dir()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]
        found += [pathlib.Path(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _stdlib_documents() -> Iterator[Document]:
    root = _stdlib_dir()
    for path in stdlib_files():
        yield Document(path.relative_to(root).as_posix(), _decode(path.read_bytes()))


# ----------------------------------------------------------------------------- finding files


def _decode(raw: bytes) -> str:
    """A stray latin-1 byte (the stdlib has test files like that) becomes U+FFFD, not a crash."""
    return raw.decode("utf-8", errors="replace")


def _glob_root(pattern: str) -> str:
    """The directory before the first wildcard; document names are relative to it."""
    cut = min((i for i, c in enumerate(pattern) if c in "*?["), default=len(pattern))
    return os.path.dirname(pattern[:cut]) or "."


def _walk_files(directory: str) -> Iterator[str]:
    """All files under ``directory``, skipping hidden ones (``.git``, ``.DS_Store``) as glob does."""
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        yield from (os.path.join(dirpath, f) for f in filenames if not f.startswith("."))


def _source_files(source: str) -> list[tuple[str, str]]:
    """``(name, path)`` for every file the source names, sorted by name."""
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        root, matches = path, [path]
    else:
        root = os.path.dirname(path) if os.path.isfile(path) else _glob_root(path)
        matches = [path] if os.path.isfile(path) else glob.glob(path, recursive=True)
    files: set[str] = set()
    for match in matches:
        if os.path.isdir(match):
            files.update(_walk_files(match))
        elif os.path.isfile(match):
            files.add(match)
    if not files:
        what = "is a directory with no files" if os.path.isdir(path) else "matches no files"
        raise DataError(f"data.source='{source}' {what}; point it at a file, a directory or a glob "
                        f"such as 'data/**/*.jsonl' (or use data.source=stdlib)")
    named = ((pathlib.Path(os.path.relpath(f, root or ".")).as_posix(), f) for f in files)
    return sorted(named)


def _format_of(path: str, fmt: str) -> str:
    if fmt == "auto":
        return _FORMAT_BY_EXT.get(os.path.splitext(path)[1].lower(), "text")
    if fmt not in ("text", "jsonl", "parquet"):
        raise DataError(f"data.format='{fmt}' is not one of auto, text, jsonl, parquet")
    return fmt


# ----------------------------------------------------------------------------- readers


def _read_text(path: str, name: str) -> Iterator[Document]:
    """The whole file is one document."""
    with open(path, "rb") as f:
        yield Document(name, _decode(f.read()))


def _jsonl_text(path: str, lineno: int, line: str, field: str) -> str:
    where = f"{path}:{lineno}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where} is not valid JSON ({e.msg}); "
                        f"each line of a jsonl file must be one JSON object") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where} holds a JSON {type(obj).__name__}, not an object; "
                        f"each line of a jsonl file must be one JSON object like {{\"{field}\": \"...\"}}")
    if field not in obj:
        keys = ", ".join(map(str, obj)) or "none"
        raise DataError(f"{where} has no field '{field}' (keys: {keys}); set data.text_field=<key holding the text>")
    value = obj[field]
    if not isinstance(value, str):
        raise DataError(f"{where} field '{field}' is a JSON {type(value).__name__}, not a string; "
                        f"set data.text_field=<key holding the text>")
    return value


def _read_jsonl(path: str, name: str, field: str) -> Iterator[Document]:
    """One JSON object per non-blank line, streamed so large files need not fit in memory.

    File iteration splits only at ``\\n``/``\\r``; ``str.splitlines`` would also cut at U+2028,
    which is legal raw inside a JSON string.
    """
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                yield Document(f"{name}:{lineno}", _jsonl_text(path, lineno, line, field))


def _read_parquet(path: str, name: str, field: str) -> Iterator[Document]:
    """One document per row of column ``field``, read one record batch at a time; null rows are empty."""
    import pyarrow as pa  # only parquet sources pay for the import
    import pyarrow.parquet as pq

    try:
        pfile = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path} is not a readable parquet file ({str(e).splitlines()[0]}); "
                        f"fix the file or set data.format") from None
    schema = pfile.schema_arrow
    if field not in schema.names:
        raise DataError(f"{path} has no column '{field}' (columns: {', '.join(schema.names) or 'none'}); "
                        f"set data.text_field=<column holding the text>")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"{path} column '{field}' has type {kind}, not string; set data.text_field=<text column>")
    row = 0
    for batch in pfile.iter_batches(columns=[field]):
        for value in batch.column(0).to_pylist():
            yield Document(f"{name}#{row}", value or "")
            row += 1


def _file_documents(cfg: DataConfig) -> Iterator[Document]:
    for name, path in _source_files(cfg.source):
        fmt = _format_of(path, cfg.format)
        if fmt == "jsonl":
            yield from _read_jsonl(path, name, cfg.text_field)
        elif fmt == "parquet":
            yield from _read_parquet(path, name, cfg.text_field)
        else:
            yield from _read_text(path, name)


# ----------------------------------------------------------------------------- public entry


def load_documents(cfg: DataConfig, split: str) -> list[Document]:
    """The non-empty documents of one split, in source order; stops reading once ``max_docs`` are kept."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    want_val = split == "validation"
    docs = _stdlib_documents() if cfg.source == "stdlib" else _file_documents(cfg)
    kept: list[Document] = []
    seen = 0
    for doc in docs:
        if not doc.text:
            continue
        seen += 1
        if is_validation(doc.name, cfg.val_fraction) == want_val:
            kept.append(doc)
            if 0 < cfg.max_docs <= len(kept):
                break
    if not kept:
        fix = "raise data.val_fraction" if want_val else "lower data.val_fraction"
        fix += " or point data.source at more data"
        raise DataError(f"data.source='{cfg.source}' gives no {split} documents ({seen} non-empty documents in all, "
                        f"data.val_fraction={cfg.val_fraction}); {fix}")
    return kept


# ----------------------------------------------------------------------------- baseline


def _byte_counts(texts: Iterable[str]) -> np.ndarray:
    """Counts of the 256 byte values; ``errors='replace'`` matches what the byte tokenizer sees."""
    counts = np.zeros(256, dtype=np.int64)
    for text in texts:
        counts += np.bincount(np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8), minlength=256)
    return counts


def unigram_bits_per_byte(train_texts: Iterable[str], val_texts: Iterable[str]) -> float:
    """Cross-entropy (bits/byte) of the validation bytes under add-one-smoothed training byte frequencies.

    A model that does not beat this has learned nothing beyond byte frequencies.
    """
    train, val = _byte_counts(train_texts), _byte_counts(val_texts)
    total = int(val.sum())
    if total == 0:
        raise ValueError("unigram_bits_per_byte needs at least one validation byte")
    log_p = np.log2(train + 1.0) - np.log2(float(train.sum()) + 256.0)
    return float(-(val * log_p).sum() / total)
