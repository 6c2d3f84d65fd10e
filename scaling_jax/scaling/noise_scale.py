"""Gradient noise scale (McCandlish et al. 2018) and the critical batch size B_crit(L) (Kaplan et al. 2020).

For a mini-batch of B examples (here: target tokens) E|g_B|² = |G|² + tr(Σ)/B, where G is the true gradient and
Σ the per-example gradient covariance. Two batch sizes give unbiased estimates of both (McCandlish App. A.1):

    |G|²  = (B_big |g_big|² − B_small |g_small|²) / (B_big − B_small)
    tr(Σ) = (|g_small|² − |g_big|²) / (1/B_small − 1/B_big)

and the simple noise scale B_simple = tr(Σ)/|G|². Single-step values are noisy (the difference can even be
negative), so B_simple is the ratio of *averages* of the two estimates over a window of steps. In training
(``train.noise_scale``) the step computes its gradient as two half-batches (same FLOPs): each half is a
small-batch gradient and their token-weighted mean is the full-batch one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from scaling_jax.errors import DataError
from scaling_jax.scaling.laws import Fit, fit_power_law

KEYS = ("noise_grad_sq_small", "noise_grad_sq_big", "noise_batch_small", "noise_batch_big")


def _moments(g_small_sq, g_big_sq, b_small, b_big):
    """The two estimators as plain arithmetic, so numpy arrays and traced JAX values both work."""
    g_sq = (b_big * g_big_sq - b_small * g_small_sq) / (b_big - b_small)
    trace = (g_small_sq - g_big_sq) / (1.0 / b_small - 1.0 / b_big)
    return g_sq, trace


def gradient_moments(g_small_sq, g_big_sq, b_small, b_big) -> tuple[np.ndarray, np.ndarray]:
    """Unbiased (|G|², tr Σ) from squared gradient norms measured at two batch sizes."""
    b_small, b_big = np.asarray(b_small, float), np.asarray(b_big, float)
    if np.any(b_big <= b_small):
        raise DataError("the big batch must be larger than the small one (noise_batch_big > noise_batch_small)")
    return _moments(np.asarray(g_small_sq, float), np.asarray(g_big_sq, float), b_small, b_big)


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


# ---------------------------------------------------------------------------------------------- in training


def two_batch_value_and_grad(value_and_grad: Callable, graphdef, params: dict, batch: dict):
    """``value_and_grad(graphdef, params, batch)`` computed as two half-batches (even and odd rows, so every
    data shard keeps both halves), recombined exactly for a token-mean loss, plus the noise-scale metrics.

    Token sums (``tokens``, ``*_sum``) are added; other metrics are token-weighted means of the halves.
    """
    import jax
    import jax.numpy as jnp

    halves = [jax.tree.map(lambda x, i=i: x[i::2], batch) for i in (0, 1)]
    (_, m1), g1 = value_and_grad(graphdef, params, halves[0])
    (_, m2), g2 = value_and_grad(graphdef, params, halves[1])
    n1 = m1.get("tokens", jnp.float32(1.0))
    n2 = m2.get("tokens", jnp.float32(1.0))
    w1, w2 = n1 / (n1 + n2), n2 / (n1 + n2)
    grads = jax.tree.map(lambda a, b: w1 * a + w2 * b, g1, g2)
    metrics = {k: m1[k] + m2[k] if k == "tokens" or k.endswith("_sum") else w1 * m1[k] + w2 * m2[k] for k in m1}
    sq = lambda tree: sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree))  # noqa: E731
    b_small = 2.0 / (1.0 / n1 + 1.0 / n2)  # E(|g1|² + |g2|²)/2 = |G|² + tr Σ · mean(1/n_i)
    noise = {"noise_grad_sq_small": (sq(g1) + sq(g2)) / 2, "noise_grad_sq_big": sq(grads),
             "noise_batch_small": b_small, "noise_batch_big": n1 + n2}
    g_sq, trace = _moments(*(noise[k] for k in KEYS))
    noise["noise_b_simple"] = trace / g_sq  # one step's value: noisy; average with noise_scale_series
    return (metrics["loss"], {**metrics, **noise}), grads
