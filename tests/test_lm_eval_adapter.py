"""lm-evaluation-harness runs a scaling_jax run as ``--model scaling_jax``: its numbers are ours.

Skipped where lm-eval is not installed (``pip install 'scaling_jax[lm-eval]'``). The tasks are the YAML files
in tests/fixtures/lm_eval (``--include_path``) over a local jsonl, so nothing is downloaded.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import TINY_RUN

lm_eval = pytest.importorskip("lm_eval")

from scaling_jax.errors import CheckpointError, UserError  # noqa: E402
from scaling_jax.eval import harness  # noqa: E402
from scaling_jax.eval import lm_eval_adapter as adapter  # noqa: E402
from scaling_jax.model.decode import SamplingConfig  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "lm_eval")
TASKS = ["sj_loglik", "sj_mc", "sj_rolling", "sj_gen"]  # the tag scaling_jax_tiny names all four
TINY = ["model.series=custom", "model.layers=1", "model.d_model=32", "model.heads=1", "model.head_dim=32",
        "model.d_ff=64", "data.seq_len=32", "data.batch_size=8", "data.max_docs=20", "train.steps=1",
        "optimizer.warmup_steps=1", "train.eval_batches=1", "train.progress=false", "train.plot=false",
        "train.tensorboard=false"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Offline, with the fixture dataset's Arrow cache in a temporary directory."""
    cache = tmp_path_factory.mktemp("datasets_cache")
    values = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "LM_EVAL_FIXTURE_CACHE": str(cache),
              "TOKENIZERS_PARALLELISM": "false"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in values.items():
            mp.setenv(k, v)
        yield values


@pytest.fixture(scope="module")
def run_dir(tiny_trained_run):
    """The session's shared 1-step run of TINY (trained by ``scaling-jax train``), only read here."""
    assert [*TINY, "train.async_checkpointing=false"] == TINY_RUN
    return str(tiny_trained_run)


@pytest.fixture(scope="module")
def reference(run_dir):
    """Our own model of the run, loaded independently of the adapter."""
    return harness.load_run(run_dir, 1).lm


@pytest.fixture(scope="module")
def evaluated(env, run_dir):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=FIXTURES, include_defaults=False)
    return lm_eval.simple_evaluate(model="scaling_jax", model_args=f"run_dir={run_dir},step=1",
                                   tasks=["scaling_jax_tiny"], task_manager=manager, log_samples=True,
                                   batch_size=4, bootstrap_iters=0)


def _summed(logprobs) -> list[float]:
    return [float(np.sum(lp, dtype=np.float64)) for lp in logprobs]


def test_registered_beside_lm_evals_own_models():
    from lm_eval.api.registry import get_model, model_registry

    assert get_model("scaling_jax") is adapter.ScalingJaxLM
    assert get_model("scaling-jax") is adapter.ScalingJaxLM
    assert "hf" in model_registry and "dummy" in model_registry  # lm-eval's own still resolve
    adapter.register()  # idempotent
    assert get_model("scaling_jax") is adapter.ScalingJaxLM


def test_simple_evaluate_runs_every_request_type(evaluated):
    results = evaluated["results"]
    assert set(TASKS) <= set(results)
    for key in ("acc,none", "acc_norm,none"):
        assert 0.0 <= results["sj_mc"][key] <= 1.0
    assert results["sj_rolling"]["bits_per_byte,none"] > 0
    assert results["sj_gen"]["exact_match,none"] in (0.0, 0.25, 0.5, 0.75, 1.0)


def test_loglikelihoods_equal_cached_lm(evaluated, reference):
    """Every loglikelihood request lm-eval made (plain and multiple choice, empty context included) scored
    by lm-eval through the adapter equals CachedLM.loglikelihood of the same strings."""
    samples = [s for task in ("sj_loglik", "sj_mc") for s in evaluated["samples"][task]]
    args = [tuple(a) for s in samples for a in s["arguments"]]
    got = [r[0][0] for s in samples for r in s["resps"]]
    assert len(args) == 4 + 11 and ("", "import sys") in args
    want = _summed(reference.loglikelihood([c for c, _ in args], [x for _, x in args]))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_rolling_loglikelihood_equals_cached_lm(evaluated, reference):
    """Documents within the run's 32-token context: the log-likelihood of the text after BOS. The longer one:
    the sum over lm-eval's rolling windows, each scored by CachedLM.logprobs, every token predicted once."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    tok = reference.tokenizer
    for sample in evaluated["samples"]["sj_rolling"]:
        text, got = sample["arguments"][0][0], sample["resps"][0][0]
        ids = [int(t) for t in tok.encode(text)]
        if len(ids) <= 32:
            want = _summed(reference.loglikelihood([""], [text]))[0]
        else:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, tok.bos_id, 32, 1)]
            assert len(windows) > 1 and [t for _, cont in windows for t in cont] == ids
            want = sum(_summed(reference.logprobs([c for c, _ in windows], [x for _, x in windows])))
        assert got == pytest.approx(want, abs=1e-5)
    assert any(len(tok.encode(s["arguments"][0][0])) > 32 for s in evaluated["samples"]["sj_rolling"])


def test_generate_until_equals_cached_lm(evaluated, reference):
    samples = evaluated["samples"]["sj_gen"]
    contexts = [s["arguments"][0][0] for s in samples]
    want = reference.generate(contexts, SamplingConfig(max_new_tokens=8, stop=("\n",)))
    assert [s["resps"][0][0] for s in samples] == want


def test_is_greedy_marks_the_greedy_continuation(run_dir, reference):
    from lm_eval.api.instance import Instance

    model = adapter.ScalingJaxLM(run_dir=run_dir, batch_size=4)
    context = "def"
    greedy = reference.generate_ids([reference.encode_prompt(context)], SamplingConfig(max_new_tokens=3)).tokens[0]
    text = reference.tokenizer.decode(greedy)
    assert [int(t) for t in reference.tokenizer.encode(text)] == greedy
    other = "zz" if not text.startswith("zz") else "qq"
    got = model.loglikelihood([Instance("loglikelihood", {}, (context, c), i) for i, c in enumerate([text, other])],
                              disable_tqdm=True)
    assert [g for _, g in got] == [True, False]
    np.testing.assert_allclose([s for s, _ in got], _summed(reference.loglikelihood([context] * 2, [text, other])),
                               atol=1e-5)
    assert model.loglikelihood([Instance("loglikelihood", {}, ("abc", ""), 0)], disable_tqdm=True) == [(0.0, True)]


def test_context_and_continuation_are_split_as_lm_eval_splits_them(run_dir, reference):
    """lm-eval's own split (``TemplateLM._encode_pair``, run here on our tokenizer) after BOS: trailing
    whitespace of the context is scored with the continuation."""
    from types import SimpleNamespace

    from lm_eval.api.instance import Instance
    from lm_eval.api.model import TemplateLM

    model = adapter.ScalingJaxLM(run_dir=run_dir, batch_size=4)
    tok = reference.tokenizer
    lm_evals = SimpleNamespace(backend="causal", tok_encode=lambda text, **_: [int(t) for t in tok.encode(text)])
    pairs = [("Answer: ", "Paris"), ("x", " y"), ("a \n ", "b"), ("q", "\t")]
    for context, continuation in pairs:
        ctx, cont = TemplateLM._encode_pair(lm_evals, context, continuation)
        assert model._pair(context, continuation) == ([tok.bos_id, *ctx], cont)
    got = model.loglikelihood([Instance("loglikelihood", {}, ("Answer: ", "Paris"), 0)], disable_tqdm=True)
    assert got[0][0] == pytest.approx(_summed(reference.loglikelihood(["Answer:"], [" Paris"]))[0], abs=1e-5)


def test_a_generation_budget_that_leaves_no_room_for_the_prompt_is_refused(run_dir):
    """max_gen_toks >= max_length kept one token of every prompt (two unrelated prompts gave the same text);
    lm-eval's own HFLM asserts against it."""
    from lm_eval.api.instance import Instance

    model = adapter.ScalingJaxLM(run_dir=run_dir, batch_size=4, max_length=16)
    request = Instance("generate_until", {}, ("Once upon", {"until": ["\n"], "max_gen_toks": 16}), 0)
    with pytest.raises(UserError, match="max_gen_toks=16 new tokens but max_length is 16"):
        model.generate_until([request], disable_tqdm=True)
    assert model.max_gen_toks == 8  # unset: half the window (lm-eval's 256 would leave none at seq_len 256)


def test_bad_model_args_are_one_clear_error(tmp_path, run_dir):
    not_a_run = tmp_path / "not_a_run"
    not_a_run.mkdir()
    with pytest.raises(CheckpointError) as e:
        lm_eval.simple_evaluate(model="scaling_jax", model_args=f"run_dir={not_a_run}", tasks=["sj_mc"])
    assert str(not_a_run) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="needs --model_args run_dir="):
        adapter.ScalingJaxLM()
    with pytest.raises(UserError, match="unknown --model_args pretrained"):
        adapter.ScalingJaxLM(run_dir=run_dir, pretrained="gpt2")
    with pytest.raises(UserError, match="step='x'"):
        adapter.ScalingJaxLM(run_dir=run_dir, step="x")


def test_cli_bad_run_dir_exits_2_with_one_line(tmp_path, monkeypatch, capsys, env):
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    code = adapter.main(["--model", "scaling_jax", "--model_args", f"run_dir={tmp_path}/missing", "--tasks", "sj_mc",
                         "--include_path", FIXTURES])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(err) == 1 and f"{tmp_path}/missing" in err[0]


def test_no_default_tasks_indexes_only_the_include_path_and_needs_one(capsys):
    with adapter._without_default_tasks(True):
        only = lm_eval.tasks.TaskManager(include_path=FIXTURES)
    assert lm_eval.tasks.TaskManager.__name__ == "TaskManager"  # lm-eval's own class again
    assert "scaling_jax_tiny" in only.all_tasks and "sj_mc" in only.all_tasks
    assert not any(name.startswith("hellaswag") for name in only.all_tasks)  # lm-eval ships hellaswag
    assert adapter.main(["--model", "scaling_jax", "--tasks", "sj_mc", "--no_default_tasks"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --no_default_tasks") and "--include_path" in err[0]
    # lm-eval's --config file may name the path: the flag is not refused (the missing run is what stops this one)
    assert adapter.main(["run", "--config", "x.yaml", "--model", "scaling_jax", "--model_args", "run_dir=/missing",
                         "--tasks", "sj_mc", "--no_default_tasks"]) == 2
    assert "/missing" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_end_to_end(tmp_path, run_dir, env, evaluated):
    """``python -m scaling_jax.eval.lm_eval_adapter`` is the lm_eval command with --model scaling_jax."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "scaling_jax.eval.lm_eval_adapter", "--model", "scaling_jax",
         "--model_args", f"run_dir={run_dir},step=1", "--tasks", "scaling_jax_tiny", "--include_path", FIXTURES,
         "--batch_size", "4", "--output_path", str(out), "--no_default_tasks"],
        capture_output=True, text=True, timeout=300, env={**os.environ, **env, "DISABLE_MULTIPROC": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sj_mc" in proc.stdout and "bits_per_byte" in proc.stdout
    files = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs if f.startswith("results_")]
    assert len(files) == 1
    with open(files[0]) as f:
        results = json.load(f)["results"]
    for task, metric in (("sj_mc", "acc,none"), ("sj_loglik", "perplexity,none"), ("sj_rolling", "bits_per_byte,none"),
                         ("sj_gen", "exact_match,none")):
        assert results[task][metric] == pytest.approx(evaluated["results"][task][metric], rel=1e-6)
