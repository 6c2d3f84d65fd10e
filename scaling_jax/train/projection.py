"""Learning-curve laws (Kaplan et al. 2020) and a projection of one run's final loss from its curve so far.

- eq. 5.4: S_min = S / (1 + B_crit(L)/B), B = tokens per batch, B_crit(L) = B*/L^(1/α_B): the steps the run
  would have needed at a batch far above the critical batch, so runs at different batch sizes share one curve.
- eq. 1.6: L(N, S_min) = (N_c/N)^α_N + (S_c/S_min)^α_S.
- One run: L(S) = L_inf + (S_c/S)^α_S, fitted on log loss to the points after a burn-in, extrapolated to the
  run's last step with a bootstrap interval over the points.

Pure numpy/scipy (no JAX) so the trainer can refit it between steps and scripts can import it cheaply. Kaplan
fitted these laws on runs with (after warmup) nearly constant learning rates: a cosine schedule's final decay
lowers the loss below what the law extrapolates from the early curve, so projections of such runs are biased
high, and that bias is part of what a report should show.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

# Kaplan et al. 2020, Table 3 / §5 (B* in tokens, losses in nats per token); N_c is the eq. 1.6 fit's value.
ALPHA_N = 0.076
N_C = 6.5e13
ALPHA_S = 0.76
S_C = 2.1e3
B_STAR = 2e8
ALPHA_B = 0.21

ALPHA_S_BOUNDS = (0.1, 2.0)  # outside this the one-run fit is chasing noise, not a learning curve
BURN_IN = 0.1  # share of the steps seen that the one-run fit leaves out
MIN_POINTS = 8  # fewer points after the burn-in: no projection (3 parameters need some redundancy)
LEVEL = 0.95


def s_min(steps, batch_tokens, loss, b_star: float = B_STAR, alpha_b: float = ALPHA_B) -> np.ndarray:
    """Eq. 5.4: the steps at a batch far above B_crit(L) that reach the loss ``steps`` reached at ``batch_tokens``."""
    b_crit = b_star / np.asarray(loss, float) ** (1.0 / alpha_b)
    return np.asarray(steps, float) / (1.0 + b_crit / np.asarray(batch_tokens, float))


def kaplan_ns(n, s_min, n_c: float = N_C, alpha_n: float = ALPHA_N, s_c: float = S_C,
              alpha_s: float = ALPHA_S) -> np.ndarray:
    """Eq. 1.6: L(N, S_min) = (N_c/N)^α_N + (S_c/S_min)^α_S, the loss of N parameters after S_min steps."""
    return (n_c / np.asarray(n, float)) ** alpha_n + (s_c / np.asarray(s_min, float)) ** alpha_s


@dataclass(frozen=True)
class BatchLaw:
    """How steps become S_min: the run's tokens per batch and the B_crit(L) law (Kaplan's values by default)."""

    batch_tokens: float
    b_star: float = B_STAR
    alpha_b: float = ALPHA_B

    def s_min(self, steps, loss) -> np.ndarray:
        return s_min(steps, self.batch_tokens, loss, self.b_star, self.alpha_b)


def loss_at_step(step: float, law_of_s: Callable[[float], float], batch: BatchLaw | None,
                 start_loss: float, iterations: int = 30) -> float:
    """The loss a law of S (or of S_min) gives at ``step``. With S_min the x depends on the loss it predicts
    (through B_crit(L)), so the fixed point L = law(S_min(step, L)) is iterated from ``start_loss``."""
    if batch is None:
        return float(law_of_s(step))
    loss = start_loss
    for _ in range(iterations):
        loss = float(law_of_s(float(batch.s_min(step, loss))))
        if not math.isfinite(loss) or loss <= 0:
            return math.nan
    return loss


# ---------------------------------------------------------------------------------------------- smoothing


def bin_means(steps: Sequence[float], loss: Sequence[float], bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean step and mean loss in ``bins`` bins of equal width in log step: per-step loss is noisy, and a fit over
    thousands of steps needs neither every step nor the cost of them. Equal in log step because a bin's mean
    lies above a convex curve by about its curvature times the bin's squared width: bins as wide as a fixed
    share of their step keep that bias the same small fraction everywhere (equal-count bins made the early,
    steep bins biased enough to move a fitted N_c outside its interval). Steps must be positive."""
    s, y = np.asarray(steps, float), np.asarray(loss, float)
    if len(s) <= bins:
        return s, y
    edges = np.geomspace(s.min(), s.max(), bins + 1)
    idx = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, bins - 1)
    counts = np.bincount(idx, minlength=bins)
    full = counts > 0
    return (np.bincount(idx, s, bins)[full] / counts[full]), (np.bincount(idx, y, bins)[full] / counts[full])


def after_burn_in(steps: np.ndarray, loss: np.ndarray, burn_in: float = BURN_IN,
                  skip_until: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Finite points past ``burn_in`` of the last step seen and past ``skip_until`` (the warmup's end)."""
    s, y = np.asarray(steps, float), np.asarray(loss, float)
    keep = np.isfinite(s) & np.isfinite(y) & (y > 0) & (s > 0)
    if keep.any():
        keep &= s > max(burn_in * s[keep].max(), skip_until)
    return s[keep], y[keep]


class LossHistory:
    """A bounded record of a run's training loss: every point is the mean of ``stride`` consecutive steps, and
    when ``max_points`` are held, neighbours are merged in pairs and the stride doubles. Memory and fit cost
    stay fixed however long the run, and the points stay evenly spread over it."""

    def __init__(self, max_points: int = 256) -> None:
        self.max_points = max_points - max_points % 2
        self.stride = 1
        self.points: list[tuple[float, float]] = []
        self._pending: list[tuple[float, float]] = []

    def add(self, step: int, loss: float) -> None:
        """Record one step; a non-finite loss (a skipped update) is left out."""
        if not math.isfinite(loss):
            return
        self._pending.append((float(step), float(loss)))
        if len(self._pending) >= self.stride:
            self.points.append(tuple(np.mean(self._pending, axis=0)))
            self._pending = []
        if len(self.points) >= self.max_points:
            self.points = [tuple(np.mean(self.points[i:i + 2], axis=0)) for i in range(0, len(self.points), 2)]
            self.stride *= 2

    def forget_after(self, step: int) -> None:
        """A rollback to ``step``: the steps past it will be trained again."""
        self.points = [p for p in self.points if p[0] <= step]
        self._pending = [p for p in self._pending if p[0] <= step]

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        pts = np.array(self.points, float).reshape(-1, 2)
        return pts[:, 0], pts[:, 1]


# ---------------------------------------------------------------------------------------------- one run


@dataclass(frozen=True)
class Projection:
    """A run's projected loss at ``final_step`` with its ``level`` bootstrap interval [low, high]."""

    final_step: float
    loss: float
    low: float
    high: float
    n_points: int

    def label(self) -> str:
        """What the progress bar shows: ``final≈2.345[2.301,2.398]``."""
        return f"final≈{self.loss:.3f}[{self.low:.3f},{self.high:.3f}]"

    def metrics(self) -> dict[str, float]:
        """The columns a metrics row gets."""
        return {"projected_final_loss": self.loss, "projected_final_loss_low": self.low,
                "projected_final_loss_high": self.high}


def _curve_residuals(p: np.ndarray, ls: np.ndarray, ly: np.ndarray) -> np.ndarray:
    """log(L_inf + exp(α(log S_c − log S))) − log L for p = (L_inf, log S_c, α)."""
    return np.log(p[0] + np.exp(p[2] * (p[1] - ls))) - ly


def _curve_starts(ls: np.ndarray, ly: np.ndarray) -> list[np.ndarray]:
    """Starts from profiling L_inf: for a fixed L_inf the law is a line in log(L − L_inf) against log S."""
    y, starts = np.exp(ly), []
    for frac in (0.0, 0.5, 0.8, 0.9, 0.95):
        slope, icpt = np.polyfit(ls, np.log(y - frac * y.min()), 1)
        alpha = float(np.clip(-slope, *ALPHA_S_BOUNDS))
        starts.append(np.array([frac * y.min(), icpt / alpha, alpha]))
    return starts


def best_least_squares(residuals: Callable, starts, args: tuple, bounds: tuple, max_nfev: int) -> np.ndarray | None:
    """The lowest-cost bounded least-squares solution over several starts (None if none converged): a curve
    law's loss surface has flat valleys where a single start stalls."""
    from scipy import optimize  # here, not at import: ~1 s of every trainer's start-up, and short runs never fit

    best, best_cost = None, np.inf
    for start in starts:
        try:
            res = optimize.least_squares(residuals, start, args=args, bounds=bounds, method="trf", x_scale="jac",
                                         xtol=1e-10, ftol=1e-10, gtol=1e-10, max_nfev=max_nfev)
        except ValueError:
            continue
        if np.isfinite(res.cost) and res.cost < best_cost:
            best, best_cost = res.x, res.cost
    return best


def _fit_curve(ls: np.ndarray, ly: np.ndarray, starts: list[np.ndarray]) -> np.ndarray | None:
    """(L_inf, log S_c, α_S) by least squares on log loss, L_inf in [0, min L), α_S in ALPHA_S_BOUNDS."""
    if np.ptp(ls) == 0:
        return None
    lower = [0.0, -np.inf, ALPHA_S_BOUNDS[0]]
    upper = [float(np.exp(ly.min())) * (1 - 1e-9), np.inf, ALPHA_S_BOUNDS[1]]
    clipped = [np.clip(x, [0.0, -np.inf, lower[2]], [upper[0] * (1 - 1e-6), np.inf, upper[2]]) for x in starts]
    return best_least_squares(_curve_residuals, clipped, (ls, ly), (lower, upper), max_nfev=200)


def _law(p: np.ndarray) -> Callable[[float], float]:
    return lambda s: float(p[0] + np.exp(p[2] * (p[1] - np.log(s))))


def project_final(steps: Sequence[float], loss: Sequence[float], final_step: float, *, burn_in: float = BURN_IN,
                  skip_until: float = 0.0, batch: BatchLaw | None = None, n_boot: int = 200,
                  min_points: int = MIN_POINTS, level: float = LEVEL, seed: int = 0) -> Projection | None:
    """Fit L = L_inf + (S_c/S)^α_S (on S_min with ``batch``) to one run's points and project its loss at
    ``final_step``, with a percentile bootstrap interval over resampled points; None if too few points remain
    after the burn-in or the fit fails.

    The burn-in (the first ``burn_in`` of the steps seen, and the warmup up to ``skip_until``) is left out:
    there the loss falls from ln(vocabulary) under a rising learning rate, which no power law in S describes,
    and those few steep points would pull α_S far more than the long tail that decides the extrapolation.
    It is a share of the steps seen, not a fixed count, so a live fit early in a run and one at its end
    drop the same part of what they see.
    """
    s, y = after_burn_in(np.asarray(steps, float), np.asarray(loss, float), burn_in, skip_until)
    if len(s) < min_points:
        return None
    x = s if batch is None else batch.s_min(s, y)
    ls, ly = np.log(x), np.log(y)
    point = _fit_curve(ls, ly, _curve_starts(ls, ly))
    if point is None:
        return None
    final = loss_at_step(final_step, _law(point), batch, float(y[-1]))
    boots = _bootstrap_finals(ls, ly, point, final_step, batch, float(y[-1]), n_boot, seed)
    if not math.isfinite(final) or len(boots) < 2:
        return None
    low, high = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2])
    return Projection(float(final_step), final, float(low), float(high), len(s))


def _bootstrap_finals(ls: np.ndarray, ly: np.ndarray, point: np.ndarray, final_step: float, batch: BatchLaw | None,
                      start_loss: float, n_boot: int, seed: int) -> np.ndarray:
    """Projected final losses of refits on resampled points (from the point estimate; failures dropped)."""
    rng, out = np.random.default_rng(seed), []
    for _ in range(n_boot):
        i = rng.integers(0, len(ls), len(ls))
        p = _fit_curve(ls[i], ly[i], [point])
        final = math.nan if p is None else loss_at_step(final_step, _law(p), batch, start_loss)
        if math.isfinite(final):
            out.append(final)
    return np.array(out)


# ---------------------------------------------------------------------------------------------- live


class LiveProjection:
    """The trainer's projection of its own final loss: it records every step's loss (bounded, ``LossHistory``)
    and refits from ``start`` of the run on, at most once per ``refit_every`` of the run and once per
    ``min_interval_s`` seconds, so a run pays for a few dozen small fits at most, never one per step (a short run
    whose steps take milliseconds would otherwise spend more time fitting than training). The first fit also
    waits ``min_interval_s`` from the projection's start: a fit holds the host for about a second, and a run
    (or a resumed piece of one) that ends within seconds is over before a projection could tell anyone
    anything. Each refit also waits until the last fit's duration is at most ``max_host_share`` of the time
    since it began, so a display never takes more than that share of the host from a run whose steps are
    fast. A failed fit clears the projection (nothing is shown rather than a stale number), and no error
    escapes: a progress display must never stop training. ``enabled=False`` makes every method a no-op, so
    callers need no ``if``."""

    def __init__(self, total_steps: int, skip_until: float = 0.0, start: float = 0.1, refit_every: float = 0.05,
                 min_interval_s: float = 10.0, max_host_share: float = 0.02, n_boot: int = 100,
                 max_points: int = 256, enabled: bool = True) -> None:
        self.total_steps = total_steps
        self.skip_until = skip_until
        self.first_fit = max(1, math.ceil(start * total_steps))
        self.refit_steps = max(1, math.ceil(refit_every * total_steps))
        self.min_interval_s = min_interval_s
        self.max_host_share = max_host_share
        self.n_boot = n_boot
        self.enabled = enabled
        self.history = LossHistory(max_points)
        self.last: Projection | None = None
        self._last_fit: tuple[int, float, float] | None = None  # (step, monotonic start, seconds) of the last refit
        self._started = time.monotonic()

    def _due(self, step: int) -> bool:
        """Past ``start`` of the run, before its end, and far enough (in steps and seconds) from the last refit
        (or, before the first, in seconds from the start)."""
        if step < self.first_fit or step >= self.total_steps:
            return False
        if self._last_fit is None:
            return time.monotonic() - self._started >= self.min_interval_s
        last_step, began, took = self._last_fit
        wait = max(self.min_interval_s, took / self.max_host_share)
        return step - last_step >= self.refit_steps and time.monotonic() - began >= wait

    def observe(self, step: int, loss: float) -> Projection | None:
        """Record ``step``'s loss; returns the projection refitted at this step, else None (not due, or failed)."""
        if not self.enabled:
            return None
        self.history.add(step, loss)
        if not self._due(step):
            return None
        steps, losses = self.history.arrays()
        if len(after_burn_in(steps, losses, skip_until=self.skip_until)[0]) < MIN_POINTS:
            return None  # too early to fit; costs nothing, so it does not count against the throttle
        began = time.monotonic()
        try:
            self.last = project_final(steps, losses, self.total_steps, skip_until=self.skip_until, n_boot=self.n_boot)
        except Exception:  # noqa: BLE001 - a numerical surprise in a display must not end a run
            self.last = None
        self._last_fit = (step, began, time.monotonic() - began)
        return self.last

    def resume(self, rows: list[dict]) -> None:
        """A resumed run's logged training losses (its metrics rows), so its projection need not wait for new ones."""
        if self.enabled:
            for row in rows:
                if "loss" in row:
                    self.history.add(row["step"], row["loss"])

    def forget_after(self, step: int) -> None:
        """A rollback to ``step``: its history past that step is dropped and the next due step refits."""
        self.history.forget_after(step)
        self._last_fit = None

    def label(self) -> str:
        """``final≈X.XXX[lo,hi]`` once a projection exists, else empty."""
        return self.last.label() if self.last is not None else ""
