"""The gradient noise scale measured inside the train step (``train.noise_scale``).

The step takes its gradient as two half-batches (same FLOPs): each half is a small-batch gradient and
their token-weighted mean is the full-batch one, so the squared norms at two batch sizes come for free
(McCandlish et al. 2018, App. A.1). ``scaling/noise_scale.py`` turns the logged values into B_simple
series and B_crit(L) fits.
"""

from __future__ import annotations

from collections.abc import Callable

KEYS = ("noise_grad_sq_small", "noise_grad_sq_big", "noise_batch_small", "noise_batch_big")


def moments(g_small_sq, g_big_sq, b_small, b_big):
    """Unbiased (|G|², tr Σ) as plain arithmetic, so numpy arrays and traced JAX values both work."""
    g_sq = (b_big * g_big_sq - b_small * g_small_sq) / (b_big - b_small)
    trace = (g_small_sq - g_big_sq) / (1.0 / b_small - 1.0 / b_big)
    return g_sq, trace


def two_batch_value_and_grad(value_and_grad: Callable, graphdef, params: dict, batch: dict):
    """``value_and_grad(graphdef, params, batch)`` computed as two half-batches (even and odd rows, so every
    data shard keeps both halves), recombined exactly for a token-mean loss, plus the noise-scale metrics.

    Token sums (``tokens``, ``*_sum``) are added; other metrics are token-weighted means of the halves.
    """
    import jax  # here: the host-side analysis (``KEYS``, ``moments``; ``scaling-jax report``) loads without JAX
    import jax.numpy as jnp

    from scaling_jax.train.health import squared_norms

    halves = [jax.tree.map(lambda x, i=i: x[i::2], batch) for i in (0, 1)]
    (_, m1), g1 = value_and_grad(graphdef, params, halves[0])
    (_, m2), g2 = value_and_grad(graphdef, params, halves[1])
    n1 = m1.get("tokens", jnp.float32(1.0))
    n2 = m2.get("tokens", jnp.float32(1.0))
    w1, w2 = n1 / (n1 + n2), n2 / (n1 + n2)
    grads = jax.tree.map(lambda a, b: w1 * a + w2 * b, g1, g2)
    metrics = {k: m1[k] + m2[k] if k == "tokens" or k.endswith("_sum") else w1 * m1[k] + w2 * m2[k] for k in m1}
    sq = lambda tree: sum(squared_norms(tree))  # noqa: E731 (the step's grad_norm is sqrt(sq(grads)))
    b_small = 2.0 / (1.0 / n1 + 1.0 / n2)  # E(|g1|² + |g2|²)/2 = |G|² + tr Σ · mean(1/n_i)
    noise = {"noise_grad_sq_small": (sq(g1) + sq(g2)) / 2, "noise_grad_sq_big": sq(grads),
             "noise_batch_small": b_small, "noise_batch_big": n1 + n2}
    g_sq, trace = moments(*(noise[k] for k in KEYS))
    noise["noise_b_simple"] = trace / g_sq  # one step's value: noisy; average with noise_scale_series
    return (metrics["loss"], {**metrics, **noise}), grads
