"""Scaling-law fitters recover known laws from noisy synthetic tables, within their own bootstrap intervals."""

import numpy as np
import pytest
from scipy import optimize

from scaling_jax.errors import DataError
from scaling_jax.scaling import laws

# Besiroglu et al. 2024 refit of Chinchilla approach 3 (../shared/REFERENCES.md).
EPOCH = dict(e=1.82, a=482.0, b=2085.0, alpha=0.35, beta=0.37)
CHINCHILLA_COMPUTE = 5.76e23  # Chinchilla 70B on 1.4T tokens


def noisy(values, sigma, seed=0):
    return values * np.exp(np.random.default_rng(seed).normal(0.0, sigma, np.shape(values)))


def assert_within_ci(fit, truth):
    for name, value in truth.items():
        lo, hi = fit.ci[name]
        assert lo <= value <= hi, f"{name}={value} outside its CI [{lo}, {hi}]"


def chinchilla_table(seed=0, sigma=0.01):
    n = np.repeat(np.geomspace(1e7, 1e10, 6), 5)
    d = np.tile(np.geomspace(1e9, 1e12, 5), 6)
    return n, d, noisy(laws.chinchilla(n, d, **EPOCH), sigma, seed)


def test_power_law_recovers_kaplan_l_of_n_within_ci():
    n = np.geomspace(1e6, 1e10, 12)
    loss = noisy(laws.power_law(n, 8.8e13, 0.076), 0.005)
    fit = laws.fit_power_law(n, loss, n_boot=200)
    assert_within_ci(fit, {"alpha": 0.076, "x_c": 8.8e13})
    assert fit.ci["alpha"][1] - fit.ci["alpha"][0] < 0.01  # the interval is informative, not just wide


def test_power_offset_recovers_irreducible_loss_within_ci():
    n = np.geomspace(1e5, 1e8, 10)
    loss = noisy(laws.power_offset(n, 1.7, 3e4, 0.34), 0.003, seed=1)
    fit = laws.fit_power_offset(n, loss, n_boot=100)
    assert_within_ci(fit, {"e": 1.7, "x_c": 3e4, "alpha": 0.34})
    lo, hi = fit.predict_interval(3e8)  # extrapolation band contains the true value
    assert lo <= laws.power_offset(3e8, 1.7, 3e4, 0.34) <= hi


def test_kaplan_nd_recovers_equation_1_5_within_ci():
    n = np.repeat(np.geomspace(1e6, 1e9, 5), 5)
    d = np.tile(np.geomspace(1e8, 1e11, 5), 5)
    truth = {"n_c": 8.8e13, "d_c": 5.4e13, "alpha_n": 0.076, "alpha_d": 0.095}
    fit = laws.fit_kaplan_nd(n, d, noisy(laws.kaplan_nd(n, d, **truth), 0.003, seed=2), n_boot=60)
    assert_within_ci(fit, {"alpha_n": 0.076, "alpha_d": 0.095})
    assert abs(np.log(fit.params["n_c"] / 8.8e13)) < 3 and abs(np.log(fit.params["d_c"] / 5.4e13)) < 3


def test_pareto_frontier_matches_brute_force_and_compute_law_recovers_alpha_c():
    rng = np.random.default_rng(3)
    c, loss = rng.uniform(1e15, 1e20, 60), rng.uniform(2.0, 4.0, 60)
    brute = sorted(i for i in range(60) if not np.any((c < c[i]) & (loss <= loss[i])))
    assert sorted(laws.pareto_frontier(c, loss)) == brute
    # frontier of curves: the envelope follows L(C) = (C_c/C)^0.05; points above it must be ignored
    frontier_c = np.geomspace(1e15, 1e21, 10)
    envelope = noisy(laws.power_law(frontier_c, 3.1e8, 0.05), 0.002, seed=4)
    above = np.concatenate([envelope * 1.05, envelope * 1.2])
    fit = laws.fit_compute_law(np.tile(frontier_c, 3), np.concatenate([envelope, above]), n_boot=100)
    assert fit.info["frontier_points"] == 10
    assert_within_ci(fit, {"alpha": 0.05})


@pytest.fixture(scope="module")
def chinchilla_fit():
    n, d, loss = chinchilla_table()
    return laws.fit_chinchilla(n, d, loss, top_k=16, n_boot=30)


def test_chinchilla_approach_3_recovers_published_fit_within_ci(chinchilla_fit):
    assert_within_ci(chinchilla_fit, EPOCH)
    assert chinchilla_fit.info["starts_reaching_best"] >= 2  # the optimum is not a lucky single start


def test_chinchilla_fit_is_insensitive_to_the_initialisation_grid(chinchilla_fit):
    n, d, loss = chinchilla_table()
    other_grid = {"e": (0.2, 1.2), "a": (2.0, 9.0), "b": (3.0, 11.0), "alpha": (0.2, 0.9), "beta": (0.25, 1.3)}
    other = laws.fit_chinchilla(n, d, loss, grid=other_grid, top_k=None, n_boot=0)
    for name, value in chinchilla_fit.params.items():
        assert other.params[name] == pytest.approx(value, rel=1e-3), name


def test_huber_gradient_matches_finite_differences():
    n, d, loss = chinchilla_table(sigma=0.05)
    args = (np.log(n), np.log(d), np.log(loss), 1e-3)
    theta = np.array([0.5, 6.0, 7.5, 0.33, 0.39])
    numeric = optimize.approx_fprime(theta, lambda t: laws.huber_objective(t, *args)[0], 1e-7)
    np.testing.assert_allclose(laws.huber_objective(theta, *args)[1], numeric, rtol=1e-4, atol=1e-3)


def test_compute_optimal_allocation_matches_numeric_minimiser():
    for c in (1e18, 1e21, CHINCHILLA_COMPUTE):
        alloc = laws.chinchilla_optimal(EPOCH, c)
        res = optimize.minimize_scalar(lambda ln, c=c: laws.chinchilla(np.exp(ln), c / (6 * np.exp(ln)), **EPOCH),
                                       bounds=(np.log(1e3), np.log(1e14)), method="bounded",
                                       options={"xatol": 1e-10})
        assert alloc.n == pytest.approx(np.exp(res.x), rel=1e-4)
        assert alloc.n * alloc.d * 6 == pytest.approx(c)


def test_optimum_on_a_measured_flops_grid_is_the_closed_form_when_flops_are_6n():
    sizes = np.geomspace(1e9, 1e12, 7)  # brackets the optimum at 1e22 FLOPs (~3e10 parameters)
    n_opt, inside = laws.optimal_n_at_compute(EPOCH, 1e22, sizes, 6 * sizes, points=20001)
    assert inside and n_opt == pytest.approx(laws.chinchilla_optimal(EPOCH, 1e22).n, rel=1e-3)
    # FLOPs/token growing slower than N (a vocabulary projection's share) moves the optimum to larger N
    assert laws.optimal_n_at_compute(EPOCH, 1e22, sizes, 6 * sizes + 6e10)[0] > n_opt
    assert laws.optimal_n_at_compute(EPOCH, 1e26, sizes, 6 * sizes) == (pytest.approx(1e12), False)  # not bracketed


# A small family's FLOPs per token: 6 per non-embedding parameter plus a vocabulary projection and attention
# share that grows more slowly (on the isoflop_cpu sweep grid they are 14-20x N, not 6x).
SMALL_FAMILY = laws.FlopsPerToken(k=6.0, g=3e3, q=0.45)


def _true_optimum(compute, flops_per_token, n_low=1e2, n_high=1e9):
    """(N*, D*) minimising the Chinchilla law at real compute C = FLOPs/token(N)·D, by a bounded 1-D search."""
    loss = lambda ln: laws.chinchilla(np.exp(ln), compute / flops_per_token(np.exp(ln)), **EPOCH)  # noqa: E731
    res = optimize.minimize_scalar(loss, bounds=(np.log(n_low), np.log(n_high)), method="bounded",
                                   options={"xatol": 1e-10})
    return float(np.exp(res.x)), float(compute / flops_per_token(np.exp(res.x)))


def test_isoflop_d_opt_is_what_the_profiles_runs_train_at_n_opt_not_c_over_6n():
    budgets = (1e11, 1e12, 1e13, 1e14)
    rows = []
    for c in budgets:
        n_star = _true_optimum(c, SMALL_FAMILY)[0]
        for n in n_star * np.geomspace(0.5, 2.0, 7):
            rows.append((n, c / SMALL_FAMILY(n), c))
    n, d, c = np.array(rows).T
    fit = laws.fit_isoflop(n, d, laws.chinchilla(n, d, **EPOCH), compute=c, n_boot=20)
    truth = np.array([_true_optimum(b, SMALL_FAMILY) for b in budgets])
    np.testing.assert_allclose(fit.n_opt, truth[:, 0], rtol=0.03)
    np.testing.assert_allclose(fit.d_law.predict(fit.budgets), truth[:, 1], rtol=0.05)
    b_true = np.polyfit(np.log(budgets), np.log(truth[:, 1]), 1)[0]
    assert fit.b == pytest.approx(b_true, abs=0.01)
    assert abs(fit.b - (1 - fit.a)) > 0.03  # D_opt = C / (6 N_opt) would force b = 1 - a


def test_flops_per_token_law_is_recovered_and_prices_budgets_past_the_grid():
    sizes = np.geomspace(1e4, 1e6, 5)
    fitted = laws.fit_flops_per_token(sizes, SMALL_FAMILY(sizes))
    assert (fitted.k, fitted.g, fitted.q) == (6.0, pytest.approx(3e3), pytest.approx(0.45))
    assert laws.fit_flops_per_token(sizes, 6 * sizes) == laws.FlopsPerToken(6.0, 0.0, 1.0)  # nothing beyond 6N
    target = 1e15  # 10x past the grid's largest run at 1e8 tokens
    alloc, inside = laws.optimal_allocation(EPOCH, target, fitted, 1e2, 1e10, points=20001)
    n_true, d_true = _true_optimum(target, SMALL_FAMILY)
    assert inside and alloc.n == pytest.approx(n_true, rel=2e-3) and alloc.d == pytest.approx(d_true, rel=2e-3)
    assert SMALL_FAMILY(alloc.n) * alloc.d == pytest.approx(target)  # spends the budget as the runs count it
    closed = laws.chinchilla_optimal(EPOCH, target)  # C = 6ND: would cost far more than the budget
    assert SMALL_FAMILY(closed.n) * closed.d > 1.1 * target


def test_profile_minimum_intervals_cover_the_true_minimum_of_noisy_profiles():
    n = np.geomspace(1e3, 1e6, 10)  # decades: only the window around the lowest point is parabolic enough
    true = 3e4
    loss = 2.0 + 0.05 * np.log(n / true) ** 2
    rng = np.random.default_rng(3)
    found = [laws.profile_minimum(n, loss + rng.normal(0, 0.01, 10), n_boot=200, seed=i) for i in range(40)]
    assert all(lo <= best <= hi and n[1] <= lo and hi <= n[-2] for best, lo, hi in found)
    coverage = np.mean([lo <= true <= hi for _, lo, hi in found])
    assert 0.8 <= coverage <= 1.0, coverage  # a 95% interval, from 40 noisy profiles
    assert laws.profile_minimum(n, -loss) is None  # a profile with a maximum has no optimum


def test_fitted_law_reproduces_chinchilla_allocation(chinchilla_fit):
    published = laws.chinchilla_optimal(EPOCH, CHINCHILLA_COMPUTE)
    # the published fit itself lands near the Chinchilla model (70B params, 1.4T tokens, ~20 tokens/param)
    assert 70e9 / 1.5 < published.n < 70e9 * 1.5 and 1.4e12 / 1.5 < published.d < 1.4e12 * 1.5
    fitted = laws.chinchilla_optimal(chinchilla_fit.params, CHINCHILLA_COMPUTE)
    boot = np.array([laws.chinchilla_optimal(dict(zip(chinchilla_fit.params, row, strict=True)),
                                             CHINCHILLA_COMPUTE).tokens_per_param
                     for row in chinchilla_fit.samples])
    lo, hi = np.quantile(boot, [0.025, 0.975])
    assert lo <= published.tokens_per_param <= hi
    assert fitted.tokens_per_param == pytest.approx(published.tokens_per_param, rel=0.5)


def test_isoflop_profiles_recover_the_closed_form_exponent():
    rows = []
    for c in (1e18, 1e19, 1e20, 1e21):
        n_star = laws.chinchilla_optimal(EPOCH, c).n
        for n in n_star * np.geomspace(0.2, 5.0, 7):
            rows.append((n, c / (6 * n)))
    n, d = np.array(rows).T
    fit = laws.fit_isoflop(n, d, noisy(laws.chinchilla(n, d, **EPOCH), 0.001, seed=5), n_boot=100)
    closed_a = EPOCH["beta"] / (EPOCH["alpha"] + EPOCH["beta"])
    assert len(fit.budgets) == 4
    assert fit.a == pytest.approx(closed_a, abs=0.03)
    lo, hi = sorted(-np.array(fit.n_law.ci["alpha"]))
    assert lo - 0.01 <= closed_a <= hi + 0.01
    np.testing.assert_allclose(fit.n_opt, laws.chinchilla_optimal(EPOCH, fit.budgets).n, rtol=0.15)


def test_bad_tables_fail_with_one_line_errors():
    with pytest.raises(DataError, match="different lengths"):
        laws.fit_power_law([1, 2, 3], [1, 2])
    with pytest.raises(DataError, match="finite positive"):
        laws.fit_power_law([1, 2, -3], [3, 2, 1])
    with pytest.raises(DataError, match="at least 5 rows"):
        laws.fit_chinchilla([1e6, 1e7], [1e9, 1e9], [3, 2])
    with pytest.raises(DataError, match="usable compute budget"):
        laws.fit_isoflop(np.geomspace(1e6, 1e8, 6), np.full(6, 1e9), np.linspace(3, 2, 6))


def test_fit_command_fits_a_published_style_csv_table(tmp_path, capsys):
    from scaling_jax.cli import main

    n = np.geomspace(1e6, 1e10, 8)
    loss = noisy(laws.power_law(n, 8.8e13, 0.076), 0.002, seed=6)
    table = tmp_path / "kaplan.csv"
    table.write_text("N,Loss\n" + "".join(f"{a},{b}\n" for a, b in zip(n, loss, strict=True)))
    assert main(["fit", str(table), "--law", "kaplan_n", "--bootstrap", "50"]) == 0
    out = capsys.readouterr().out
    direct = laws.fit_table({"n": n, "LOSS": loss}, "kaplan_n", n_boot=0)
    assert f"alpha = {direct.params['alpha']:.6g}" in out
    assert main(["fit", str(table), "--law", "chinchilla"]) == 2  # no D column: one-line error
    assert "lacks d" in capsys.readouterr().err


def test_seed_stats_match_scipys_t_interval_of_the_mean():
    from scipy import stats

    for values in ([2.51, 2.47, 2.55], [3.0, 3.2], [1.9, 2.0, 2.05, 2.2, 1.95]):
        v = np.array(values)
        got = laws.seed_stats(v)
        lo, hi = stats.t.interval(0.95, len(v) - 1, loc=np.mean(v), scale=stats.sem(v))
        assert got.n == len(v) and got.mean == pytest.approx(np.mean(v))
        assert got.interval == pytest.approx((lo, hi), rel=1e-12)
        assert (got.min, got.max) == (v.min(), v.max())
    # two seeds, closed form: half-width = t(0.975, 1) * |a - b| / 2 with t(0.975, 1) = 12.7062...
    assert laws.seed_stats([3.0, 3.2]).half_width == pytest.approx(12.706204736 * 0.1, rel=1e-9)
    assert laws.seed_stats([2.0, 2.2], level=0.5).half_width == pytest.approx(0.1, rel=1e-9)  # t(0.75, 1) = 1
    one = laws.seed_stats([2.5])
    assert one.n == 1 and one.mean == 2.5 and np.isnan(one.half_width)  # one seed: no interval is known
    with pytest.raises(DataError, match="at least one finite value"):
        laws.seed_stats([])


def test_compute_frontier_of_seeded_points_keeps_every_seed_of_a_frontier_point():
    rng = np.random.default_rng(7)
    points, seeds = 20, 3
    c = np.repeat(rng.uniform(1e15, 1e20, points), seeds)
    loss = np.repeat(rng.uniform(2.0, 4.0, points), seeds) + rng.normal(0.0, 0.2, points * seeds)
    groups = np.repeat([f"p{i}" for i in range(points)], seeds)
    mean_c, mean_l = c[::seeds], loss.reshape(points, seeds).mean(axis=1)
    brute = [g for g in range(points) if not np.any((mean_c < mean_c[g]) & (mean_l <= mean_l[g]))]
    rows = laws.pareto_frontier(c, loss, groups=groups)
    assert sorted(rows) == [g * seeds + s for g in brute for s in range(seeds)]
    assert np.all(np.diff(c[rows]) >= 0)
    # a row-wise frontier would keep a single (the luckiest) seed per compute instead
    assert len(laws.pareto_frontier(c, loss)) < len(rows)
    fit = laws.fit_compute_law(c, loss, n_boot=0, groups=groups)
    assert fit.info["frontier_points"] == len(brute) and fit.info["frontier_rows"] == len(brute) * seeds


def test_tables_that_cannot_separate_n_from_d_or_do_not_fall_are_refused():
    """A fixed token count or a fixed D/N leaves one Chinchilla exponent free (the fit printed 'tight' intervals
    around a = 489.9 and 5.4 tokens/parameter for data drawn at 92.6); equal losses fit x_c = inf."""
    n = np.geomspace(1e7, 1e10, 8)
    for d in (np.full(8, 1e11), 20 * n):
        with pytest.raises(DataError, match="N, D and tokens per parameter D/N each vary"):
            laws.fit_chinchilla(n, d, laws.chinchilla(n, d, **EPOCH), n_boot=0)
    flat = np.full(8, 2.5)
    for fit in (lambda: laws.fit_power_law(n, flat), lambda: laws.fit_power_offset(n, flat),
                lambda: laws.fit_kaplan_nd(n, n[::-1] * 100, flat), lambda: laws.fit_chinchilla(n, n[::-1], flat)):
        with pytest.raises(DataError, match="every loss in the table is the same value"):
            fit()


def test_chinchilla_exponents_stay_nonnegative_and_an_undetermined_split_is_refused():
    """Losses that depend on D only: the fitted α was -1e-5 and the allocation a complex-number traceback."""
    n, d = np.meshgrid(np.geomspace(1e7, 1e10, 5), np.geomspace(1e9, 1e12, 5))
    n, d = n.ravel(), d.ravel()
    loss = noisy(1.7 + 410.7 / d**0.28, 0.003, seed=3)
    fit = laws.fit_chinchilla(n, d, loss, n_boot=0)
    assert fit.params["alpha"] >= 0 and fit.params["beta"] == pytest.approx(0.28, abs=0.05)
    with pytest.raises(DataError, match="do not determine how to split compute"):
        laws.chinchilla_optimal({**fit.params, "alpha": min(fit.params["alpha"], 1e-4)}, 1e21)


def test_five_rows_give_chinchilla_no_bootstrap_interval():
    n, d, loss = (c[:: 6][:5] for c in chinchilla_table())
    assert len(laws.fit_chinchilla(n, d, loss, n_boot=20).samples) == 0  # every resample is an exact fit


def test_learning_curve_intervals_are_widened_by_students_t_over_few_runs():
    from scipy import stats

    from scaling_jax.scaling.learning_curves import PARAMS, CurveFit

    rng = np.random.default_rng(0)
    params = {"n_c": 6.5e13, "alpha_n": 0.076, "s_c": 2.1e3, "alpha_s": 0.76}
    samples = np.array([[params[k] * np.exp(0.1 * rng.normal()) for k in PARAMS] for _ in range(400)])
    plain, six = CurveFit(params, samples), CurveFit(params, samples, runs=6)
    factor = stats.t.ppf(0.975, 5) / stats.norm.ppf(0.975)
    for k in PARAMS:
        (lo, hi), (lo6, hi6) = plain.ci[k], six.ci[k]
        to = np.log if k in ("n_c", "s_c") else float
        assert to(params[k]) - to(lo6) == pytest.approx(factor * (to(params[k]) - to(lo)))
        assert to(hi6) - to(params[k]) == pytest.approx(factor * (to(hi) - to(params[k])))
