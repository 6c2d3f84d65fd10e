"""Scoring formulas: pass@k against the combinatorial definition, BIG-bench post-processing and the
optional (non-BIG-bench) normalisation, and multiple-choice grades with BIG-bench's tie-break.
The BIG-bench rules one by one are in test_bigbench.py."""

import itertools
import math

import numpy as np
import pytest

from scaling_jax.eval.scoring import (
    Normalization,
    PassingText,
    exact_match,
    make_checker,
    multiple_choice_grade,
    pass_at_k,
    passing_text,
    postprocess,
)
from scaling_jax.eval.tasks import task_from_dict


def _pass_at_k_by_enumeration(n: int, c: int, k: int) -> float:
    """Share of all k-subsets of n samples (c of them correct) that contain a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n, c, k", [(5, 0, 1), (5, 1, 1), (6, 2, 3), (8, 3, 5), (7, 7, 2), (9, 4, 9), (10, 1, 4)])
def test_pass_at_k_equals_the_combinatorial_formula(n, c, k):
    want = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)
    assert pass_at_k(n, c, k) == pytest.approx(_pass_at_k_by_enumeration(n, c, k), abs=1e-12)


def test_pass_at_k_stays_exact_for_large_n_and_rejects_bad_counts():
    assert pass_at_k(2000, 3, 100) == pytest.approx(1 - math.comb(1997, 100) / math.comb(2000, 100), rel=1e-9)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    for bad in ((5, 6, 1), (5, 2, 0), (5, 2, 6)):
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_bigbench_postprocessing_keeps_the_stop_string_and_takes_the_first_regex_match():
    assert postprocess("The apple is on the ground. What is", Normalization(stop_string=".")) == \
        "The apple is on the ground."
    assert postprocess("= 42. 7*7 = 49.", Normalization(output_regex=r"\d+")) == "42"
    assert postprocess("no digits", Normalization(output_regex=r"\d+")) == ""
    assert postprocess("abcdef", Normalization(max_length=3)) == "abc"


def test_exact_match_normalisation_options():
    assert not exact_match("  Paris \n", ["Paris"])  # BIG-bench keeps whitespace
    assert exact_match("  Paris \n", ["Paris"], Normalization(strip=True))  # opt-in
    assert not exact_match("paris", ["Paris"])
    assert exact_match("paris", ["Paris"], Normalization(lowercase=True))
    assert exact_match("Paris!", ["Paris"], Normalization(remove_punctuation=True))
    assert exact_match("New   York", ["New York"], Normalization(collapse_whitespace=True))
    assert exact_match("four", ["4", "four"])
    assert exact_match("The answer is 12, I think", ["12"], Normalization(output_regex=r"\d+"))
    assert not exact_match(" Paris", ["Paris"], Normalization(strip=False))
    assert exact_match("4.\nQ: next", ["4."], Normalization(stop_string="."))


def test_multiple_choice_grade_takes_the_best_choice_with_partial_credit_and_hashed_ties():
    targets = {"elephant": 1.0, "cup": 0.0}
    assert multiple_choice_grade([-2.4, -1.5], ["elephant", "cup"], targets) == 0.0  # summed log-likelihoods
    assert multiple_choice_grade([0.0, -1.0], ["a", "b"], {"a": 0.5, "b": 1.0}) == 0.5  # partial credit
    grades = {multiple_choice_grade(np.full(2, -float(k)), ["a", "b"], {"a": 1.0, "b": 0.0}) for k in range(1, 12)}
    assert grades == {0.0, 1.0}  # a tie is not always won by the first choice


def _generative_task(target: str, **fmt) -> object:
    return task_from_dict({"name": "t", "description": "", "keywords": [], "metrics": ["exact_str_match"],
                           "examples": [{"input": "Q", "target": target}], **fmt})


@pytest.mark.parametrize("target, fmt, want", [
    ("three", {}, PassingText("three\n", ends=False)),  # default regex: the newline ends its match
    ("hi", {"stop_string": "\n"}, PassingText("hi", ends=True)),  # the kept stop string would fail "hi"
    ("hi.", {"stop_string": "."}, PassingText("hi.", ends=False)),  # the target ends with the stop string
    ("42", {"output_regex": r"\d+"}, PassingText("42\n", ends=False)),
    ("Foo bar.", {}, None),  # the default regex drops the final '.': no generation can match this target
])
def test_passing_text_passes_the_tasks_own_check_whatever_follows_it(target, fmt, want):
    """PassUntil's loss-based estimate is the probability of this text: every sample that writes it must
    pass the task's checker (BIG-bench post-processing, then exact match), whatever it writes after."""
    task = _generative_task(target, **fmt)
    example, check = task.examples[0], make_checker(task)
    got = passing_text(task, example)
    assert got == want
    if got is None:  # nothing passes: the target itself, closed or not, fails its own check
        assert not any(check(example, text) for text in (target, target + "\n", target + " more"))
        return
    assert check(example, got.text)
    suffixes = ["\n", "\nQ: next", " more words", ".", "!?"]
    assert all(check(example, got.text + s) for s in suffixes) == (not got.ends)
