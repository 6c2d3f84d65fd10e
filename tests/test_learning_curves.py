"""Learning curves: Kaplan's eq. 1.6 and 5.4, the one-run projection, the trainer's live projection, and the
sweep-level leave-one-out script. Synthetic curves only: no training."""

import json
import math
import sys

import numpy as np
import pytest

from scaling_jax.errors import DataError
from scaling_jax.scaling import learning_curves as lc
from scaling_jax.train import projection
from scaling_jax.train.metrics import ProgressBar
from scaling_jax.train.projection import BatchLaw, LiveProjection, kaplan_ns, project_final, s_min

sys.path.insert(0, "scripts")
import learning_curves as script  # noqa: E402

TRUE = {"n_c": 6.5e13, "alpha_n": 0.076, "s_c": 2.1e3, "alpha_s": 0.76}  # Kaplan et al. 2020, Table 3
SIZES = (1e6, 3e6, 1e7, 3e7, 1e8, 3e8)


def offset_curve(steps: np.ndarray, l_inf: float = 2.0, s_c: float = 300.0, alpha: float = 0.5) -> np.ndarray:
    return l_inf + (s_c / steps) ** alpha


def synthetic_curve(n: float, steps: int, noise: float, rng: np.random.Generator, run_id: str = "") -> lc.Curve:
    """An eq. 1.6 curve (constant learning rate, no warmup) with multiplicative per-step noise."""
    step = np.arange(1, steps + 1, dtype=float)
    loss = kaplan_ns(n, step, **TRUE) * np.exp(rng.normal(0.0, noise, steps))
    return lc.Curve(run_id or f"n{n:.0e}", n, steps, step, loss, batch_tokens=2**19, warmup=0, lr_end_ratio=1.0)


# ---------------------------------------------------------------------------------------------- laws


def test_s_min_matches_eq_5_4_by_hand():
    # B_crit(3.0) = 2e8 / 3^(1/0.21) = 2e8 / 187.1 = 1.069e6 tokens; at B = 2^20: S_min = 1000 / (1 + 1.0194)
    assert s_min(1000, 2**20, 3.0, b_star=2e8, alpha_b=0.21) == pytest.approx(495.15, abs=0.01)
    assert BatchLaw(2**20).s_min(1000, 3.0) == pytest.approx(495.15, abs=0.01)  # Kaplan's B*, α_B by default


def test_kaplan_ns_is_the_sum_of_its_two_power_laws():
    assert kaplan_ns(1e8, 1e4, **TRUE) == pytest.approx((6.5e13 / 1e8) ** 0.076 + (2.1e3 / 1e4) ** 0.76)


def test_joint_fit_recovers_known_parameters_inside_its_intervals():
    rng = np.random.default_rng(0)
    curves = [synthetic_curve(n, 4000, 0.01, rng) for n in SIZES]
    fit = lc.fit_curves(curves, n_boot=40)
    for name, true in TRUE.items():
        lo, hi = fit.ci[name]
        assert lo <= true <= hi, (name, fit.params[name], lo, hi)
    assert fit.params["alpha_s"] == pytest.approx(TRUE["alpha_s"], rel=0.1)


def test_leave_one_out_predicts_synthetic_final_losses_from_a_quarter_of_each_curve():
    rng = np.random.default_rng(1)
    curves = [synthetic_curve(n, 2000, 0.01, rng) for n in SIZES[:4]]
    for c, p in zip(curves, lc.predict_from_prefix(curves, prefix=0.25, n_boot=40), strict=True):
        loss, low, high = p.law
        assert abs(p.relative_error(loss)) < 0.01 and abs(p.relative_error(p.single.loss)) < 0.01
        # the interval is the law's uncertainty: it covers the noise-free loss at the window the measurement
        # averages (the measured mean has its own noise, ~0.1% here). The one-run intervals are checked once, in
        # their own test: four 95% intervals all covering would fail by chance one time in five
        truth = float(kaplan_ns(c.n, c.final_step(), **TRUE))
        assert low <= truth <= high, (p, truth)
        assert p.prefix_steps == 500


# ---------------------------------------------------------------------------------------------- one run


def test_single_run_projection_of_an_exact_curve_from_its_first_quarter():
    steps = np.arange(1, 10_001, dtype=float)
    loss = offset_curve(steps)
    p = project_final(steps[:2500], loss[:2500], 10_000, n_boot=50)
    assert p.loss == pytest.approx(loss[-1], rel=0.01)
    assert p.low <= loss[-1] * (1 + 1e-9) and loss[-1] * (1 - 1e-9) <= p.high
    assert p.final_step == 10_000 and p.n_points == 2250  # the burn-in left out the first 10% seen


def test_single_run_projection_interval_covers_a_noisy_curve():
    steps = np.arange(1, 4001, dtype=float)
    loss = offset_curve(steps) * np.exp(np.random.default_rng(2).normal(0.0, 0.02, len(steps)))
    p = project_final(steps[:1000], loss[:1000], 4000, n_boot=50)
    assert p.low <= offset_curve(np.array(4000.0)) <= p.high


def test_too_few_points_give_no_projection():
    steps = np.arange(1.0, 9.0)  # 0.1 x 8 steps seen: the burn-in drops none of these
    assert project_final(steps[:7], offset_curve(steps[:7]), 100) is None
    assert project_final(steps, offset_curve(steps), 100) is not None  # 8 points are enough
    assert project_final(steps, np.full(8, np.nan), 100) is None


# ---------------------------------------------------------------------------------------------- live


def test_live_projection_appears_after_a_tenth_of_the_run_and_refits_rarely(capsys):
    live = LiveProjection(total_steps=1000, min_interval_s=0.0, n_boot=20)
    loss = offset_curve(np.arange(1, 1001, dtype=float))
    fits = [step for step in range(1, 401) if live.observe(step, float(loss[step - 1])) is not None]
    assert fits[0] == 100 and np.all(np.diff(fits) >= 50)  # from 10% of the run on, at most every 5%
    assert live.label().startswith("final≈") and live.last.loss == pytest.approx(loss[-1], rel=0.01)
    bar = ProgressBar(total_steps=1000, initial_step=400)
    bar.update(401, loss=2.1, tokens_per_s=100.0, note=live.label())
    bar.close()
    assert "loss=2.1000 tok/s=100 final≈" in capsys.readouterr().err


def test_a_run_shorter_than_the_refit_interval_never_pays_for_a_fit(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(projection.time, "monotonic", lambda: clock[0])
    live = LiveProjection(total_steps=1000, min_interval_s=10.0, n_boot=5)
    loss = offset_curve(np.arange(1, 1001, dtype=float))
    assert all(live.observe(step, float(loss[step - 1])) is None for step in range(1, 200))  # due by steps, not time
    clock[0] += 10.0
    assert live.observe(200, float(loss[199])) is not None


def test_refits_never_take_more_than_their_share_of_the_host(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(projection.time, "monotonic", lambda: clock[0])
    fit = projection.project_final

    def slow_fit(*args, **kwargs):  # a fit that holds the host for 1 s
        clock[0] += 1.0
        return fit(*args, **kwargs)

    monkeypatch.setattr(projection, "project_final", slow_fit)
    live = LiveProjection(total_steps=10_000, min_interval_s=0.0, max_host_share=0.05, n_boot=5)
    loss = offset_curve(np.arange(1, 10_001, dtype=float))
    fits = []
    for step in range(1, 5000):
        if live.observe(step, float(loss[step - 1])) is not None:
            fits.append(clock[0])
        clock[0] += 0.01  # 10 ms steps: due by steps every 500 steps, i.e. every 5 s
    assert len(fits) >= 3 and min(np.diff(fits)) >= 20.0  # 1 s of fitting per 20 s at most


def test_a_resumed_run_projects_at_its_first_due_step_from_the_losses_it_logged():
    loss = offset_curve(np.arange(1, 1001, dtype=float))
    live = LiveProjection(total_steps=1000, min_interval_s=0.0, n_boot=20)
    live.resume([{"step": s, "loss": float(loss[s - 1])} for s in range(1, 301)] + [{"step": 300, "val_loss": 9.0}])
    assert live.observe(301, float(loss[300])) is not None  # no wait for new steps
    assert live.last.loss == pytest.approx(loss[-1], rel=0.01)


def test_live_projection_before_its_start_and_after_a_failed_fit_shows_nothing(monkeypatch):
    live = LiveProjection(total_steps=1000, min_interval_s=0.0, n_boot=5)
    assert [live.observe(s, 3.0) for s in range(1, 100)] == [None] * 99 and live.label() == ""

    def broken(*args, **kwargs):
        raise FloatingPointError("a numerical surprise")

    monkeypatch.setattr(projection, "project_final", broken)
    assert live.observe(100, 3.0) is None and live.label() == ""  # no exception reaches the trainer
    disabled = LiveProjection(total_steps=10, enabled=False)
    assert disabled.observe(5, 3.0) is None and disabled.label() == "" and not disabled.history.points


def test_loss_history_stays_bounded_and_even():
    history = projection.LossHistory(max_points=16)
    for step in range(1, 1001):
        history.add(step, 1.0 / step)
    steps, _ = history.arrays()
    assert len(steps) < 16 and history.stride == 64 and np.all(np.diff(steps) > 0)
    history.forget_after(500)
    assert history.arrays()[0].max() <= 500


# ---------------------------------------------------------------------------------------------- the script


def write_sweep(root, sizes=SIZES[:3], steps: int = 400, done: bool = True) -> str:
    """A sweep directory as ``sweep`` writes it: manifest.json and each run's metrics.jsonl and summary.json."""
    rng, runs = np.random.default_rng(3), []
    for n in sizes:
        curve = synthetic_curve(n, steps, 0.005, rng)
        run_dir = root / curve.run_id
        run_dir.mkdir(parents=True)
        rows = [{"step": int(s), "loss": float(v), "lr": 1e-3, "tokens": int(s) * 4096}
                for s, v in zip(curve.step, curve.loss, strict=True)]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (run_dir / "summary.json").write_text(json.dumps({"step": steps, "non_embedding_params": n}))
        runs.append({"run_id": curve.run_id, "objective": "causal", "size": curve.run_id, "budget": "b",
                     "status": "done" if done else "pending", "run_dir": str(run_dir), "n": n,
                     "tokens": steps * 4096, "flops": 6.0 * n * steps * 4096})
    (root / "manifest.json").write_text(json.dumps({"sweep": "synthetic", "runs": runs}))
    return str(root)


def test_script_prints_a_row_per_run_with_both_predictions(tmp_path, capsys):
    assert script.main([write_sweep(tmp_path), "--prefix", "0.25", "--boot", "10"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("3 finished runs") and "eq1.6 LOO from 25%" in out[1]
    assert len([line for line in out if line.startswith("n1e+06") or line.startswith("n3e+06")]) == 2
    assert out[-1].startswith("eq. 1.6 on all runs: n_c=")


@pytest.mark.parametrize("make", [lambda p: str(p / "missing"), lambda p: write_sweep(p, done=False)])
def test_script_refuses_bad_input_with_one_error_line(tmp_path, capsys, make):
    assert script.main([make(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")


def test_a_sweep_of_several_objectives_is_fitted_one_objective_at_a_time(tmp_path):
    """UL2's training loss is its denoising loss: one law over causal and UL2 curves would mix two quantities."""
    sweep = write_sweep(tmp_path, steps=100)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["runs"][0]["objective"] = "ul2"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="holds runs of objectives ul2, causal"):
        lc.load_curves(sweep)
    assert [c.n for c in lc.load_curves(sweep, "causal")] == list(SIZES[1:3])


def test_curves_read_from_a_sweep_directory(tmp_path):
    curves = lc.load_curves(write_sweep(tmp_path, steps=100))
    assert [c.n for c in curves] == list(SIZES[:3]) and curves[0].steps == 100
    assert curves[0].batch_tokens == 4096 and math.isclose(curves[0].lr_end_ratio, 1.0)
