"""Schedules against their closed forms; weight decay skips norms."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from scaling_jax.config import OptimizerConfig
from scaling_jax.train.state import decay_mask, make_optimizer, make_schedule


def test_cosine_schedule_matches_closed_form():
    cfg = OptimizerConfig(lr=1.0, schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    sched = make_schedule(cfg, 110)
    assert float(sched(5)) == pytest.approx(0.5)
    for step in (10, 35, 60, 110):
        frac = (step - 10) / 100
        expected = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))
        assert float(sched(step)) == pytest.approx(expected, rel=1e-5)


def test_wsd_schedule_is_flat_then_decays_linearly_at_the_end():
    cfg = OptimizerConfig(lr=2.0, schedule="wsd", warmup_steps=10, min_lr_ratio=0.0, decay_fraction=0.2)
    sched = make_schedule(cfg, 100)
    assert float(sched(5)) == pytest.approx(1.0)
    assert float(sched(10)) == pytest.approx(2.0) and float(sched(79)) == pytest.approx(2.0)
    assert float(sched(90)) == pytest.approx(1.0)
    assert float(sched(100)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("total, warmup, fraction", [(1000, 100, 1.0), (100, 50, 0.8), (100, 90, 0.5)])
def test_wsd_decay_still_ends_at_the_final_lr_when_warmup_takes_part_of_its_share(total, warmup, fraction):
    """Warmup, then a linear decay from the later of warmup's end and (1 - decay_fraction) of the run."""
    cfg = OptimizerConfig(lr=2.0, schedule="wsd", warmup_steps=warmup, min_lr_ratio=0.1, decay_fraction=fraction)
    sched = make_schedule(cfg, total)
    start = max(warmup, total - round(fraction * total))
    for step in range(start, total + 1, max(1, (total - start) // 7)):
        want = 2.0 + (0.2 - 2.0) * (step - start) / max(1, total - start)
        assert float(sched(step)) == pytest.approx(want, rel=1e-5), step
    assert float(sched(total)) == pytest.approx(0.2)


def test_constant_schedule_after_warmup():
    sched = make_schedule(OptimizerConfig(lr=0.3, schedule="constant", warmup_steps=4), 50)
    assert float(sched(2)) == pytest.approx(0.15) and float(sched(40)) == pytest.approx(0.3)


def test_weight_decay_skips_vectors_and_clipping_bounds_the_update():
    params = {"w": jnp.ones((4, 4)), "norm": {"scale": jnp.ones((4,))}}
    assert decay_mask(params) == {"w": True, "norm": {"scale": False}}
    cfg = OptimizerConfig(lr=1.0, schedule="constant", warmup_steps=0, weight_decay=0.5, clip_norm=1.0,
                          b1=0.0, b2=0.0, eps=1e-12)
    tx, _ = make_optimizer(cfg, 10)
    zero_grads = {"w": jnp.zeros((4, 4)), "norm": {"scale": jnp.zeros((4,))}}
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.5 * np.ones((4, 4)))  # decoupled decay only
    np.testing.assert_allclose(updates["norm"]["scale"], 0.0)  # norms are not decayed
