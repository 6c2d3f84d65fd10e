"""BIG-bench task loading and prompting, a task scored against a model whose answers we control,
the generators' answers checked independently, execution checks, and the eval CLI end to end."""

import datetime
import json
import os
import re

import numpy as np
import pytest

from scaling_jax.cli import main
from scaling_jax.errors import DataError
from scaling_jax.eval import generators
from scaling_jax.eval.scoring import make_checker, score_task
from scaling_jax.eval.tasks import Example, build_prompts, load_task, task_from_dict
from scaling_jax.model.decode import truncate_at_stop

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "bigbench_mixed_task.json")


class ControlledLM:
    """Answers and choice likelihoods fixed per question, so every score is known in advance."""

    answers = {"What is the capital of France?": "Paris\nQ: and then more text",  # right: BIG-bench's default regex
               "What is two plus two?": "five",  # wrong
               "What colour is a clear daytime sky?": " blue ",  # wrong: BIG-bench keeps whitespace
               "Which number is even?": "8",  # right
               "Which of these is an animal?": "elephant",  # right (target from target_scores, as in BIG-bench)
               "Which of these is a fruit?": "banana"}  # wrong
    per_token = {"elephant": -0.3, "cup": -0.5,  # summed picks "cup" (wrong), per token "elephant" (right)
                 "apple": -0.2, "stone": -0.3, "cloud": -0.4,  # both pick "apple" (right)
                 "8": -2.0, "7": -1.0, "9": -3.0}  # both pick "7" (wrong)

    def __init__(self):
        self.prompts = []

    def generate(self, prompts, sampling):
        self.prompts += list(prompts)
        return [truncate_at_stop(self.answers[p.rsplit("\nQ: ", 1)[1].split("\n")[0]], sampling.stop)
                for p in prompts]

    def loglikelihood(self, contexts, continuations):
        return [np.full(len(c), self.per_token[c]) for c in continuations]


def test_a_mixed_bigbench_task_is_scored_against_a_controlled_model():
    task = load_task(FIXTURE)
    assert task.name == "mixed_fixture" and task.generative and task.multiple_choice
    assert task.examples[2].extra == {"comment": "unknown fields are kept"}
    lm = ControlledLM()
    score = score_task(task, lm)
    assert score.metrics["exact_str_match"] == pytest.approx(3 / 6)
    assert score.metrics["multiple_choice_grade"] == pytest.approx(1 / 3)  # summed log-likelihoods, as BIG-bench
    assert score.metrics["normalized_aggregate_score"] == pytest.approx(50.0)  # preferred: exact_str_match on [0, 1]
    assert score.details()["preferred_score"] == "exact_str_match"
    assert all(p.startswith("Answer each question.\n\nQ: ") and p.endswith("\nA: ") for p in lm.prompts)


def test_target_scores_without_target_give_the_best_choices_as_targets():
    task = load_task(FIXTURE)
    assert task.examples[3].targets == ["elephant"]
    assert task.examples[5].targets == ["8"] and task.examples[5].choices == ["8", "7", "9"]


def test_prompts_follow_bigbench_formatting_and_every_example_is_scored_with_its_own_shots():
    task = load_task(FIXTURE)
    zero = build_prompts(task, 0, seed=0)
    mc = zero[3]
    assert mc.prompt == ("Answer each question.\n" + "\nQ: Which of these is an animal?"
                         + "".join(f"\n  choice: {c}" for c in mc.shown_choices) + "\nA: ")
    assert sorted(mc.shown_choices) == ["cup", "elephant"] and mc.choices == ["elephant", "cup"]
    a, b = build_prompts(task, 2, seed=3), build_prompts(task, 2, seed=3)
    assert [p.prompt for p in a] == [p.prompt for p in b]
    assert sorted(p.index for p in a) == list(range(len(task.examples)))  # no example is spent as a shot
    for p in a:  # two other examples, answered, precede the query
        others = [e for e in task.examples if e is not p.example and f"Q: {e.input}" in p.prompt]
        assert len(others) == 2 and p.prompt.count(f"Q: {p.example.input}") == 1
    assert [p.prompt for p in build_prompts(task, 2, seed=4)] != [p.prompt for p in a]


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d["examples"][1].pop("input"), "examples[1].input"),
    (lambda d: d["examples"][0].update(target=3), "examples[0].target"),
    (lambda d: d["examples"][3].update(target_scores={"a": "yes"}), "examples[3].target_scores"),
    (lambda d: d.update(examples=[]), "examples"),
    (lambda d: d.update(example_input_prefix=5), "example_input_prefix"),
    (lambda d: d.update(metrics=["accuracy"]), "metrics"),
    (lambda d: d.update(preferred_score="rouge"), "preferred_score"),
    (lambda d: d.update(output_regex="(a)(b)"), "output_regex"),
    # a preferred score its metrics never compute: its normalised score went missing without a word
    (lambda d: d.update(preferred_score="bleu"), "preferred_score"),
])
def test_malformed_task_files_name_the_file_and_field(tmp_path, mutate, field):
    with open(FIXTURE) as f:
        data = json.load(f)
    mutate(data)
    path = tmp_path / "bad_task.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError) as err:
        load_task(str(path))
    assert str(path) in str(err.value) and field in str(err.value)


@pytest.mark.parametrize("metric, example, field", [
    ("macro_f1", {"input": "q", "target_scores": {"a": 0.5, "b": 0.5}}, "examples[0].target_scores"),
    ("numeric_match_with_0_1_relative_error", {"input": "q", "target": ["1", "2"]}, "examples[0].target"),
    ("log_likelihood", {"input": "q", "target": ""}, "examples[0].target"),
])
def test_targets_a_metric_cannot_score_are_refused_before_any_model_runs(metric, example, field):
    """BIG-bench's metrics raise on these mid-task (after the model ran): here the task file is refused."""
    with pytest.raises(DataError, match=re.escape(field)):
        task_from_dict({"examples": [example, {"input": "r", "target": "3", "target_scores": {"3": 1, "4": 0}}],
                        "metrics": [metric]}, "t.json")


def test_unreadable_task_files_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_task(str(tmp_path / "missing.json"))
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_task(str(bad))
    with pytest.raises(DataError, match="shots"):
        build_prompts(load_task(FIXTURE), shots=6)


# ----------------------------------------------------------------------------- generators


def test_navigate_answers_match_a_replay_of_the_moves():
    task = task_from_dict(generators.navigate(n=40, seed=1, moves=6, max_steps=4))
    truth = []
    for ex in task.examples:
        x = y = 0
        for k, d in re.findall(r"Take (\d+) steps? (\w+)\.", ex.input):
            dx, dy = {"forward": (0, 1), "backward": (0, -1), "left": (-1, 0), "right": (1, 0)}[d]
            x, y = x + dx * int(k), y + dy * int(k)
        assert len(re.findall(r"Take", ex.input)) == 6
        truth.append((x, y) == (0, 0))
        assert ex.targets == [str((x, y) == (0, 0))] and ex.target_scores[str((x, y) == (0, 0))] == 1
    assert 0.3 < np.mean(truth) < 0.7


def test_date_and_arithmetic_answers_are_right_and_distractors_wrong():
    for ex in task_from_dict(generators.date_arith(n=30, seed=2, max_days=3, unit="weeks")).examples:
        today, k, unit, way = re.match(r"Today is (\S+)\. What is the date (\d+) (week|weeks) (later|ago)",
                                       ex.input).groups()
        start = datetime.datetime.strptime(today, "%m/%d/%Y").date()
        delta = datetime.timedelta(weeks=int(k))
        assert ex.targets == [(start + delta if way == "later" else start - delta).strftime("%m/%d/%Y")]
        assert sum(ex.target_scores.values()) == 1 and len(ex.target_scores) == 4
    for op, fn in (("+", int.__add__), ("-", int.__sub__), ("*", int.__mul__)):
        for ex in task_from_dict(generators.arithmetic(n=20, seed=3, digits=3, op=op)).examples:
            a, b = map(int, re.findall(r"\d+", ex.input))
            assert 100 <= a < 1000 and 100 <= b < 1000 and ex.targets == [str(fn(a, b))]


def test_arithmetic_without_choices_is_purely_generative():
    task = task_from_dict(generators.arithmetic(n=10, seed=3, digits=3, choices=0))
    assert task.generative and not task.multiple_choice
    prompt = build_prompts(task)[0].prompt
    assert "choice" not in prompt and task.examples[0].targets[0] not in prompt


def test_generator_specs_parse_difficulty_and_reject_unknowns():
    assert generators.parse_spec("arithmetic:digits=4,op=*") == ("arithmetic", {"digits": 4, "op": "*"})
    with pytest.raises(DataError, match="neither a file nor a generator"):
        generators.generate_task("sudoku")
    with pytest.raises(DataError, match="difficulty"):
        generators.generate_task("navigate:speed=3")


@pytest.mark.slow
def test_code_completion_checks_candidates_by_execution_in_a_subprocess():
    data = generators.code_completion(n=2, seed=0, split="all", max_lines=16, execution_only=True, timeout=20)
    task = task_from_dict(data)
    assert task.stop_string == "\n" and "code_execution" in task.metrics
    for ex in task.examples:
        assert "execution" in ex.extra and ex.input.startswith("def ")
        assert generators.run_execution_check(ex, ex.targets[0], timeout=20)
        assert not generators.run_execution_check(ex, "    return (", timeout=20)
    prefix = 'def double(x):\n    """\n    >>> double(3)\n    6\n    """\n'
    double = Example(prefix, ["    return 2 * x"], extra={"execution": {"module": "os", "function": "double",
                                                                        "prefix": prefix}})
    assert generators.run_execution_check(double, "    return x + x", timeout=20)  # another text, same behaviour
    assert not generators.run_execution_check(double, "    return x * x", timeout=20)
    assert not generators.run_execution_check(double, "    while True: pass", timeout=1)  # killed at the timeout
    # the task's checker runs what post-processing keeps: the completed line, up to its stop string
    task = task_from_dict({**data, "examples": [{"input": prefix, "target": "    return 2 * x",
                                                  "execution": double.extra["execution"]}]})
    assert make_checker(task)(task.examples[0], "    return x + x\nprint(undefined_name) )(")


@pytest.mark.slow
def test_eval_cli_scores_a_trained_checkpoint_on_generated_and_file_tasks(tiny_trained_run, tmp_path, capsys):
    run_dir = str(tiny_trained_run)  # the session's shared 1-step run (eval reads it and writes only to --out)
    out = str(tmp_path / "eval")
    code = main(["eval", "--checkpoint", run_dir, "--tasks", f"arithmetic:digits=1,{FIXTURE}", "--shots", "1",
                 "--num-examples", "4", "--passuntil", "--max-samples", "4", "--out", out])
    assert code == 0
    results = json.load(open(os.path.join(out, "results.json")))["runs"][0]
    assert set(results["tasks"]) == {"arithmetic_digits1", "mixed_fixture"}
    pu = results["tasks"]["arithmetic_digits1"]["passuntil"]
    assert len(pu["instances"]) == 4 and 0 < pu["pu"] <= 1  # BIG-bench's k-shot scores every example
    assert "multiple_choice_grade" in results["tasks"]["mixed_fixture"]["metrics"]
    assert os.path.isfile(os.path.join(out, "results.md")) and os.path.isfile(os.path.join(out, "tasks",
                                                                                              "arithmetic_digits1.json"))
    assert "arithmetic_digits1" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(tmp_path), "--tasks", "navigate"]) == 2


def test_generator_specs_with_several_settings_survive_the_task_list_and_odd_values_are_one_line():
    from scaling_jax.eval.generators import generate_task, split_task_specs

    assert split_task_specs("arithmetic:digits=3,op=*,navigate:moves=8,max_steps=5,t.json,date_arith") == [
        "arithmetic:digits=3,op=*", "navigate:moves=8,max_steps=5", "t.json", "date_arith"]
    with pytest.raises(DataError, match="op"):
        generate_task("arithmetic:op=%", n=2)  # not YAML: the generator names the bad value
    for spec in ("navigate:moves=3", "navigate:moves=5,max_steps=1"):  # no returning walk exists: refused, no hang
        with pytest.raises(DataError, match="moves >= 4"):
            generate_task(spec, n=2)
    assert len(generate_task("navigate:moves=4,max_steps=1", n=4)["examples"]) == 4


def test_date_arith_distractors_do_not_give_the_answer_away_by_date_order():
    """Half the questions ask for a later date: the answer must not always be the latest option."""
    from scaling_jax.eval.generators import generate_task

    task = generate_task("date_arith", n=200, seed=0)
    latest = []
    for example in task["examples"]:
        if "later" not in example["input"]:
            continue
        dates = {d: datetime.datetime.strptime(d, generators.DATE_FORMAT) for d in example["target_scores"]}
        answer = next(d for d, s in example["target_scores"].items() if s == 1)
        latest.append(max(dates, key=dates.get) == answer)
    assert len(latest) > 50 and 0.1 < sum(latest) / len(latest) < 0.9
