"""What a run directory is, and the rule that keeps a run from writing over anything else.

A command that writes a run (``train``, ``continue``, ``convert --from-hf``) only ever writes into a
directory it made: one that did not exist, was empty, or holds ``MARKER`` (written when the run was
created). Anything else — an empty path, the current directory with the user's files in it, a file —
is refused with one line before a byte is written, because a run writes ``config.yaml``,
``metrics.jsonl`` and ``summary.json`` by those names and would overwrite the user's own.

Runs made before the marker existed are recognised by their layout (a config.yaml that a run saved, next
to step-numbered ``checkpoints/`` or ``metrics.jsonl``) and adopted: the marker is added on their next start.

A fresh start that fails (bad data, a model that cannot fit) takes back what it wrote, so a typo
leaves no half-made run directory behind (``discard_fresh``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import time
from typing import NamedTuple

from scaling_jax import paths
from scaling_jax.config import fill_saved_run_defaults, read_yaml
from scaling_jax.errors import CheckpointError, ConfigError

MARKER = "scaling_jax_run.json"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
LINEAGE_FILE = "lineage.json"
TOKENIZER_DIR = "tokenizer"
CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "checkpoints-damaged"
LOCK_FILE = ".lock"
TENSORBOARD_DIR = "tensorboard"
PLOTS_DIR = "plots"
EVAL_DIR = "eval"  # scaling-jax eval's default output, inside the first run
COMPILATION_CACHE_DIR = "compilation_cache"  # XLA's persistent cache (train.compilation_cache=run)
REPORT_DIR = "report"  # scaling-jax report's default output, inside the first path
# a bucket run's entries its local mirror never copies (checkpoints and the compilation cache go to the bucket direct)
MIRROR_SKIP = (CHECKPOINT_DIR, DAMAGED_DIR, LOCK_FILE, COMPILATION_CACHE_DIR)
_FAILED_START = {LOCK_FILE, TOKENIZER_DIR}  # all that a failed start left behind before starts cleaned up
_SHOWN = 3  # entries named in a refusal


def is_run_dir(path: str) -> bool:
    """True if ``path`` is a directory holding our marker or a run written before markers existed: our
    ``config.yaml`` (its sections, ``train.run_dir`` among them) beside step-numbered ``checkpoints/`` or
    ``metrics.jsonl``, or only what a failed start left (its lock, perhaps the tokenizer). A user's project
    with a config.yaml and a checkpoints folder of its own is not one (its config.yaml would be overwritten)."""
    names = set(paths.listdir(path))
    if MARKER in names:
        return True
    if CONFIG_FILE in names and _is_saved_config(paths.join(path, CONFIG_FILE)):
        return METRICS_FILE in names or (CHECKPOINT_DIR in names and any(
            name.isdigit() for name in paths.listdir(paths.join(path, CHECKPOINT_DIR))))
    return LOCK_FILE in names and names <= _FAILED_START


def _is_saved_config(path: str) -> bool:
    """A config.yaml that a run saved: every section of ours, with the run's ``train.run_dir``."""
    try:
        raw = read_yaml(path, path)
    except (OSError, ConfigError):
        return False
    sections = ("model", "data", "optimizer", "train")
    return isinstance(raw, dict) and all(isinstance(raw.get(k), dict) for k in sections) and "run_dir" in raw["train"]


def _refusal(path: str, field: str, names: list[str]) -> CheckpointError:
    shown = ", ".join(names[:_SHOWN]) + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")
    where = f"'{path}'" + (" (the current directory)" if not paths.is_remote(path) and
                           os.path.abspath(path) == os.getcwd() else "")
    return CheckpointError(f"{field} {where} already holds files that are not a scaling_jax run ({shown}); "
                           f"choose a new or empty directory, e.g. {field}=runs/NAME")


def check_claimable(path: str, field: str = "train.run_dir") -> bool:
    """Refuse a path a run may not write into; True if it is fresh (missing or empty), False if it is a run.

    Pure check: nothing is created or written.
    """
    if not str(path).strip():
        raise CheckpointError(f"{field} is empty; set it to a new directory, e.g. {field}=runs/NAME "
                              f"(a multi-host run: {field}=gs://BUCKET/runs/NAME)")
    if not paths.is_remote(path) and os.path.exists(path) and not os.path.isdir(path):
        raise CheckpointError(f"{field} '{path}' is a file; point {field} at a directory")
    if not paths.is_remote(path):  # inside another run, its resume would take this one for a damaged checkpoint
        ancestor = os.path.dirname(os.path.abspath(path))
        while ancestor != os.path.dirname(ancestor):
            if os.path.isfile(os.path.join(ancestor, MARKER)):
                raise CheckpointError(f"{field} '{path}' lies inside the run '{ancestor}', whose files are its "
                                      f"own; choose a directory outside it, e.g. {field}=runs/NAME")
            ancestor = os.path.dirname(ancestor)
    names = paths.listdir(path)
    if not names:
        return True
    if not is_run_dir(path):
        raise _refusal(path, field, names)
    return False


class Claim(NamedTuple):
    fresh: bool  # the directory was missing or empty: a failed start may take back all of it
    created: bool  # it was missing: a failed start removes the directory itself too
    # the missing parents the claim made, innermost first (``runs/a`` for a missing ``runs/a/b``): a failed start
    # removes each one only while it is empty, as another run may have been started inside it since
    made_parents: tuple[str, ...] = ()


def claim(path: str, field: str = "train.run_dir") -> Claim:
    """Make ``path`` usable as this run's directory (created if missing, proven writable); ``mark`` it once
    the writer holds its lock.

    Refuses (see ``check_claimable``) before anything is written.
    """
    fresh = check_claimable(path, field)
    created = not paths.exists(path)
    made: list[str] = []
    if created and not paths.is_remote(path):
        parent = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(parent):
            made.append(parent)
            parent = os.path.dirname(parent)
    paths.prepare_dir(path, field)
    return Claim(fresh, created, tuple(made))


def mark(path: str) -> None:
    """Write the marker that makes ``path`` a run (runs from before markers get one on their next start)."""
    marker = paths.join(path, MARKER)
    if not paths.exists(marker):
        paths.write_text(marker, json.dumps({"format": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))


def discard_fresh(path: str, claimed: Claim) -> None:
    """Take back what a failed fresh start wrote: everything in ``path``, and ``path`` itself if we made it."""
    if not claimed.fresh:
        return
    if paths.is_remote(path):
        for name in paths.listdir(path):
            paths.remove(paths.join(path, name))
        return
    if claimed.created:
        shutil.rmtree(path, ignore_errors=True)
        for parent in claimed.made_parents:  # innermost first; one holding another run (or anything) stays
            try:
                os.rmdir(parent)
            except OSError:
                break
        return
    for name in os.listdir(path):
        target = os.path.join(path, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target, ignore_errors=True)
        else:
            os.remove(target)


def resolve_run_config(path: str) -> tuple[str, str] | None:
    """``(run_dir, config_file)`` when ``path`` names a run directory or the ``config.yaml`` inside one.

    Resuming goes by the run directory itself: the ``train.run_dir`` stored in its config is where the
    run was first written, which is wrong for a copied or moved run, or one read from another directory.
    """
    if paths.isdir(path):
        run_dir = path
    elif paths.basename(path) == CONFIG_FILE and is_run_dir(paths.dirname(path) or "."):
        run_dir = paths.dirname(path) or "."
    else:
        return None
    config_file = paths.join(run_dir, CONFIG_FILE)
    if not paths.exists(config_file):
        raise CheckpointError(f"'{path}' is a directory without {CONFIG_FILE}; pass a config file or a run "
                              "directory (scaling-jax train RUN_DIR resumes a run)")
    return run_dir, config_file


# ----------------------------------------------------------------------------- what a checkpoint says of itself

META_VERSION = 1


@dataclasses.dataclass
class CheckpointMeta:
    """The ``meta`` item of every checkpoint: what a resume, a continuation stage or an export needs besides the
    arrays. Written by the trainer and by weight imports; read through ``from_json`` only, which fills what
    checkpoints written before a field existed lack (version 0: no ``version``, ``total_step`` or ``offset``).
    """

    config: dict  # the resolved config the checkpoint was trained with (``config.to_dict``)
    tokenizer: str  # the tokenizer's fingerprint: resuming with another is refused
    step: int  # this run's updates
    tokens: int  # totals over every stage so far
    flops: float
    total_step: int
    wall_time: float = 0.0  # seconds of training in this run, across its sessions
    offset: dict = dataclasses.field(default_factory=lambda: {"step": 0, "tokens": 0, "flops": 0.0})  # earlier stages
    lineage: list = dataclasses.field(default_factory=list)  # one record per stage, oldest first; the last is this run
    data_index: int | None = None  # the global batch the data stream reads next (None: older checkpoints)
    version: int = META_VERSION

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, raw: dict) -> CheckpointMeta:
        known = {f.name for f in dataclasses.fields(cls)}
        filled = {"total_step": raw.get("step", 0), "version": 0, **{k: v for k, v in raw.items() if k in known}}
        filled["config"] = fill_saved_run_defaults(copy.deepcopy(filled.get("config", {})))
        return cls(**filled)

    @property
    def stage_record(self) -> dict:
        """This run's own lineage record (empty for a checkpoint written without lineage)."""
        return dict(self.lineage[-1]) if self.lineage else {}
