"""BIG-bench JSON tasks: loading, validation, and k-shot prompts formatted as BIG-bench does.

A task file (``task.json`` as published in google/BIG-bench) has ``examples``, each with an ``input``
and a ``target`` (string or list) and/or ``target_scores`` (choice -> score), plus optional
formatting fields. Formatting follows BIG-bench's JSON task: an example becomes
``example_input_prefix + input [+ choice_prefix + choices] + example_output_prefix``; k-shot
context is the shots' formatted inputs followed by their targets, joined by
``few_shot_example_separator``, all after ``task_prefix``. Shots are drawn once with a seed and
left out of the scored set, so a score never counts an example the prompt already answered.
Unknown fields are kept (``Example.extra``) and otherwise ignored.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scaling_jax.errors import DataError

GENERATIVE_METRICS = ("exact_str_match", "code_execution")
MC_METRICS = ("multiple_choice_grade",)
DEFAULTS = {"task_prefix": "", "example_input_prefix": "\nQ: ", "example_output_prefix": "\nA: ",
            "choice_prefix": "\n  choice: ", "few_shot_example_separator": "\n", "append_choices_to_input": True}


@dataclass
class Example:
    input: str
    targets: list[str]  # generative answers (any one is correct); from target_scores' best when absent
    target_scores: dict[str, float] | None = None  # multiple choice: choice -> score (1 = right)
    extra: dict[str, Any] = field(default_factory=dict)  # unknown fields, e.g. an execution check

    @property
    def choices(self) -> list[str]:
        return list(self.target_scores) if self.target_scores else []


@dataclass
class Task:
    name: str
    examples: list[Example]
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

    @property
    def generative(self) -> bool:
        return any(m in GENERATIVE_METRICS for m in self.metrics) and any(e.targets for e in self.examples)

    @property
    def multiple_choice(self) -> bool:
        return any(m in MC_METRICS for m in self.metrics) and any(e.target_scores for e in self.examples)


@dataclass
class Prompted:
    """One scored example with its full prompt; ``choices`` in the order they were shown."""

    example: Example
    prompt: str
    choices: list[str]
    index: int  # position in the task's example list


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
            best = max(scores.values())
            target = [k for k, v in scores.items() if v == best]
    extra = {k: v for k, v in raw.items() if k not in ("input", "target", "target_scores")}
    return Example(raw["input"], list(target), scores, extra)


def task_from_dict(data: Any, source: str = "<dict>", name: str | None = None) -> Task:
    """A validated ``Task`` from parsed BIG-bench JSON."""
    if not isinstance(data, dict):
        raise _fail(source, "the top level", "must be a JSON object")
    raw_examples = data.get("examples")
    if not isinstance(raw_examples, list) or not raw_examples:
        raise _fail(source, "examples", "is missing or empty")
    metrics = data.get("metrics", ["exact_str_match"])
    if not isinstance(metrics, list) or not all(isinstance(m, str) for m in metrics):
        raise _fail(source, "metrics", "must be a list of metric names")
    fmt = {}
    for key, default in DEFAULTS.items():
        value = data.get(key, default)
        if not isinstance(value, type(default)):
            raise _fail(source, key, f"must be a {type(default).__name__}")
        fmt[key] = value
    for key in ("stop_string", "output_regex"):
        if key in data and not isinstance(data[key], str):
            raise _fail(source, key, "must be a string")
    examples = [_example(e, i, source) for i, e in enumerate(raw_examples)]
    task = Task(name=name or str(data.get("name") or os.path.splitext(os.path.basename(source))[0]),
                examples=examples, metrics=metrics, description=str(data.get("description", "")),
                stop_string=data.get("stop_string"), output_regex=data.get("output_regex"), source=source, **fmt)
    if not task.generative and not task.multiple_choice:
        raise _fail(source, "metrics", f"{metrics} name no supported metric with matching examples "
                    f"(supported: {', '.join(GENERATIVE_METRICS + MC_METRICS)})")
    return task


def load_task(path: str) -> Task:
    """Read a BIG-bench ``task.json``; errors name the file and the field."""
    if not os.path.isfile(path):
        raise DataError(f"task file '{path}' does not exist; pass a BIG-bench task.json or a generator name")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"task file '{path}' is not valid JSON (line {e.lineno}: {e.msg})") from None
    return task_from_dict(data, path)


# ----------------------------------------------------------------------------- prompting


def format_example(task: Task, example: Example, rng: np.random.Generator) -> tuple[str, list[str]]:
    """(formatted input ending in the output prefix, choices in the order shown)."""
    text = example.input
    choices = example.choices
    if choices:
        choices = [str(c) for c in rng.permutation(sorted(choices))]
        if task.append_choices_to_input:
            text = text + task.choice_prefix + task.choice_prefix.join(choices)
    return task.example_input_prefix + text + task.example_output_prefix, choices


def build_prompts(task: Task, shots: int = 0, seed: int = 0, max_examples: int = 0) -> list[Prompted]:
    """The scored examples with k-shot prompts; the same ``seed`` gives the same shots and choice orders."""
    n = len(task.examples)
    if shots < 0 or shots >= n:
        raise DataError(f"--shots {shots} needs more than {shots} examples but task '{task.name}' has {n}; "
                        "use fewer shots")
    rng = np.random.default_rng(seed)
    shot_ids = [int(i) for i in rng.choice(n, size=shots, replace=False)] if shots else []
    context = [format_example(task, task.examples[i], rng)[0] + task.examples[i].targets[0] for i in shot_ids]
    sep = task.few_shot_example_separator
    prefix = task.task_prefix + "".join(c + sep for c in context)
    scored = [i for i in range(n) if i not in set(shot_ids)]
    if max_examples:
        scored = scored[:max_examples]
    out = []
    for i in scored:
        text, choices = format_example(task, task.examples[i], rng)
        out.append(Prompted(task.examples[i], prefix + text, choices, i))
    return out
