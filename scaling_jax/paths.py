"""Local paths and ``gs://`` (any fsspec URL) behind one small set of file operations.

On a TPU pod the run directory and the data usually live in a bucket: the workers' disks vanish
with the VMs. orbax (through tensorstore) reads and writes ``gs://`` checkpoints by itself; the
other files of a run (resolved config, metrics, summary, plots, tokenizer) go through here.

Two properties of object stores shape the API:

- an object appears whole when its upload finishes, so ``write_text`` is atomic on both kinds
  of path (local files: temp file + rename);
- objects cannot be appended to, so a writer that appends line by line (``metrics.jsonl``,
  TensorBoard event files) writes into ``RunMirror.local`` and ``RunMirror.push()`` copies what
  changed to the bucket (after each checkpoint and at exit); ``pull()`` brings a run's files back
  before a resume. For a local run directory the mirror is the directory itself and both are no-ops.

``gs://`` needs ``gcsfs`` (extra ``gcs``); ``memory://`` works without it and is what the tests use.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import tempfile
from collections.abc import Iterator
from typing import IO

from scaling_jax.errors import CheckpointError


def is_remote(path: str) -> bool:
    """True for URLs such as ``gs://bucket/run`` (``file://`` and plain paths are local)."""
    scheme, sep, _ = str(path).partition("://")
    return bool(sep) and scheme not in ("", "file")


def _fs(path: str):
    import fsspec

    try:
        return fsspec.core.url_to_fs(str(path))
    except (ImportError, ValueError) as e:
        scheme = str(path).split("://")[0]
        hint = "pip install 'scaling_jax[gcs]'" if scheme == "gs" else f"install the fsspec backend for {scheme}://"
        raise CheckpointError(f"cannot open '{path}' ({e}); {hint}") from None


def umask() -> int:
    """The process's file-creation mask (reading it means setting it: it is put back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def absolute(path: str) -> str:
    """``os.path.abspath`` for local paths; URLs are already absolute (abspath would mangle ``gs://``)."""
    return str(path).rstrip("/") if is_remote(path) else os.path.abspath(path)


def join(path: str, *parts: str) -> str:
    return "/".join([str(path).rstrip("/"), *parts]) if is_remote(path) else os.path.join(path, *parts)


def dirname(path: str) -> str:
    return posixpath.dirname(str(path).rstrip("/")) if is_remote(path) else os.path.dirname(path)


def basename(path: str) -> str:
    return posixpath.basename(str(path).rstrip("/")) if is_remote(path) else os.path.basename(path)


def exists(path: str) -> bool:
    fs, p = _fs(path)
    return fs.exists(p)


def isfile(path: str) -> bool:
    fs, p = _fs(path)
    return fs.isfile(p)


def isdir(path: str) -> bool:
    fs, p = _fs(path)
    return fs.isdir(p)


def makedirs(path: str) -> None:
    fs, p = _fs(path)
    fs.makedirs(p, exist_ok=True)


def listdir(path: str) -> list[str]:
    """Names (not paths) in a directory; empty if it does not exist."""
    fs, p = _fs(path)
    if not fs.isdir(p):
        return []
    return sorted(os.path.basename(str(e).rstrip("/")) for e in fs.ls(p, detail=False))


def file_sizes(directory: str) -> dict[str, int]:
    """``{relative path: size}`` of every file under ``directory`` (``/``-separated, sorted)."""
    fs, root = _fs(directory)
    if not fs.isdir(root):
        return {}
    root = root.rstrip("/")
    found = fs.find(root, detail=True)
    return {posixpath.relpath(p, root) if is_remote(directory) else os.path.relpath(p, root).replace(os.sep, "/"):
            int(info["size"]) for p, info in sorted(found.items())}


def glob(pattern: str) -> list[str]:
    """Matches of a glob, as full paths/URLs (data files: ``gs://bucket/shards/*.parquet``)."""
    fs, p = _fs(pattern)
    matches = sorted(fs.glob(p))
    return [fs.unstrip_protocol(m) for m in matches] if is_remote(pattern) else matches


def open_file(path: str, mode: str = "r") -> IO:
    """A file object for reading or whole-file writing (``a`` is refused on object stores)."""
    if "a" in mode and is_remote(path):
        raise CheckpointError(f"cannot append to '{path}': object stores have no append; write through RunMirror")
    fs, p = _fs(path)
    return fs.open(p, mode)


def read_text(path: str) -> str:
    with open_file(path) as f:
        return f.read()


def write_text(path: str, text: str) -> None:
    """Atomic: a reader sees the old file or the new one, never half of it."""
    if is_remote(path):
        with open_file(path, "w") as f:  # the object becomes visible when the upload completes
            f.write(text)
        return
    directory = os.path.dirname(os.path.abspath(path))
    with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, prefix=".tmp-") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())  # the rename must not publish a file whose bytes are still in the page cache
    os.replace(f.name, path)


def rename(src: str, dst: str) -> None:
    """Move a file or directory (on object stores: copy then delete, object by object)."""
    if not is_remote(src):
        os.rename(src, dst)
        return
    fs, p = _fs(src)
    fs.copy(p, _fs(dst)[1], recursive=True)  # GCS has no rename; copy + delete is what a move is there
    fs.rm(p, recursive=True)
    # orbax's path layer lists the bucket through its own cached instance; a stale listing would still
    # show the moved directory to it
    for instance in [fs, *getattr(type(fs), "_cache", {}).values()]:
        instance.invalidate_cache()


def remove(path: str) -> None:
    fs, p = _fs(path)
    fs.rm(p, recursive=fs.isdir(p))


def prepare_dir(path: str, field: str = "train.run_dir") -> None:
    """Create a directory (local or bucket) and prove it is writable before any compute is spent."""
    try:
        if not is_remote(path) and os.path.exists(path) and not os.path.isdir(path):
            raise CheckpointError(f"{field} '{path}' is a file; point {field} at a directory")
        makedirs(path)
        probe = join(path, f".write-probe-{os.getpid()}")
        write_text(probe, "ok")
        remove(probe)
    except (OSError, PermissionError) as e:
        raise CheckpointError(f"{field} '{path}' is not writable ({getattr(e, 'strerror', None) or e}); "
                              f"choose a writable {field}") from None


class RunMirror:
    """A local directory standing in for a remote run directory, for files written in place.

    ``local`` is where writers put their files; ``push()`` uploads each file whose content changed
    since the last push (relative paths kept), ``pull()`` downloads the remote files that exist.
    ``skip`` names top-level entries left alone: the checkpoints (orbax writes them to the bucket
    directly) and the lock file of the trainer that holds this mirror.
    """

    def __init__(self, run_dir: str, skip: tuple[str, ...], cache_root: str | None = None):
        self.remote = run_dir if is_remote(run_dir) else None
        self.skip = set(skip)
        self._pushed: dict[str, str] = {}
        if self.remote is None:
            self.local = run_dir
            return
        root = cache_root or os.path.join(tempfile.gettempdir(), "scaling_jax-runs")
        digest = hashlib.sha1(self.remote.encode()).hexdigest()[:12]
        self.local = os.path.join(root, f"{os.path.basename(self.remote.rstrip('/'))}-{digest}")
        os.makedirs(self.local, exist_ok=True)

    def _local_files(self) -> Iterator[str]:
        for directory, dirs, files in os.walk(self.local):
            rel_dir = os.path.relpath(directory, self.local)
            if rel_dir == ".":
                dirs[:] = [d for d in dirs if d not in self.skip]
            for name in files:
                rel = os.path.normpath(os.path.join(rel_dir, name))
                if not name.startswith(".tmp-") and rel.split(os.sep)[0] not in self.skip:
                    yield rel

    def push(self) -> list[str]:
        """Upload changed files; returns their relative paths (nothing for a local run directory)."""
        if self.remote is None:
            return []
        sent = []
        for rel in self._local_files():
            with open(os.path.join(self.local, rel), "rb") as f:
                data = f.read()
            digest = hashlib.sha1(data).hexdigest()
            if self._pushed.get(rel) == digest:
                continue
            target = join(self.remote, *rel.split(os.sep))
            fs, p = _fs(target)
            fs.makedirs(os.path.dirname(p), exist_ok=True)
            with fs.open(p, "wb") as f:
                f.write(data)
            self._pushed[rel] = digest
            sent.append(rel)
        return sent

    def pull(self) -> list[str]:
        """Make ``local`` a copy of the remote run's files (before resuming; files only in ``local`` are
        deleted); returns the relative paths downloaded."""
        if self.remote is None:
            return []
        for rel in list(self._local_files()):  # the bucket is the truth: no leftovers of an older run
            os.remove(os.path.join(self.local, rel))
        self._pushed.clear()
        fs, root = _fs(self.remote)
        if not fs.isdir(root):
            return []
        got = []
        for path in fs.find(root):
            rel = os.path.relpath(path, root.rstrip("/"))
            if rel.split("/")[0] in self.skip:
                continue
            local = os.path.join(self.local, *rel.split("/"))
            os.makedirs(os.path.dirname(local), exist_ok=True)
            with fs.open(path, "rb") as src, open(local, "wb") as dst:
                data = src.read()
                dst.write(data)
            self._pushed[os.path.normpath(rel)] = hashlib.sha1(data).hexdigest()
            got.append(rel)
        return got

    @contextlib.contextmanager
    def pushing(self) -> Iterator[RunMirror]:
        """Push on the way out, whatever happened (a crash keeps the metrics up to the crash)."""
        try:
            yield self
        finally:
            self.push()
