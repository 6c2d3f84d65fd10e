"""Documents from the embedded stdlib corpus, text / jsonl / parquet files, or Hugging Face datasets.

Every document carries a stable name, and the train/validation split is a hash of that
name, so the same data gives the same split on every machine, run and ``PYTHONHASHSEED``.
Names of file documents are relative to the source's fixed directory part (the path before
the first wildcard), so moving a data set elsewhere does not reshuffle its split. Paths with a
scheme (``gs://bucket/dir/*.jsonl``, ``s3://``, ``memory://``) are read through fsspec; ``gs://``
needs ``gcsfs`` installed. ``hf:PATH_OR_NAME`` reads a Hugging Face ``datasets`` data set: a
``save_to_disk`` directory, a local directory of data files, or a hub name (downloaded by
``datasets`` itself, or streamed with ``data.streaming=true``).

A plain-text file is cut into pieces so that even a corpus of one big ``.txt`` has held-out text
for validation (the split is per document, so a single-document file would land wholly on one
side). The rule is fixed and deterministic: a piece ends just after the first ``\n`` at or past
``PIECE_BYTES`` (64 KiB) from its start, so lines are never torn; only a line that runs on for
another ``PIECE_BYTES`` without a newline is cut, at ``PIECE_BYTES`` backed off to the start of
a UTF-8 character. A file that is one piece keeps its name (small files split as they always
did); otherwise the pieces are ``NAME#0``, ``NAME#1``, ... and each is hashed to its own side.
The embedded stdlib corpus is not cut: its names are file paths that the eval generators reuse.

User text is decoded strictly as UTF-8: a text file (piece) or jsonl line that is not valid UTF-8
is an error naming the file and byte offset, or with ``data.malformed_lines=skip`` is skipped
and counted in one warning per file.

``source_components`` turns ``data.mixture`` into one ``DataConfig`` and sampling weight per source.

``unigram_bits_per_byte`` is the floor any trained model has to beat: a byte-frequency table.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import itertools
import json
import math
import os
import pathlib
import posixpath
import sysconfig
import zlib
from collections.abc import Iterable, Iterator
from typing import BinaryIO, NamedTuple

import numpy as np

from scaling_jax import log
from scaling_jax.config import DataConfig
from scaling_jax.errors import DataError, first_line

SPLITS = ("train", "validation")
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_FORMAT_BY_EXT = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
PIECE_BYTES = 64 * 1024  # plain-text files are cut into pieces of about this size (module docstring)
_READ_BYTES = 1 << 20


class Document(NamedTuple):
    name: str  # stable identifier; the split is decided by it
    text: str


# ----------------------------------------------------------------------------- split


def split_point(name: str) -> float:
    """Where ``name`` falls in [0, 1); crc32 rather than ``hash()`` so it never changes with ``PYTHONHASHSEED``."""
    return zlib.crc32(name.encode("utf-8", "surrogateescape")) / 2**32


def is_validation(name: str, val_fraction: float) -> bool:
    """A document is held out iff its name's split point is below ``val_fraction``."""
    return split_point(name) < val_fraction


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


@functools.lru_cache(maxsize=1)
def _stdlib_corpus() -> tuple[Document, ...]:
    """Read once per process (~30 MB): both splits, every run of a local sweep and every stage read it again."""
    root = _stdlib_dir()
    return tuple(Document(path.relative_to(root).as_posix(), _decode_stdlib(path.read_bytes()))
                 for path in stdlib_files())


def _stdlib_documents() -> Iterator[Document]:
    return iter(_stdlib_corpus())


# ----------------------------------------------------------------------------- finding files


def _decode_stdlib(raw: bytes) -> str:
    """Lenient on purpose, unlike user files: a few stdlib test files are deliberately not UTF-8
    (``test/encoded_modules/module_iso_8859_1.py`` and the like). The stdlib corpus is ours, and its
    bad bytes become U+FFFD as they always did, so its documents and the quickstart's numbers stay put."""
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


def is_url(path: str) -> bool:
    return "://" in path


def _open(path: str, mode: str):
    """A local file or any fsspec URL, opened as ``mode`` (``r`` decodes UTF-8 strictly; readers use
    ``rb`` so that an error can give the byte offset)."""
    text = {"encoding": "utf-8"} if "b" not in mode else {}
    if not is_url(path):
        return open(path, mode, **text)
    import fsspec

    return fsspec.open(path, mode, **text).open()


def _url_files(source: str) -> list[tuple[str, str]]:
    """``(name, url)`` for a URL file, directory or glob; names relative to the fixed prefix as for local paths."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(source)
    except (ImportError, ValueError) as e:
        raise DataError(f"data.source='{source}' cannot be opened ({str(e).splitlines()[0]}); install the "
                        "filesystem package for that scheme (gcsfs for gs://, s3fs for s3://)") from None
    if fs.isdir(path):
        root, found = path, fs.find(path)
    elif fs.isfile(path):
        root, found = posixpath.dirname(path), [path]
    else:
        root = _glob_root(fs._strip_protocol(source))
        # a ``**`` glob lists directories as well as their files: each file once
        found = sorted({f for match in fs.glob(path) for f in (fs.find(match) if fs.isdir(match) else [match])})
    found = [f for f in found if not any(p.startswith(".") for p in posixpath.relpath(f, root).split("/"))]
    if not found:
        raise DataError(f"data.source='{source}' matches no files; point it at a file, a directory or a glob")
    return sorted((posixpath.relpath(f, root), fs.unstrip_protocol(f)) for f in found)


def _source_files(source: str) -> list[tuple[str, str]]:
    """``(name, path)`` for every file the source names, sorted by name."""
    if is_url(source):
        return _url_files(source)
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


def _text_pieces(f: BinaryIO) -> Iterator[tuple[int, bytes]]:
    """``(byte offset, bytes)`` of each piece of a text file, by the rule in the module docstring;
    read a block at a time, so a large file need not fit in memory."""
    buf, start, offset, eof = b"", 0, 0, False  # buf[start:] is unconsumed; offset is buf[0]'s file offset
    while True:
        newline = buf.find(b"\n", start + PIECE_BYTES - 1, start + 2 * PIECE_BYTES - 1)
        if newline >= 0:
            cut = newline + 1
        elif len(buf) - start >= 2 * PIECE_BYTES - 1:  # no newline for a whole extra piece: cut the line
            cut = start + PIECE_BYTES
            while cut > start + PIECE_BYTES - 3 and buf[cut] & 0xC0 == 0x80:  # not inside a character
                cut -= 1
        elif eof:
            if start < len(buf):
                yield offset + start, buf[start:]
            return
        else:
            block = f.read(_READ_BYTES)
            buf, offset, start, eof = buf[start:] + block, offset + start, 0, not block
            continue
        yield offset + start, buf[start:cut]
        start = cut


def _text_utf8(raw: bytes, path: str, offset: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {offset + e.start}); "
                        "re-encode it as UTF-8 (or set data.malformed_lines=skip to skip each "
                        f"{PIECE_BYTES // 1024} KiB piece that is not)") from None


def _read_text(path: str, name: str, skip_malformed: bool = False) -> Iterator[Document]:
    """The file's pieces (module docstring); a file of one piece is one document under its own name.

    A piece that is not UTF-8 is fatal, or with ``skip_malformed`` skipped and counted in one warning."""
    skipped, first = 0, ""
    with _open(path, "rb") as f:
        pieces = _text_pieces(f)
        head = next(pieces, (0, b""))
        if b"\x00" in head[1][:8192]:  # a .gz / .zip / UTF-16 file read as text would train on garbage
            raise DataError(f"{path} looks binary (NUL bytes), not UTF-8 text; decompress or re-encode it, remove "
                            "it from data.source, or set data.format if it is jsonl or parquet")
        second = next(pieces, None)
        if second is None:
            named: Iterable[tuple[str, tuple[int, bytes]]] = [(name, head)]
        else:
            named = ((f"{name}#{i}", p) for i, p in enumerate(itertools.chain([head, second], pieces)))
        for piece_name, (offset, raw) in named:
            try:
                text = _text_utf8(raw, path, offset)
            except DataError as e:
                if not skip_malformed:
                    raise
                skipped, first = skipped + 1, first or str(e).split(";")[0]
                continue
            yield Document(piece_name, text)
    _warn_skipped(path, skipped, "non-UTF-8 piece(s)", first)


def _jsonl_text(path: str, lineno: int, line: str, field: str) -> str:
    where = f"{path}:{lineno}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where} is not valid JSON ({e.msg}); each line of a jsonl file must be one JSON "
                        "object (or set data.malformed_lines=skip to skip such lines)") from None
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
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a "\ud83d" escape without its pair (an emoji cut in two): not text
        raise DataError(f"{where} field '{field}' holds a lone surrogate escape (half of a character); fix the "
                        "line or set data.malformed_lines=skip to skip such lines") from None
    return value


def utf8_line(raw: bytes, path: str, lineno: int, offset: int,
              escape: str = " (or set data.malformed_lines=skip to skip such lines)") -> str:
    """``offset``: the line's byte offset in the file, so the message can point at the exact byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{lineno} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}, "
                        f"file offset {offset + e.start}); re-encode the file as UTF-8{escape}") from None


_skips_reported: set[tuple[str, int]] = set()


def _warn_skipped(path: str, skipped: int, what: str, first: str) -> None:
    """One warning per file and count: both splits read the file, and the user needs to hear it once."""
    if skipped and (path, skipped) not in _skips_reported:
        _skips_reported.add((path, skipped))
        log.warning(f"skipped {skipped} {what} of {path} (first: {first}); data.malformed_lines=skip")


def _read_jsonl(path: str, name: str, field: str, skip_malformed: bool = False) -> Iterator[Document]:
    """One JSON object per non-blank line, streamed so large files need not fit in memory.

    Lines are split at ``\\n`` only; ``str.splitlines`` would also cut at U+2028, which is legal
    raw inside a JSON string. A line that is not UTF-8 JSON with the text field is fatal, or with
    ``skip_malformed`` (``data.malformed_lines=skip``) skipped and counted in one warning per file.
    """
    skipped, first, offset = 0, "", 0
    with _open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            offset, line_offset = offset + len(raw), offset
            if not raw.strip():
                continue
            try:
                text = _jsonl_text(path, lineno, utf8_line(raw, path, lineno, line_offset), field)
            except DataError as e:
                if not skip_malformed:
                    raise
                skipped, first = skipped + 1, first or str(e).split(";")[0]
                continue
            yield Document(f"{name}:{lineno}", text)
    _warn_skipped(path, skipped, "malformed line(s)", first)


def _read_parquet(path: str, name: str, field: str) -> Iterator[Document]:
    """One document per row of column ``field``, read one record batch at a time; null rows are empty."""
    import pyarrow as pa  # only parquet sources pay for the import
    import pyarrow.parquet as pq

    try:
        pfile = pq.ParquetFile(_open(path, "rb") if is_url(path) else path)
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


def _read_file(cfg: DataConfig, name: str, path: str) -> Iterator[Document]:
    fmt = _format_of(path, cfg.format)
    if fmt == "jsonl":
        return _read_jsonl(path, name, cfg.text_field, cfg.malformed_lines == "skip")
    if fmt == "parquet":
        return _read_parquet(path, name, cfg.text_field)
    return _read_text(path, name, cfg.malformed_lines == "skip")


def _file_documents(cfg: DataConfig) -> Iterator[Document]:
    for name, path in _source_files(cfg.source):
        yield from _read_file(cfg, name, path)


class SourceFile(NamedTuple):
    """One file of a file or stdlib source: ``data prepare`` groups them, in source order, into parts."""

    name: str  # the file's document name (prefix), relative to the source's fixed directory
    path: str  # a local path or URL
    size: int  # bytes, to balance the parts


def _size(path: str) -> int:
    if not is_url(path):
        return os.path.getsize(path)
    import fsspec

    fs, inner = fsspec.core.url_to_fs(path)
    return int(fs.size(inner))


def source_files(cfg: DataConfig) -> list[SourceFile]:
    """The files behind ``cfg.source`` in source order (the stdlib corpus's too); ``hf:`` data sets have none."""
    if cfg.source == "stdlib":
        root = _stdlib_dir()
        return [SourceFile(p.relative_to(root).as_posix(), str(p), p.stat().st_size) for p in stdlib_files()]
    return [SourceFile(name, path, _size(path)) for name, path in _source_files(cfg.source)]


def file_documents(cfg: DataConfig, files: Iterable[SourceFile]) -> Iterator[Document]:
    """The documents of some of ``source_files(cfg)``, exactly as ``source_documents`` reads them."""
    for file in files:
        if cfg.source == "stdlib":
            yield Document(file.name, _decode_stdlib(pathlib.Path(file.path).read_bytes()))
        else:
            yield from _read_file(cfg, file.name, file.path)


def _hf_documents(cfg: DataConfig) -> Iterator[Document]:
    """Rows of a Hugging Face data set, column ``data.text_field``; names are ``split#row``."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"data.source='{cfg.source}' needs the 'datasets' package; pip install datasets") from None
    target = os.path.expanduser(cfg.source[len("hf:"):])
    try:
        saved = any(os.path.isfile(os.path.join(target, f)) for f in ("state.json", "dataset_dict.json"))
        if saved:
            ds = datasets.load_from_disk(target)  # a save_to_disk directory
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[cfg.source_split]
            if cfg.streaming:
                ds = ds.to_iterable_dataset()
        else:
            ds = datasets.load_dataset(target, cfg.hf_name or None, split=cfg.source_split, streaming=cfg.streaming)
    except (OSError, ValueError, KeyError, datasets.exceptions.DatasetNotFoundError,
            datasets.exceptions.DatasetGenerationError) as e:  # OSError: no network, a missing file
        raise DataError(f"data.source='{cfg.source}' cannot be loaded ({first_line(e)}); check the path or name "
                        "(and the network for a hub data set), data.hf_name and data.source_split") from None
    columns = ds.column_names
    if columns is not None and cfg.text_field not in columns:
        raise DataError(f"data.source='{cfg.source}' has no column '{cfg.text_field}' (columns: "
                        f"{', '.join(columns)}); set data.text_field=<column holding the text>")
    for row, example in _rows_of(ds, cfg.source):
        value = example.get(cfg.text_field)
        if value is not None and not isinstance(value, str):
            raise DataError(f"data.source='{cfg.source}' row {row} column '{cfg.text_field}' is "
                            f"{type(value).__name__}, not a string; set data.text_field=<text column>")
        yield Document(f"{cfg.source_split}#{row}", value or "")


def _rows_of(ds, source: str) -> Iterator[tuple[int, dict]]:
    """``enumerate(ds)``, with a streaming data set's read errors (arrow, datasets, network) as one DataError."""
    rows = iter(ds)
    row = 0
    while True:
        try:
            example = next(rows)
        except StopIteration:
            return
        except (OSError, ValueError, KeyError, RuntimeError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise DataError(f"data.source='{source}' row {row} cannot be read ({type(e).__name__}: "
                            f"{first_line(e)}); fix or drop the file it comes from") from None
        yield row, example
        row += 1


def source_documents(cfg: DataConfig) -> Iterator[Document]:
    """Every document of one source (no split applied), in source order."""
    if cfg.source == "stdlib":
        return _stdlib_documents()
    if cfg.source.startswith("hf:"):
        return _hf_documents(cfg)
    return _file_documents(cfg)


MIXTURE_KEYS = ("source", "rate", "format", "text_field", "hf_name", "source_split", "streaming", "max_docs",
                "seqio_feature")


def source_components(cfg: DataConfig) -> list[tuple[DataConfig, float]]:
    """``data.mixture`` as one DataConfig per source (its keys override ``data.*``) with normalised rates;
    without a mixture, ``data.source`` alone with weight 1."""
    if not cfg.mixture:
        return [(cfg, 1.0)]
    if cfg.source != "stdlib":  # the default; anything else would be silently ignored
        raise DataError(f"data.source='{cfg.source}' and data.mixture are both set; put that source into "
                        "data.mixture (with a rate) or drop data.mixture")
    parts = []
    for i, entry in enumerate(cfg.mixture):
        where = f"data.mixture[{i}]"
        if not isinstance(entry, dict) or "source" not in entry:
            raise DataError(f"{where} must be a mapping with at least 'source' (and 'rate'), got {entry!r}")
        unknown = sorted(set(entry) - set(MIXTURE_KEYS))
        if unknown:
            raise DataError(f"{where} has unknown key(s) {', '.join(unknown)}; allowed: {', '.join(MIXTURE_KEYS)}")
        weight = entry.get("rate", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
            raise DataError(f"{where}.rate must be a positive number (a relative sampling rate), got {weight!r}")
        fields = {k: v for k, v in entry.items() if k != "rate"}
        parts.append((dataclasses.replace(cfg, mixture=[], **fields), float(weight)))
    total = sum(w for _, w in parts)
    return [(c, w / total) for c, w in parts]


# ----------------------------------------------------------------------------- public entry


def load_documents(cfg: DataConfig, split: str) -> list[Document]:
    """The non-empty documents of one split, in source order; stops reading once ``max_docs`` are kept."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    want_val = split == "validation"
    docs = source_documents(cfg)
    kept: list[Document] = []
    seen, lowest, highest = 0, 1.0, 0.0
    for doc in docs:
        if not doc.text:
            continue
        seen += 1
        point = split_point(doc.name)
        lowest, highest = min(lowest, point), max(highest, point)
        if (point < cfg.val_fraction) == want_val:
            kept.append(doc)
            if 0 < cfg.max_docs <= len(kept):
                break
    if not kept:
        raise DataError(f"data.source='{cfg.source}' gives no {split} documents ({seen} non-empty documents in all, "
                        f"data.val_fraction={cfg.val_fraction}); {_empty_split_fix(want_val, seen, lowest, highest)}")
    return kept


def _empty_split_fix(want_val: bool, seen: int, lowest: float, highest: float) -> str:
    """Suggest a ``data.val_fraction`` only if one gives both splits a document: each document's side
    is fixed by its name, so with a single document (or none) no value can help."""
    if not seen:
        return "point data.source at more data"
    if want_val:  # validation needs val_fraction > lowest, and train still needs val_fraction <= highest
        value, fits, verb = math.floor(lowest * 1000 + 1) / 1000, "or more", "raise"
    else:  # train needs val_fraction <= highest, and validation still needs val_fraction > lowest
        value, fits, verb = math.floor(highest * 1000) / 1000, "or less", "lower"
    if lowest < value <= highest:
        return f"{verb} data.val_fraction to {value} {fits} or point data.source at more data"
    return (f"no data.val_fraction gives both splits a document here; point data.source at more data "
            f"(text files are cut into {PIECE_BYTES // 1024} KiB pieces, so a larger file or more files)")


# ----------------------------------------------------------------------------- baseline


def byte_counts(texts: Iterable[str]) -> np.ndarray:
    """Counts of the 256 byte values; ``errors='replace'`` matches what the byte tokenizer sees."""
    counts = np.zeros(256, dtype=np.int64)
    for text in texts:
        counts += np.bincount(np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8), minlength=256)
    return counts


def unigram_bits_per_byte(train_texts: Iterable[str], val_texts: Iterable[str]) -> float:
    """Cross-entropy (bits/byte) of the validation bytes under add-one-smoothed training byte frequencies.

    A model that does not beat this has learned nothing beyond byte frequencies.
    """
    return unigram_bits_from_counts([(byte_counts(train_texts), byte_counts(val_texts), 1.0)])


def unigram_bits_from_counts(parts: list[tuple[np.ndarray, np.ndarray, float]]) -> float:
    """The same baseline from byte counts, for a mixture ``[(train_counts, val_counts, rate), ...]``:
    training bytes follow the rate-weighted mix of each source's smoothed frequencies, and the
    validation cross-entropy is the rate-weighted average over the sources' validation bytes."""
    p = sum(rate * (train + 1.0) / (float(train.sum()) + 256.0) for train, _, rate in parts)
    total = sum(rate for _, val, rate in parts if val.sum() > 0)
    if total == 0:
        raise ValueError("unigram_bits_per_byte needs at least one validation byte")
    log_p = np.log2(p / sum(rate for *_, rate in parts))
    return float(sum(rate * -(val * log_p).sum() / val.sum() for _, val, rate in parts if val.sum() > 0) / total)
