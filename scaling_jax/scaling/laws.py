"""Scaling-law fits on plain tables: Kaplan power laws, Chinchilla approaches 2 and 3, compute-optimal sizes.

Every fitter takes numpy-convertible columns (so published tables fit as easily as our runs) and returns a
``Fit``: point estimates, bootstrap refits (rows resampled with replacement) and percentile confidence
intervals, plus ``predict`` / ``predict_interval`` for extrapolation. Law forms and constants:

- Kaplan et al. 2020: L(N)=(N_c/N)^α_N, L(D)=(D_c/D)^α_D, L(C_min)=(C_c/C)^α_C, and eq. 1.5
  L(N,D)=[(N_c/N)^(α_N/α_D)+D_c/D]^α_D.
- Hoffmann et al. 2022 (Chinchilla) approach 3: L=E+A/N^α+B/D^β fitted by minimising the Huber loss
  (δ=1e-3) of log L with L-BFGS from a grid of initialisations; approach 2: IsoFLOP parabolas.
- ``power_offset`` L=E+(X_c/X)^α adds the irreducible loss to a one-variable law (what a short extrapolation
  of small models needs: their log-log curve bends toward E).

Repeated runs (a sweep's ``seeds``) enter a fit as rows of their own, one per (size, seed): the bootstrap then
resamples runs, so the seed-to-seed scatter shows in the intervals instead of being averaged away first.
``seed_stats`` summarises one grid point over its seeds (mean and Student-t interval) for reports.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import optimize, special  # t and normal quantiles; scipy.stats costs ~0.4 s more to import
from threadpoolctl import threadpool_limits

from scaling_jax.errors import DataError

CHINCHILLA_DELTA = 1e-3
# Hoffmann et al.'s initialisation grid over (e=log E, a=log A, b=log B, α, β).
CHINCHILLA_GRID: dict[str, Sequence[float]] = {
    "e": (-1.0, -0.5, 0.0, 0.5, 1.0),
    "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
    "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
}


# ---------------------------------------------------------------------------------------------- law forms


def power_law(x, x_c, alpha):
    """Kaplan's one-variable law (X_c/X)^α (X = N, D or C_min)."""
    return (x_c / x) ** alpha


def power_offset(x, e, x_c, alpha):
    """E + (X_c/X)^α: a power law approaching an irreducible loss E."""
    return e + (x_c / x) ** alpha


def kaplan_nd(n, d, n_c, d_c, alpha_n, alpha_d):
    """Kaplan et al. eq. 1.5: L(N, D) = [(N_c/N)^(α_N/α_D) + D_c/D]^α_D."""
    return ((n_c / n) ** (alpha_n / alpha_d) + d_c / d) ** alpha_d


def chinchilla(n, d, e, a, b, alpha, beta):
    """Hoffmann et al. approach 3: L(N, D) = E + A/N^α + B/D^β."""
    return e + a / n**alpha + b / d**beta


# The problems here have 2-5 parameters: BLAS threads only add overhead, and on a busy machine OpenBLAS's
# spinning threads made each L-BFGS-B iteration ~10x slower (measured). Every public fitter runs single-threaded.
single_thread_blas = threadpool_limits.wrap(limits=1, user_api="blas")

LAWS: dict[str, Callable] = {"power": power_law, "power_offset": power_offset, "kaplan_nd": kaplan_nd,
                             "chinchilla": chinchilla}


# ---------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Fit:
    """A fitted law: ``params`` (point estimate), ``samples`` (bootstrap refits, one row each, columns in
    ``params`` order) and the confidence ``level`` of the percentile intervals."""

    law: str
    params: dict[str, float]
    samples: np.ndarray
    level: float = 0.95
    info: dict = field(default_factory=dict)

    def predict(self, *x) -> np.ndarray:
        return LAWS[self.law](*(np.asarray(v, float) for v in x), **self.params)

    def _quantiles(self) -> tuple[float, float]:
        tail = (1.0 - self.level) / 2
        return tail, 1.0 - tail

    @property
    def ci(self) -> dict[str, tuple[float, float]]:
        """Percentile bootstrap interval of every parameter (NaN without refits: no interval is known)."""
        if len(self.samples) == 0:
            return {k: (math.nan, math.nan) for k in self.params}
        lo, hi = np.quantile(self.samples, self._quantiles(), axis=0)
        return {k: (float(lo[i]), float(hi[i])) for i, k in enumerate(self.params)}

    def predict_interval(self, *x) -> tuple[np.ndarray, np.ndarray]:
        """Percentile band of the prediction over the bootstrap refits (the band at an extrapolated x)."""
        if len(self.samples) == 0:
            nan = np.full(np.shape(self.predict(*x)), np.nan)
            return nan, nan
        xs = [np.asarray(v, float) for v in x]
        preds = np.stack([LAWS[self.law](*xs, **dict(zip(self.params, row, strict=True))) for row in self.samples])
        lo, hi = np.quantile(preds, self._quantiles(), axis=0)
        return lo, hi

    def to_dict(self) -> dict:
        return {"law": self.law, "params": dict(self.params), "ci": {k: list(v) for k, v in self.ci.items()},
                "level": self.level, "bootstrap": len(self.samples), **self.info}


# ---------------------------------------------------------------------------------------------- helpers


def columns(*cols, names: Sequence[str], min_rows: int) -> list[np.ndarray]:
    """Float columns of equal length, finite and positive (logs are taken), at least ``min_rows`` long."""
    arrays = [np.asarray(c, float).ravel() for c in cols]
    if len({len(a) for a in arrays}) != 1:
        raise DataError(f"columns {', '.join(names)} have different lengths {[len(a) for a in arrays]}; "
                        "pass one value per run in each")
    if len(arrays[0]) < min_rows:
        raise DataError(f"this fit needs at least {min_rows} rows of ({', '.join(names)}), got {len(arrays[0])}; "
                        "add runs or use a law with fewer parameters")
    for name, a in zip(names, arrays, strict=True):
        if not np.all(np.isfinite(a) & (a > 0)):
            raise DataError(f"column {name} must hold finite positive numbers (logs are taken); drop bad rows")
    return arrays


def require_varying_loss(loss: np.ndarray) -> None:
    """Every law here explains how loss falls: equal losses fit any scale with exponent ~0 (an x_c of inf)."""
    if np.ptp(np.log(loss)) == 0:
        raise DataError("every loss in the table is the same value, so no law can be fitted; check the loss column")


def nd_vary_independently(n: np.ndarray, d: np.ndarray, min_log_spread: float = 0.1) -> bool:
    """Whether approach 3 can separate the N and D terms: N, D and D/N must each vary (a fixed token count or
    a fixed ratio D/N leaves one exponent free, and the fit returns confident nonsense)."""
    n, d = np.asarray(n, float), np.asarray(d, float)
    return min(np.ptp(np.log(n)), np.ptp(np.log(d)), np.ptp(np.log(d / n))) > min_log_spread


def bootstrap(refit: Callable[[np.ndarray], np.ndarray | None], n_rows: int, n_boot: int,
              seed: int = 0) -> np.ndarray:
    """Refit on ``n_boot`` resamples of row indices; failed or non-finite refits are dropped."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_boot):
        params = refit(rng.integers(0, n_rows, n_rows))
        if params is not None and np.all(np.isfinite(params)):
            out.append(np.asarray(params, float))
    return np.array(out) if out else np.empty((0, 0))


def t_widening(dof: int, level: float) -> float:
    """Student's t over the normal quantile at ``level`` for ``dof`` degrees of freedom (1 below one): how much
    wider an interval resting on a few independent units must be than a normal-theory or percentile one."""
    if dof < 1:
        return 1.0
    q = 0.5 + level / 2
    return float(special.stdtrit(dof, q) / special.ndtri(q))


def widened(point: float, low: float, high: float, factor: float) -> tuple[float, float]:
    """``[low, high]`` stretched about ``point`` by ``factor`` on each side (the point stays inside)."""
    return point - factor * max(point - low, 0.0), point + factor * max(high - point, 0.0)


def log_linear(x: np.ndarray, y: np.ndarray) -> tuple[float, float] | None:
    """(slope, intercept) of log y against log x by least squares; None if x has one distinct value."""
    lx = np.log(x)
    if np.ptp(lx) == 0:
        return None
    slope, intercept = np.polyfit(lx, np.log(y), 1)
    return float(slope), float(intercept)


def _estimate(cols: tuple, names: tuple[str, ...], min_rows: int, estimate: Callable, refit: Callable,
              message: str, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Checked columns -> the point estimate (``message`` as a DataError if there is none) and bootstrap refits
    ``refit(point, *resampled_columns)``."""
    arrays = columns(*cols, names=names, min_rows=min_rows)
    require_varying_loss(arrays[-1])
    point = estimate(*arrays)
    if point is None or not np.all(np.isfinite(point)):
        raise DataError(message)
    if len(arrays[0]) <= len(point):  # every resample is fitted exactly: the refits say nothing about the error
        n_boot = 0
    return point, bootstrap(lambda i: refit(point, *(a[i] for a in arrays)), len(arrays[0]), n_boot, seed)


# ---------------------------------------------------------------------------------------------- Kaplan


def _power_params(x: np.ndarray, y: np.ndarray) -> np.ndarray | None:
    line = log_linear(x, y)
    if line is None or not abs(line[0]) > 1e-9:  # no slope (a float zero is rarely exactly 0): no law
        return None
    alpha = -line[0]
    with np.errstate(over="ignore"):  # a degenerate resample can overflow; bootstrap drops non-finite refits
        return np.array([np.exp(line[1] / alpha), alpha])


@single_thread_blas
def fit_power_law(x, loss, n_boot: int = 200, level: float = 0.95, seed: int = 0) -> Fit:
    """Kaplan's L(X) = (X_c/X)^α, a straight line in log-log space (exact least squares on log L)."""
    point, samples = _estimate((x, loss), ("x", "loss"), 2, _power_params, lambda p, *cols: _power_params(*cols),
                               "fit_power_law needs at least two distinct x values", n_boot, seed)
    return Fit("power", {"x_c": float(point[0]), "alpha": float(point[1])}, samples, level)


def _log_residual_fit(fun: Callable, starts: Sequence[np.ndarray], bounds) -> np.ndarray | None:
    """Least squares on log-loss residuals from several starts; the best converged solution."""
    best, best_cost = None, np.inf
    for start in starts:
        try:
            res = optimize.least_squares(fun, start, bounds=bounds, method="trf", x_scale="jac",
                                         xtol=1e-10, ftol=1e-10, gtol=1e-10, max_nfev=500)
        except ValueError:  # a start outside the bounds or a non-finite residual at the start
            continue
        if np.isfinite(res.cost) and res.cost < best_cost:
            best, best_cost = res.x, res.cost
    return best


def _power_offset_params(x: np.ndarray, y: np.ndarray, starts: list | None = None) -> np.ndarray | None:
    """(E, log X_c, α) minimising squared log residuals. Default starts come from profiling E: for fixed E the
    law is a line in log(y − E), so each grid value of E gives a closed-form start; the two best are polished."""
    if np.ptp(np.log(x)) == 0:
        return None
    lx, ly = np.log(x), np.log(y)
    fun = lambda p: np.log(p[0] + np.exp(p[2] * (p[1] - lx))) - ly  # noqa: E731
    if starts is None:
        starts = []
        for frac in (0.0, 0.3, 0.6, 0.8, 0.9, 0.95, 0.98):
            p = _power_params(x, y - frac * y.min())
            if p is not None and p[1] > 0:
                starts.append(np.array([frac * y.min(), np.log(p[0]), p[1]]))
        starts = sorted(starts, key=lambda p: float(np.sum(fun(p) ** 2)))[:2]
    return _log_residual_fit(fun, starts, ([0.0, -np.inf, 1e-6], [y.min() * (1 - 1e-9), np.inf, 10.0]))


@single_thread_blas
def fit_power_offset(x, loss, n_boot: int = 200, level: float = 0.95, seed: int = 0) -> Fit:
    """L(X) = E + (X_c/X)^α with an irreducible loss E in [0, min L)."""
    def refit(p, xs, ys):  # from the point estimate, E nudged below the resample's smallest loss
        return _power_offset_params(xs, ys, [np.minimum(p, [ys.min() * 0.999, np.inf, np.inf])])

    point, samples = _estimate((x, loss), ("x", "loss"), 3, _power_offset_params, refit,
                               "fit_power_offset needs at least two distinct x values and a decreasing loss",
                               n_boot, seed)
    if len(samples):
        samples[:, 1] = np.exp(samples[:, 1])
    return Fit("power_offset", {"e": float(point[0]), "x_c": float(np.exp(point[1])), "alpha": float(point[2])},
               samples, level)


def _kaplan_nd_params(n: np.ndarray, d: np.ndarray, y: np.ndarray, starts: list | None = None) -> np.ndarray | None:
    """(log N_c, log D_c, α_N, α_D) by least squares on log L, started from a small grid."""
    if np.ptp(np.log(n)) == 0 or np.ptp(np.log(d)) == 0:
        return None
    ln, ld, ly = np.log(n), np.log(d), np.log(y)

    def fun(p):
        lnc, ldc, an, ad = p
        inner = np.logaddexp((an / ad) * (lnc - ln), ldc - ld)
        return ad * inner - ly

    if starts is None:
        starts = [np.array([ln.max() + s, ld.max() + s, a, a]) for s in (0.0, 5.0, 15.0) for a in (0.05, 0.2, 0.5)]
    return _log_residual_fit(fun, starts, ([-np.inf, -np.inf, 1e-4, 1e-4], [np.inf, np.inf, 5.0, 5.0]))


@single_thread_blas
def fit_kaplan_nd(n, d, loss, n_boot: int = 200, level: float = 0.95, seed: int = 0) -> Fit:
    """Kaplan et al. eq. 1.5 L(N, D) on runs that vary both N and D."""
    def to_params(p):
        return np.array([np.exp(p[0]), np.exp(p[1]), p[2], p[3]])

    def refit(p, *cols) -> np.ndarray | None:
        q = _kaplan_nd_params(*cols, [p])
        return None if q is None else to_params(q)

    point, samples = _estimate((n, d, loss), ("N", "D", "loss"), 5, _kaplan_nd_params, refit,
                               "fit_kaplan_nd needs runs at several N and several D", n_boot, seed)
    return Fit("kaplan_nd", dict(zip(("n_c", "d_c", "alpha_n", "alpha_d"), map(float, to_params(point)), strict=True)),
               samples, level)


def pareto_frontier(compute, loss, groups=None) -> np.ndarray:
    """Indices of the compute-efficient frontier (no other point has less compute and lower loss), sorted by
    compute: the C_min points Kaplan's L(C_min) is fitted to.

    ``groups`` (one label per row, e.g. the grid point of each seed's run): the frontier is taken over the
    groups' mean compute and mean loss, and every row of a frontier group is returned, so a point's seeds
    enter together (a row-wise frontier would keep only the luckiest seed of each compute)."""
    compute, loss = np.asarray(compute, float), np.asarray(loss, float)
    if groups is None:
        keep, best = [], np.inf
        for i in np.lexsort((loss, compute)):
            if loss[i] < best:
                keep.append(i)
                best = loss[i]
        return np.array(keep, dtype=int)
    labels = np.asarray(groups, dtype=object).ravel()
    if len(labels) != len(compute):
        raise DataError(f"groups has {len(labels)} labels for {len(compute)} rows; pass one label per row")
    members = [np.flatnonzero(labels == g) for g in dict.fromkeys(labels.tolist())]
    frontier = pareto_frontier([compute[m].mean() for m in members], [loss[m].mean() for m in members])
    rows = np.concatenate([members[g] for g in frontier])
    return rows[np.argsort(compute[rows], kind="stable")]


@single_thread_blas
def fit_compute_law(compute, loss, n_boot: int = 200, level: float = 0.95, seed: int = 0, groups=None) -> Fit:
    """Kaplan's L(C_min) = (C_c/C)^α_C on the compute-efficient frontier of (C, L) points; with ``groups``
    (see ``pareto_frontier``) every seed of a frontier point is a row of the fit."""
    compute, loss = columns(compute, loss, names=("C", "loss"), min_rows=2)
    idx = pareto_frontier(compute, loss, groups)
    points = len(idx) if groups is None else len(set(np.asarray(groups, dtype=object).ravel()[idx].tolist()))
    fit = fit_power_law(compute[idx], loss[idx], n_boot, level, seed)
    return Fit(fit.law, fit.params, fit.samples, level, {"frontier_points": points, "frontier_rows": len(idx)})


# ---------------------------------------------------------------------------------------------- seeds


@dataclass(frozen=True)
class SeedStats:
    """One grid point's final losses over its seeds: the mean and the Student-t interval of that mean,
    mean ± t_{(1+level)/2, n-1} · s / √n (s: sample standard deviation). NaN half-width for one seed."""

    mean: float
    half_width: float
    n: int
    std: float
    min: float
    max: float
    level: float = 0.95

    @property
    def interval(self) -> tuple[float, float]:
        return self.mean - self.half_width, self.mean + self.half_width


def seed_stats(values, level: float = 0.95) -> SeedStats:
    """Mean and ``level`` t-interval of repeated measurements (the seeds of one sweep point)."""
    v = np.asarray(values, float).ravel()
    if v.size == 0 or not np.all(np.isfinite(v)):
        raise DataError(f"seed_stats needs at least one finite value, got {v.tolist()}")
    if not 0.0 < level < 1.0:
        raise DataError(f"level={level} must be in (0, 1)")
    mean, n = float(v.mean()), int(v.size)
    if n == 1:
        return SeedStats(mean, math.nan, 1, math.nan, mean, mean, level)
    std = float(v.std(ddof=1))
    half = float(special.stdtrit(n - 1, 0.5 + level / 2)) * std / math.sqrt(n)
    return SeedStats(mean, half, n, std, float(v.min()), float(v.max()), level)


# ---------------------------------------------------------------------------------------------- Chinchilla (3)

_CH_ORDER = ("e", "a", "b", "alpha", "beta")  # optimisation vector: log E, log A, log B, α, β
MIN_EXPONENT = 1e-3  # below it N_opt runs to a parameter or to infinity: the data do not constrain the split


def huber_objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray,
                    delta: float = CHINCHILLA_DELTA) -> tuple[float, np.ndarray]:
    """Sum of Huber(log L̂ − log L) / δ and its gradient, with log L̂ = LSE(a − α log N, b − β log D, e).

    Dividing by δ does not move the minimum but keeps the objective O(|r|) so L-BFGS's tolerances mean
    something when every residual is below δ.
    """
    e, a, b, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    top = terms.max(axis=0)
    lse = top + np.log(np.exp(terms - top).sum(axis=0))
    r = lse - log_l
    small = np.abs(r) <= delta
    value = np.where(small, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta)).sum() / delta
    dr = np.clip(r, -delta, delta) / delta
    w = np.exp(terms - lse) * dr  # softmax weights times dHuber/dr
    grad = np.array([w[2].sum(), w[0].sum(), w[1].sum(), -(w[0] * log_n).sum(), -(w[1] * log_d).sum()])
    return float(value), grad


# α, β >= 0: a negative exponent says loss grows with N or D, and chinchilla_optimal has no minimiser for it
_CH_BOUNDS = [(None, None)] * 3 + [(0.0, None)] * 2


def _lbfgs(theta0: np.ndarray, args: tuple) -> optimize.OptimizeResult:
    return optimize.minimize(huber_objective, theta0, args=args, jac=True, method="L-BFGS-B", bounds=_CH_BOUNDS,
                             options={"maxiter": 1000, "ftol": 1e-13, "gtol": 1e-9})


def grid_points(grid: dict[str, Sequence[float]]) -> np.ndarray:
    """Cartesian product of a grid dict (keys e, a, b, alpha, beta) as rows of optimisation vectors."""
    missing = set(_CH_ORDER) - set(grid)
    if missing:
        raise DataError(f"initialisation grid lacks {', '.join(sorted(missing))}; give values for {_CH_ORDER}")
    return np.array(list(itertools.product(*(grid[k] for k in _CH_ORDER))), float)


def _chinchilla_solve(starts: np.ndarray, args: tuple) -> tuple[np.ndarray, float, list[np.ndarray]]:
    """L-BFGS from every start; returns the best optimum, its objective and all optima sorted by objective."""
    results = []
    for theta0 in starts:
        res = _lbfgs(theta0, args)
        if np.isfinite(res.fun) and np.all(np.isfinite(res.x)):
            results.append((float(res.fun), res.x))
    if not results:
        raise DataError("Chinchilla fit failed from every initialisation; check that the losses are sensible")
    results.sort(key=lambda t: t[0])
    return results[0][1], results[0][0], [x for _, x in results]


def _to_natural(theta: np.ndarray) -> np.ndarray:
    e, a, b, alpha, beta = theta
    return np.array([np.exp(e), np.exp(a), np.exp(b), alpha, beta])


@single_thread_blas
def fit_chinchilla(n, d, loss, delta: float = CHINCHILLA_DELTA, grid: dict | None = None, top_k: int | None = 32,
                   n_boot: int = 100, level: float = 0.95, seed: int = 0) -> Fit:
    """Chinchilla approach 3: Huber(δ) on log loss, L-BFGS from a grid of initialisations (Hoffmann's grid by
    default), the best local optimum wins.

    ``top_k`` runs L-BFGS only from the k grid points with the lowest starting objective (None: from all
    4,500 of Hoffmann's grid, ~100x slower). Each bootstrap refit starts from the point estimate and the next
    best distinct optimum of the full fit, which is what makes 100 refits affordable.
    """
    n, d, loss = columns(n, d, loss, names=("N", "D", "loss"), min_rows=5)
    require_varying_loss(loss)
    if not nd_vary_independently(n, d):
        raise DataError("approach 3 needs runs whose N, D and tokens per parameter D/N each vary (a fixed token "
                        "count or a fixed D/N leaves an exponent undetermined); add runs off that line, or fit "
                        "kaplan_n / kaplan_d")
    if len(n) <= len(_CH_ORDER):  # five rows fit five parameters exactly: resamples say nothing about the error
        n_boot = 0
    args = (np.log(n), np.log(d), np.log(loss), delta)
    starts = grid_points(grid or CHINCHILLA_GRID)
    if top_k is not None and top_k < len(starts):
        start_values = np.array([huber_objective(t, *args)[0] for t in starts])
        starts = starts[np.argsort(start_values, kind="stable")[:top_k]]
    best, best_value, optima = _chinchilla_solve(starts, args)
    distinct = [best]
    for x in optima[1:]:
        if len(distinct) == 2:
            break
        if all(np.max(np.abs(x - y)) > 1e-3 for y in distinct):
            distinct.append(x)
    reached = sum(huber_objective(x, *args)[0] <= best_value + 1e-9 * max(1.0, abs(best_value)) for x in optima)

    def refit(idx: np.ndarray) -> np.ndarray | None:
        sub = (args[0][idx], args[1][idx], args[2][idx], delta)
        try:
            return _to_natural(_chinchilla_solve(np.array(distinct), sub)[0])
        except DataError:
            return None

    samples = bootstrap(refit, len(n), n_boot, seed)
    params = dict(zip(("e", "a", "b", "alpha", "beta"), map(float, _to_natural(best)), strict=True))
    return Fit("chinchilla", params, samples, level,
               {"objective": best_value, "starts": len(starts), "starts_reaching_best": int(reached)})


# ---------------------------------------------------------------------------------------------- compute-optimal


@dataclass(frozen=True)
class Allocation:
    compute: np.ndarray
    n: np.ndarray
    d: np.ndarray

    @property
    def tokens_per_param(self) -> np.ndarray:
        return self.d / self.n


def chinchilla_optimal(params: dict[str, float], compute, flops_per_param_token: float = 6.0) -> Allocation:
    """Closed-form minimiser of E + A/N^α + B/D^β subject to C = k·N·D (Hoffmann et al. eq. 4):
    N_opt = G (C/k)^(β/(α+β)), D_opt = G^-1 (C/k)^(α/(α+β)), G = (αA / (βB))^(1/(α+β))."""
    a, b, alpha, beta = params["a"], params["b"], params["alpha"], params["beta"]
    if not (min(alpha, beta) >= MIN_EXPONENT and math.isfinite(alpha + beta)):
        raise DataError(f"the fitted exponents (alpha={alpha:.3g}, beta={beta:.3g}) do not determine how to split "
                        f"compute between N and D (each must be >= {MIN_EXPONENT}): the losses barely depend on one "
                        "of them; add runs that vary it")
    c = np.asarray(compute, float)
    g = (alpha * a / (beta * b)) ** (1.0 / (alpha + beta))
    scaled = c / flops_per_param_token
    return Allocation(c, g * scaled ** (beta / (alpha + beta)), scaled ** (alpha / (alpha + beta)) / g)


def optimal_allocation(params: dict[str, float], compute: float, flops_per_token: Callable[[np.ndarray], np.ndarray],
                       n_low: float, n_high: float, points: int = 2001) -> tuple[Allocation, bool]:
    """Approach 3's loss-minimising (N, D) at a real compute C = FLOPs/token(N) · D, searched over log N in
    [``n_low``, ``n_high``]: for model families whose FLOPs per token are not 6N (a tiny model spends most of them
    on the vocabulary projection, so C = 6ND would misplace every budget). Returns the allocation and whether its
    N lies inside the range (False at an edge: the range does not bracket the optimum)."""
    grid = np.exp(np.linspace(math.log(n_low), math.log(n_high), points))
    tokens = compute / flops_per_token(grid)
    best = int(np.argmin(chinchilla(grid, tokens, **params)))
    return Allocation(np.asarray(float(compute)), grid[best], tokens[best]), 0 < best < points - 1


def optimal_n_at_compute(params: dict[str, float], compute: float, n, flops_per_token,
                         points: int = 2001) -> tuple[float, bool]:
    """``optimal_allocation`` inside a grid of sizes ``n`` with measured ``flops_per_token``, interpolated log-log
    between sizes. Returns (N_opt, inside), ``inside`` False when the budget's optimum is not bracketed."""
    ln, lf = np.log(np.asarray(n, float)), np.log(np.asarray(flops_per_token, float))
    order = np.argsort(ln)
    alloc, inside = optimal_allocation(params, compute, lambda x: np.exp(np.interp(np.log(x), ln[order], lf[order])),
                                       float(np.exp(ln.min())), float(np.exp(ln.max())), points)
    return float(alloc.n), inside


@dataclass(frozen=True)
class FlopsPerToken:
    """Training FLOPs per token of a model family as k·N + g·N^q (``fit_flops_per_token``)."""

    k: float
    g: float
    q: float

    def __call__(self, n):
        n = np.asarray(n, float)
        return self.k * n + self.g * n ** self.q


def fit_flops_per_token(n, flops_per_token, k: float = 6.0) -> FlopsPerToken:
    """Every non-embedding parameter costs ``k`` = 6 FLOPs per token (its matmul forward and backward); what runs
    spend beyond that (the vocabulary projection, attention scores) grows more slowly with N and is fitted as
    g·N^q on their measured FLOPs per token, so that a budget beyond the grid's sizes can be priced. Where the
    runs spend no more than k·N (another parameter count), FLOPs per token are taken as their median multiple of N."""
    n, f = columns(n, flops_per_token, names=("N", "FLOPs per token"), min_rows=1)
    extra = f - k * n
    if len(np.unique(n)) >= 2 and np.all(extra > 0):
        q, log_g = np.polyfit(np.log(n), np.log(extra), 1)
        return FlopsPerToken(k, float(np.exp(log_g)), float(q))
    return FlopsPerToken(float(np.median(f / n)), 0.0, 1.0)


def optimal_n_interval(fit: Fit, compute: float, n, flops_per_token) -> tuple[float, float, float]:
    """``optimal_n_at_compute`` of a Chinchilla fit with the percentile interval over its bootstrap refits."""
    best = optimal_n_at_compute(fit.params, compute, n, flops_per_token)[0]
    draws = [optimal_n_at_compute(dict(zip(fit.params, row, strict=True)), compute, n, flops_per_token)[0]
             for row in fit.samples]
    if not draws:
        return best, math.nan, math.nan
    lo, hi = np.quantile(draws, fit._quantiles())
    return best, float(lo), float(hi)


# ---------------------------------------------------------------------------------------------- IsoFLOP (2)


@dataclass(frozen=True)
class IsoFlopFit:
    """Approach 2: per compute budget, the N minimising a parabola in log N; then N_opt ∝ C^a, D_opt ∝ C^b."""

    budgets: np.ndarray  # compute of each IsoFLOP profile
    n_opt: np.ndarray  # the parabola's minimum per profile
    loss_opt: np.ndarray
    n_law: Fit  # N_opt(C) = (C / x_c)^(-alpha)... stored as a power law in C: fit of N_opt vs C
    d_law: Fit

    @property
    def a(self) -> float:
        """Exponent of N_opt ∝ C^a (Hoffmann: ≈ 0.5)."""
        return -self.n_law.params["alpha"]

    @property
    def b(self) -> float:
        return -self.d_law.params["alpha"]

    def optimal(self, compute) -> Allocation:
        c = np.asarray(compute, float)
        return Allocation(c, self.n_law.predict(c), self.d_law.predict(c))


def isoflop_groups(compute, rel_tol: float = 0.05) -> list[np.ndarray]:
    """Indices grouped by compute budget: consecutive sorted values within ``rel_tol`` (relative) belong together."""
    c = np.asarray(compute, float)
    order = np.argsort(c)
    groups: list[list[int]] = []
    for i in order:
        if groups and c[i] <= c[groups[-1][0]] * (1 + rel_tol):
            groups[-1].append(int(i))
        else:
            groups.append([int(i)])
    return [np.array(g) for g in groups]


def _parabola_minimum(n: np.ndarray, loss: np.ndarray) -> tuple[float, float] | None:
    """(N at the minimum, loss there) of a parabola in log N; None unless it opens upward inside the data."""
    ln = np.log(n)
    if len(np.unique(ln)) < 3:
        return None
    c2, c1, c0 = np.polyfit(ln, loss, 2)
    if c2 <= 0:
        return None
    x = -c1 / (2 * c2)
    if not ln.min() <= x <= ln.max():
        return None
    return float(np.exp(x)), float(c0 + c1 * x + c2 * x * x)


def _minimum_in_window(ln: np.ndarray, loss: np.ndarray) -> float:
    """N of a parabola's minimum in log N, clipped to the window; a downward parabola's lower end."""
    c2, c1, _ = np.polyfit(ln, loss, 2)
    if c2 <= 0:
        return float(np.exp(ln[0] if loss[0] <= loss[-1] else ln[-1]))
    return float(np.exp(np.clip(-c1 / (2 * c2), ln.min(), ln.max())))


def profile_minimum(n, loss, window: int = 5, n_boot: int = 200, level: float = 0.95,
                    seed: int = 0) -> tuple[float, float, float] | None:
    """Approach 2 on one IsoFLOP profile, with an interval: a parabola in log N through the ``window`` sizes
    nearest the profile's lowest loss (over a grid spanning decades a profile is not a parabola), its minimum
    N, and the percentile interval of that minimum over residual-bootstrap refits (residuals scaled by
    sqrt(k/(k-3)) for the three fitted coefficients; a refit whose minimum leaves the window counts at the
    window's edge it leaves by), widened in log N by t(k-3)/normal quantiles: with 5 points and 2 degrees of
    freedom the plain bootstrap interval covered the true minimum of noisy test profiles only 75% of the
    time. None when the parabola does not open upward inside the window."""
    order = np.argsort(np.asarray(n, float))
    n, loss = np.asarray(n, float)[order], np.asarray(loss, float)[order]
    k = min(window, len(n))
    start = int(np.clip(np.argmin(loss) - k // 2, 0, len(n) - k))
    n, loss = n[start:start + k], loss[start:start + k]
    found = _parabola_minimum(n, loss)
    if found is None or k <= 3:
        return None
    ln = np.log(n)
    fitted = np.polyval(np.polyfit(ln, loss, 2), ln)
    residuals = (loss - fitted) * math.sqrt(k / (k - 3))
    rng = np.random.default_rng(seed)
    draws = np.log([_minimum_in_window(ln, fitted + rng.choice(residuals, size=k)) for _ in range(n_boot)])
    tail = (1.0 - level) / 2
    best = math.log(found[0])
    lo, hi = widened(best, *np.quantile(draws, [tail, 1.0 - tail]), t_widening(k - 3, level))  # few points: t
    return found[0], float(np.exp(max(lo, ln.min()))), float(np.exp(min(hi, ln.max())))


@single_thread_blas
def fit_isoflop(n, d, loss, compute=None, flops_per_param_token: float = 6.0, rel_tol: float = 0.05,
                n_boot: int = 200, level: float = 0.95, seed: int = 0) -> IsoFlopFit:
    """IsoFLOP profiles from runs at a few fixed compute budgets (``compute`` defaults to k·N·D).

    Budgets need ≥ 3 sizes whose parabola has its minimum inside the sampled range; ≥ 2 such budgets fit
    the exponents. D_opt is the token count the profile's own runs train at N_opt (log D interpolated in
    log N), not C / (k·N_opt): with measured compute a small model spends most FLOPs per token outside its
    non-embedding parameters (the vocabulary projection, attention), so k·N·D would overstate D and tie the
    exponent b to 1 - a whatever the data say."""
    n, d, loss = columns(n, d, loss, names=("N", "D", "loss"), min_rows=6)
    c = flops_per_param_token * n * d if compute is None else columns(compute, names=("C",), min_rows=1)[0]
    budgets, n_opt, d_opt, l_opt = [], [], [], []
    for idx in isoflop_groups(c, rel_tol):
        found = _parabola_minimum(n[idx], loss[idx])
        if found is not None:
            budgets.append(float(np.exp(np.log(c[idx]).mean())))
            n_opt.append(found[0])
            order = np.argsort(n[idx])
            d_opt.append(float(np.exp(np.interp(np.log(found[0]), np.log(n[idx][order]), np.log(d[idx][order])))))
            l_opt.append(found[1])
    if len(budgets) < 2:
        raise DataError(f"IsoFLOP fit found {len(budgets)} usable compute budget(s); need >= 2 budgets, each with "
                        ">= 3 sizes bracketing the loss minimum")
    budgets_a, n_a = np.array(budgets), np.array(n_opt)
    return IsoFlopFit(budgets_a, n_a, np.array(l_opt), fit_power_law(budgets_a, n_a, n_boot, level, seed),
                      fit_power_law(budgets_a, np.array(d_opt), n_boot, level, seed))


# ---------------------------------------------------------------------------------------------- tables

TABLE_FITS: dict[str, tuple[Callable, tuple[str, ...]]] = {  # law -> (fitter, columns it reads)
    "kaplan_n": (fit_power_law, ("n", "loss")),
    "kaplan_d": (fit_power_law, ("d", "loss")),
    "kaplan_c": (fit_compute_law, ("c", "loss")),
    "offset_n": (fit_power_offset, ("n", "loss")),
    "kaplan_nd": (fit_kaplan_nd, ("n", "d", "loss")),
    "chinchilla": (fit_chinchilla, ("n", "d", "loss")),
}


def fit_table(table: dict[str, Sequence[float]], law: str, **kwargs) -> Fit:
    """Fit a named law to a table of columns; column names are case-insensitive (N, D, C, loss)."""
    if law not in TABLE_FITS:
        raise DataError(f"law '{law}' is unknown; choose one of {', '.join(TABLE_FITS)}")
    fitter, needed = TABLE_FITS[law]
    cols = {k.strip().lower(): v for k, v in table.items()}
    missing = [c for c in needed if c not in cols]
    if missing:
        raise DataError(f"law {law} needs columns {', '.join(needed)}; the table lacks {', '.join(missing)} "
                        f"(its columns: {', '.join(table) or 'none'})")
    return fitter(*(cols[c] for c in needed), **kwargs)
