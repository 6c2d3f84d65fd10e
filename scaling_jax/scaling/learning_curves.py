"""Learning curves across a sweep: Kaplan et al. 2020 eq. 1.6 fitted jointly over runs, and a leave-one-out test.

L(N, S) = (N_c/N)^α_N + (S_c/S)^α_S is fitted by least squares on log loss to every finished run's smoothed
training-loss curve (S = steps, or S_min of eq. 5.4 with ``use_s_min``), with percentile bootstrap intervals
that resample runs (the points of one curve are not independent: a run that is off is off at every step).

``predict_from_prefix`` asks whether the law earns its keep: for each run it fits the law on the other runs'
full curves plus this run's first ``prefix`` of steps and predicts its final loss, next to the one-run
projection (``train.projection``) from the same prefix. The measured final loss is the mean *training* loss
over the last ``FINAL_SHARE`` of the run's steps (what the law is fitted to; the final validation loss of the
manifest would add the generalisation gap). Kaplan's law describes runs at a nearly constant learning rate:
a cosine decay lowers the loss at the end below both predictions, a bias reports must show.

Runs are read with the report's reader (``plots.load_runs``: the manifest, each run's ``metrics.jsonl``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from scaling_jax.errors import DataError
from scaling_jax.scaling import laws
from scaling_jax.scaling.plots import RunRecord, load_runs
from scaling_jax.train.projection import (
    ALPHA_N,
    ALPHA_S,
    ALPHA_S_BOUNDS,
    LEVEL,
    BatchLaw,
    Projection,
    after_burn_in,
    best_least_squares,
    bin_means,
    kaplan_ns,
    loss_at_step,
    project_final,
)

FINAL_SHARE = 0.05  # the measured final loss: mean training loss over this last share of the steps
BINS = 32  # smoothed points per curve in the joint fit
ALPHA_N_BOUNDS = (1e-3, 3.0)
PARAMS = ("n_c", "alpha_n", "s_c", "alpha_s")


# ---------------------------------------------------------------------------------------------- curves


@dataclass(frozen=True)
class Curve:
    """One finished run's per-step training loss, as the fits see it."""

    run_id: str
    n: float  # non-embedding parameters
    steps: int  # the run's last step
    step: np.ndarray
    loss: np.ndarray
    batch_tokens: float
    warmup: int  # the step the learning rate peaked at (0 without an lr column): the fits skip up to it
    lr_end_ratio: float  # final lr / peak lr: well below 1 means a decay the law does not describe

    def _final_window(self, share: float) -> np.ndarray:
        return self.step > (1.0 - share) * self.steps

    def measured_final(self, share: float = FINAL_SHARE) -> float:
        """Mean training loss over the last ``share`` of the steps (one step's loss is too noisy to test on)."""
        return float(self.loss[self._final_window(share)].mean())

    def final_step(self, share: float = FINAL_SHARE) -> float:
        """The mean step of that window: where predictions are evaluated, since the loss is still falling and
        the window's mean sits above the loss at its last step (by ~0.5% on a curve of 2,000 steps)."""
        return float(self.step[self._final_window(share)].mean())

    def batch(self, use_s_min: bool) -> BatchLaw | None:
        return BatchLaw(self.batch_tokens) if use_s_min else None

    def upto(self, fraction: float) -> tuple[np.ndarray, np.ndarray]:
        """The per-step points of the first ``fraction`` of the run."""
        keep = self.step <= fraction * self.steps
        return self.step[keep], self.loss[keep]


def _column(rows: list[dict], *keys: str) -> list[np.ndarray]:
    """Columns of the rows holding every key as a finite number (training rows for 'loss')."""
    picked = [r for r in rows if all(isinstance(r.get(k), (int, float)) and math.isfinite(r[k]) for k in keys)]
    return [np.array([r[k] for r in picked], float) for k in keys]


def curve_of(record: RunRecord) -> Curve | None:
    """A run's curve from its metrics rows; None when it logged too few training steps to have one."""
    step, loss, tokens = _column(record.rows, "step", "loss", "tokens")
    if len(step) < 2 or np.ptp(step) == 0:
        return None
    lr_step, lr = _column(record.rows, "step", "lr")
    peak = int(np.argmax(lr)) if len(lr) else 0
    return Curve(record.run_id, record.n, int(step.max()), step, loss,
                 float((tokens[-1] - tokens[0]) / (step[-1] - step[0])),
                 int(lr_step[peak]) if len(lr) else 0, float(lr[-1] / lr[peak]) if len(lr) and lr[peak] > 0 else 1.0)


def load_curves(sweep_dir: str, objective: str | None = None) -> list[Curve]:
    """The curves of a sweep's finished runs of one objective, in manifest order (a DataError if there are none).
    Training losses of different objectives (UL2's denoising loss, causal next-token loss) are not one law, so a
    sweep of several objectives needs ``objective``."""
    records = [r for r in load_runs([sweep_dir]) if r.status == "done" and r.n > 0]
    objectives = list(dict.fromkeys(r.objective for r in records))
    if objective is None and len(objectives) > 1:
        raise DataError(f"'{sweep_dir}' holds runs of objectives {', '.join(objectives)}, whose training losses "
                        "follow different laws; pass --objective with one of them")
    records = [r for r in records if objective is None or r.objective == objective]
    curves = [c for c in map(curve_of, records) if c is not None]
    if not curves:
        raise DataError(f"no finished runs with a training-loss curve in '{sweep_dir}'; finish some runs of the "
                        "sweep first")
    return curves


def curve_points(curve: Curve, fraction: float = 1.0, use_s_min: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(S or S_min, smoothed loss) of the first ``fraction`` of a run, past its warmup and burn-in."""
    step, loss = after_burn_in(*curve.upto(fraction), skip_until=curve.warmup)
    step, loss = bin_means(step, loss, BINS)
    batch = curve.batch(use_s_min)
    return (step if batch is None else batch.s_min(step, loss)), loss


# ---------------------------------------------------------------------------------------------- eq. 1.6

Group = tuple[float, np.ndarray, np.ndarray]  # (N, S or S_min, loss) of one run: the bootstrap's unit


@dataclass(frozen=True)
class CurveFit:
    """Eq. 1.6 fitted on several runs: ``params`` (N_c, α_N, S_c, α_S), bootstrap refits over runs in
    ``samples`` (one row each, ``PARAMS`` order) and whether S is S_min."""

    params: dict[str, float]
    samples: np.ndarray
    use_s_min: bool = False
    level: float = LEVEL
    runs: int = 0  # runs resampled by the bootstrap (0: unknown, intervals as the percentiles say)

    @property
    def widen(self) -> float:
        """t(runs-1)/normal quantile ratio: the percentile bootstrap over a handful of runs under-covers (eq. 1.6
        on 6 runs: 0.78-0.88 of 95% intervals held the truth over 100 simulated sweeps), as a mean of few values
        does without Student's t; ``laws.profile_minimum`` widens its interval the same way."""
        return laws.t_widening(self.runs - 1, self.level)

    @property
    def ci(self) -> dict[str, tuple[float, float]]:
        """Percentile interval of every parameter, widened by ``widen`` about the estimate (in log space for the
        positive scales N_c and S_c); NaN without refits."""
        if len(self.samples) == 0:
            return {k: (math.nan, math.nan) for k in PARAMS}
        lo, hi = np.quantile(self.samples, [(1 - self.level) / 2, (1 + self.level) / 2], axis=0)
        out = {}
        for i, k in enumerate(PARAMS):
            log = k in ("n_c", "s_c")
            to, back = (math.log, math.exp) if log else (float, float)
            low, high = laws.widened(to(self.params[k]), to(float(lo[i])), to(float(hi[i])), self.widen)
            out[k] = (back(low), back(high))
        return out

    def final_loss(self, curve: Curve, params: dict[str, float] | None = None) -> float:
        """The law's loss for ``curve``'s N at its ``final_step`` (through S_min's fixed point with ``use_s_min``)."""
        p = params or self.params
        law = lambda s: float(kaplan_ns(curve.n, s, **p))  # noqa: E731
        return loss_at_step(curve.final_step(), law, curve.batch(self.use_s_min), float(curve.loss[-1]))

    def final_interval(self, curve: Curve) -> tuple[float, float]:
        """Percentile band of ``final_loss`` over the bootstrap refits."""
        finals = [self.final_loss(curve, dict(zip(PARAMS, row, strict=True))) for row in self.samples]
        finals = np.array([f for f in finals if math.isfinite(f)])
        if len(finals) < 2:
            return math.nan, math.nan
        lo, hi = np.quantile(finals, [(1 - self.level) / 2, (1 + self.level) / 2])
        return laws.widened(self.final_loss(curve), float(lo), float(hi), self.widen)


def _residuals(p: np.ndarray, ln: np.ndarray, ls: np.ndarray, ly: np.ndarray) -> np.ndarray:
    """log[(N_c/N)^α_N + (S_c/S)^α_S] − log L for p = (log N_c, α_N, log S_c, α_S)."""
    return np.logaddexp(p[1] * (p[0] - ln), p[3] * (p[2] - ls)) - ly


def _starts(ln: np.ndarray, ls: np.ndarray, ly: np.ndarray) -> list[np.ndarray]:
    """Published and steeper exponents, each with N_c, S_c putting the N term near 70% of the median loss and
    the S term near 30% (where a curve past its burn-in sits)."""
    mid = float(np.median(ly))
    return [np.array([ln.mean() + (mid + math.log(0.7)) / a_n, a_n, ls.mean() + (mid + math.log(0.3)) / a_s, a_s])
            for a_n in (ALPHA_N, 0.3) for a_s in (ALPHA_S, 0.3)]


def _stack(groups: list[Group]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Log columns of all points of ``groups``."""
    return (np.log(np.concatenate([np.full(len(x), n) for n, x, _ in groups])),
            np.log(np.concatenate([x for _, x, _ in groups])), np.log(np.concatenate([y for _, _, y in groups])))


def _fit_groups(groups: list[Group], starts: list[np.ndarray] | None = None) -> np.ndarray | None:
    """(log N_c, α_N, log S_c, α_S) on the points of ``groups``; None without two distinct N or convergence."""
    ln, ls, ly = _stack(groups)
    if np.ptp(ln) == 0 or np.ptp(ls) == 0:
        return None
    bounds = ([-np.inf, ALPHA_N_BOUNDS[0], -np.inf, ALPHA_S_BOUNDS[0]],
              [np.inf, ALPHA_N_BOUNDS[1], np.inf, ALPHA_S_BOUNDS[1]])
    return best_least_squares(_residuals, starts or _starts(ln, ls, ly), (ln, ls, ly), bounds, max_nfev=500)


def _natural(p: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # a degenerate refit can overflow; the bootstrap drops non-finite rows
        return np.array([np.exp(p[0]), p[1], np.exp(p[2]), p[3]])


@laws.single_thread_blas
def fit_groups(groups: list[Group], use_s_min: bool = False, n_boot: int = 200, level: float = LEVEL,
               seed: int = 0) -> CurveFit:
    """Eq. 1.6 on runs' (N, S, loss) points, bootstrapped over runs (``laws.bootstrap`` resamples groups)."""
    point = _fit_groups(groups)
    if point is None:
        raise DataError("eq. 1.6 needs curves of at least two model sizes, and the fit must converge")
    refit = lambda i: None if (p := _fit_groups([groups[j] for j in i], [point])) is None else _natural(p)  # noqa: E731
    samples = laws.bootstrap(refit, len(groups), n_boot, seed)
    return CurveFit(dict(zip(PARAMS, map(float, _natural(point)), strict=True)), samples, use_s_min, level,
                    runs=len(groups))


def fit_curves(curves: list[Curve], use_s_min: bool = False, n_boot: int = 200, seed: int = 0) -> CurveFit:
    """Eq. 1.6 on the full curves of ``curves``."""
    return fit_groups([(c.n, *curve_points(c, 1.0, use_s_min)) for c in curves], use_s_min, n_boot, seed=seed)


# ---------------------------------------------------------------------------------------------- leave one out


@dataclass(frozen=True)
class PrefixPrediction:
    """One run's final loss: measured, predicted by eq. 1.6 fitted on the other runs plus this run's prefix,
    and projected from the prefix alone (each None when its fit failed)."""

    run_id: str
    n: float
    steps: int
    prefix_steps: int
    measured: float
    law: tuple[float, float, float] | None  # (loss, low, high)
    single: Projection | None
    lr_end_ratio: float

    def relative_error(self, value: float) -> float:
        """Signed: positive when the prediction is above the measurement."""
        return (value - self.measured) / self.measured

    def covers(self, low: float, high: float) -> bool:
        return low <= self.measured <= high


def _law_prediction(curves: list[Curve], i: int, prefix: float, use_s_min: bool, n_boot: int,
                    seed: int) -> tuple[float, float, float] | None:
    """Eq. 1.6 fitted on every curve but ``i`` in full and on ``i``'s prefix, evaluated at ``i``'s last step."""
    groups = [(c.n, *curve_points(c, prefix if j == i else 1.0, use_s_min)) for j, c in enumerate(curves)]
    groups = [g for g in groups if len(g[1])]
    try:
        fit = fit_groups(groups, use_s_min, n_boot, seed=seed)
    except DataError:
        return None
    loss = fit.final_loss(curves[i])
    return (loss, *fit.final_interval(curves[i])) if math.isfinite(loss) else None


def predict_from_prefix(curves: list[Curve], prefix: float = 0.25, use_s_min: bool = False, n_boot: int = 200,
                        seed: int = 0) -> list[PrefixPrediction]:
    """For every run: eq. 1.6 leave-one-out from its first ``prefix`` of steps, and the one-run projection."""
    out = []
    for i, c in enumerate(curves):
        step, loss = c.upto(prefix)
        single = project_final(step, loss, c.final_step(), skip_until=c.warmup, batch=c.batch(use_s_min), n_boot=n_boot,
                               seed=seed)
        out.append(PrefixPrediction(c.run_id, c.n, c.steps, int(step.max()) if len(step) else 0, c.measured_final(),
                                    _law_prediction(curves, i, prefix, use_s_min, n_boot, seed), single,
                                    c.lr_end_ratio))
    return out
