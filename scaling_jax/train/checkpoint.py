"""orbax checkpoints holding everything needed for an exact resume, and surviving damage.

Each step directory holds three items: ``state`` (params, optimizer state, step, RNG),
``data`` (the grain iterator position) and ``meta`` (resolved config, tokenizer fingerprint,
tokens/FLOPs/wall-clock so far, lineage). orbax writes into a temporary directory and renames
it when complete, so a killed save never becomes the latest checkpoint.

A finished step also gets ``DIGEST_FILE``: size and CRC32 of every file in it. orbax itself does
not notice a flipped byte in compressed array data (it restores wrong numbers), so the digest is
what tells a damaged checkpoint from a good one. Resume takes the newest checkpoint that passes
that check; a damaged newer one is reported by name and, by the process that holds the run
directory's lock, moved to ``DAMAGED_DIR`` (never deleted: it may be the only copy of hours of
training), so new saves cannot collide with it. A failed save (disk full, read-only disk)
becomes one ``CheckpointError``; orbax only deletes old steps after a new one is committed, so
the previous checkpoint stays intact.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import re
import sys
import threading
import time
import warnings
import zlib
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from scaling_jax import log, paths
from scaling_jax.config import ModelConfig
from scaling_jax.errors import CheckpointError, first_line
from scaling_jax.run_dir import CHECKPOINT_DIR, DAMAGED_DIR
from scaling_jax.train.lock import holds_run_lock
from scaling_jax.train.state import TrainState

COMMIT_MARKER = "commit_success.txt"  # orbax's "this step is complete" file on object stores
DIGEST_FILE = "scaling_jax_digest.json"
ITEMS = ("state", "data", "meta")
MODEL_SIGNATURE_FIELDS = ("layers", "d_model", "heads", "kv_heads", "head_dim", "d_ff", "mlp", "tie_embeddings",
                          "vocab_size", "param_dtype")
# Read errors that mean the bytes on disk are bad (tensorstore status codes, orbax's wrapper), not a model mismatch
# (orbax reports those as ValueErrors about shapes or tree structure). NOT_FOUND is left out on purpose: a target
# with an extra array must never get a checkpoint moved aside; a file missing from a digested step fails ``damage``.
_DAMAGE_MARKERS = ("DATA_LOSS", "OUT_OF_RANGE", "Encountered error while reading", "Error reading", "Error decoding")
_OS_ERROR_CODE = re.compile(r"os_error_code='(\d+)'")


def _as_tree(state: TrainState) -> dict:
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state, "rng": state.rng}


def model_signature(model_cfg: dict) -> dict:
    """The model fields a checkpoint's parameters depend on (their shapes and dtypes, and the tree's layout:
    checkpoints saved before ``scan_layers`` existed hold a ``blocks/0/...`` list), and what its weights mean:
    the position scheme (a model trained with rotary positions, or with a learned relative-bias table of a given
    bucketing, computes something else under another; configs from before ``position`` are rope)."""
    signature = {**{k: model_cfg[k] for k in MODEL_SIGNATURE_FIELDS},
                 "scan_layers": model_cfg.get("scan_layers", False), "position": model_cfg.get("position", "rope")}
    if signature["position"] == "t5_relative":
        signature |= {k: model_cfg.get(k, getattr(ModelConfig, k)) for k in ("relative_buckets",
                                                                              "relative_max_distance")}
    return signature


# ----------------------------------------------------------------------------- integrity


def _crc32(path: str, chunk: int = 1 << 22) -> int:
    crc = 0
    with paths.open_file(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def file_digests(step_dir: str) -> dict[str, list[int]]:
    """``{relative path: [size, crc32]}`` of every file of a finished step (the digest file excluded);
    paths are ``/``-separated, local or in a bucket."""
    return {rel: [size, _crc32(paths.join(step_dir, *rel.split("/")))]
            for rel, size in paths.file_sizes(step_dir).items() if not rel.startswith(DIGEST_FILE)}


def write_digest(step_dir: str) -> None:
    paths.write_text(paths.join(step_dir, DIGEST_FILE), json.dumps(file_digests(step_dir)))


def _json_problem(path: str) -> str | None:
    try:
        json.loads(paths.read_text(path))
    except FileNotFoundError:
        return f"{path} is missing"
    except (OSError, ValueError) as e:
        return f"{path} is unreadable ({type(e).__name__})"
    return None


def damage(step_dir: str) -> str | None:
    """What is wrong with a finished step directory, or None. With a digest every byte is checked;
    without one (saved by a run killed before it could write the digest) only the structure."""
    sizes = paths.file_sizes(step_dir)
    missing = [item for item in ITEMS if not any(rel.startswith(f"{item}/") for rel in sizes)]
    if missing:
        return f"item '{missing[0]}' is missing"
    for rel in ("meta/metadata", "state/_METADATA"):
        problem = _json_problem(paths.join(step_dir, *rel.split("/")))
        if problem:
            return problem.replace(f"{step_dir}/", "", 1)
    if DIGEST_FILE not in sizes:
        return None
    try:
        expected = json.loads(paths.read_text(paths.join(step_dir, DIGEST_FILE)))
    except (OSError, ValueError):
        return f"{DIGEST_FILE} is unreadable"
    for rel, (size, crc) in expected.items():
        path = paths.join(step_dir, *rel.split("/"))
        if rel not in sizes:
            return f"{rel} is missing"
        actual = sizes[rel]
        if actual != size:
            return f"{rel} is truncated ({actual} of {size} bytes)" if actual < size else \
                f"{rel} has {actual} bytes, {size} were written"
        try:
            if _crc32(path) != crc:
                return f"{rel} is corrupted (checksum mismatch)"
        except PermissionError:  # the files may be intact: setting the step aside would resume from an older one
            raise CheckpointError(f"cannot read {path} (permission denied); give this user read access to "
                                  f"{step_dir}") from None
        except OSError as e:
            return f"{rel} is unreadable ({e.strerror or e})"
    return None


def _is_damage(e: BaseException) -> bool:
    if isinstance(e, (OSError, json.JSONDecodeError)):
        return True
    return any(marker in str(e) for marker in _DAMAGE_MARKERS)



def _write_failure(e: BaseException) -> str | None:
    """The OS reason a save failed (disk full, read-only, permissions), or None if it is not an I/O failure."""
    if isinstance(e, OSError) and e.errno:
        return os.strerror(e.errno)
    match = _OS_ERROR_CODE.search(str(e))
    return os.strerror(int(match.group(1))) if match else None


class _OrbaxThreadErrors(logging.Filter):
    """orbax logs a failed background save with a full traceback before re-raising it to us; we turn it
    into one CheckpointError line, so the duplicate traceback is dropped (``--debug`` still shows ours).
    Which of orbax's threads logs it depends on timing: the write's own thread, the thread that waits for the
    writes to commit, or the manager's finalize thread when the trainer waits for the save."""

    MESSAGES = ("raised an exception", "in background save thread", "Save Finalize thread")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(m in message for m in self.MESSAGES)


class _UnretrievedWriteFailures(logging.Filter):
    """A failed save leaves orbax's other write tasks holding the same I/O error; asyncio logs each one with a
    traceback ("Task exception was never retrieved", and the same for the future gathering them) when it is
    collected, dozens after our one-line error. Only those whose exception is an I/O failure of a write are
    dropped; asyncio's other reports are kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not ("exception was never retrieved" in record.getMessage()
                    and error is not None and _write_failure(error) is not None)


def _is_closed_loop_callback(unraisable) -> bool:
    """orbax runs each save's coroutines on an event loop of its own and closes it when the save fails; the
    write threads still running then post their results to the closed loop, and each post is reported as an
    unraisable RuntimeError, a traceback on stderr (16 of them for a 2-layer model's failed save)."""
    return (unraisable.object is None and isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == "Event loop is closed")


@functools.cache
def _drop_orbax_failure_reports() -> None:
    """Once per process: orbax's, asyncio's and Python's own reports of a failed save are dropped (the trainer
    reports it as one CheckpointError line). Each filter matches only those reports; every other one passes."""
    logging.getLogger("absl").addFilter(_OrbaxThreadErrors())
    logging.getLogger("asyncio").addFilter(_UnretrievedWriteFailures())
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        if not _is_closed_loop_callback(unraisable):
            previous(unraisable)

    sys.unraisablehook = hook
    # a synchronous save's unstarted write coroutines, which Python reports as it exits
    warnings.filterwarnings("ignore", r"coroutine '.*write_fragment' was never awaited", RuntimeWarning)


# ----------------------------------------------------------------------------- checkpointer


@functools.cache
def _one_writer_per_array_on_cpu() -> None:
    """orbax splits a replicated array into one slice per replica so that replicas write in parallel. CPU
    devices all live in one host's memory, so there is nothing to parallelise, and each slice is an eager
    ``jax.lax.slice`` compiled once per (shape, device): 56 small compiles for the first save of a 7-array
    state on 8 CPU devices (2.2 s, about as long as the tiny test model's train-step compile, 2.5 s). orbax
    already turns the split off on GPU; we turn it off on CPU too (once per process). The files hold the same
    arrays."""
    if jax.default_backend() != "cpu":
        return
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # orbax warns that a handler replaces its default: that is the point
    try:
        handler = ocp.type_handlers.ArrayHandler(use_replica_parallel=False)
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
    finally:
        absl_logger.setLevel(level)


class Checkpointer:
    def __init__(self, run_dir: str, keep: int, async_save: bool = True):
        _one_writer_per_array_on_cpu()
        self.run_dir = paths.absolute(run_dir)
        self.directory = paths.join(self.run_dir, CHECKPOINT_DIR)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._undigested: list[int] = []  # steps this process saved whose digest is not written yet
        self._digester: threading.Thread | None = None
        self._reported: set[int] = set()
        self._intact: set[int] = set()  # steps ``damage`` passed in this process (each verified once)
        _drop_orbax_failure_reports()

    def _step_dir(self, step: int) -> str:
        return paths.join(self.directory, str(step))

    def _damage(self, step: int, again: bool = False) -> str | None:
        """``damage`` of a finished step; ``restore_partial`` skips a step this process found intact already
        (``latest_step`` then ``restore_partial`` of one step, as eval and convert do, read every byte twice).
        ``again``: check it anyway (the trainer's choice of where to resume)."""
        if step in self._intact and not again:
            return None
        problem = damage(self._step_dir(step))
        if problem is None:
            self._intact.add(step)
        return problem

    def _finished_steps(self) -> list[int]:
        """Committed step directories, newest first. Locally orbax renames a finished temporary directory
        (whose name is not a number); a bucket has no rename, so there a step is committed once orbax
        has written its ``commit_success.txt``."""
        steps = (int(n) for n in paths.listdir(self.directory) if n.isdigit())
        if paths.is_remote(self.directory):
            steps = (s for s in steps if paths.exists(paths.join(self._step_dir(s), COMMIT_MARKER)))
        return sorted(steps, reverse=True)

    def _set_aside(self, step: int, problem: str, move: bool = True) -> None:
        """Report a damaged step once; the lock holder moves it out of orbax's way, intact."""
        if step in self._reported:
            return
        self._reported.add(step)
        where = self._step_dir(step)
        if move and holds_run_lock(self.run_dir) and jax.process_index() == 0:
            stamp = f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
            target = paths.join(self.run_dir, DAMAGED_DIR, stamp)
            for n in itertools.count(2):  # the same step set aside twice within a second
                if not paths.exists(target):
                    break
                target = paths.join(self.run_dir, DAMAGED_DIR, f"{stamp}-{n}")
            paths.makedirs(paths.dirname(target))
            paths.rename(where, target)
            self.manager.reload()
            kept = f"moved to {target} (not deleted)"
        else:
            kept = "left in place"
        log.warning(f"checkpoint {where} is damaged ({problem}); {kept}")

    def _newest_intact(self, below: int | None = None, move: bool = True) -> int | None:
        """Newest step (below ``below``) that passes ``damage``; damaged newer ones are reported and, with
        ``move`` (and the run's lock), set aside. With no intact step nothing is moved: the user decides what
        to do with the only copies there are."""
        steps = [s for s in self._finished_steps() if below is None or s < below]
        problems = {}
        for step in steps:
            problem = self._damage(step, again=True)
            if problem is None:
                for bad, why in problems.items():
                    self._set_aside(bad, why, move)
                return step
            problems[step] = problem
        for bad, why in problems.items():
            self._set_aside(bad, why, move=False)
        if problems:
            raise CheckpointError(f"no intact checkpoint in {self.directory} (see the warnings above); restore "
                                  f"one from a backup, or move {self.directory} away to start from scratch")
        return None

    def has_digest(self, step: int) -> bool:
        """Whether ``step`` carries a digest, i.e. whether ``damage`` could check its every byte."""
        return paths.exists(paths.join(self._step_dir(step), DIGEST_FILE))

    def latest_step(self, set_aside_damaged: bool = False) -> int | None:
        """The newest intact checkpoint (damaged newer ones are reported and skipped), None if there is none.

        A read: only with ``set_aside_damaged`` (the trainer, holding the run's lock) are damaged newer steps
        moved to ``DAMAGED_DIR``, so new saves cannot collide with them."""
        return self._newest_intact(move=set_aside_damaged)

    def save(self, step: int, state: TrainState, data_iter: grain.DatasetIterator, meta: dict) -> None:
        """Asynchronous when configured; the previous save is finished (and digested) first."""
        self.wait()
        args = ocp.args.Composite(state=ocp.args.StandardSave(_as_tree(state)),
                                  data=grain.checkpoint.CheckpointSave(data_iter),
                                  meta=ocp.args.JsonSave(meta))
        self._undigested.append(step)
        self._intact.discard(step)
        try:
            self.manager.save(step, args=args, force=True)
        except Exception as e:
            self._raise_save_failure(e)

    def _raise_save_failure(self, e: BaseException) -> None:
        """An I/O failure becomes one CheckpointError naming the step and the intact fallback; others re-raise."""
        reason = _write_failure(e)
        if reason is None:
            raise e
        failed = self._undigested.pop() if self._undigested else None
        previous = next((s for s in self._finished_steps() if s != failed), None)
        kept = f"checkpoint step {previous} is intact, rerun to resume from it" if previous is not None else \
            "no earlier checkpoint exists"
        raise CheckpointError(f"could not write checkpoint step {failed} to {self.directory} ({reason}); "
                              f"free disk space or make it writable ({kept})") from e

    def wait(self) -> None:
        """Block until the pending save is committed. Its digest is written on a background thread (reading a
        large checkpoint back must not stall training), joined by the next ``wait`` or ``close``."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            self._raise_save_failure(e)
        self._join_digests()
        steps, self._undigested = self._undigested, []
        if steps and jax.process_index() == 0:
            self._digester = threading.Thread(target=self._digest, args=(steps,), name="checkpoint-digest",
                                              daemon=True)
            self._digester.start()

    def _digest(self, steps: list[int]) -> None:
        for step in steps:
            try:
                write_digest(self._step_dir(step))
            except OSError:  # the disk is failing: the next save reports it; without a digest only structure counts
                pass

    def _join_digests(self) -> None:
        if self._digester is not None:
            self._digester.join()
            self._digester = None

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, abstract: TrainState, shardings: TrainState,
                data_iter: grain.DatasetIterator | None) -> tuple[TrainState, dict]:
        """Restore onto ``shardings`` (any mesh) and move ``data_iter`` to the saved position.

        If ``step`` turns out unreadable, the next older intact checkpoint is restored instead (the
        returned state's ``step`` says which).
        """
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              _as_tree(abstract), _as_tree(shardings))
        items: dict[str, Any] = {"state": ocp.args.StandardRestore(target), "meta": ocp.args.JsonRestore()}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:
            if _is_damage(e):
                older = self._newest_intact(below=step)
                if older is None:
                    raise CheckpointError(f"checkpoint {self.directory}/{step} is unreadable ({first_line(e)}) "
                                          "and no older one exists; restore it from a backup or use a new "
                                          "train.run_dir") from None
                self._set_aside(step, first_line(e))
                return self.restore(older, abstract, shardings, data_iter)
            if isinstance(e, (ValueError, KeyError, TypeError)):
                raise CheckpointError(f"checkpoint {self.directory}/{step} does not match this model ({e}); "
                                      "use the model settings it was trained with or a new train.run_dir") from None
            raise
        tree = out["state"]
        return TrainState(step=tree["step"], params=tree["params"], opt_state=tree["opt_state"], rng=tree["rng"]), \
            out["meta"]

    def restore_partial(self, step: int, target: dict) -> dict:
        """Restore only the items of ``target`` (e.g. ``{"params": ...}``), each leaf a
        ``jax.ShapeDtypeStruct`` carrying the sharding to place it with.

        Inference and stage continuation need parameters without paying for optimizer moments.
        """
        path = paths.join(self._step_dir(step), "state")
        if not paths.isdir(path):
            raise CheckpointError(f"checkpoint {self.directory}/{step} has no saved state; "
                                  "pass a run directory with a finished checkpoint")
        # A step named by the caller is checked as the trainer checks the newest one (every byte, where it has a
        # digest): damaged bytes may restore without an error, as wrong weights.
        problem = self._damage(step)
        if problem is not None:
            raise CheckpointError(f"checkpoint {self.directory}/{step} is damaged ({problem}); pass another step, "
                                  "or the run directory for its newest intact checkpoint")
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        try:
            return ocp.PyTreeCheckpointer().restore(
                path, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True))
        except Exception as e:  # tensorstore's read errors are plain Exceptions
            if _is_damage(e):
                raise CheckpointError(f"checkpoint {self.directory}/{step} is unreadable ({first_line(e)}); pass "
                                      "another step, or the run directory for its newest intact checkpoint") from None
            if isinstance(e, (ValueError, KeyError, TypeError)):
                raise CheckpointError(f"checkpoint {self.directory}/{step} does not match this model ({e}); "
                                      "use the model settings it was trained with") from None
            raise

    def close(self) -> None:
        """Finish (and digest) a pending save, then release orbax's threads."""
        try:
            self.wait()
        finally:
            self._join_digests()
            self.manager.close()
