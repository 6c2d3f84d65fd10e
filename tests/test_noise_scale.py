"""Gradient noise scale: the two-batch estimator is exact on a quadratic toy problem, the in-step split is the
full-batch gradient, and B_crit(L) is recovered across runs."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scaling_jax.errors import ConfigError
from scaling_jax.scaling import noise_scale as ns
from scaling_jax.train.metrics import read_metrics
from scaling_jax.train.noise import two_batch_value_and_grad


def quadratic_problem(seed=0, examples=400, dim=6):
    """Per-example loss ½|θ − x_i|²: per-example gradient θ − x_i, so G = θ − x̄ and tr Σ = mean |x_i − x̄|²."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 1.0, (examples, dim)) * rng.uniform(0.5, 2.0, dim)
    theta = x.mean(0) + rng.normal(0.0, 0.3, dim)
    g_true = theta - x.mean(0)
    trace = np.mean(np.sum((x - x.mean(0)) ** 2, axis=1))
    return x, theta, g_true @ g_true, trace


def test_two_batch_estimator_is_exact_on_a_quadratic_problem():
    x, theta, g_sq, trace = quadratic_problem()
    rng = np.random.default_rng(1)
    draws, b_small, b_big = 40000, 4, 32
    mean_grad = lambda b: theta - x[rng.integers(0, len(x), (draws, b))].mean(1)  # noqa: E731
    small_sq = np.sum(mean_grad(b_small) ** 2, axis=1)
    big_sq = np.sum(mean_grad(b_big) ** 2, axis=1)
    est_g_sq, est_trace = ns.gradient_moments(small_sq, big_sq, b_small, b_big)
    assert np.mean(est_g_sq) == pytest.approx(g_sq, rel=0.03)
    assert np.mean(est_trace) == pytest.approx(trace, rel=0.02)
    assert ns.simple_noise_scale(small_sq, big_sq, b_small, b_big) == pytest.approx(trace / g_sq, rel=0.04)
    # and with the exact expectations E|g_B|² = |G|² + tr Σ / B the estimator returns the truth exactly
    exact = ns.simple_noise_scale(g_sq + trace / b_small, g_sq + trace / b_big, b_small, b_big)
    assert exact == pytest.approx(trace / g_sq, rel=1e-12)


def test_in_step_half_batches_give_the_full_batch_gradient_and_the_estimator_inputs():
    x, theta, _, _ = quadratic_problem(dim=3, examples=10)
    mask = np.array([1, 1, 1, 0, 1, 1, 1, 1, 1, 0], np.float32)  # uneven halves: weighting matters

    def loss_fn(params, batch):
        per_example = 0.5 * jnp.sum((params["theta"] - batch["x"]) ** 2, axis=1)
        tokens = batch["mask"].sum()
        loss = (per_example * batch["mask"]).sum() / tokens
        return loss, {"loss": loss, "tokens": tokens, "nll_sum": (per_example * batch["mask"]).sum()}

    value_and_grad = lambda graphdef, p, b: jax.value_and_grad(loss_fn, has_aux=True)(p, b)  # noqa: E731
    params = {"theta": jnp.asarray(theta, jnp.float32)}
    batch = {"x": jnp.asarray(x, jnp.float32), "mask": jnp.asarray(mask)}
    (loss, metrics), grads = jax.jit(lambda p, b: two_batch_value_and_grad(value_and_grad, None, p, b))(params,
                                                                                                          batch)
    (full_loss, full_metrics), full_grads = value_and_grad(None, params, batch)
    np.testing.assert_allclose(grads["theta"], full_grads["theta"], rtol=1e-6, atol=1e-6)
    assert float(loss) == pytest.approx(float(full_loss), rel=1e-6)
    assert float(metrics["nll_sum"]) == pytest.approx(float(full_metrics["nll_sum"]), rel=1e-6)
    # reference: per-half gradients by hand in numpy
    halves = [(x[i::2], mask[i::2]) for i in (0, 1)]
    g = [((theta - xs) * m[:, None]).sum(0) / m.sum() for xs, m in halves]
    n1, n2 = mask[0::2].sum(), mask[1::2].sum()
    assert float(metrics["noise_grad_sq_small"]) == pytest.approx((g[0] @ g[0] + g[1] @ g[1]) / 2, rel=1e-5)
    assert float(metrics["noise_batch_small"]) == pytest.approx(2 / (1 / n1 + 1 / n2))
    assert float(metrics["noise_batch_big"]) == n1 + n2
    g_sq, trace = ns.gradient_moments(metrics["noise_grad_sq_small"], metrics["noise_grad_sq_big"],
                                      metrics["noise_batch_small"], metrics["noise_batch_big"])
    assert float(metrics["noise_b_simple"]) == pytest.approx(float(trace / g_sq), rel=1e-4)


def test_critical_batch_law_is_recovered_across_runs():
    b_star, alpha_b = 2e5, 0.21  # B_simple ~ 300..7000 tokens, around the batch sizes below
    rng = np.random.default_rng(2)
    rows, step = [], 0
    for loss in np.linspace(4.0, 2.0, 400):
        trace = b_star / loss ** (1 / alpha_b)  # with |G|² = 1, B_simple = tr Σ
        b_small, b_big = 4096.0, 8192.0
        step += 1
        rows.append({"step": step, "tokens": step * b_big, "loss": loss,
                     "noise_grad_sq_small": (1 + trace / b_small) * rng.lognormal(0, 0.005),
                     "noise_grad_sq_big": (1 + trace / b_big) * rng.lognormal(0, 0.005),
                     "noise_batch_small": b_small, "noise_batch_big": b_big})
    rows.insert(5, {"step": 5, "val_loss": 3.0})  # validation rows are ignored
    points = ns.noise_scale_series(rows, window=20)
    assert len(points) == 20
    fit = ns.fit_critical_batch([p.loss for p in points], [p.b_simple for p in points], n_boot=200)
    assert fit.ci["alpha_b"][0] <= alpha_b <= fit.ci["alpha_b"][1]
    assert fit.ci["b_star"][0] <= b_star <= fit.ci["b_star"][1]
    assert fit.predict(3.0) == pytest.approx(b_star / 3.0 ** (1 / alpha_b), rel=0.1)


@pytest.mark.slow
def test_training_logs_noise_metrics_consistent_with_the_gradient_norm(tiny_config, tmp_path):
    from scaling_jax.train.loop import train

    data = tmp_path / "data.jsonl"  # a small source: the embedded corpus takes long to tokenize
    data.write_text("".join(json.dumps({"text": f"row {i}: " + "abc def ghi " * 20}) + "\n" for i in range(30)))
    config = tiny_config("train.steps=3", "data.batch_size=16", "train.noise_scale=true", "train.progress=false",
                         "train.tensorboard=false", "train.plot=false", "train.eval_batches=1",
                         "data.val_fraction=0.2", f"data.source={data}", f"train.run_dir={tmp_path / 'run'}")
    train(config)
    rows = [r for r in read_metrics(os.path.join(tmp_path, "run", "metrics.jsonl")) if "loss" in r]
    assert len(rows) == 3
    for row in rows:  # the logged big-batch norm is the very gradient the optimizer used
        assert row["noise_grad_sq_big"] == pytest.approx(row["grad_norm"] ** 2, rel=1e-4)
        assert row["noise_batch_small"] < row["noise_batch_big"] <= 16 * 32
        assert row["noise_grad_sq_small"] > row["noise_grad_sq_big"]


def test_odd_batch_with_noise_scale_is_a_config_error(tiny_config):
    with pytest.raises(ConfigError, match="train.noise_scale needs an even data.batch_size"):
        tiny_config("data.batch_size=7", "train.noise_scale=true")


def test_noise_scale_refuses_a_loss_mixed_from_several_heads(tiny_config):
    """MTP's heads each average over their own targets: the halves cannot recombine into its gradient."""
    with pytest.raises(ConfigError, match="objective=mtp with objective.heads=2"):
        tiny_config("objective=mtp", "model.layers=3", "train.noise_scale=true")
    assert tiny_config("objective=mtp", "model.layers=3", "objective.heads=1", "train.noise_scale=true")


def test_half_batches_that_cannot_split_over_the_batch_devices_are_refused(tiny_config):
    """8 rows on 8 batch devices: a 4-row half would be replicated, each device computing all of it."""
    import jax

    from scaling_jax.parallel.mesh import build_mesh
    from scaling_jax.parallel.sharding import DEFAULT_RULES
    from scaling_jax.train.compute import check_batch_fits_mesh

    config = tiny_config("data.batch_size=8", "train.noise_scale=true", "mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1")
    mesh = build_mesh(config.mesh, jax.devices()[:8])
    with pytest.raises(ConfigError, match="make data.batch_size a multiple of 16"):
        check_batch_fits_mesh(config, mesh, DEFAULT_RULES)
    check_batch_fits_mesh(tiny_config("data.batch_size=16", "train.noise_scale=true", "mesh.data=1", "mesh.fsdp=8",
                                      "mesh.tensor=1"), mesh, DEFAULT_RULES)
    check_batch_fits_mesh(tiny_config("data.batch_size=8", "mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1"), mesh,
                          DEFAULT_RULES)
