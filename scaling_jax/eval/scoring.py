"""Scores as BIG-bench computes them for JSON tasks, plus unbiased pass@k, and a task scorer that runs
any ``LanguageModel`` (the real one in ``model/decode.py``, or a fake in tests).

Generation follows BIG-bench's model API: the model writes up to ``max_new_tokens`` with no stop
sequence, then ``postprocess`` (``bigbench/models/model_utils.postprocess_output``) cuts the text to
that many characters, keeps it up to and including the first ``stop_string`` (unless that is at the
very start), and keeps only the first match of ``output_regex``. A task with neither gets BIG-bench's
default regex, the first run of characters other than ``. ? ! ;`` and newline. Nothing is stripped:
``exact_str_match`` compares characters. Multiple choice ranks choices by their log-likelihoods
renormalised over the choices and breaks ties by hash (``task_metrics.argmax``). Metric formulas are
in ``bigbench_metrics``.
"""

from __future__ import annotations

import re
import statistics
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from scaling_jax.errors import DataError
from scaling_jax.eval import bigbench_metrics as bm
from scaling_jax.eval.tasks import BIGBENCH_SEED, GENERATIVE_METRICS, MC_METRICS, Example, Task, build_prompts


class LanguageModel(Protocol):
    def generate(self, prompts: Sequence[str], sampling) -> list[str]:
        """One continuation per prompt (``sampling`` is a ``model.decode.SamplingConfig``)."""

    def loglikelihood(self, contexts: Sequence[str], continuations: Sequence[str]) -> list[np.ndarray]:
        """Per-token log-probabilities of each continuation given its context (PassUntil also passes
        ``end_of_text=True``: each continuation followed by the end of generation)."""


# ----------------------------------------------------------------------------- post-processing


@dataclass(frozen=True)
class Normalization:
    """BIG-bench's ``postprocess_output`` settings, then optional normalisation of response and targets
    alike (all off by default: BIG-bench has none)."""

    max_length: int = 0
    stop_string: str | None = None
    output_regex: str | None = None
    strip: bool = False
    lowercase: bool = False
    remove_punctuation: bool = False
    collapse_whitespace: bool = False

    @classmethod
    def for_task(cls, task: Task, **options) -> Normalization:
        """The task's settings; with neither ``stop_string`` nor ``output_regex`` given, BIG-bench's default
        regex (``json_task._DEFAULT_REGEX``), so ``three.`` and ``three`` both give ``three``."""
        regex = task.output_regex
        if task.output_regex is None and task.stop_string is None:
            regex = DEFAULT_OUTPUT_REGEX
        return cls(stop_string=task.stop_string, output_regex=regex, **options)


DEFAULT_OUTPUT_REGEX = r"[^\.\?\!\;\n]+"


def postprocess(text: str, norm: Normalization) -> str:
    """BIG-bench's model-output post-processing (``bigbench.models.model_utils.postprocess_output``)."""
    if norm.max_length:
        text = text[:norm.max_length]
    if norm.stop_string:
        at = text.find(norm.stop_string)
        if at > 0:  # a stop string at the very start cuts nothing
            text = text[:at + len(norm.stop_string)]
    if norm.output_regex:
        first = next(iter(re.findall(norm.output_regex, text)), "")
        if isinstance(first, tuple):
            raise DataError(f"output_regex {norm.output_regex!r} has several capturing groups; keep at most one "
                            "((?:...) for the others)")
        text = first
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
    """BIG-bench ``exact_str_match`` for one example: the post-processed response equals one of the targets."""
    got = normalize(postprocess(response, norm), norm)
    return any(got == normalize(t, norm) for t in targets)


# ----------------------------------------------------------------------------- multiple choice


def multiple_choice_grade(scores: Sequence[float], choices: Sequence[str], target_scores: dict[str, float]) -> float:
    """BIG-bench's grade of one example: the target score of the highest-scoring choice (1 right, 0 wrong, or
    partial), ties broken by hashing the scores (``bigbench_metrics.tie_break_argmax``)."""
    return float(target_scores[choices[bm.tie_break_argmax(scores)]])


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


def _leaf_of(task: Task, example: Example) -> Task:
    """The task (a composite's subtask) that holds ``example``."""
    return next((leaf for leaf in task.leaves if any(e is example for e in leaf.examples)), task)


def make_checker(task: Task, norm: Normalization | None = None, timeout: float = 5.0) -> Checker:
    """Execution check for examples that carry one (code completion), BIG-bench exact match otherwise,
    each with the post-processing of the (sub)task the example belongs to."""
    if task.subtasks:
        checks = {id(e): make_checker(leaf, norm, timeout) for leaf in task.leaves for e in leaf.examples}
        return lambda example, response: checks[id(example)](example, response)
    norm = norm or Normalization.for_task(task)

    def check(example: Example, response: str) -> bool:
        if "code_execution" in task.metrics and "execution" in example.extra:
            from scaling_jax.eval.generators import run_execution_check

            # the code the task asked for: cut at its stop string as exact match is (what generation wrote
            # after the completed lines would otherwise run too)
            return run_execution_check(example, postprocess(response, norm), timeout)
        return exact_match(response, example.targets, norm)

    return check


def stop_sequences(task: Task) -> tuple[str, ...]:
    """Where generation may end early: nowhere. BIG-bench generates to the length limit and only then
    applies ``stop_string`` and ``output_regex``; stopping at a newline would score ``\\nthree`` as empty."""
    return ()


@dataclass(frozen=True)
class PassingText:
    """What a sample must write to pass: ``text``, then anything (``ends`` False) or nothing (``ends`` True)."""

    text: str
    ends: bool


_PROBE = "\x00 more"  # stands for whatever generation writes after an answer


def passing_text(task: Task, example: Example) -> PassingText | None:
    """The continuation whose probability is PassUntil's loss-based estimate where no sample passed.

    The first target that can pass, followed by what closes the answer (the stop string, or a newline, which
    ends the default regex's match) when every sample starting so passes: its probability is a lower bound on
    the pass rate. BIG-bench's post-processing keeps the stop string, so a target that does not end with it
    passes only as the whole generation (then eos). None when no target survives post-processing (the default
    regex drops a final '.'): no sample can pass, and the sampled estimate (zero passes) stands."""
    leaf = _leaf_of(task, example)
    norm = Normalization.for_task(leaf)
    executed = "code_execution" in leaf.metrics and "execution" in example.extra  # checked by running it
    end = leaf.stop_string or "\n"
    for target in example.targets:
        closed = target if target.endswith(end) else target + end
        kept = postprocess(closed, norm)
        if postprocess(closed + _PROBE, norm) == kept and (executed or exact_match(closed, [target], norm)):
            return PassingText(closed, ends=False)
        if executed or exact_match(target, [target], norm):
            return PassingText(target, ends=True)
    return None


@dataclass
class TaskScore:
    """BIG-bench's ``ScoreData`` for one shot count, with the examples' records."""

    name: str
    metrics: dict[str, float]  # BIG-bench's score_dict, normalized_aggregate_score included
    records: list[dict]
    num_examples: int
    preferred_score: str | None = None
    low_score: float | None = None
    high_score: float | None = None
    skipped_metrics: list[str] = field(default_factory=list)  # asked for but not computable here (bleurt)
    subtasks: list[TaskScore] = field(default_factory=list)

    def details(self) -> dict:
        """Preferred score, its range, skipped metrics and subtask scores, for ``results.json``."""
        out: dict = {"preferred_score": self.preferred_score, "low_score": self.low_score,
                     "high_score": self.high_score}
        if self.skipped_metrics:
            out["skipped_metrics"] = self.skipped_metrics
        if self.subtasks:
            out["subtasks"] = {s.name: {"examples": s.num_examples, "metrics": s.metrics, **s.details()}
                               for s in self.subtasks}
        return out


def _range(task: Task) -> tuple[float, float] | None:
    if task.preferred_score in bm.SCORE_RANGES:
        return bm.score_range(task.preferred_score, [e.target_scores for e in task.examples if e.target_scores])
    return (0.0, 1.0) if task.preferred_score == "code_execution" else None


def _generate(task: Task, lm: LanguageModel, prompted: list, records: list[dict], max_new_tokens: int,
              norm: Normalization) -> dict[str, float]:
    from scaling_jax.model.decode import SamplingConfig

    outputs = lm.generate([p.prompt for p in prompted], SamplingConfig(max_new_tokens=max_new_tokens))
    answers = [normalize(postprocess(o, norm), norm) for o in outputs]
    targets = [[normalize(t, norm) for t in p.example.targets] for p in prompted]
    metrics = bm.generative_metrics([m for m in task.metrics if m in GENERATIVE_METRICS], targets, answers)
    for record, p, out, answer, want in zip(records, prompted, outputs, answers, targets, strict=True):
        record.update(response=out, answer=answer, targets=p.example.targets, correct=answer in want)
    if "code_execution" in task.metrics:
        check = make_checker(task, norm)
        passed = [bool(check(p.example, out)) for p, out in zip(prompted, outputs, strict=True)]
        for record, ok in zip(records, passed, strict=True):
            record["passed"] = ok
        metrics["code_execution"] = float(np.mean(passed))
    return metrics


def _choose(task: Task, lm: LanguageModel, prompted: list, records: list[dict]) -> dict[str, float]:
    mc = [(r, p) for r, p in zip(records, prompted, strict=True) if p.example.target_scores]
    logprobs = lm.loglikelihood([p.prompt for _, p in mc for _ in p.choices], [c for _, p in mc for c in p.choices])
    samples, at = [], 0
    for record, p in mc:
        absolute = [float(np.sum(lp, dtype=np.float64)) for lp in logprobs[at:at + len(p.choices)]]
        at += len(p.choices)
        normalized = bm.normalized_log_probs(absolute)
        sample = bm.ChoiceSample(p.choices, p.example.target_scores,
                                 absolute if task.absolute_normalization else normalized, absolute)
        samples.append(sample)
        record.update(choices=p.choices, shown_choices=p.shown_choices, absolute_log_prob=absolute,
                      normalized_log_prob=[float(x) for x in normalized], choice=sample.picked,
                      grade=sample.target_scores[sample.picked])
    return bm.multiple_choice_metrics([m for m in task.metrics if m in MC_METRICS], samples)


def _target_loglik(lm: LanguageModel, prompted: list) -> dict[str, float]:
    pairs = [(p.prompt, t) for p in prompted for t in p.example.targets]
    flat = [float(np.sum(lp, dtype=np.float64)) for lp in lm.loglikelihood([c for c, _ in pairs],
                                                                            [t for _, t in pairs])]
    per_example, at = [], 0
    for p in prompted:
        per_example.append(flat[at:at + len(p.example.targets)])
        at += len(p.example.targets)
    return bm.log_likelihood(per_example, [p.example.targets for p in prompted])


def _score_leaf(task: Task, lm: LanguageModel, shots: int, seed: int, max_examples: int, max_new_tokens: int,
                norm: Normalization | None) -> TaskScore:
    prompted = build_prompts(task, shots, seed, max_examples)
    records: list[dict] = [{"index": p.index, "input": p.example.input} for p in prompted]
    metrics: dict[str, float] = {}
    if task.generative:
        metrics.update(_generate(task, lm, prompted, records, max_new_tokens,
                                 norm or Normalization.for_task(task, max_length=max_new_tokens)))
    if task.multiple_choice:
        metrics.update(_choose(task, lm, prompted, records))
    if "log_likelihood" in task.metrics:
        metrics.update(_target_loglik(lm, prompted))
    low_high = _range(task)
    if low_high and task.preferred_score in metrics:
        metrics["normalized_aggregate_score"] = bm.normalized_score(metrics[task.preferred_score], *low_high)
    return TaskScore(task.name, metrics, records, len(prompted), task.preferred_score,
                     *(low_high or (None, None)), [m for m in task.metrics if m in bm.UNAVAILABLE_METRICS])


def aggregate_scores(name: str, parts: list[TaskScore]) -> TaskScore:
    """A composite task's score as ``results.add_aggregate_scores`` makes it: each metric averaged over the
    subtasks that report it, ``normalized_aggregate_score`` the mean of the subtasks' normalised preferred
    scores, and the preferred score ``multiple_choice_grade`` (low: the mean of theirs) when every subtask
    prefers it, else ``normalized_aggregate_score`` on 0-100."""
    names = list(dict.fromkeys(m for s in parts for m in s.metrics))
    metrics = {m: statistics.mean(s.metrics[m] for s in parts if m in s.metrics) for m in names}
    normalized = [s.metrics.get("normalized_aggregate_score") for s in parts]
    metrics.pop("normalized_aggregate_score", None)
    if all(v is not None for v in normalized):
        metrics["normalized_aggregate_score"] = statistics.mean(normalized)
    if all(s.preferred_score == "multiple_choice_grade" for s in parts):
        preferred, low, high = "multiple_choice_grade", statistics.mean(s.low_score for s in parts), 1.0
    else:
        preferred, low, high = "normalized_aggregate_score", 0.0, 100.0
    records = [{"task": s.name, **r} for s in parts for r in s.records]
    skipped = list(dict.fromkeys(m for s in parts for m in s.skipped_metrics))
    return TaskScore(name, metrics, records, sum(s.num_examples for s in parts), preferred, low, high, skipped, parts)


def score_task(task: Task, lm: LanguageModel, shots: int = 0, seed: int = BIGBENCH_SEED, max_examples: int = 0,
               max_new_tokens: int = 64, norm: Normalization | None = None) -> TaskScore:
    """BIG-bench's evaluation of one shot count: generative metrics on greedy generations, multiple-choice
    metrics on choice log-likelihoods, the preferred score normalised; composites aggregated."""
    if task.subtasks:
        per = max_examples // len(task.subtasks) if max_examples else 0
        if max_examples and per < 1:
            raise DataError(f"--max-examples {max_examples} is fewer than the {len(task.subtasks)} subtasks of "
                            f"'{task.name}'; use at least {len(task.subtasks)}")
        return aggregate_scores(task.name, [score_task(t, lm, shots, seed, per, max_new_tokens, norm)
                                            for t in task.subtasks])
    return _score_leaf(task, lm, shots, seed, max_examples, max_new_tokens, norm)
