"""PassUntil: the instance estimator on simulated Bernoulli instances with known p (unbiased, intervals
cover), loss-based PU == the exact sequence probability, the task-law fit recovering known parameters,
and the instance-level fit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scaling_jax.data.tokenizer import ByteTokenizer
from scaling_jax.eval import passuntil as pu
from scaling_jax.model.decode import CachedLM, full_logits
from scaling_jax.model.transformer import Decoder


def _simulate(p: float, passes: int, cap: int, instances: int, seed: int) -> list[pu.InstancePU]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(instances):
        s, t = pu.sample_until(lambda k: rng.random(k) < p, passes, cap, batch=16)
        out.append(pu.estimate_from_counts(s, t, passes))
    return out


@pytest.mark.parametrize("p, cap", [(0.3, 1000), (0.04, 1000), (0.01, 1000), (0.02, 30)])
def test_instance_estimator_is_unbiased_and_its_interval_covers(p, cap):
    """(r-1)/(K-1) at the r-th pass and s/M at the cap: unbiased for this plan, even when the cap binds
    (p=0.02, cap=30: most instances stop at the cap)."""
    est = _simulate(p, passes=2, cap=cap, instances=3000, seed=int(p * 1000) + cap)
    values = np.array([e.p for e in est])
    assert abs(values.mean() - p) < 4 * values.std() / np.sqrt(len(values))
    coverage = np.mean([e.low <= p <= e.high for e in est])
    assert coverage >= 0.93


@pytest.mark.parametrize("successes, trials, passes", [(2, 40, 2), (3, 7, 3), (1, 1, 1), (0, 30, 2), (1, 500, 2)])
def test_interval_ends_leave_exactly_alpha_over_2_in_each_tail(successes, trials, passes):
    """The interval ends, checked by scipy's binomial tails. At the cap (a binomial count) they are
    Clopper-Pearson's; at the r-th pass on trial K, P(K' <= K | low) = P(Binomial(K, low) >= r) = alpha/2 and
    P(K' >= K | high) = P(Binomial(K - 1, high) <= r - 1) = alpha/2."""
    from scipy import stats

    est = pu.estimate_from_counts(successes, trials, passes, confidence=0.9)
    if successes >= passes:
        assert stats.binom.sf(passes - 1, trials, est.low) == pytest.approx(0.05, rel=1e-6)
        if trials > passes:
            assert stats.binom.cdf(passes - 1, trials - 1, est.high) == pytest.approx(0.05, rel=1e-6)
    else:
        exact = stats.binomtest(successes, trials).proportion_ci(0.9, method="exact")
        assert (est.low, est.high) == pytest.approx((exact.low, exact.high), rel=1e-9, abs=1e-12)


def test_with_one_pass_the_estimate_is_the_mle_and_overestimates_small_p():
    """Why the default is r=2: with r=1 only 1/K is informative, and E[1/K] = p log(1/p) / (1-p) > p."""
    p = 0.05
    values = np.array([e.p for e in _simulate(p, passes=1, cap=10_000, instances=3000, seed=1)])
    expected = p * np.log(1 / p) / (1 - p)
    assert abs(values.mean() - expected) < 4 * values.std() / np.sqrt(len(values))
    assert values.mean() > 2 * p


def test_a_cap_reached_with_every_draw_passing_has_the_clopper_pearson_ends_of_n_of_n():
    est = pu.estimate_from_counts(3, 3, passes=5)  # --max-samples below --passes (the Python API allows it)
    assert est.p == 1.0 and est.high == 1.0 and est.low == pytest.approx(0.025 ** (1 / 3), rel=1e-9)


def test_sample_until_counts_draws_in_order_and_stops_at_the_rth_pass():
    draws = iter([[False, True, False, True, True, True], [True] * 6])
    assert pu.sample_until(lambda k: next(draws), passes=2, max_samples=100, batch=6) == (2, 4)
    assert pu.sample_until(lambda k: [False] * k, passes=2, max_samples=10, batch=4) == (0, 10)
    est = pu.instance_pu(0, 10, passes=2, loss_pu=1e-7)
    assert est.method == "loss" and est.p == 1e-7 and est.high >= 0.2  # no pass in 10: p could still be ~0.3
    assert pu.instance_pu(2, 4, passes=2, loss_pu=1e-7).p == pytest.approx(1 / 3)


def test_loss_based_pu_equals_the_exact_sequence_probability(tiny_config):
    tok = ByteTokenizer()
    model = Decoder(tiny_config().model, nnx.Rngs(4))
    lm = CachedLM(model, tok)
    context, target = "x = ", "42\n"
    got = pu.loss_based_pu(lm.loglikelihood([context], [target])[0])
    # Reference: each conditional from its own forward pass over the prefix (right-padded to one length,
    # which causal attention ignores), multiplied in float64.
    graphdef, state = nnx.split(model)
    length = 16
    logits_of = jax.jit(lambda st, ids, seg: full_logits(nnx.merge(graphdef, st), ids, jnp.arange(length)[None], seg))
    seq = lm.encode_prompt(context)
    want = 1.0
    for t in [int(i) for i in tok.encode(target)] + [tok.eos_id]:
        ids = jnp.asarray([seq + [0] * (length - len(seq))])
        seg = jnp.asarray([[1] * len(seq) + [0] * (length - len(seq))])
        logits = np.asarray(logits_of(state, ids, seg)[0, len(seq) - 1], np.float64)
        probs = np.exp(logits - logits.max())
        want, last = want * probs[t] / probs.sum(), probs[t] / probs.sum()
        seq = seq + [t]
    assert got == pytest.approx(want / last, rel=1e-4)
    assert 0 < got < 1
    # the same text, then the end of generation (a stop-string task's target passes only so)
    ended = pu.loss_based_pu(lm.loglikelihood([context], [target], end_of_text=True)[0])
    assert ended == pytest.approx(want, rel=1e-4) and ended < got


def _synthetic(a: float, b: float, n: np.ndarray, noise: float, seed: int):
    rng = np.random.default_rng(seed)
    y = a * np.log(n) + b + rng.normal(0, noise, len(n))
    p = pu.pu_from_log_neg_log(y)
    return p, noise * p * np.abs(np.log(p))  # delta-method standard error of PU for noise sd in y


def test_task_law_fit_recovers_known_parameters_and_predicts_within_its_interval():
    n = np.logspace(5, 8, 6)
    p, _ = _synthetic(-0.6, 9.0, n, 0.0, 0)
    exact = pu.fit_task_law(n, p)
    assert exact.a == pytest.approx(-0.6, abs=1e-8) and exact.b == pytest.approx(9.0, abs=1e-7)
    hits = []
    for seed in range(40):
        p, se = _synthetic(-0.6, 9.0, n, 0.05, seed)
        fit = pu.fit_task_law(n, p, se)
        hits.append(abs(fit.a + 0.6) < 2.0 * np.sqrt(fit.cov[0, 0]))
        truth = float(pu.pu_from_log_neg_log(-0.6 * np.log(1e9) + 9.0))
        pred, low, high = fit.predict(1e9)
        assert low <= pred <= high
        hits.append(low <= truth <= high)
    assert np.mean(hits) > 0.85


def test_instance_level_fit_predicts_the_mean_of_the_instances_laws():
    n = np.logspace(5, 7, 4)
    slopes, intercepts = np.array([-0.3, -0.8, -0.5]), np.array([5.0, 12.0, 7.0])
    grid = pu.pu_from_log_neg_log(slopes[None] * np.log(n)[:, None] + intercepts[None])  # [models, instances]
    truth = pu.pu_from_log_neg_log(slopes * np.log(1e8) + intercepts).mean()
    pred, low, high = pu.predict_instance_level(n, grid, 1e8)
    assert pred == pytest.approx(truth, rel=1e-6)
    assert low <= pred <= high
    grid[:, 0] = 1.0  # an instance solved at every size stays solved
    fit = pu.fit_instance_laws(n, grid)
    assert fit.predict(1e8)[0] == 1.0


def test_task_pu_is_the_mean_with_a_standard_error():
    inst = [pu.instance_pu(2, k, 2) for k in (3, 5, 11)] + [pu.instance_pu(0, 64, 2, loss_pu=1e-9)]
    agg = pu.task_pu(inst)
    values = [0.5, 0.25, 0.1, 1e-9]
    assert agg.pu == pytest.approx(np.mean(values))
    assert agg.se == pytest.approx(np.std(values, ddof=1) / 2)
    assert (agg.sampled, agg.loss_based, agg.instances) == (3, 1, 4)
    assert 0 < agg.low < agg.pu < agg.high <= max(values)


def test_arithmetic_carries_sets_the_difficulty_and_leaves_the_default_draws_unchanged():
    """``carries=k`` keeps only sums with exactly k column carries (a difficulty knob for the PassUntil demo);
    without it the generator draws the same problems as before."""
    from scaling_jax.errors import DataError
    from scaling_jax.eval.generators import arithmetic, generate_task

    for k in range(4):
        task = generate_task(f"arithmetic:digits=3,carries={k},choices=0", n=50, seed=3)
        for ex in task["examples"]:
            a, b = (int(w) for w in ex["input"][len("What is "):-1].split(" plus "))
            carries = sum((a // 10**i % 10 + b // 10**i % 10 + (a % 10**i + b % 10**i >= 10**i)) >= 10
                          for i in range(3))
            assert carries == k and ex["target"] == str(a + b)
    rng = np.random.default_rng(0)
    first = arithmetic(n=1, seed=0, digits=2)["examples"][0]["input"]
    assert first == f"What is {int(rng.integers(10, 100))} plus {int(rng.integers(10, 100))}?"
    with pytest.raises(DataError):
        arithmetic(digits=2, op="*", carries=1)


def test_counts_outside_their_range_are_refused():
    for successes, trials, passes in ((-1, 10, 2), (0, 0, 2), (11, 10, 2), (1, 10, 0)):
        with pytest.raises(ValueError, match="PassUntil counts need"):
            pu.estimate_from_counts(successes, trials, passes)


def test_task_law_leaves_out_sizes_at_pu_0_or_1_and_two_bare_points_have_no_interval():
    """log(-log PU) has no value at PU 0: clipped to 1e-300, such a point set the slope (-1.09 against -0.18)."""
    n = np.array([1e6, 1e7, 1e8, 1e9])
    with_zero = pu.fit_task_law(n, [0.0, 1e-3, 1e-2, 1.0])
    without = pu.fit_task_law(n[1:3], [1e-3, 1e-2])
    assert with_zero.left_out == 2 and with_zero.a == pytest.approx(without.a)
    assert without.a == pytest.approx((pu.log_neg_log(1e-2) - pu.log_neg_log(1e-3)) / np.log(10))
    _, low, high = without.predict(1e10)
    assert np.isnan(low) and np.isnan(high)  # a line through two points says nothing of its own error
    with pytest.raises(ValueError, match="two model sizes with 0 < PU < 1"):
        pu.fit_task_law(n[:2], [0.0, 0.5])
