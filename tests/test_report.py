"""Reports: curves on three x-axes, per-objective fits that recover the law the runs were drawn from, an
extrapolation with its interval, the equal-compute table and the noise scale — from sweeps or run dirs."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from scaling_jax.cli import main
from scaling_jax.errors import DataError
from scaling_jax.scaling import laws, plots

LAWS = {"causal": (1e20, 0.05), "ul2": (2e19, 0.055)}  # L(C) = (C_c / C)^alpha per objective
SIZES = {"a": 1e5, "b": 2e5, "c": 4e5, "d": 8e5}


def fake_run(run_dir, objective, n, noise_rows=False, seed=0):
    """A finished run whose validation curve follows the objective's L(C) (cosine-free, for plotting only)."""
    rng = np.random.default_rng(seed)
    c_c, alpha = LAWS[objective]
    tokens = 20 * n
    flops = 6 * n * tokens
    rows = []
    for k in range(1, 5):
        step, frac = 10 * k, k / 4
        loss = float(laws.power_law(flops * frac, c_c, alpha) * (1 + 0.002 * rng.normal()) * (1 + (1 - frac) / 10))
        row = {"step": step, "loss": loss, "tokens": tokens * frac, "flops": flops * frac, "wall_time": 3.0 * k}
        if noise_rows:
            row.update({"noise_grad_sq_small": 1.0 + 4000 / 512 * (1 + 0.1 * k), "noise_grad_sq_big": 1.0 + 4000 / 1024
                        * (1 + 0.1 * k), "noise_batch_small": 512.0, "noise_batch_big": 1024.0})
        rows += [row, {"step": step, "tokens": tokens * frac, "flops": flops * frac, "val_loss": loss,
                       "val_bpb": loss / np.log(2)}]
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"step": 40, "preempted": False, "tokens": tokens, "flops": flops, "wall_time": 12.0,
               "non_embedding_params": n, "val_loss": rows[-1]["val_loss"], "val_bpb": rows[-1]["val_bpb"]}
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f)
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        f.write(f"objective:\n  name: {objective}\nmodel:\n  series: custom\n")
    return {"run_dir": run_dir, "n": n, "tokens": tokens, "flops": flops}


@pytest.fixture
def fake_sweep(tmp_path):
    out = tmp_path / "sweep"
    entries = []
    for i, objective in enumerate(LAWS):
        for j, (size, n) in enumerate(SIZES.items()):
            run_id = f"{objective}-{size}-k20"
            info = fake_run(str(out / run_id), objective, n, noise_rows=objective == "causal", seed=10 * i + j)
            entries.append({"run_id": run_id, "objective": objective, "size": size, "budget": "k20",
                            "status": "done", "steps": 40, **info})
    entries.append({"run_id": "causal-e-k20", "objective": "causal", "size": "e", "budget": "k20", "status": "pending",
                    "run_dir": str(out / "causal-e-k20"), "n": 1.6e6, "tokens": 3.2e7, "flops": 3e14, "steps": 80})
    with open(out / "manifest.json", "w") as f:
        json.dump({"sweep": "fake", "runs": entries}, f)
    return str(out)


def test_report_plots_every_axis_and_recovers_each_objectives_compute_law(fake_sweep, tmp_path):
    out = str(tmp_path / "report")
    report = plots.write_report([fake_sweep], out, target_flops=1e15, n_boot=50)
    for name in ("loss_vs_tokens", "loss_vs_flops", "loss_vs_wallclock", "fit_loss_vs_params", "fit_loss_vs_compute"):
        assert os.path.getsize(os.path.join(out, f"{name}.png")) > 10_000, name
    text = open(report).read()
    for objective in LAWS:
        for size in SIZES:
            assert f"| {objective}-{size}-k20 | {objective} |" in text
    assert "| causal-e-k20 | causal | e |" in text and "| pending |" in text  # the unfinished run is listed
    data = json.load(open(os.path.join(out, "report.json")))
    for objective, (c_c, alpha) in LAWS.items():
        fit = data["fits"][objective]
        lo, hi = fit["loss_vs_compute"]["ci"]["alpha"]
        assert lo <= alpha <= hi
        extrapolated = fit["extrapolation"]
        assert extrapolated["flops"] == 1e15
        assert extrapolated["ci"][0] <= laws.power_law(1e15, c_c, alpha) <= extrapolated["ci"][1]
    assert "extrapolated loss at C = 1e+15 FLOPs" in text
    # equal-compute table at the largest finished run's compute, lower loss first, from each objective's own fit
    table = text.split("## Objectives at equal compute")[1]
    largest = 6 * SIZES["d"] * 20 * SIZES["d"]
    assert f"C = {largest:.3g} FLOPs" in table
    expected = sorted(LAWS, key=lambda o: laws.power_law(largest, *LAWS[o]))
    assert sorted(LAWS, key=lambda o: table.index(f"| {o} |")) == expected
    assert "## Gradient noise scale" in text and "| causal-a-k20 |" in text.split("## Gradient noise scale")[1]


def test_report_takes_single_run_directories_and_wall_clock_from_training_rows(tmp_path):
    runs = [fake_run(str(tmp_path / f"r{i}"), "causal", n)["run_dir"] for i, n in enumerate((1e5, 3e5))]
    records = plots.load_runs(runs)
    assert [r.objective for r in records] == ["causal", "causal"] and records[0].status == "done"
    assert [p["wall_time"] for p in records[0].curve] == [3.0, 6.0, 9.0, 12.0]
    assert main(["report", *runs, "--out", str(tmp_path / "rep")]) == 0
    assert "L(N) = (N_c/N)^α" in open(tmp_path / "rep" / "report.md").read()  # two sizes: Kaplan's two-parameter form


def test_report_loads_without_jax(tmp_path):
    """The report is numpy and scipy: its command starts without JAX's ~0.8 s of imports."""
    code = (f"import sys; from scaling_jax.cli import main; assert main(['report', {str(tmp_path)!r}]) == 2; "
            "assert 'jax' not in sys.modules, 'jax imported'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_report_on_a_directory_without_runs_is_a_one_line_error(tmp_path):
    with pytest.raises(DataError, match="neither a sweep directory"):
        plots.load_runs([str(tmp_path)])
    assert main(["report", str(tmp_path)]) == 2


SEEDS = (0, 1, 2)


@pytest.fixture
def seeded_sweep(tmp_path):
    """causal at three sizes x three seeds (each seed its own noise), and a fourth seed of size a unfinished."""
    out = tmp_path / "seeded"
    entries = []
    for j, (size, n) in enumerate(list(SIZES.items())[:3]):
        for seed in SEEDS:
            run_id = f"causal-{size}-k20-s{seed}"
            info = fake_run(str(out / run_id), "causal", n, seed=100 * j + seed)
            entries.append({"run_id": run_id, "objective": "causal", "size": size, "budget": "k20", "seed": seed,
                            "status": "done", "steps": 40, **info})
    entries.append({"run_id": "causal-a-k20-s3", "objective": "causal", "size": "a", "budget": "k20", "seed": 3,
                    "status": "pending", "run_dir": str(out / "causal-a-k20-s3"), "n": SIZES["a"],
                    "tokens": 20 * SIZES["a"], "flops": 120 * SIZES["a"] ** 2, "steps": 40})
    with open(out / "manifest.json", "w") as f:
        json.dump({"sweep": "seeded", "runs": entries}, f)
    return str(out)


def _seed_losses(sweep_dir: str, size: str) -> np.ndarray:
    return np.array([json.load(open(os.path.join(sweep_dir, f"causal-{size}-k20-s{s}", "summary.json")))["val_loss"]
                     for s in SEEDS])


def test_report_gives_each_seeded_point_its_mean_t_interval_and_seed_count(seeded_sweep, tmp_path):
    from scipy import stats

    out = str(tmp_path / "report")
    text = open(plots.write_report([seeded_sweep], out, n_boot=20)).read()
    section = text.split("## Seeds")[1].split("## Curves")[0]
    data = json.load(open(os.path.join(out, "report.json")))
    points = {p["point"]: p for p in data["seed_points"]}
    assert sorted(points) == ["causal-a-k20", "causal-b-k20", "causal-c-k20"]
    for size in ("a", "b", "c"):
        v = _seed_losses(seeded_sweep, size)
        lo, hi = stats.t.interval(0.95, len(v) - 1, loc=np.mean(v), scale=stats.sem(v))
        row = next(line for line in section.splitlines() if line.startswith(f"| causal-{size}-k20 |"))
        assert f"| {np.mean(v):.4f} ± {(hi - lo) / 2:.4f} (n=3) |" in row
        assert f"[{lo:.4f}, {hi:.4f}]" in row
        p = points[f"causal-{size}-k20"]
        assert p["mean"] == pytest.approx(np.mean(v)) and p["interval"] == pytest.approx([lo, hi])
        assert p["n_seeds"] == 3 and p["seeds"] == list(SEEDS)
    assert "0, 1, 2 (3 of 4 finished)" in section.split("| causal-a-k20 |")[1].splitlines()[0]
    assert "| causal-b-k20-s2 | causal | b |" in text  # the runs table still lists every seed's run
    for name in ("fit_loss_vs_params", "fit_loss_vs_compute"):
        assert os.path.getsize(os.path.join(out, f"{name}.png")) > 10_000, name


def test_fit_plot_draws_each_seeded_point_at_its_mean_with_the_t_interval_as_error_bar(seeded_sweep):
    from matplotlib.container import ErrorbarContainer

    records = plots.load_runs([seeded_sweep])
    fits = {"causal": plots.fit_objective(plots._finished(records), 1e15, n_boot=0)}
    ax = plots.fit_figure(records, fits, "n", "loss_vs_n").axes[0]
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 1
    (segments,) = [col.get_segments() for col in bars[0].lines[2]]
    for seg, size in zip(sorted(segments, key=lambda s: s[0][0]), ("a", "b", "c"), strict=True):
        st = laws.seed_stats(_seed_losses(seeded_sweep, size))
        (x0, lo), (x1, hi) = seg
        assert x0 == x1 == SIZES[size] and (lo, hi) == pytest.approx(st.interval)


def _seeded_records(delta: float, seeds=SEEDS) -> list:
    """Three sizes whose seeds scatter by exp(-delta), 1, exp(+delta) (in an order that changes with the size)
    around L(C): their means lie on one power law exactly, whatever delta is."""
    records = []
    for j, (size, n) in enumerate(list(SIZES.items())[:3]):
        flops = 6 * n * 20 * n
        offsets = np.roll([-delta, 0.0, delta], j)
        for seed, off in zip(seeds, offsets, strict=True):
            records.append(plots.RunRecord(f"causal-{size}-k20-s{seed}", "causal", size, n, 20 * n, flops, 1.0,
                                           float(laws.power_law(flops, *LAWS["causal"]) * np.exp(off)), None,
                                           "done", seed=seed, point=f"causal-{size}-k20", source="sweep"))
    return records


def _width(fit, name="alpha") -> float:
    lo, hi = fit.ci[name]
    return hi - lo


def test_fits_take_every_seed_as_a_point_so_the_seed_scatter_widens_their_intervals():
    alpha = LAWS["causal"][1]
    widths = {}
    for delta in (0.0, 0.01, 0.03):
        fits = plots.fit_objective(_seeded_records(delta), 1e15, n_boot=200)
        widths[delta] = (_width(fits["loss_vs_n"]), _width(fits["loss_vs_compute"]))
        assert fits["loss_vs_compute"].info["frontier_rows"] == 9  # all three seeds of all three points
        lo, hi = fits["loss_vs_compute"].ci["alpha"]
        assert lo - 1e-9 <= alpha <= hi + 1e-9
    # the seeds' means lie exactly on the law: fitted alone they leave no error to see
    means = [plots.RunRecord(p.label, "causal", p.size, p.n, p.tokens, p.flops, 1.0, p.stats.mean, None, "done",
                             point=p.label, source="means") for p in plots.seed_points(_seeded_records(0.03))]
    on_means = plots.fit_objective(means, 1e15, n_boot=200)
    assert _width(on_means["loss_vs_n"]) < 1e-9 and _width(on_means["loss_vs_compute"]) < 1e-9
    for i in range(2):  # L(N), L(C): no scatter, no width; then wider with every step up in scatter
        assert widths[0.0][i] < 1e-9 < 1e-3 < widths[0.01][i] < widths[0.03][i]


def test_an_unseeded_run_beside_seeded_ones_is_not_counted_as_a_seed(seeded_sweep):
    """Rerunning a sweep with seeds keeps the old unseeded run; it shares seed 0's default seeds, so pooling it
    would count one training twice and narrow the interval."""
    sweep = seeded_sweep
    manifest = json.load(open(os.path.join(sweep, "manifest.json")))
    info = fake_run(os.path.join(sweep, "causal-a-k20"), "causal", SIZES["a"], seed=0)
    manifest["runs"].append({"run_id": "causal-a-k20", "objective": "causal", "size": "a", "budget": "k20",
                             "status": "done", "steps": 40, **info})
    json.dump(manifest, open(os.path.join(sweep, "manifest.json"), "w"))
    points = {r.point for r in plots.load_runs([sweep]) if r.run_id.startswith("causal-a-k20")}
    assert points == {"causal-a-k20", "causal-a-k20 (unseeded)"}
    seeded = [p for p in plots.seed_points(plots.load_runs([sweep])) if p.label == "causal-a-k20"]
    assert seeded[0].seeds == SEEDS


def test_a_copied_sweep_reports_its_own_runs_and_a_stage_its_total_compute(fake_sweep, tmp_path):
    """The manifest's recorded run paths point into the original sweep: a copy (or a report run from another
    directory) reads the runs beside its own manifest. A stage run is charged every stage's FLOPs, as its curve."""
    import shutil

    copy = str(tmp_path / "archive")
    shutil.copytree(fake_sweep, copy)
    run_id = "causal-a-k20"
    summary_path = os.path.join(fake_sweep, run_id, "summary.json")
    summary = json.load(open(summary_path))
    json.dump({**summary, "val_loss": 9.999}, open(summary_path, "w"))
    ours = next(r for r in plots.load_runs([copy]) if r.run_id == run_id)
    assert ours.val_loss == pytest.approx(summary["val_loss"]) and ours.val_loss != 9.999
    stage = str(tmp_path / "stage")
    fake_run(stage, "ul2", SIZES["a"])
    summary = json.load(open(os.path.join(stage, "summary.json")))
    json.dump({**summary, "total_flops": 3 * summary["flops"], "total_tokens": 3 * summary["tokens"]},
              open(os.path.join(stage, "summary.json"), "w"))
    record = plots.load_runs([stage])[0]
    assert record.flops == 3 * summary["flops"] and record.tokens == 3 * summary["tokens"]
    assert len(plots.load_runs([copy, copy + "/", stage])) == len(plots.load_runs([copy])) + 1  # each path once


def test_a_diverged_run_is_named_and_left_out_instead_of_failing_the_report(fake_sweep, tmp_path):
    """A finished run whose final validation loss is NaN stopped the whole report ('seed_stats needs at least one
    finite value') without saying which run."""
    summary_path = os.path.join(fake_sweep, "causal-b-k20", "summary.json")
    with open(summary_path) as f:
        summary = json.load(f)
    with open(summary_path, "w") as f:
        json.dump({**summary, "val_loss": float("nan")}, f)
    report = plots.write_report([fake_sweep], str(tmp_path / "report"), n_boot=10)
    text = open(report).read()
    assert "Left out of every fit and seed statistic: causal-b-k20" in text
    assert "## Fits" in text or "loss_vs_compute" in text
