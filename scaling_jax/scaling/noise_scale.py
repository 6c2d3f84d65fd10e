"""Gradient noise scale (McCandlish et al. 2018) and the critical batch size B_crit(L) (Kaplan et al. 2020).

For a mini-batch of B examples (here: target tokens) E|g_B|² = |G|² + tr(Σ)/B, where G is the true gradient and
Σ the per-example gradient covariance. Two batch sizes give unbiased estimates of both (McCandlish App. A.1):

    |G|²  = (B_big |g_big|² − B_small |g_small|²) / (B_big − B_small)
    tr(Σ) = (|g_small|² − |g_big|²) / (1/B_small − 1/B_big)

and the simple noise scale B_simple = tr(Σ)/|G|². Single-step values are noisy (the difference can even be
negative), so B_simple is the ratio of *averages* of the two estimates over a window of steps. In training
(``train.noise_scale``) the step computes its gradient as two half-batches (same FLOPs): each half is a
small-batch gradient and their token-weighted mean is the full-batch one (``train/noise.py``); this module
turns the logged measurements into B_simple series and B_crit(L) fits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from scaling_jax.errors import DataError
from scaling_jax.scaling.laws import Fit, fit_power_law
from scaling_jax.train.noise import KEYS, moments


def gradient_moments(g_small_sq, g_big_sq, b_small, b_big) -> tuple[np.ndarray, np.ndarray]:
    """Unbiased (|G|², tr Σ) from squared gradient norms measured at two batch sizes."""
    b_small, b_big = np.asarray(b_small, float), np.asarray(b_big, float)
    if np.any(b_big <= b_small):
        raise DataError("the big batch must be larger than the small one (noise_batch_big > noise_batch_small)")
    return moments(np.asarray(g_small_sq, float), np.asarray(g_big_sq, float), b_small, b_big)


def simple_noise_scale(g_small_sq, g_big_sq, b_small, b_big) -> float:
    """B_simple = mean tr(Σ) / mean |G|² over all the measurements given (ratio of averages)."""
    g_sq, trace = gradient_moments(g_small_sq, g_big_sq, b_small, b_big)
    return float(np.mean(trace) / np.mean(g_sq))


@dataclass(frozen=True)
class NoiseScalePoint:
    step: float
    tokens: float
    loss: float
    b_simple: float


def noise_scale_series(rows: Sequence[dict], window: int = 50) -> list[NoiseScalePoint]:
    """B_simple over consecutive windows of ``window`` measured steps of one run's metrics rows (rows without
    the noise metrics, e.g. validation rows, are skipped). A window whose |G|² estimate is not positive is
    dropped: there the gradient signal is below the measurement noise."""
    measured = [r for r in rows if all(k in r for k in KEYS) and "loss" in r]
    points = []
    for start in range(0, len(measured) - window + 1, window):
        chunk = measured[start:start + window]
        col = {k: np.array([r.get(k, np.nan) for r in chunk], float) for k in (*KEYS, "step", "tokens", "loss")}
        g_sq, trace = gradient_moments(*(col[k] for k in KEYS))
        if np.mean(g_sq) > 0 and np.mean(trace) > 0:
            points.append(NoiseScalePoint(float(col["step"].mean()), float(col["tokens"].mean()),
                                          float(col["loss"].mean()), float(np.mean(trace) / np.mean(g_sq))))
    return points


@dataclass(frozen=True)
class CriticalBatchFit:
    """Kaplan's B_crit(L) = B* / L^(1/α_B) (B in tokens; Kaplan: B* ≈ 2e8 tokens, α_B ≈ 0.21)."""

    fit: Fit  # the underlying power law B = (x_c / L)^p with p = 1/α_B, B* = x_c^p

    @staticmethod
    def _natural(x_c: float, p: float) -> tuple[float, float]:
        with np.errstate(over="ignore", divide="ignore"):  # degenerate bootstrap refits give inf, not a warning
            return float(np.power(x_c, p)), 1.0 / p

    @property
    def b_star(self) -> float:
        return self._natural(self.fit.params["x_c"], self.fit.params["alpha"])[0]

    @property
    def alpha_b(self) -> float:
        return 1.0 / self.fit.params["alpha"]

    @property
    def ci(self) -> dict[str, tuple[float, float]]:
        if len(self.fit.samples) == 0:
            return {"b_star": (self.b_star, self.b_star), "alpha_b": (self.alpha_b, self.alpha_b)}
        nat = np.array([self._natural(x_c, p) for x_c, p in self.fit.samples])
        tail = (1 - self.fit.level) / 2
        lo, hi = np.quantile(nat, [tail, 1 - tail], axis=0)
        return {"b_star": (float(lo[0]), float(hi[0])), "alpha_b": (float(lo[1]), float(hi[1]))}

    def predict(self, loss) -> np.ndarray:
        return self.b_star / np.asarray(loss, float) ** (1.0 / self.alpha_b)


def fit_critical_batch(loss, b_crit, n_boot: int = 200, level: float = 0.95, seed: int = 0) -> CriticalBatchFit:
    """Fit B_crit(L) across runs (points from ``noise_scale_series`` of several runs, B_simple as B_crit's
    estimate as in Kaplan et al. §5.1)."""
    return CriticalBatchFit(fit_power_law(loss, b_crit, n_boot, level, seed))
