"""Emergence report: preferred score and PassUntil PU against N and training compute, one PNG per task."""

import json
import os

import pytest

from scaling_jax.eval import harness
from scaling_jax.eval.emergence import plot_emergence, task_series


def _pu(pu: float, low: float, high: float, instances: int = 3) -> dict:
    return {"pu": pu, "low": low, "high": high, "se": (high - low) / 4, "instances": [{"p": pu}] * instances}


def _run(name: str, n: int, flops: float | None, arith_pu: dict | None, mc_grade: float) -> dict:
    tasks = {
        # greedy exact match sits at 0 in every model while PU rises: the emergence the plot is for
        "arith": {"metrics": {"exact_str_match": 0.0, "normalized_aggregate_score": 0.0},
                  "preferred_score": "exact_str_match", "low_score": 0.0, "high_score": 1.0, "records": []},
        "mc": {"metrics": {"multiple_choice_grade": mc_grade}, "preferred_score": "multiple_choice_grade",
               "low_score": 0.25, "high_score": 1.0, "records": []},
    }
    if arith_pu:
        tasks["arith"]["passuntil"] = arith_pu
    return {"run_dir": f"/runs/{name}", "step": 100, "n_params": n, "total_params": 2 * n, "flops": flops,
            "objective": "causal", "shots": 0, "tasks": tasks}


@pytest.fixture
def results():
    # given out of size order: the report sorts by N
    return [_run("s2", 400_000, 3e14, _pu(2e-3, 1e-3, 4e-3), 0.30),
            _run("s1", 100_000, 5e13, _pu(1e-4, 0.0, 5e-4), 0.20),
            _run("s3", 1_600_000, 2e15, _pu(3e-2, 2e-2, 5e-2), 0.55)]


def test_series_are_the_inputs_sorted_by_n(results):
    s = task_series(results, "arith")
    assert s["runs"] == ["/runs/s1", "/runs/s2", "/runs/s3"]
    assert s["n_params"] == [100_000, 400_000, 1_600_000]
    assert s["flops"] == [5e13, 3e14, 2e15]
    assert s["score_name"] == "exact_str_match" and s["score"] == [0.0, 0.0, 0.0]
    assert s["pu"] == [1e-4, 2e-3, 3e-2] and s["pu_low"] == [0.0, 1e-3, 2e-2] and s["pu_high"] == [5e-4, 4e-3, 5e-2]
    mc = task_series(results, "mc")
    assert mc["score_name"] == "multiple_choice_grade" and mc["score"] == [0.20, 0.30, 0.55]
    assert mc["low_score"] == 0.25 and mc["pu"] is None


def test_one_png_per_task_with_its_data(results, tmp_path):
    out = plot_emergence(results, str(tmp_path))
    assert sorted(out) == ["arith", "mc"]
    for task, series in out.items():
        assert series["plot"] == str(tmp_path / "plots" / f"emergence_{task}.png")
        assert os.path.getsize(series["plot"]) > 10_000
        assert {k: v for k, v in series.items() if k != "plot"} == task_series(results, task)


def test_missing_compute_and_partial_passuntil(results, tmp_path):
    """A run without recorded FLOPs (an imported checkpoint) and one without PassUntil still plot."""
    results[1]["flops"] = None
    del results[0]["tasks"]["arith"]["passuntil"]
    series = plot_emergence(results, str(tmp_path))["arith"]
    assert series["flops"] == [None, 3e14, 2e15] and series["pu"] == [1e-4, None, 3e-2]
    assert os.path.isfile(series["plot"])
    for r in results:
        r["flops"] = 0.0  # what a checkpoint imported from Hugging Face records
    series = plot_emergence(results, str(tmp_path))["arith"]
    assert series["flops"] == [None, None, None] and os.path.isfile(series["plot"])


def test_write_report_lists_emergence_plots(results, tmp_path):
    report = harness.write_report(results, str(tmp_path))
    with open(tmp_path / "results.json") as f:
        saved = json.load(f)
    assert "plots/emergence_arith.png" in saved["plots"] and "plots/emergence_mc.png" in saved["plots"]
    assert "plots/passuntil_arith.png" in saved["plots"]
    assert all((tmp_path / p).is_file() for p in saved["plots"])
    assert sorted(report["emergence"]) == ["arith", "mc"]
    assert [r["flops"] for r in saved["runs"]] == [3e14, 5e13, 2e15]


def test_single_run_gets_no_emergence_plot(results, tmp_path):
    report = harness.write_report(results[:1], str(tmp_path))
    assert report["emergence"] == {} and not list(tmp_path.glob("plots/emergence_*"))


@pytest.mark.slow
def test_run_eval_end_to_end(tmp_path):
    """Two checkpoints of one tiny run through ``scaling-jax eval``'s own path: PassUntil on, N and FLOPs from
    the run, one emergence plot listed in results.json."""
    from scaling_jax.cli import main

    run = str(tmp_path / "run")
    assert main(["train", "configs/quickstart.yaml", "model.series=custom", "model.layers=1", "model.d_model=32",
                 "model.heads=1", "model.head_dim=32", "model.d_ff=64", "data.seq_len=32", "data.batch_size=8",
                 "data.max_docs=20", "train.steps=1", "optimizer.warmup_steps=1", "train.eval_batches=1",
                 "train.progress=false", "train.plot=false", "train.tensorboard=false", f"train.run_dir={run}"]) == 0
    with open(os.path.join(run, "summary.json")) as f:
        flops = json.load(f)["total_flops"]
    options = harness.PassUntilOptions(passes=1, max_samples=2, batch=2, max_new_tokens=4)
    out = harness.run_eval([run, run], ["arithmetic:digits=1"], out_dir=str(tmp_path / "eval"), num_examples=3,
                           max_examples=2, passuntil=options)
    assert [r["flops"] for r in out["results"]] == [flops, flops]
    with open(tmp_path / "eval" / "results.json") as f:
        saved = json.load(f)
    assert "plots/emergence_arithmetic_digits1.png" in saved["plots"]
    series = out["emergence"]["arithmetic_digits1"]
    assert series["flops"] == [flops, flops] and series["score_name"] == "exact_str_match"
    assert series["pu"] == [r["tasks"]["arithmetic_digits1"]["passuntil"]["pu"] for r in out["results"]]
    assert os.path.isfile(series["plot"])
