"""BIG-bench JSON tasks: loading, validation, and k-shot prompts built exactly as BIG-bench builds them.

A task file (``task.json`` as published in google/BIG-bench) has ``examples``, each with an ``input``
and a ``target`` (string or list) and/or ``target_scores`` (choice -> score), plus optional
formatting fields; a ``task.json`` without examples is a composite whose subtasks are the
``*/task.json`` files beside it. Everything follows BIG-bench 1.0.0's ``bigbench/api/json_task.py``:

- duplicate examples (same JSON text) are dropped; a missing ``target`` is the *first* choice with the
  highest score;
- an example becomes ``example_input_prefix + input [+ choice_prefix + choices] + example_output_prefix``,
  the choices sorted and then permuted by a generator seeded afresh with ``seed`` for every example
  (``default_format_fn``);
- with k shots every example is a query (in an order drawn from one seeded stream), and each query
  gets its own k shots drawn from the *other* examples, each shot followed by one of its targets drawn
  at random, joined by ``few_shot_example_separator``, all after ``task_prefix`` (``make_nshot_dataset``).

Beyond BIG-bench: tasks where only some examples carry ``target_scores`` (which BIG-bench rejects) are
accepted, multiple-choice metrics then covering the examples that have choices, and a
``code_execution`` metric is allowed for generated code tasks. Unknown example fields are kept
(``Example.extra``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scaling_jax.errors import DataError
from scaling_jax.eval import bigbench_metrics as bm

EXTRA_METRICS = ("code_execution",)  # ours: generated code checked by running it (eval/generators.py)
GENERATIVE_METRICS = bm.GENERATIVE_METRICS + EXTRA_METRICS
MC_METRICS = bm.MULTIPLE_CHOICE_METRICS
KNOWN_METRICS = GENERATIVE_METRICS + MC_METRICS + bm.SCORING_METRICS
BIGBENCH_SEED = 42  # JsonTask's default random_seed, for choice order and shots alike
DEFAULTS = {"task_prefix": "", "example_input_prefix": "\nQ: ", "example_output_prefix": "\nA: ",
            "choice_prefix": "\n  choice: ", "few_shot_example_separator": "\n"}


@dataclass
class Example:
    input: str
    targets: list[str]  # generative answers (any one is correct); the first best choice when absent
    target_scores: dict[str, float] | None = None  # multiple choice: choice -> score (1 = right)
    extra: dict[str, Any] = field(default_factory=dict)  # unknown fields, e.g. an execution check

    @property
    def choices(self) -> list[str]:
        return list(self.target_scores) if self.target_scores else []


@dataclass
class Task:
    name: str
    examples: list[Example]  # distinct examples, file order; empty for a composite task
    metrics: list[str]
    description: str = ""
    task_prefix: str = DEFAULTS["task_prefix"]
    example_input_prefix: str = DEFAULTS["example_input_prefix"]
    example_output_prefix: str = DEFAULTS["example_output_prefix"]
    choice_prefix: str = DEFAULTS["choice_prefix"]
    few_shot_example_separator: str = DEFAULTS["few_shot_example_separator"]
    append_choices_to_input: bool = True
    stop_string: str | None = None
    output_regex: str | None = None
    source: str = ""
    preferred_score: str = ""
    absolute_normalization: bool = False  # choose among choices by absolute, not renormalised, log-probs
    subtasks: list[Task] = field(default_factory=list)  # a composite task's parts, scored and then averaged

    @property
    def generative(self) -> bool:
        if self.subtasks:
            return any(t.generative for t in self.subtasks)
        return any(m in GENERATIVE_METRICS for m in self.metrics) and any(e.targets for e in self.examples)

    @property
    def multiple_choice(self) -> bool:
        if self.subtasks:
            return any(t.multiple_choice for t in self.subtasks)
        return any(m in MC_METRICS for m in self.metrics) and any(e.target_scores for e in self.examples)

    @property
    def leaves(self) -> list[Task]:
        """The tasks that hold examples: the subtasks of a composite, else the task itself."""
        return [leaf for t in self.subtasks for leaf in t.leaves] if self.subtasks else [self]


@dataclass
class Prompted:
    """One scored example with its full prompt."""

    example: Example
    prompt: str
    choices: list[str]  # target_scores' keys in file order: the order BIG-bench scores choices in
    index: int  # position in its task's (distinct) example list
    shown_choices: list[str] = field(default_factory=list)  # the order the prompt lists them in, if it does
    task: Task | None = None  # the task (a composite's subtask) whose formatting and metrics apply


# ----------------------------------------------------------------------------- loading


def _fail(source: str, where: str, problem: str) -> DataError:
    return DataError(f"task file '{source}': {where} {problem}; fix the file (BIG-bench task.json format)")


def _example(raw: Any, i: int, source: str) -> Example:
    where = f"examples[{i}]"
    if not isinstance(raw, dict):
        raise _fail(source, where, "must be an object with 'input' and 'target' or 'target_scores'")
    if not isinstance(raw.get("input"), str):
        raise _fail(source, f"{where}.input", "is missing or not a string")
    target = raw.get("target")
    scores = raw.get("target_scores")
    if target is None and scores is None:
        raise _fail(source, where, "has neither 'target' nor 'target_scores'")
    if target is not None:
        target = [target] if isinstance(target, str) else target
        if not isinstance(target, list) or not target or not all(isinstance(t, str) for t in target):
            raise _fail(source, f"{where}.target", "must be a string or a non-empty list of strings")
    if scores is not None:
        if (not isinstance(scores, dict) or not scores
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scores.values())):
            raise _fail(source, f"{where}.target_scores", "must map each choice to a number")
        scores = {str(k): float(v) for k, v in scores.items()}
        if target is None:
            best, worst = max(scores.values()), min(scores.values())
            if (len(scores) == 1 and best == 0) or (len(scores) > 1 and best <= worst):
                raise _fail(source, f"{where}.target_scores", "has no correct choice (one must score highest)")
            target = [next(k for k, v in scores.items() if v == best)]  # BIG-bench: the first best choice
    extra = {k: v for k, v in raw.items() if k not in ("input", "target", "target_scores")}
    return Example(raw["input"], list(target), scores, extra)


def _distinct(raw_examples: list) -> list:
    """Examples with exact duplicates (same JSON text) dropped, first occurrences kept in order."""
    seen: set[str] = set()
    out = []
    for raw in raw_examples:
        key = json.dumps(raw)
        if key not in seen:
            seen.add(key)
            out.append(raw)
    return out


def _preferred_score(data: dict, metrics: list[str], source: str) -> str:
    preferred = data.get("preferred_score")
    if preferred is None:  # BIG-bench requires it; ours default to the first metric
        preferred = "rougeLsum" if metrics[0] == "rouge" else metrics[0]
    if preferred == "rouge":
        raise _fail(source, "preferred_score", "'rouge' is ambiguous: use 'rouge1', 'rouge2' or 'rougeLsum'")
    if not isinstance(preferred, str) or preferred not in set(bm.SCORE_RANGES) | set(EXTRA_METRICS):
        raise _fail(source, "preferred_score", f"{preferred!r} is not a score a task reports "
                    f"(one of {', '.join(sorted(bm.SCORE_RANGES))})")
    reported = bm.reported_scores(metrics)
    if preferred not in reported:  # its normalised score (and a composite's) would silently be missing
        raise _fail(source, "preferred_score", f"{preferred!r} is not among the scores its metrics {metrics} report "
                    f"({', '.join(sorted(reported))}); name one of those or add its metric")
    return preferred


def _check_metric_targets(examples: list[Example], metrics: list[str], source: str) -> None:
    """What a metric needs of every example, checked before a model runs (BIG-bench fails mid-task on these)."""
    for i, e in enumerate(examples):
        if "macro_f1" in metrics and e.target_scores is not None and (
                list(e.target_scores.values()).count(1) != 1 or sum(e.target_scores.values()) != 1):
            raise _fail(source, f"examples[{i}].target_scores", "must give exactly one choice score 1 and the others "
                        "0 for macro_f1 (no partial credit)")
        if "numeric_match_with_0_1_relative_error" in metrics and len(e.targets) != 1:
            raise _fail(source, f"examples[{i}].target", "must be one value for "
                        "numeric_match_with_0_1_relative_error")
        if "log_likelihood" in metrics and e.target_scores is None and any(not t.strip() for t in e.targets):
            raise _fail(source, f"examples[{i}].target", "is empty; log_likelihood's per-word and per-character "
                        "means need text")


def _format_fields(data: dict, source: str) -> dict:
    fmt: dict[str, Any] = {}
    for key, default in DEFAULTS.items():
        value = data.get(key, default)
        if key == "task_prefix":
            value = str(value)  # as BIG-bench does
        if not isinstance(value, str):
            raise _fail(source, key, "must be a string")
        fmt[key] = value
    for key in ("stop_string", "output_regex"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise _fail(source, key, "must be a string")
        fmt[key] = data.get(key)
    if fmt["output_regex"]:
        try:
            groups = re.compile(fmt["output_regex"]).groups
        except re.error as e:
            raise _fail(source, "output_regex", f"is not a valid regular expression ({e})") from None
        if groups > 1:  # BIG-bench keeps re.findall's first item, which would be a tuple
            raise _fail(source, "output_regex", f"has {groups} capturing groups; keep at most one ((?:...) for others)")
    # Any JSON value, read for its truth as BIG-bench does: the string "false" appends the choices.
    fmt["append_choices_to_input"] = bool(data.get("append_choices_to_input", True))
    fmt["absolute_normalization"] = bool(data.get("absolute_normalization", False))
    return fmt


def task_from_dict(data: Any, source: str = "<dict>", name: str | None = None,
                   subtask_sources: list[tuple[Any, str]] | None = None, parent: str | None = None) -> Task:
    """A validated ``Task`` from parsed BIG-bench JSON; a composite's parts come from ``subtask_sources``
    ((data, source) pairs, as ``load_task`` finds them) or from an inline ``subtasks`` list, and are
    named ``parent:name`` as in BIG-bench."""
    if not isinstance(data, dict):
        raise _fail(source, "the top level", "must be a JSON object")
    # BIG-bench's task name, made ASCII as BIG-bench does
    name = name or str(data.get("name") or os.path.splitext(os.path.basename(source))[0])
    name = name.encode("ascii", errors="replace").decode()
    name = f"{parent}:{name}" if parent else name
    if "examples" not in data and (subtask_sources or isinstance(data.get("subtasks"), list)):
        parts = subtask_sources or [(d, f"{source}:subtasks[{i}]") for i, d in enumerate(data["subtasks"])]
        subtasks = []
        for sub_data, sub_source in parts:
            sub = task_from_dict(sub_data, sub_source, parent=name)
            if any(t.name == sub.name for t in subtasks):
                raise _fail(source, "subtasks", f"repeat the subtask name '{sub.name}'")
            subtasks.append(sub)
        return Task(name=name, examples=[], metrics=[], description=str(data.get("description", "")), source=source,
                    subtasks=subtasks)
    raw_examples = data.get("examples")
    if not isinstance(raw_examples, list) or not raw_examples:
        raise _fail(source, "examples", "is missing or empty")
    metrics = data.get("metrics", ["exact_str_match"])
    if not isinstance(metrics, list) or not metrics or not all(isinstance(m, str) for m in metrics):
        raise _fail(source, "metrics", "must be a non-empty list of metric names")
    unknown = [m for m in metrics if m not in KNOWN_METRICS]
    if unknown:
        raise _fail(source, "metrics", f"name {unknown}, not BIG-bench metrics (supported: {', '.join(KNOWN_METRICS)})")
    examples = [_example(e, i, source) for i, e in enumerate(_distinct(raw_examples))]
    _check_metric_targets(examples, metrics, source)
    task = Task(name=name, examples=examples, metrics=metrics, description=str(data.get("description", "")),
                source=source, preferred_score=_preferred_score(data, metrics, source), **_format_fields(data, source))
    if not task.generative and not task.multiple_choice and "log_likelihood" not in metrics:
        raise _fail(source, "metrics", f"{metrics} need examples with "
                    f"{'target_scores' if set(metrics) <= set(MC_METRICS) else 'targets'}")
    if task.preferred_score == "multiple_choice_grade":
        low, high = bm.score_range(task.preferred_score, [e.target_scores for e in examples if e.target_scores])
        if high <= low:
            raise _fail(source, "target_scores", f"give chance-level multiple_choice_grade {low:g} >= 1: "
                        "every choice scores as well as the right one")
    return task


def load_task(path: str) -> Task:
    """Read a BIG-bench ``task.json``; one without ``examples`` is a composite whose subtasks are the
    ``task.json`` files one directory down (sorted by path, as BIG-bench finds them). Errors name the
    file and the field."""
    data = _read_json(path)
    if isinstance(data, dict) and "examples" not in data:
        base = os.path.dirname(os.path.abspath(path))
        found = sorted(p for p in (os.path.join(base, d, "task.json") for d in os.listdir(base)) if os.path.isfile(p))
        if not found:
            raise DataError(f"task file '{path}' has no 'examples' and no subtask directories (*/task.json) beside "
                            "it; fix the file (BIG-bench task.json format)")
        return task_from_dict(data, path, subtask_sources=[(_read_json(p), p) for p in found])
    return task_from_dict(data, path)


def _read_json(path: str) -> Any:
    if not os.path.isfile(path):
        raise DataError(f"task file '{path}' does not exist; pass a BIG-bench task.json or a generator name")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"task file '{path}' is not valid JSON (line {e.lineno}: {e.msg})") from None
    except UnicodeDecodeError:
        raise DataError(f"task file '{path}' is not UTF-8 text; save it as UTF-8") from None


# ----------------------------------------------------------------------------- prompting


def format_example(task: Task, example: Example, seed: int = BIGBENCH_SEED) -> tuple[str, list[str]]:
    """(input with prefixes and any appended choices, ending in the output prefix; the choices in the order
    shown). The sorted choices are permuted by a generator seeded with ``seed`` for this example alone,
    so the order depends only on the seed and the set of choices (``json_task.default_format_fn``)."""
    text, shown = example.input, []
    if example.target_scores is not None and task.append_choices_to_input:
        shown = [str(c) for c in np.random.RandomState(seed).permutation(sorted(example.target_scores))]
        text = text + task.choice_prefix + task.choice_prefix.join(shown)
    return task.example_input_prefix + text + task.example_output_prefix, shown


def _identity(example: Example, formatted: str) -> tuple:
    """What BIG-bench compares when it leaves a query out of its own shots: the whole formatted example."""
    return (formatted, example.targets, example.target_scores, example.choices if example.target_scores else None,
            example.extra)


def nshot_contexts(task: Task, formatted: list[str], shots: int, seed: int,
                   max_examples: int = 0) -> list[tuple[int, str]]:
    """(example index, k-shot context) for each query, in BIG-bench's query order (``make_nshot_dataset``).

    One ``RandomState(seed)`` stream draws, in order: the queries (a subset without replacement; with
    shots, always, so the order is a permutation), then per query its shots among the examples unequal
    to it and, per shot, which of its targets follows it. Integer draws consume the stream exactly as
    BIG-bench's draws over lists do."""
    n = len(task.examples)
    rng = np.random.RandomState(seed)
    if shots == 0:
        if max_examples and max_examples < n:
            return [(int(i), "") for i in rng.choice(n, max_examples, replace=False)]
        return [(i, "") for i in range(n)]
    count = min(max_examples, n) if max_examples else n
    ids = [_identity(e, f) for e, f in zip(task.examples, formatted, strict=True)]
    sep = task.few_shot_example_separator
    out = []
    for q in (int(i) for i in rng.choice(n, count, replace=False)):
        others = [j for j in range(n) if ids[j] != ids[q]]
        parts = []
        for k in rng.choice(len(others), shots, replace=False):
            shot = task.examples[others[int(k)]]
            parts.append(formatted[others[int(k)]] + shot.targets[int(rng.choice(len(shot.targets)))])
        out.append((q, sep.join(parts) + sep))
    return out


def build_prompts(task: Task, shots: int = 0, seed: int = BIGBENCH_SEED, max_examples: int = 0) -> list[Prompted]:
    """Every example (or ``max_examples`` drawn at random) as a query with its own k-shot prompt, as BIG-bench
    evaluates one shot count; a composite's subtasks each get ``max_examples // subtasks``."""
    if task.subtasks:
        per = max_examples // len(task.subtasks) if max_examples else 0
        if max_examples and per < 1:
            raise DataError(f"--max-examples {max_examples} is fewer than the {len(task.subtasks)} subtasks of "
                            f"'{task.name}'; use at least {len(task.subtasks)}")
        return [p for t in task.subtasks for p in build_prompts(t, shots, seed, per)]
    n = len(task.examples)
    if shots < 0 or n < shots + 1:
        raise DataError(f"--shots {shots} needs at least {shots + 1} distinct examples but task '{task.name}' has "
                        f"{n}; use fewer shots")
    if not 0 <= seed < 2 ** 32:
        raise DataError(f"--seed {seed} must be in [0, 2**32) (BIG-bench seeds numpy's RandomState with it)")
    formatted = [format_example(task, e, seed) for e in task.examples]
    out = []
    for i, context in nshot_contexts(task, [f for f, _ in formatted], shots, seed, max_examples):
        example = task.examples[i]
        out.append(Prompted(example, task.task_prefix + context + formatted[i][0], example.choices, i,
                            formatted[i][1], task))
    return out
