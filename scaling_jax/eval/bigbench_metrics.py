"""BIG-bench's JSON-task metrics, as pure functions of targets, responses and choice log-probabilities.

Each one follows ``bigbench/api/task_metrics.py`` (BIG-bench 1.0.0) and, for the text metrics, the
``t5.evaluation.metrics`` wrappers it calls: BLEU is sacrebleu's ``corpus_bleu`` with t5's settings,
ROUGE is rouge-score's ``RougeScorer`` with t5's sentence splitting and bootstrap aggregation.
Score ranges and the normalised score follow ``json_task.py`` and ``results.add_aggregate_scores``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

GENERATIVE_METRICS = ("bleu", "bleurt", "exact_str_match", "case_insensitive_str_match", "sequence_f1",
                      "numeric_match_with_0_1_relative_error", "rouge")
SCORING_METRICS = ("log_likelihood",)
MULTIPLE_CHOICE_METRICS = ("multiple_choice_grade", "calibration_multiple_choice_brier_score",
                           "expected_calibration_error", "weighted_log_probabilities", "weighted_probabilities",
                           "macro_f1")
# Added by BIG-bench whenever a task asks for multiple_choice_grade (json_task.load_and_process_json).
CALIBRATION_METRICS = ("calibration_multiple_choice_brier_score", "expected_calibration_error")
UNAVAILABLE_METRICS = ("bleurt",)  # needs a BLEURT checkpoint; reported as skipped
SCORE_RANGES = {
    "bleu": (0.0, 100.0), "sequence_f1": (0.0, 100.0), "bleurt": (-0.1, 1.1),
    "calibration_multiple_choice_brier_score": (0.0, 1.0), "expected_calibration_error": (0.0, 1.0),
    "exact_str_match": (0.0, 1.0), "case_insensitive_str_match": (0.0, 1.0), "log_likelihood": (-10.0, 0.0),
    "multiple_choice_grade": (0.0, 1.0), "numeric_match_with_0_1_relative_error": (0.0, 1.0),
    "rouge1": (0.0, 100.0), "rouge2": (0.0, 100.0), "rougeLsum": (0.0, 100.0),
    "weighted_log_probabilities": (-10.0, 0.0), "weighted_probabilities": (-1.0, 1.0), "macro_f1": (0.0, 1.0),
}
ROUGE_TYPES = ("rouge1", "rouge2", "rougeLsum")
ROUGE_BOOTSTRAP_SEED = 0  # BIG-bench leaves numpy's global generator unseeded; we fix it so scores repeat


def reported_scores(metrics: Sequence[str]) -> set[str]:
    """The scores a task asking for ``metrics`` reports: rouge gives three, multiple_choice_grade brings the
    calibration scores, log_likelihood its per-word and per-character means (with one target per example)."""
    out: set[str] = set()
    for name in metrics:
        out |= set(ROUGE_TYPES) if name == "rouge" else {name}
        if name == "multiple_choice_grade":
            out |= set(CALIBRATION_METRICS)
        if name == "log_likelihood":
            out |= {"log_likelihood_per_word", "log_likelihood_per_char"}
    return out


# ----------------------------------------------------------------------------- generative


def exact_str_match(targets: Sequence[Sequence[str]], responses: Sequence[str]) -> float:
    """Share of responses equal to one of their targets, character for character (nothing stripped)."""
    return sum(r in list(t) for t, r in zip(targets, responses, strict=True)) / len(targets)


def case_insensitive_str_match(targets: Sequence[Sequence[str]], responses: Sequence[str]) -> float:
    """As ``exact_str_match`` after lower-casing and stripping both sides."""
    hits = sum(r.strip().lower() in [t.strip().lower() for t in ts] for ts, r in zip(targets, responses, strict=True))
    return hits / len(targets)


def _within_relative_error(value: str, target: Sequence[str], rel_error: float) -> bool:
    if len(target) != 1:
        raise ValueError("numeric_match_with_0_1_relative_error needs exactly one target per example")
    try:
        want, got = float(target[0]), float(value)
    except ValueError:
        return False
    return abs(got - want) / (want if want != 0 else 1) <= rel_error


def numeric_match_with_0_1_relative_error(targets: Sequence[Sequence[str]], responses: Sequence[str],
                                          rel_error: float = 0.1) -> float:
    """Share of responses that parse as a number within 10% of the target (absolute error for a zero target).
    As in BIG-bench the error is divided by the signed target, so negative targets always pass when parsed."""
    return sum(_within_relative_error(r, t, rel_error) for t, r in zip(targets, responses, strict=True)) / len(targets)


def bleu(targets: Sequence[Sequence[str]], responses: Sequence[str]) -> float:
    """Corpus BLEU (0-100): examples with fewer references repeat their first, then references become
    sacrebleu's parallel streams; settings are t5's (exp smoothing, ``intl`` tokenizer)."""
    import sacrebleu

    most = max(len(t) for t in targets)
    padded = [list(t) + [t[0]] * (most - len(t)) for t in targets]
    streams = [[t[i] for t in padded] for i in range(most)]
    return float(sacrebleu.corpus_bleu(list(responses), streams, smooth_method="exp", smooth_value=0.0, force=False,
                                       lowercase=False, tokenize="intl", use_effective_order=False).score)


def _rouge_text(text: str) -> str:
    return text.replace(" . ", " .\n")  # t5: one sentence per line, so rougeLsum splits sentences


def _bootstrap_mid(scores: list, seed: int) -> dict:
    """rouge-score's ``BootstrapAggregator`` (median of 1000 resampled means) with numpy's global
    generator seeded for the call and then restored."""
    from rouge_score import scoring

    aggregator = scoring.BootstrapAggregator()
    for s in scores:
        aggregator.add_scores(s)
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        result = aggregator.aggregate()
    finally:
        np.random.set_state(state)
    return {k: v.mid.fmeasure * 100 for k, v in result.items()}


def rouge(targets: Sequence[Sequence[str]], responses: Sequence[str],
          seed: int = ROUGE_BOOTSTRAP_SEED) -> dict[str, float]:
    """ROUGE-1, ROUGE-2 and ROUGE-Lsum F-measures (0-100): per response and ROUGE type the best reference
    (first on ties), then t5's corpus ROUGE over those references for that type."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES))
    best: dict[str, list[str]] = {k: [] for k in ROUGE_TYPES}
    for refs, resp in zip(targets, responses, strict=True):
        per_ref = [scorer.score(target=_rouge_text(t), prediction=_rouge_text(resp)) for t in refs]
        for kind in ROUGE_TYPES:
            best[kind].append(refs[max(range(len(refs)), key=lambda i: per_ref[i][kind].fmeasure)])
    out = {}
    for kind in ROUGE_TYPES:
        pairs = [scorer.score(target=_rouge_text(t), prediction=_rouge_text(r))
                 for t, r in zip(best[kind], responses, strict=True)]
        out[kind] = _bootstrap_mid(pairs, seed)[kind]
    return out


def sequence_f1(targets: Sequence[Sequence[str]], responses: Sequence[str]) -> float:
    """Despite the name, mean per-label accuracy (0-100): the response and the first target are split on
    single spaces, the response is cut or padded with ``O`` to the target's length, labels are compared."""
    accuracies = []
    for t, r in zip(targets, responses, strict=True):
        want, got = t[0].split(" "), r.split(" ")
        got = got[:len(want)] + ["O"] * (len(want) - len(got))
        accuracies.append(100 * np.mean([g == w for g, w in zip(got, want, strict=True)]))
    return float(np.mean(accuracies))


def generative_metrics(names: Sequence[str], targets: Sequence[Sequence[str]],
                       responses: Sequence[str]) -> dict[str, float]:
    """The requested generative metrics (``rouge`` gives rouge1, rouge2 and rougeLsum); bleurt is skipped."""
    fns = {"exact_str_match": exact_str_match, "case_insensitive_str_match": case_insensitive_str_match,
           "numeric_match_with_0_1_relative_error": numeric_match_with_0_1_relative_error,
           "bleu": bleu, "sequence_f1": sequence_f1}
    out: dict[str, float] = {}
    for name in names:
        if name == "rouge":
            out.update(rouge(targets, responses))
        elif name in fns:
            out[name] = float(fns[name](targets, responses))
    return out


def log_likelihood(log_probs: Sequence[Sequence[float]], targets: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean log-probability of the target; with several targets per example, of any of them (logsumexp)
    and no per-word or per-character versions."""
    from scipy.special import logsumexp

    if any(len(t) > 1 for t in targets):
        return {"log_likelihood": float(np.mean([logsumexp(lp) for lp in log_probs]))}
    pairs = list(zip(log_probs, targets, strict=True))
    return {"log_likelihood": sum(lp[0] for lp, _ in pairs) / len(pairs),
            "log_likelihood_per_word": sum(lp[0] / len(t[0].split()) for lp, t in pairs) / len(pairs),
            "log_likelihood_per_char": sum(lp[0] / len(t[0]) for lp, t in pairs) / len(pairs)}


# ----------------------------------------------------------------------------- multiple choice


def tie_break_argmax(values: Sequence[float]) -> int:
    """Index of the maximum; ties are broken by the SHA-256 of the float64 bytes of ``values``, so the
    same scores always pick the same choice but no position is favoured."""
    arr = np.asarray(values, np.float64)
    best = np.flatnonzero(arr == np.max(arr))
    return int(best[int(hashlib.sha256(arr.tobytes()).hexdigest(), 16) % len(best)])


def normalized_log_probs(absolute: Sequence[float]) -> list[float]:
    """Log-probabilities renormalised over the choices (BIG-bench's default ``log_prob``)."""
    from scipy.special import logsumexp

    return list(np.asarray(absolute, np.float64) - logsumexp(absolute))


@dataclass
class ChoiceSample:
    """One multiple-choice example as BIG-bench scores it: ``choices`` in the order of ``target_scores``'
    keys in the task file, ``log_prob`` the scores the argmax uses (normalised unless the task sets
    ``absolute_normalization``), ``absolute_log_prob`` the model's unnormalised log-probabilities."""

    choices: list[str]
    target_scores: dict[str, float]
    log_prob: list[float]
    absolute_log_prob: list[float]

    @property
    def picked(self) -> str:
        return self.choices[tie_break_argmax(self.log_prob)]


def multiple_choice_grade(samples: Sequence[ChoiceSample]) -> float:
    """Mean target score of the highest-scoring choice (partial credit where target scores allow it)."""
    return sum(s.target_scores[s.picked] for s in samples) / len(samples)


def _probabilities(sample: ChoiceSample) -> tuple[np.ndarray, list[float]]:
    """(softmax of ``log_prob``, target scores normalised to sum to 1 or all 0), both in choice order."""
    ordered = [sample.target_scores[c] for c in sample.choices]
    total = sum(ordered)
    target = [0.0] * len(ordered) if total == 0 else [s / total for s in ordered]
    lp = np.asarray(sample.log_prob, np.float64)
    lp = lp - np.max(lp)
    return np.exp(lp) / np.sum(np.exp(lp)), target


def calibration_multiple_choice_brier_score(samples: Sequence[ChoiceSample]) -> float:
    """Multi-class Brier score, averaged over every (example, choice) pair."""
    total, count = 0.0, 0
    for s in samples:
        probs, target = _probabilities(s)
        for t, p in zip(target, probs, strict=True):
            total += t * (p - 1) ** 2 + (1 - t) * p ** 2
            count += 1
    return total / count


def expected_calibration_error(samples: Sequence[ChoiceSample], buckets: int = 15) -> float:
    """ECE over 15 equal-width confidence buckets; a prediction is right when the most probable choice is
    the first highest target score (plain argmax here, as in BIG-bench)."""
    conf, right = [], []
    for s in samples:
        probs, target = _probabilities(s)
        conf.append(float(np.max(probs)))
        right.append(int(np.argmax(target) == np.argmax(probs)))
    bucket_of = [next((j for j in range(buckets) if c < (j + 1) / buckets), buckets - 1) for c in conf]
    ece = 0.0
    for j in range(buckets):
        members = [i for i, b in enumerate(bucket_of) if b == j]
        if members:
            ece += len(members) / len(samples) * abs(np.mean([right[i] for i in members])
                                                     - np.mean([conf[i] for i in members]))
    return float(ece)


def weighted_log_probabilities(samples: Sequence[ChoiceSample]) -> float:
    """Mean over examples of the target-score-weighted sum of absolute log-probabilities."""
    return float(np.mean([np.sum(np.array([s.target_scores[c] for c in s.choices]) * np.array(s.absolute_log_prob))
                          for s in samples]))


def weighted_probabilities(samples: Sequence[ChoiceSample]) -> float:
    """Mean over examples of the target-score-weighted sum of absolute probabilities."""
    return float(np.mean([np.sum(np.array([s.target_scores[c] for c in s.choices])
                                 * np.exp(np.array(s.absolute_log_prob))) for s in samples]))


def macro_f1(samples: Sequence[ChoiceSample]) -> float:
    """Unweighted mean over labels (those true or predicted) of per-label F1; needs one correct choice
    with score 1 and no partial credit per example."""
    if not all(list(s.target_scores.values()).count(1) == 1 and sum(s.target_scores.values()) == 1 for s in samples):
        raise ValueError("macro_f1 needs exactly one correct choice (score 1) and no soft scores per example")
    truth = [next(k for k, v in s.target_scores.items() if v == 1) for s in samples]
    picked = [s.picked for s in samples]
    scores = []
    for label in sorted(set(truth) | set(picked)):
        tp = sum(t == label and p == label for t, p in zip(truth, picked, strict=True))
        predicted, actual = picked.count(label), truth.count(label)
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        scores.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return float(np.mean(scores))


def multiple_choice_metrics(names: Sequence[str], samples: Sequence[ChoiceSample]) -> dict[str, float]:
    """The requested multiple-choice metrics, plus the two calibration scores BIG-bench adds to any task
    graded by ``multiple_choice_grade``."""
    fns = {"multiple_choice_grade": multiple_choice_grade,
           "calibration_multiple_choice_brier_score": calibration_multiple_choice_brier_score,
           "expected_calibration_error": expected_calibration_error,
           "weighted_log_probabilities": weighted_log_probabilities,
           "weighted_probabilities": weighted_probabilities, "macro_f1": macro_f1}
    wanted = [n for n in names if n in fns]
    if "multiple_choice_grade" in wanted:
        wanted += [c for c in CALIBRATION_METRICS if c not in wanted]
    return {n: float(fns[n](samples)) for n in wanted}


# ----------------------------------------------------------------------------- normalised score


def chance_grade(target_scores: Sequence[dict[str, float]]) -> float:
    """``multiple_choice_grade`` of uniform guessing: the mean over examples of the mean target score."""
    return float(np.mean([sum(ts.values()) / len(ts) for ts in target_scores]))


def score_range(preferred: str, target_scores: Sequence[dict[str, float]] = ()) -> tuple[float, float] | None:
    """(low, high) for the preferred score: chance level to 1 for ``multiple_choice_grade``, else the
    fixed range of the metric; None for a score BIG-bench has no range for."""
    if preferred == "multiple_choice_grade" and target_scores:
        return chance_grade(target_scores), 1.0
    return SCORE_RANGES.get(preferred)


def normalized_score(value: float, low: float, high: float) -> float:
    """Where ``value`` falls between ``low`` (0) and ``high`` (100); not clipped."""
    return (value - low) / (high - low) * 100
