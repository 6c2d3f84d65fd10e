"""PassUntil (Hu et al. 2023, arXiv 2310.03262): pass probabilities far below what greedy accuracy
can resolve, and the task scaling law log(-log PU) = a log N + b that extrapolates them.

Instance level: sample until the r-th pass (capped at ``max_samples``). This is inverse binomial
sampling; for r >= 2 the estimate (r-1)/(K-1) at the r-th pass on trial K, and s/M when the cap M
is reached first with s < r passes, is exactly unbiased for this plan (Girshick, Mosteller and
Savage 1946: paths from the first success over all paths to the stopping point). With r = 1 no
useful unbiased estimate exists (it would be 1 if the first draw passes, else 0), so r = 1 reports
the maximum-likelihood 1/K, which overestimates small p; use r >= 2 for unbiased PU. Intervals
are exact: beta quantiles of the negative binomial when stopped by passes, Clopper-Pearson when
stopped by the cap.

Instances too hard to sample (no pass within the cap) fall back to the loss-based estimate: the
probability of the exact target string under teacher forcing, a lower bound on the chance that a
temperature-1 sample passes.

Task level: PU is the mean of the instance PUs. Across a model series the task law is fitted by
weighted least squares in (log N, log(-log PU)) with a coefficient covariance, so a prediction
at a larger N comes with an interval; the instance-level fit (each instance its own law, then
the mean of the predictions) follows the paper's treatment of heterogeneous instances.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import special  # quantiles as special functions: scipy.stats costs ~0.8 s more to import

TINY = 1e-300  # floor for probabilities so log(-log PU) stays finite


# ----------------------------------------------------------------------------- instance level


def sample_until(draw: Callable[[int], Sequence[bool]], passes: int, max_samples: int,
                 batch: int = 32) -> tuple[int, int]:
    """``(successes, trials)``: draws are taken in batches (for throughput) but counted in order and
    cut at the ``passes``-th success, so the result is that of one-at-a-time inverse sampling."""
    if passes < 1 or max_samples < 1:
        raise ValueError(f"need passes >= 1 and max_samples >= 1, got {passes}, {max_samples}")
    successes = trials = 0
    while trials < max_samples:
        k = min(batch, max_samples - trials)
        for ok in list(draw(k))[:k]:
            trials += 1
            successes += bool(ok)
            if successes >= passes:
                return successes, trials
    return successes, trials


@dataclass
class InstancePU:
    p: float
    low: float
    high: float
    successes: int
    trials: int
    method: str  # "sampled" (passes observed) or "loss" (none within the cap: teacher-forced probability)
    loss_pu: float | None = None


def estimate_from_counts(successes: int, trials: int, passes: int, confidence: float = 0.95) -> InstancePU:
    """Point estimate and exact interval from ``sample_until``'s counts (see the module docstring)."""
    if not (trials >= 1 and 0 <= successes <= trials and passes >= 1):
        raise ValueError(f"PassUntil counts need trials >= 1, 0 <= successes <= trials and passes >= 1; got "
                         f"successes={successes}, trials={trials}, passes={passes}")
    alpha = 1.0 - confidence
    if successes >= passes:  # stopped by the r-th pass on trial `trials`
        r = passes
        p = (r - 1) / (trials - 1) if r >= 2 else 1.0 / trials
        low = float(special.betaincinv(r, trials - r + 1, alpha / 2))
        high = float(special.betaincinv(r, trials - r, 1 - alpha / 2)) if trials > r else 1.0
    else:  # stopped by the cap: a binomial count
        p = successes / trials
        low = float(special.betaincinv(successes, trials - successes + 1, alpha / 2)) if successes else 0.0
        high = float(special.betaincinv(successes + 1, trials - successes, 1 - alpha / 2)) \
            if successes < trials else 1.0
    return InstancePU(p, low, high, successes, trials, "sampled")


def loss_based_pu(target_logprobs: Sequence[float] | np.ndarray) -> float:
    """The probability of generating exactly the target: the product of its token probabilities."""
    return float(np.exp(np.sum(np.asarray(target_logprobs, np.float64))))


def instance_pu(successes: int, trials: int, passes: int, loss_pu: float | None = None,
                confidence: float = 0.95) -> InstancePU:
    """The sampled estimate, or the loss-based one when sampling saw no pass."""
    est = estimate_from_counts(successes, trials, passes, confidence)
    est.loss_pu = loss_pu
    if successes == 0 and loss_pu is not None:
        est.p, est.low, est.method = loss_pu, loss_pu, "loss"
        est.high = max(est.high, loss_pu)
    return est


@dataclass
class TaskPU:
    pu: float
    se: float  # over instances (includes each instance's estimation noise)
    low: float  # percentile bootstrap over instances: instance PUs span decades, a normal interval would go < 0
    high: float
    instances: int
    sampled: int  # instances with at least one observed pass
    loss_based: int

    def as_dict(self) -> dict:
        return asdict(self)


def bootstrap_mean_interval(values: np.ndarray, confidence: float = 0.95, resamples: int = 2000,
                            seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the mean, resampling ``values`` (instances) with replacement."""
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (resamples, len(values)))].mean(axis=1)
    low, high = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(low), float(high)


def task_pu(instances: Sequence[InstancePU], confidence: float = 0.95) -> TaskPU:
    p = np.array([i.p for i in instances], np.float64)
    se = float(p.std(ddof=1) / np.sqrt(len(p))) if len(p) > 1 else float("nan")
    low, high = bootstrap_mean_interval(p, confidence)
    return TaskPU(float(p.mean()), se, low, high, len(p),
                  sum(i.method == "sampled" for i in instances), sum(i.method == "loss" for i in instances))


# ----------------------------------------------------------------------------- scaling law


def log_neg_log(pu: np.ndarray | float) -> np.ndarray:
    pu = np.clip(np.asarray(pu, np.float64), TINY, 1 - 1e-15)
    return np.log(-np.log(pu))


def pu_from_log_neg_log(y: np.ndarray | float) -> np.ndarray:
    return np.exp(-np.exp(np.asarray(y, np.float64)))


@dataclass
class LawFit:
    """log(-log PU) = a log N + b, with the coefficients' covariance."""

    a: float
    b: float
    cov: np.ndarray  # 2x2 covariance of (a, b); NaN where the points cannot say (two sizes, no standard errors)
    dof: int  # residual degrees of freedom (points - 2)
    left_out: int = 0  # sizes whose PU is exactly 0 or 1, where log(-log PU) does not exist

    def predict(self, n: float, confidence: float = 0.95) -> tuple[float, float, float]:
        """``(PU, low, high)`` at ``n`` parameters; the interval comes from the coefficients' uncertainty."""
        x = np.array([np.log(n), 1.0])
        y = float(x @ np.array([self.a, self.b]))
        sd = float(np.sqrt(max(x @ self.cov @ x, 0.0)))
        q = special.stdtrit(self.dof, 0.5 + confidence / 2) if self.dof > 0 else special.ndtri(0.5 + confidence / 2)
        # PU falls as log(-log PU) rises, so the upper y bound is the lower PU bound.
        return float(pu_from_log_neg_log(y)), float(pu_from_log_neg_log(y + q * sd)), \
            float(pu_from_log_neg_log(y - q * sd))

    def as_dict(self) -> dict:
        return {"a": self.a, "b": self.b, "a_se": float(np.sqrt(self.cov[0, 0])),
                "b_se": float(np.sqrt(self.cov[1, 1])), "dof": self.dof, "left_out": self.left_out}


def fit_task_law(n_params: Sequence[float], pu: Sequence[float], pu_se: Sequence[float] | None = None) -> LawFit:
    """Weighted least squares of log(-log PU) on log N.

    With standard errors of PU, each point is weighted by its delta-method variance in the
    transformed space (sd_y = se / (PU |log PU|)) and the covariance is scaled up by the reduced
    chi-square when the points scatter more than their errors say; without, ordinary least squares. Sizes whose
    PU is exactly 0 or 1 are left out (``left_out``): log(-log PU) has no value there, and clipping it to a finite
    one (1e-300) set the slope (-1.09 with such a point among three, -0.18 without).
    """
    pu_arr = np.asarray(pu, np.float64)
    inside = (pu_arr > 0) & (pu_arr < 1)
    x = np.log(np.asarray(n_params, np.float64))[inside]
    pu_arr = pu_arr[inside]
    y = log_neg_log(pu_arr)
    if len(x) < 2 or np.ptp(x) == 0:
        raise ValueError(f"fitting the task law needs at least two model sizes with 0 < PU < 1; got {len(x)} "
                         f"({int((~inside).sum())} left out at PU 0 or 1)")
    design = np.stack([x, np.ones_like(x)], axis=1)
    if pu_se is not None:
        p = pu_arr
        sd = np.asarray(pu_se, np.float64)[inside] / (p * np.abs(np.log(p)))
        usable = np.isfinite(sd) & (sd > 0)  # a PU with no spread gets the least weight of the others
        sd = np.where(usable, sd, sd[usable].max() if usable.any() else 1.0)
        w = 1.0 / sd ** 2
    else:
        w = np.ones_like(x)
    xtwx = design.T @ (design * w[:, None])
    coef = np.linalg.solve(xtwx, design.T @ (w * y))
    resid = y - design @ coef
    dof = len(x) - 2
    cov = np.linalg.inv(xtwx)
    if pu_se is None:  # two points and no errors: a line through both says nothing about its own uncertainty
        cov = cov * (float(resid @ resid) / dof if dof > 0 else np.nan)
    elif dof > 0:
        cov = cov * max(1.0, float((w * resid ** 2).sum()) / dof)
    return LawFit(float(coef[0]), float(coef[1]), cov, dof, int((~inside).sum()))


@dataclass
class InstanceFit:
    """Each instance's own law; the task prediction is the mean of the instances' predictions."""

    slopes: np.ndarray
    intercepts: np.ndarray

    def predict(self, n: float) -> np.ndarray:
        return pu_from_log_neg_log(self.slopes * np.log(n) + self.intercepts)


def fit_instance_laws(n_params: Sequence[float], pu: np.ndarray) -> InstanceFit:
    """``pu``: ``[models, instances]``. An instance whose PU is 1 at some sizes is fitted on the others;
    one left with fewer than two usable sizes takes the task-level slope through its mean point."""
    x = np.log(np.asarray(n_params, np.float64))
    pu = np.asarray(pu, np.float64)
    try:
        shared = fit_task_law(n_params, pu.mean(axis=1)).a
    except ValueError:  # the task's PU is 0 or 1 at all but one size: no shared trend to lend
        shared = 0.0
    slopes, intercepts = np.empty(pu.shape[1]), np.empty(pu.shape[1])
    for i in range(pu.shape[1]):
        ok = pu[:, i] < 1 - 1e-12
        y = log_neg_log(pu[ok, i])
        if ok.sum() >= 2 and np.ptp(x[ok]) > 0:
            slopes[i], intercepts[i] = np.polyfit(x[ok], y, 1)
        elif ok.any():
            slopes[i], intercepts[i] = shared, float(np.mean(y - shared * x[ok]))
        else:
            slopes[i], intercepts[i] = 0.0, -np.inf  # always passes: PU = exp(-exp(-inf)) = 1
    return InstanceFit(slopes, intercepts)


def predict_instance_level(n_params: Sequence[float], pu: np.ndarray, n_target: float, confidence: float = 0.95,
                           bootstrap: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """``(PU, low, high)`` at ``n_target`` from instance-level fits; the interval resamples instances."""
    per_instance = fit_instance_laws(n_params, pu).predict(n_target)
    low, high = bootstrap_mean_interval(per_instance, confidence, bootstrap, seed)
    return float(per_instance.mean()), low, high
