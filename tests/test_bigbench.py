"""BIG-bench JSON-task semantics. Each rule is checked against BIG-bench 1.0.0's documented behaviour
(``bigbench/api/json_task.py``, ``task_metrics.py``, ``models/model_utils.py`` and the expected values in
their tests), a fixture task is scored against a from-the-spec re-implementation written here, and
``bigbench:NAME`` / ``bigbench-lite`` resolve from ``BIGBENCH_DIR``."""

import copy
import hashlib
import json
import os
import re

import numpy as np
import pytest
import sacrebleu
from scipy.special import logsumexp

from scaling_jax.errors import DataError
from scaling_jax.eval import bigbench
from scaling_jax.eval import bigbench_metrics as bm
from scaling_jax.eval.harness import resolve_tasks
from scaling_jax.eval.scoring import Normalization, exact_match, postprocess, score_task
from scaling_jax.eval.tasks import build_prompts, load_task, task_from_dict

BIGBENCH_DIR = os.path.join(os.path.dirname(__file__), "fixtures", "bigbench")
TASKS = os.path.join(BIGBENCH_DIR, "bigbench", "benchmark_tasks")


def _question(prompt: str) -> str:
    """The query's own input: the last ``Q:`` line, or the last line for prefix-less tasks."""
    if "\nQ: " in prompt:
        return prompt.rsplit("\nQ: ", 1)[1].split("\n")[0]
    return prompt.rsplit("\n", 1)[-1].strip()


class ScriptedLM:
    """Generations and choice log-likelihoods fixed per question, so every score is known in advance."""

    def __init__(self, answers: dict[str, str] | None = None, choice_logprob=None):
        self.answers = answers or {}
        self.choice_logprob = choice_logprob or (lambda question, choice: -float(len(choice)))
        self.samplings = []

    def generate(self, prompts, sampling):
        self.samplings.append(sampling)
        return [self.answers.get(_question(p), "") for p in prompts]

    def loglikelihood(self, contexts, continuations):
        return [np.array([self.choice_logprob(_question(c), k)]) for c, k in zip(contexts, continuations, strict=True)]


def _task(examples, **fields):
    return task_from_dict({"name": "t", "metrics": ["exact_str_match"], "examples": examples, **fields})


# ----------------------------------------------------------------------------- post-processing rules


def test_without_stop_string_or_regex_the_default_regex_applies():
    """json_task: no output_regex and no stop_string -> _DEFAULT_REGEX, the first run free of . ? ! ; newline."""
    plain = _task([{"input": "q", "target": "three"}])
    assert Normalization.for_task(plain).output_regex == r"[^\.\?\!\;\n]+"
    assert exact_match("three.", ["three"], Normalization.for_task(plain))
    assert exact_match("three! Four?", ["three"], Normalization.for_task(plain))
    with_stop = _task([{"input": "q", "target": "three"}], stop_string=".")
    assert Normalization.for_task(with_stop).output_regex is None  # a task's own stop string switches it off
    assert not exact_match("three.", ["three"], Normalization.for_task(with_stop))


def test_whitespace_is_kept():
    """exact_str_match_fn compares `response in target`: nothing is stripped or lower-cased."""
    norm = Normalization.for_task(_task([{"input": "q", "target": "three"}]))
    assert not exact_match(" three", ["three"], norm)
    assert not exact_match("three ", ["three"], norm)
    assert not exact_match("Three", ["three"], norm)
    assert bm.exact_str_match([["three"]], [" three"]) == 0.0
    assert exact_match(" three", ["three"], Normalization(strip=True))  # opt-in normalisation, not BIG-bench


def test_a_leading_newline_is_not_an_empty_answer():
    """BIG-bench generates to max_length, then post-processes: the default regex skips the newline."""
    task = _task([{"input": "What is one plus two?", "target": "three"},
                  {"input": "What is two plus two?", "target": "four"}])
    lm = ScriptedLM({"What is one plus two?": "\nthree\nQ: next", "What is two plus two?": "\n\n"})
    score = score_task(task, lm, max_new_tokens=20)
    assert score.metrics["exact_str_match"] == 0.5
    assert lm.samplings[0].stop == () and lm.samplings[0].max_new_tokens == 20
    assert [r["answer"] for r in score.records] == ["three", ""]


def test_the_stop_string_is_kept_and_one_at_index_zero_cuts_nothing():
    """postprocess_output: cut after the first stop string, keeping it, only when it starts after index 0."""
    assert postprocess("The apple is on the ground. What is", Normalization(stop_string=".")) == \
        "The apple is on the ground."
    assert postprocess(".5 is half. Yes.", Normalization(stop_string=".")) == ".5 is half. Yes."
    assert postprocess("\n42\nQ: more", Normalization(stop_string="\n")) == "\n42\nQ: more"
    assert postprocess("42\nQ: more", Normalization(stop_string="\n")) == "42\n"
    # then the regex: re.findall's first item, a single group's text when the regex has one
    assert postprocess("42\nQ: more", Normalization(stop_string="\n", output_regex=r"(\d+)\s*$")) == "42"
    assert postprocess("= 42. 7*7 = 49.", Normalization(output_regex=r"\d+")) == "42"
    assert postprocess("no digits", Normalization(output_regex=r"\d+")) == ""
    assert postprocess("abcdef", Normalization(max_length=3)) == "abc"


# ----------------------------------------------------------------------------- multiple choice rules


def _sha_pick(values) -> int:
    arr = np.asarray(values, np.float64)
    ties = np.flatnonzero(arr == arr.max())
    return int(ties[int(hashlib.sha256(arr.tobytes()).hexdigest(), 16) % len(ties)])


def test_ties_are_broken_by_hashing_the_scores():
    """task_metrics.argmax: among the maxima, the one at sha256(float64 bytes) mod their count."""
    for values in ([-1.0, -1.0], [-0.5, -2.0, -0.5], [-3.0, -1.0, -1.0, -1.0], [0.0, 0.0, 0.0, 0.0]):
        assert bm.tie_break_argmax(values) == _sha_pick(values)
    picks = {bm.tie_break_argmax([-float(k), -float(k)]) for k in range(1, 12)}
    assert picks == {0, 1}  # not always the first maximum
    assert bm.tie_break_argmax([-2.0, -1.0, -3.0]) == 1  # no tie: the maximum
    # BIG-bench's documented macro_f1 (0.52222) needs its [0.4, 0.4, 0.2] tie broken this way.
    choices = ["foo", "bar", "baz"]
    rows = [("foo", [0.6, 0.3, 0.1]), ("foo", [0.4, 0.4, 0.2]), ("bar", [0.1, 0.7, 0.2]), ("bar", [0.8, 0.1, 0.1]),
            ("baz", [0.3, 0.2, 0.5]), ("baz", [0.4, 0.3, 0.3])]
    samples = [bm.ChoiceSample(choices, {c: float(c == right) for c in choices}, list(np.log(p)), list(np.log(p)))
               for right, p in rows]
    assert bm.macro_f1(samples) == pytest.approx(0.52222, rel=1e-4)


def test_choice_order_comes_from_a_fresh_generator_per_example():
    """default_format_fn seeds RandomState(random_seed) for each example: the order depends on the seed and
    the sorted choices only. Expected prompts are those of BIG-bench's test_nshot_targetscores_dataset."""
    fmt = {"example_input_prefix": "Q: ", "example_output_prefix": " A: ", "choice_prefix": " choice: ",
           "few_shot_example_separator": " ", "metrics": ["multiple_choice_grade"]}
    expected = ["Q: 4 + 9 = choice: 4 choice: 6 choice: 3 choice: 13 A: 13 Q: 1 + 4 = choice: 5 choice: 6 choice: 4 "
                "choice: 3 A: ",
                "Q: 1 + 4 = choice: 5 choice: 6 choice: 4 choice: 3 A: 5 Q: 4 + 9 = choice: 4 choice: 6 choice: 3 "
                "choice: 13 A: "]
    for scores in ([{"5": 1, "4": 0, "6": 0, "3": 0}, {"13": 1, "4": 0, "6": 0, "3": 0}],
                   [{"4": 0, "6": 0, "5": 1, "3": 0}, {"6": 0, "13": 1, "4": 0, "3": 0}]):  # key order irrelevant
        task = _task([{"input": "1 + 4 =", "target_scores": scores[0]},
                      {"input": "4 + 9 =", "target_scores": scores[1]}], **fmt)
        by_index = {p.index: p.prompt for p in build_prompts(task, shots=1, seed=0)}
        assert [by_index[0], by_index[1]] == expected
    same = _task([{"input": f"q{i}", "target_scores": {"a": 1, "b": 0, "c": 0, "d": 0}} for i in range(5)],
                 metrics=["multiple_choice_grade"])
    orders = [p.shown_choices for p in build_prompts(same, seed=7)]
    assert all(o == [str(c) for c in np.random.RandomState(7).permutation(["a", "b", "c", "d"])] for o in orders)
    assert [p.choices for p in build_prompts(same)][0] == ["a", "b", "c", "d"]  # scored in the file's key order


def test_every_example_is_a_query_with_its_own_shots_from_the_others():
    """make_nshot_dataset: each query draws k shots among the other examples, and none is left unscored."""
    task = load_task(os.path.join(TASKS, "tiny_qa", "task.json"))
    assert len(task.examples) == 6  # the repeated example is dropped, as BIG-bench drops duplicates
    prompts = build_prompts(task, shots=2)
    assert sorted(p.index for p in prompts) == list(range(6))
    shot_sets = set()
    for p in prompts:
        blocks = p.prompt[len(task.task_prefix):].split(task.few_shot_example_separator + "\nQ: ")
        assert len(blocks) == 3 and _question(p.prompt) == p.example.input
        shots = [b.removeprefix("\nQ: ").split("\n")[0] for b in blocks[:2]]
        assert p.example.input not in shots and len(set(shots)) == 2
        for shot, block in zip(shots, blocks[:2], strict=True):
            targets = next(e.targets for e in task.examples if e.input == shot)
            assert any(block.endswith("\nA: " + t) for t in targets)  # one of its targets follows each shot
        shot_sets.add(frozenset(shots))
    assert len(shot_sets) > 1  # shots are drawn per query, not fixed
    assert [p.prompt for p in build_prompts(task, shots=2)] == [p.prompt for p in prompts]
    limited = build_prompts(task, shots=1, max_examples=4)
    assert len(limited) == 4 and len({p.index for p in limited}) == 4
    with pytest.raises(DataError, match="at least 7 distinct examples"):
        build_prompts(task, shots=6)


# ----------------------------------------------------------------------------- text metrics


def test_bleu_rouge_and_sequence_f1_match_the_libraries_and_bigbench_values():
    targets = [["g f e d c b a", "a b c d e f g"], ["a b c d e f g"]]
    responses = ["a b c d e f g", "a b c d f g"]
    # bleu_fn: shorter reference lists repeat their first reference, then become parallel streams.
    streams = [["g f e d c b a", "a b c d e f g"], ["a b c d e f g", "a b c d e f g"]]
    want = sacrebleu.corpus_bleu(responses, streams, smooth_method="exp", smooth_value=0.0, force=False,
                                 lowercase=False, tokenize="intl", use_effective_order=False).score
    assert bm.bleu(targets, responses) == pytest.approx(want, abs=1e-12)
    assert bm.bleu(targets, responses) == pytest.approx(78.6, rel=1e-2)  # BIG-bench's test_bleu
    # rouge_fn: best reference per response and type; documented values from BIG-bench's tests.
    single = bm.rouge([["a b c d e f g"], ["a b c d e f g"]], ["a b c d e f g", "g f e d c b a"])
    assert single == pytest.approx({"rouge1": 100.0, "rouge2": 50.0, "rougeLsum": 57.14}, rel=1e-2)
    multi = bm.rouge([["g f e d c b a", "a b e f"]], ["a b c d e f g"])
    assert multi == pytest.approx({"rouge1": 100.0, "rouge2": 44.44, "rougeLsum": 72.73}, rel=1e-2)
    from rouge_score import rouge_scorer  # here, not at the top: it imports nltk (~3 s) in every worker's collection

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeLsum"])
    one = scorer.score(target="the cat sat .\non the mat", prediction="the cat .\nsat on a mat")
    got = bm.rouge([["the cat sat . on the mat"]], ["the cat . sat on a mat"])  # t5 puts " . " on new lines
    assert got == pytest.approx({k: v.fmeasure * 100 for k, v in one.items()}, abs=1e-9)
    # sequence_f1_fn: labels split on spaces, the response padded with "O" or cut to the first target's length.
    assert bm.sequence_f1([["B-PER O O B-LOC"]], ["B-PER O B-LOC"]) == pytest.approx(50.0)
    assert bm.sequence_f1([["O B-LOC"], ["A B"]], ["O B-LOC O O", "A"]) == pytest.approx(75.0)


def test_numeric_and_case_insensitive_match_follow_bigbench_including_its_sign_quirk():
    pairs = [("100", "90"), ("100", "111"), ("-100", "-111"), ("0", "0.05"), ("0", "1"), ("5", "five")]
    targets, responses = [[t] for t, _ in pairs], [r for _, r in pairs]
    assert bm.numeric_match_with_0_1_relative_error(targets, responses) == pytest.approx(3 / 6)
    assert bm.case_insensitive_str_match([["g f", "A b C"]], ["a B c "]) == 1.0


def test_multiple_choice_metrics_match_bigbench_documented_values():
    """BIG-bench's test_measure_multiple_choice_metrics (log_prob there is the absolute one)."""
    lp = [-0.1, -0.5, -3.0, -9.0]
    samples = [bm.ChoiceSample(["5", "4", "6", "3"], {"5": 1, "4": 0, "6": 0, "3": 0}, lp, lp),
               bm.ChoiceSample(["13", "4", "6", "3"], {"13": 0.5, "4": 0, "6": 0, "3": 0}, lp, lp)]
    got = bm.multiple_choice_metrics(["multiple_choice_grade", "weighted_log_probabilities",
                                      "weighted_probabilities"], samples)
    assert got == pytest.approx({"multiple_choice_grade": 0.75,
                                 "calibration_multiple_choice_brier_score": 0.08217880533576256,
                                 "expected_calibration_error": 0.4204510049762008,
                                 "weighted_log_probabilities": -0.075,
                                 "weighted_probabilities": (np.exp(-0.1) + np.exp(-0.1) * 0.5) / 2}, rel=1e-2)


# ----------------------------------------------------------------------------- normalised score


def test_normalized_aggregate_score_is_the_preferred_score_between_low_and_high():
    """results.add_aggregate_scores: (score - low) / (high - low) * 100; multiple_choice_grade's low is the
    chance grade, the mean over examples of the mean target score (json_task.load_and_process_json)."""
    assert bm.chance_grade([{"a": 1, "b": 0}, {"a": 1, "b": 0.5, "c": 0}]) == pytest.approx((0.5 + 0.5) / 2)
    assert bm.score_range("multiple_choice_grade", [{"a": 1, "b": 0, "c": 0, "d": 0}]) == (0.25, 1.0)
    assert bm.score_range("bleu") == (0.0, 100.0) and bm.score_range("rougeLsum") == (0.0, 100.0)
    assert bm.normalized_score(0.75, 0.5, 1.0) == pytest.approx(50.0)
    assert bm.normalized_score(0.3, 0.0, 1.0) == pytest.approx(30.0)

    task = load_task(os.path.join(TASKS, "tiny_composite", "task.json"))
    assert [t.name for t in task.subtasks] == ["tiny_composite:colours", "tiny_composite:counting"]
    lm = ScriptedLM({"1, 2, 3,": "4\n5, 6", "5, 6, 7,": "9\n", "10, 11, 12,": "\n13\nmore", "20, 21, 22,": "23 \nx"},
                    lambda q, c: {"blue": -1.0, "green": -2.0, "black": -1.0, "white": -3.0}.get(c, -1.0))
    score = score_task(task, lm)
    colours, counting = score.subtasks
    # colours: right, wrong, tie (yellow/purple at -1 each: the hash decides); chance is 0.5 on two choices
    tie_right = ["yellow", "purple"][_sha_pick(np.array([-1.0, -1.0]) - logsumexp([-1.0, -1.0]))] == "yellow"
    grade = (1 + 0 + tie_right) / 3
    assert colours.metrics["multiple_choice_grade"] == pytest.approx(grade)
    assert colours.metrics["normalized_aggregate_score"] == pytest.approx((grade - 0.5) / 0.5 * 100)
    # counting: stop "\n" kept, then (\d+)\s*$ -> "4", "9", "" (a newline at index 0 cuts nothing, and the
    # regex wants the digits at the end), "23"
    assert counting.metrics["exact_str_match"] == pytest.approx(2 / 4)
    assert score.preferred_score == "normalized_aggregate_score" and (score.low_score, score.high_score) == (0, 100)
    assert score.metrics["normalized_aggregate_score"] == pytest.approx(((grade - 0.5) / 0.5 * 100 + 50.0) / 2)
    assert score.num_examples == 7 and {r["task"] for r in score.records} == {s.name for s in score.subtasks}


# ----------------------------------------------------------------------------- the fixture against the spec


def _spec_prompts(data: dict, shots: int, seed: int, max_examples: int) -> list[dict]:
    """BIG-bench's JSON prompting written from its description, over example dicts as BIG-bench holds them."""
    distinct, seen = [], set()
    for raw in data["examples"]:
        if json.dumps(raw) not in seen:
            seen.add(json.dumps(raw))
            distinct.append(raw)
    formatted = []
    for raw in distinct:
        s = copy.deepcopy(raw)
        if "target_scores" in s:
            if data.get("append_choices_to_input", True):
                prefix = data.get("choice_prefix", "\n  choice: ")
                order = np.random.RandomState(seed).permutation(sorted(s["target_scores"]))
                s["input"] += prefix + prefix.join(order)
            best = max(s["target_scores"].values())
            s.setdefault("target", [k for k, v in s["target_scores"].items() if v == best][0])
            s["choice"] = list(s["target_scores"])
        s["input"] = data.get("example_input_prefix", "\nQ: ") + s["input"] + data.get("example_output_prefix", "\nA: ")
        s["target"] = s["target"] if isinstance(s["target"], list) else [s["target"]]
        formatted.append(s)
    rng, sep, n = np.random.RandomState(seed), data.get("few_shot_example_separator", "\n"), len(formatted)
    if shots == 0:
        queries = rng.choice(formatted, max_examples, replace=False).tolist() if 0 < max_examples < n else formatted
    else:
        queries = []
        for q in rng.choice(formatted, min(max_examples, n) if max_examples else n, replace=False):
            picked = list(rng.choice([x for x in formatted if x != q], shots, replace=False))
            context = sep.join(x["input"] + rng.choice(x["target"]) for x in picked)
            queries.append(dict(q, input=context + sep + q["input"]))
    return [dict(q, input=str(data.get("task_prefix", "")) + q["input"]) for q in queries]


def _spec_scores(data: dict, queries: list[dict], lm: ScriptedLM) -> dict:
    out = {}
    answers = lm.generate([q["input"] for q in queries], None)
    regex = data.get("output_regex") or (None if data.get("stop_string") else r"[^\.\?\!\;\n]+")
    answers = [(re.findall(regex, a) or [""])[0] if regex else a for a in answers]
    targets = [q["target"] for q in queries]
    out["exact_str_match"] = np.mean([a in t for a, t in zip(answers, targets, strict=True)])
    refs = max(len(t) for t in targets)
    streams = [[(t + [t[0]] * refs)[i] for t in targets] for i in range(refs)]
    out["bleu"] = sacrebleu.corpus_bleu(answers, streams, tokenize="intl", smooth_method="exp").score
    grades = []
    for q in queries:
        absolute = [float(lm.loglikelihood([q["input"]], [c])[0][0]) for c in q["choice"]]
        normalized = np.asarray(absolute) - logsumexp(absolute)
        grades.append(q["target_scores"][q["choice"][_sha_pick(normalized)]])
    out["multiple_choice_grade"] = np.mean(grades)
    chance = np.mean([np.mean(list(x["target_scores"].values())) for x in _spec_prompts(data, 0, 42, 0)])
    out["normalized_aggregate_score"] = (out["multiple_choice_grade"] - chance) / (1 - chance) * 100
    return out


@pytest.mark.parametrize("shots, seed, max_examples", [(0, 42, 0), (1, 42, 0), (2, 3, 0), (3, 42, 4), (0, 5, 3)])
def test_fixture_scores_agree_with_a_from_the_spec_reimplementation(shots, seed, max_examples):
    path = os.path.join(TASKS, "tiny_qa", "task.json")
    with open(path) as f:
        data = json.load(f)
    lm = ScriptedLM({"What is one plus two?": "three. And", "Which animal barks?": " dog",
                     "What is the opposite of hot?": "\ncold\n", "Which season follows winter?": "Spring!",
                     "What colour is grass?": "green", "How many legs has a spider?": "8 legs"},
                    lambda q, c: -float(len(c) % 3))  # plenty of ties, so the hash tie-break matters
    queries = _spec_prompts(data, shots, seed, max_examples)
    task = load_task(path)
    assert [p.prompt for p in build_prompts(task, shots, seed, max_examples)] == [q["input"] for q in queries]
    score = score_task(task, lm, shots, seed, max_examples)
    want = _spec_scores(data, queries, lm)
    assert {k: score.metrics[k] for k in want} == pytest.approx(want, abs=1e-9)
    assert {"rouge1", "rouge2", "rougeLsum", "calibration_multiple_choice_brier_score",
            "expected_calibration_error"} <= set(score.metrics)
    assert score.preferred_score == "multiple_choice_grade" and score.high_score == 1.0


# ----------------------------------------------------------------------------- task names


def test_bigbench_names_resolve_from_bigbench_dir(monkeypatch):
    monkeypatch.setenv("BIGBENCH_DIR", BIGBENCH_DIR)
    [task] = resolve_tasks(["bigbench:tiny_qa"])
    assert task.name == "tiny_qa" and task.source == os.path.join(TASKS, "tiny_qa", "task.json")
    [composite] = bigbench.resolve_bigbench("bigbench:tiny_composite")
    assert len(composite.subtasks) == 2
    [sub] = bigbench.resolve_bigbench("bigbench:tiny_composite/counting")
    assert sub.name == "counting"


def test_bigbench_lite_is_bigbench_lite_v1(tmp_path, monkeypatch):
    assert len(bigbench.BIGBENCH_LITE_V1) == 24 and len(set(bigbench.BIGBENCH_LITE_V1)) == 24
    for name in bigbench.BIGBENCH_LITE_V1:
        os.makedirs(tmp_path / "bigbench" / "benchmark_tasks" / name)
        (tmp_path / "bigbench" / "benchmark_tasks" / name / "task.json").write_text(json.dumps(
            {"name": name, "metrics": ["exact_str_match"], "preferred_score": "exact_str_match",
             "examples": [{"input": "a", "target": "b"}, {"input": "c", "target": "d"}]}))
    monkeypatch.setenv("BIGBENCH_DIR", str(tmp_path))
    assert [t.name for t in resolve_tasks(["bigbench-lite"])] == list(bigbench.BIGBENCH_LITE_V1)
    os.remove(tmp_path / "bigbench" / "benchmark_tasks" / "winowhy" / "task.json")
    with pytest.raises(DataError, match="winowhy"):
        resolve_tasks(["bigbench-lite"])


def test_an_unknown_task_names_the_directory_searched(monkeypatch):
    monkeypatch.setenv("BIGBENCH_DIR", BIGBENCH_DIR)
    with pytest.raises(DataError) as err:
        resolve_tasks(["bigbench:no_such_task"])
    message = str(err.value)
    assert "\n" not in message and TASKS in message and "no_such_task" in message and "BIGBENCH_DIR" in message
    with pytest.raises(DataError, match="programmatic"):
        resolve_tasks(["bigbench:tiny_programmatic"])
    with pytest.raises(DataError, match="not a BIG-bench task name"):
        resolve_tasks(["bigbench:../tiny_qa"])


def test_without_package_or_bigbench_dir_the_error_says_how_to_get_the_tasks(monkeypatch, tmp_path):
    monkeypatch.delenv("BIGBENCH_DIR", raising=False)
    real = bigbench.importlib.util.find_spec
    monkeypatch.setattr(bigbench.importlib.util, "find_spec", lambda name: None if name == "bigbench" else real(name))
    with pytest.raises(DataError) as err:
        resolve_tasks(["bigbench:navigate"])
    message = str(err.value)
    assert "\n" not in message and "pip install" in message and "BIGBENCH_DIR" in message
    monkeypatch.setenv("BIGBENCH_DIR", str(tmp_path))  # set, but not a BIG-bench checkout
    with pytest.raises(DataError, match=f"{tmp_path}.*bigbench/benchmark_tasks"):
        resolve_tasks(["bigbench:navigate"])
