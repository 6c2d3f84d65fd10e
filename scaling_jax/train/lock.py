"""One writer per run directory.

Two trainers writing the same ``train.run_dir`` interleave checkpoints and metrics and corrupt
both, so ``train`` holds an exclusive lock on ``RUN_DIR/.lock`` for its whole life.

The lock is an ``fcntl.flock`` on that file: the kernel drops it when the holding process dies
(SIGKILL, OOM, preemption), so a dead run's lock never blocks the next one. The file stays
behind on release (removing it would let two processes lock two different inodes); its content
only names the last holder, for the error message. Filesystems without ``flock`` (some network
mounts) fall back to the recorded holder: a dead process on this host is taken over with a
warning, anything else is refused with the file to remove.

A bucket run directory (``gs://``) cannot be flocked: its lock file lives in the run's local mirror
(``paths.RunMirror``), which guards against a second trainer on the same host. Object stores offer
no lock across hosts; on a pod, the job scheduler is what runs one job per run directory.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time

from scaling_jax import log, paths
from scaling_jax.errors import CheckpointError
from scaling_jax.run_dir import LOCK_FILE

_held: dict[str, RunLock] = {}  # run dir key (realpath or URL) -> the lock this process holds


def _key(run_dir: str) -> str:
    return paths.absolute(run_dir) if paths.is_remote(run_dir) else os.path.realpath(run_dir)


def _start_time(pid: int) -> str | None:
    """Kernel start time of ``pid`` (field 22 of /proc/PID/stat), so a reused pid is not taken for the holder."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict) -> bool | None:
    """Whether the recorded holder still runs: None when that cannot be known (another host)."""
    if holder.get("host") != socket.gethostname():
        return None
    pid = int(holder.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    started = holder.get("start_time")
    return started is None or _start_time(pid) in (None, started)


def _describe(holder: dict) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["since"])) if "since" in holder else "?"
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {when}"


class RunLock:
    """An exclusive lock on a run directory; ``release()`` (or process exit) frees it."""

    def __init__(self, run_dir: str, lock_dir: str | None = None):
        self.run_dir = run_dir
        self.path = os.path.join(lock_dir or run_dir, LOCK_FILE)
        self._fd: int | None = None

    def _read_holder(self) -> dict:
        try:
            with open(self.path) as f:
                return json.loads(f.read() or "{}")
        except (OSError, ValueError):
            return {}

    def _refuse(self, holder: dict, extra: str = "") -> CheckpointError:
        return CheckpointError(f"train.run_dir '{self.run_dir}' is in use by another run ({_describe(holder)}); "
                               f"wait for it to finish, stop it, or choose another train.run_dir{extra}")

    def _record(self, fd: int) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
              "start_time": _start_time(os.getpid())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)

    def acquire(self) -> RunLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._refuse(self._read_holder()) from None
        except OSError as e:  # no flock here (e.g. some network filesystems): judge by the recorded holder
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            self._take_unlocked(fd)
        self._record(fd)
        self._fd = fd
        return self

    def _take_unlocked(self, fd: int) -> None:
        holder = self._read_holder()
        if not holder.get("pid") or holder.get("released"):
            return
        alive = _alive(holder)
        if alive is False:
            log.warning(f"taking over the stale lock {self.path} of a dead run ({_describe(holder)})")
            return
        os.close(fd)
        raise self._refuse(holder, "" if alive else f"; if that run is dead, delete {self.path}")

    def release(self) -> None:
        """Mark the file released (for the no-flock fallback) and drop the lock; safe to call twice."""
        if self._fd is None:
            return
        try:
            holder = self._read_holder()
            holder["released"] = True
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, json.dumps(holder).encode(), 0)
        except OSError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None


def acquire_run_lock(run_dir: str, lock_dir: str | None = None) -> RunLock:
    """Lock ``run_dir`` for this process, with the lock file in ``lock_dir`` (default: the run dir itself;
    a bucket run's local mirror). Re-entrant within one process (an earlier ``train()`` call that raised
    before releasing must not lock its own process out of the directory)."""
    key = _key(run_dir)
    lock = _held.get(key)
    if lock is None or lock._fd is None:
        lock = _held[key] = RunLock(run_dir, lock_dir).acquire()
    return lock


def release_run_lock(run_dir: str) -> None:
    lock = _held.pop(_key(run_dir), None)
    if lock is not None:
        lock.release()


def holds_run_lock(run_dir: str) -> bool:
    """True if this process holds ``run_dir``'s lock (only the writer may move damaged checkpoints aside)."""
    lock = _held.get(_key(run_dir))
    return lock is not None and lock._fd is not None
