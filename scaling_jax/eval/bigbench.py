"""BIG-bench tasks by name: ``bigbench:NAME`` and ``bigbench-lite`` resolved to JSON task files.

Task files are looked up in a BIG-bench checkout named by ``BIGBENCH_DIR`` (its
``bigbench/benchmark_tasks/NAME/task.json``) or, without it, in an installed ``bigbench`` package;
nothing is downloaded. BIG-bench Lite is the fixed list in BIG-bench's
``bigbench/bbseqio/bigbench_lite.py`` (``bigbench_lite_v1``).
"""

from __future__ import annotations

import importlib.util
import os
import re

from scaling_jax.errors import DataError
from scaling_jax.eval.tasks import Task, load_task

ENV_VAR = "BIGBENCH_DIR"
PREFIX = "bigbench:"
LITE = "bigbench-lite"
# BIG-bench Lite v1 (24 tasks), from bigbench/bbseqio/bigbench_lite.py; "Do not edit existing lists" there.
BIGBENCH_LITE_V1 = (
    "auto_debugging", "bbq_lite_json", "code_line_description", "conceptual_combinations", "conlang_translation",
    "emoji_movie", "formal_fallacies_syllogisms_negation", "hindu_knowledge", "known_unknowns",
    "language_identification", "linguistics_puzzles", "logic_grid_puzzle", "logical_deduction",
    "misconceptions_russian", "novel_concepts", "operators", "parsinlu_reading_comprehension",
    "play_dialog_same_or_different", "repeat_copy_logic", "strange_stories", "strategyqa", "symbol_interpretation",
    "vitaminc_fact_verification", "winowhy",
)
INSTALL_HINT = (f"install BIG-bench (pip install bigbench, or pip install -e a google/BIG-bench checkout) or set "
                f"{ENV_VAR} to a BIG-bench checkout (with bigbench/benchmark_tasks/NAME/task.json)")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*")


def is_bigbench_spec(spec: str) -> bool:
    """Whether a ``--tasks`` entry names BIG-bench tasks rather than a file or a generator."""
    return spec.startswith(PREFIX) or spec == LITE


def tasks_dir(spec: str = "") -> tuple[str, str]:
    """(the ``benchmark_tasks`` directory, how it was found): ``BIGBENCH_DIR`` first, else the installed package."""
    root = os.environ.get(ENV_VAR, "")
    if root:
        path = os.path.join(os.path.expanduser(root), "bigbench", "benchmark_tasks")
        if not os.path.isdir(path):
            raise DataError(f"{spec or 'BIG-bench tasks'}: {ENV_VAR}={root} has no bigbench/benchmark_tasks "
                            f"directory ({path}); point {ENV_VAR} at a google/BIG-bench checkout")
        return path, f"{ENV_VAR}={root}"
    found = importlib.util.find_spec("bigbench")  # locates the package without importing it (it pulls TensorFlow)
    if found is not None and found.submodule_search_locations:
        path = os.path.join(list(found.submodule_search_locations)[0], "benchmark_tasks")
        if os.path.isdir(path):
            return path, "the installed bigbench package"
    raise DataError(f"{spec or 'BIG-bench tasks'} needs BIG-bench's task files, but {ENV_VAR} is not set and no "
                    f"bigbench package is installed; {INSTALL_HINT}")


def task_path(name: str, spec: str = "") -> str:
    """The ``task.json`` of BIG-bench task ``name`` (``NAME`` or ``NAME/SUBTASK``)."""
    spec = spec or PREFIX + name
    if not _NAME.fullmatch(name):
        raise DataError(f"{spec}: '{name}' is not a BIG-bench task name (letters, digits, _ . -, "
                        "and / for a subtask), e.g. bigbench:navigate")
    base, how = tasks_dir(spec)
    path = os.path.join(base, *name.split("/"), "task.json")
    if os.path.isfile(path):
        return path
    task_dir = os.path.dirname(path)
    if os.path.isfile(os.path.join(task_dir, "task.py")):
        raise DataError(f"{spec}: BIG-bench task '{name}' in {task_dir} is programmatic (task.py, no task.json); "
                        "only JSON tasks can be run")
    raise DataError(f"{spec}: no BIG-bench JSON task '{name}' in {base} (from {how}; looked for {path})")


def resolve_bigbench(spec: str) -> list[Task]:
    """The tasks a ``bigbench:NAME`` or ``bigbench-lite`` spec names, loaded with BIG-bench's semantics."""
    if spec == LITE:
        tasks_dir(LITE)  # no task source at all: say so once, not per task
        return [load_task(task_path(name, f"{LITE} ({name})")) for name in BIGBENCH_LITE_V1]
    if not spec.startswith(PREFIX) or not spec[len(PREFIX):]:
        raise DataError(f"'{spec}' is not a BIG-bench task spec; use bigbench:NAME (e.g. bigbench:navigate) or "
                        f"{LITE}")
    return [load_task(task_path(spec[len(PREFIX):], spec))]
