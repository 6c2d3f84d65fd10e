"""Scores: generative exact match (BIG-bench post-processing plus optional normalisation),
multiple choice by summed and length-normalised log-likelihood, unbiased pass@k, and a task
scorer that runs any ``LanguageModel`` (the real one in ``model/decode.py``, or a fake in tests).
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from scaling_jax.eval.tasks import Example, Task, build_prompts


class LanguageModel(Protocol):
    def generate(self, prompts: Sequence[str], sampling) -> list[str]:
        """One continuation per prompt (``sampling`` is a ``model.decode.SamplingConfig``)."""

    def loglikelihood(self, contexts: Sequence[str], continuations: Sequence[str]) -> list[np.ndarray]:
        """Per-token log-probabilities of each continuation given its context."""


# ----------------------------------------------------------------------------- exact match


@dataclass(frozen=True)
class Normalization:
    """BIG-bench's ``postprocess_output`` (``max_length``, ``stop_string`` kept inclusively, first match
    of ``output_regex``), then optional text normalisation applied to response and targets alike."""

    max_length: int = 0
    stop_string: str | None = None
    output_regex: str | None = None
    strip: bool = True
    lowercase: bool = False
    remove_punctuation: bool = False
    collapse_whitespace: bool = False

    @classmethod
    def for_task(cls, task: Task, **options) -> Normalization:
        return cls(stop_string=task.stop_string, output_regex=task.output_regex, **options)


def postprocess(text: str, norm: Normalization) -> str:
    """BIG-bench's model-output post-processing (``bigbench.api.task_metrics.postprocess_output``)."""
    if norm.max_length:
        text = text[:norm.max_length]
    if norm.stop_string and norm.stop_string in text:
        text = text[:text.index(norm.stop_string) + len(norm.stop_string)]
    if norm.output_regex is not None:
        match = re.search(norm.output_regex, text)
        text = match.group(0) if match else ""
    return text


def normalize(text: str, norm: Normalization) -> str:
    if norm.lowercase:
        text = text.lower()
    if norm.remove_punctuation:
        text = text.translate(str.maketrans("", "", string.punctuation))
    if norm.collapse_whitespace:
        text = " ".join(text.split())
    return text.strip() if norm.strip else text


def exact_match(response: str, targets: Sequence[str], norm: Normalization = Normalization()) -> bool:
    """BIG-bench ``exact_str_match``: the post-processed response equals one of the targets."""
    got = normalize(postprocess(response, norm), norm)
    return any(got == normalize(t, norm) for t in targets)


# ----------------------------------------------------------------------------- multiple choice


@dataclass
class ChoiceScores:
    summed: np.ndarray  # total log-likelihood of each choice
    normalized: np.ndarray  # per token: removes the bias toward short choices


def choice_scores(logprobs: Sequence[np.ndarray]) -> ChoiceScores:
    summed = np.array([float(np.sum(lp)) for lp in logprobs])
    lengths = np.array([max(len(lp), 1) for lp in logprobs])
    return ChoiceScores(summed, summed / lengths)


def multiple_choice_grade(scores: np.ndarray, choices: Sequence[str], target_scores: dict[str, float]) -> float:
    """BIG-bench's grade: the target score of the highest-scoring choice (1 right, 0 wrong, or partial)."""
    return float(target_scores[choices[int(np.argmax(scores))]])


# ----------------------------------------------------------------------------- pass@k


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k).
    Computed as a product so it stays exact in floating point for large n."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


# ----------------------------------------------------------------------------- a task against a model

Checker = Callable[[Example, str], bool]  # does this generated text pass this example?


def make_checker(task: Task, norm: Normalization | None = None, timeout: float = 5.0) -> Checker:
    """Execution check for examples that carry one (code completion), exact match otherwise."""
    norm = norm or Normalization.for_task(task)

    def check(example: Example, response: str) -> bool:
        if "code_execution" in task.metrics and "execution" in example.extra:
            from scaling_jax.eval.generators import run_execution_check

            return run_execution_check(example, response, timeout)
        return exact_match(response, example.targets, norm)

    return check


def stop_sequences(task: Task) -> tuple[str, ...]:
    """Where generation ends: the task's stop string if it has one, else the end of the answer line."""
    return (task.stop_string,) if task.stop_string else ("\n",)


@dataclass
class TaskScore:
    name: str
    metrics: dict[str, float]
    records: list[dict]
    num_examples: int


def score_task(task: Task, lm: LanguageModel, shots: int = 0, seed: int = 0, max_examples: int = 0,
               max_new_tokens: int = 64, norm: Normalization | None = None) -> TaskScore:
    """Greedy exact match (or execution) for generative examples, MC grades for multiple-choice ones."""
    from scaling_jax.model.decode import SamplingConfig

    prompted = build_prompts(task, shots, seed, max_examples)
    records: list[dict] = [{"index": p.index, "input": p.example.input} for p in prompted]
    metrics: dict[str, float] = {}
    if task.generative:
        gen = [(r, p) for r, p in zip(records, prompted, strict=True) if p.example.targets]
        sampling = SamplingConfig(max_new_tokens=max_new_tokens, stop=stop_sequences(task))
        outputs = lm.generate([p.prompt for _, p in gen], sampling)
        check = make_checker(task, norm)
        for (record, p), out in zip(gen, outputs, strict=True):
            record.update(response=out, targets=p.example.targets, correct=bool(check(p.example, out)))
        name = "code_execution" if "code_execution" in task.metrics else "exact_str_match"
        metrics[name] = float(np.mean([r["correct"] for r, _ in gen]))
    if task.multiple_choice:
        mc = [(r, p) for r, p in zip(records, prompted, strict=True) if p.example.target_scores]
        contexts = [p.prompt for _, p in mc for _ in p.choices]
        continuations = [c for _, p in mc for c in p.choices]
        logprobs = lm.loglikelihood(contexts, continuations)
        at = 0
        grades, grades_norm = [], []
        for record, p in mc:
            scores = choice_scores(logprobs[at:at + len(p.choices)])
            at += len(p.choices)
            grades.append(multiple_choice_grade(scores.summed, p.choices, p.example.target_scores))
            grades_norm.append(multiple_choice_grade(scores.normalized, p.choices, p.example.target_scores))
            record.update(choices=p.choices, loglik=scores.summed.tolist(), grade=grades[-1],
                          grade_normalized=grades_norm[-1])
        metrics["multiple_choice_grade"] = float(np.mean(grades))
        metrics["multiple_choice_grade_normalized"] = float(np.mean(grades_norm))
    return TaskScore(task.name, metrics, records, len(prompted))

