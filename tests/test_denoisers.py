"""UL2 Mixture-of-Denoisers: T5 span math, sentinels, exact reconstruction, prefix-LM layout, packing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scaling_jax.config import load_config
from scaling_jax.data.tokenizer import ByteTokenizer
from scaling_jax.errors import ConfigError
from scaling_jax.model.layers import attention_mask
from scaling_jax.objectives.base import build_objective
from scaling_jax.objectives.denoisers import (
    UL2_MIXTURE,
    UL2R_MIXTURE,
    Denoiser,
    MixtureOfDenoisers,
    corrupt,
    random_prefix_length,
    random_spans_noise_mask,
)

TOK = ByteTokenizer()
SENTINELS = np.array([TOK.sentinel_id(k) for k in range(TOK.num_sentinels)])
SPAN_DENOISERS = sorted({d for d in UL2_MIXTURE + UL2R_MIXTURE if d.kind != "S"},
                        key=lambda d: (d.kind, d.rate, d.mean_span))


def _objective(*overrides: str) -> MixtureOfDenoisers:
    return build_objective(load_config(None, ["objective=ul2", *overrides]).objective)


def _rows(batch: int, seq_len: int, seed: int = 0) -> dict:
    """Packed-row-like input: byte tokens with a bos at each document start, segment ids per document."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 259, size=(batch, seq_len + 1)).astype(np.int32)
    starts = rng.random((batch, seq_len + 1)) < 0.02
    tokens[starts] = TOK.bos_id
    seg = (np.cumsum(starts, axis=1) + 1).astype(np.int32)
    return {"tokens": tokens, "segment_ids": seg}


def _runs(mask: np.ndarray) -> np.ndarray:
    """Lengths of the runs of True in a bool vector."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)


def reconstruct(inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Undo span corruption independently of the code under test: splice each sentinel's span back."""
    sentinel_set = set(SENTINELS.tolist())
    spans, current = {}, None
    for t in targets.tolist():
        if t in sentinel_set:
            assert t not in spans, "a sentinel repeats in the targets"
            current = spans[t] = []
        else:
            assert current is not None, "targets must start with a sentinel"
            current.append(t)
    out = []
    for t in inputs.tolist():
        out.extend(spans.pop(t) if t in sentinel_set else [t])
    assert not spans, "a target span has no sentinel in the inputs"
    return np.array(out, dtype=np.int64)


def _examples_in_row(batch: dict, r: int):
    """Per segment of row r: (full sequence, prefix length, slot indices), read back from the model batch."""
    seg = batch["segment_ids"][r]
    out = []
    for s in range(1, seg.max() + 1):
        idx = np.flatnonzero(seg == s)
        assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1)), "an example must be contiguous"
        seq = np.concatenate([batch["inputs"][r, idx], batch["targets"][r, idx[-1:]]])
        out.append((seq, int(batch["bidirectional"][r, idx].sum()), idx))
    return out


# ----------------------------------------------------------------------------- T5 span math


@pytest.mark.parametrize("d", SPAN_DENOISERS, ids=lambda d: f"{d.kind}-{d.rate}-{d.mean_span:g}")
def test_noise_mask_realises_the_configured_rate_and_mean_span(d):
    length, samples = 20000, 20
    rng = np.random.default_rng(7)
    noise_tokens, spans, lengths = 0, 0, []
    for _ in range(samples):
        mask = random_spans_noise_mask(length, d.rate, d.mean_span, rng)
        assert mask.shape == (length,) and not mask[0] and mask[-1]  # starts non-noise, ends noise
        runs = _runs(mask)
        assert _runs(~mask).size == runs.size  # as many non-noise spans as noise spans
        noise_tokens += int(mask.sum())
        spans += runs.size
        lengths.append(runs)
    # T5 definition at this length, computed here from scratch.
    t5_noise = min(max(round(length * d.rate), 1), length - 1)
    t5_spans = max(1, round(t5_noise / d.mean_span))
    assert noise_tokens == samples * t5_noise and spans == samples * t5_spans
    assert noise_tokens / (samples * length) == pytest.approx(d.rate, rel=0.02)
    assert noise_tokens / spans == pytest.approx(d.mean_span, rel=0.02)
    lengths = np.concatenate(lengths)
    if t5_spans > 1:  # a random partition, not equal pieces: lengths spread around the mean
        assert lengths.min() < d.mean_span < lengths.max()


def test_noise_spans_are_a_uniform_random_partition():
    """Under a uniform composition of N into k parts, P(part = 1) = C(N-2, k-2) / C(N-1, k-1) = (k-1)/(N-1)."""
    rng = np.random.default_rng(0)
    length, rate, mean_span = 300, 0.5, 5.0
    first = np.array([_runs(random_spans_noise_mask(length, rate, mean_span, rng))[0] for _ in range(4000)])
    n, k = 150, 30
    assert first.mean() == pytest.approx(n / k, rel=0.05)
    assert (first == 1).mean() == pytest.approx((k - 1) / (n - 1), abs=0.02)


def test_s_denoiser_split_is_uniform_over_t5_prefix_lengths():
    rng = np.random.default_rng(1)
    n = 50
    splits = np.array([random_prefix_length(n, 0.5, rng) for _ in range(20000)])
    assert splits.min() == 1 and splits.max() == n - 1  # T5 random_prefix_noise_mask: [1, n - 1]
    counts = np.bincount(splits, minlength=n)[1:]
    assert counts.min() > 0.8 * counts.mean() and counts.max() < 1.2 * counts.mean()
    inputs, targets = corrupt(np.arange(3, 3 + n), Denoiser("S", 0.5), rng, SENTINELS)
    assert np.array_equal(np.concatenate([inputs, targets]), np.arange(3, 3 + n)) and inputs.size >= 1


def test_inputs_and_targets_reconstruct_the_original_exactly_property():
    rng = np.random.default_rng(2)
    for _ in range(500):
        n = int(rng.integers(2, 400))
        d = Denoiser("X", float(rng.uniform(0.01, 0.99)), float(rng.uniform(1, 70)))
        tokens = rng.integers(3, 259, size=n)
        inputs, targets = corrupt(tokens, d, np.random.default_rng(int(rng.integers(1 << 30))), SENTINELS)
        k = int(np.isin(inputs, SENTINELS).sum())
        used = SENTINELS[:k]
        assert np.array_equal(inputs[np.isin(inputs, SENTINELS)], used)  # sentinel 0, 1, ... in order, unique
        assert np.array_equal(targets[np.isin(targets, SENTINELS)], used)
        assert targets[0] == SENTINELS[0]
        assert np.array_equal(reconstruct(inputs, targets), tokens)


# ----------------------------------------------------------------------------- prepared batches


def test_prepared_examples_reconstruct_each_row_and_follow_t5_counts():
    obj = _objective("objective.examples_per_row=2")
    rows = _rows(64, 96)
    batch = obj.prepare(rows)
    seen_kinds = set()
    for r, per_row in enumerate(obj.examples(rows)):
        read = _examples_in_row(batch, r)
        assert len(read) == len(per_row) >= 2
        restored = []
        for (seq, prefix, _), (want_seq, want_prefix, choice) in zip(read, per_row, strict=True):
            d = obj.mixture[choice]
            seen_kinds.add(d.kind)
            assert np.array_equal(seq, want_seq) and prefix == want_prefix
            assert seq[0] == TOK.mode_ids[d.mode] and seq[-1] == TOK.eos_id
            inputs, targets = seq[1:prefix], seq[prefix:-1]
            if d.kind == "S":
                assert not np.isin(seq, SENTINELS).any()
                restored.append(np.concatenate([inputs, targets]))
                continue
            sentinels_in = inputs[np.isin(inputs, SENTINELS)]
            assert np.array_equal(sentinels_in, SENTINELS[: sentinels_in.size])  # unique, numbered in order
            original = reconstruct(inputs, targets)
            noise = targets.size - sentinels_in.size
            t5_noise = min(max(round(original.size * d.rate), 1), original.size - 1)
            assert noise == t5_noise and sentinels_in.size == max(1, round(t5_noise / d.mean_span))
            restored.append(original)
        restored = np.concatenate(restored)
        assert np.array_equal(restored, rows["tokens"][r, : restored.size])  # consecutive chunks of the row
    assert seen_kinds == {"R", "X", "S"}


def test_prefix_mask_is_bidirectional_on_mode_and_inputs_causal_on_targets_and_never_crosses_examples():
    obj = _objective("objective.examples_per_row=3")
    batch = obj.prepare(_rows(8, 80, seed=3))
    mask = np.asarray(attention_mask(jnp.asarray(batch["segment_ids"]),
                                     jnp.asarray(batch["bidirectional"]).astype(bool)))[:, 0]
    t = batch["segment_ids"].shape[1]
    for r in range(8):
        expected = np.eye(t, dtype=bool)  # padding sees only itself
        for _, prefix, idx in _examples_in_row(batch, r):
            block = np.tril(np.ones((idx.size, idx.size), dtype=bool))
            block[:prefix, :prefix] = True  # [mode] + inputs see each other fully
            expected[np.ix_(idx, idx)] = block
        assert np.array_equal(mask[r], expected)


def test_loss_mask_covers_exactly_the_targets_and_prepare_is_deterministic():
    obj = _objective("objective.examples_per_row=2")
    rows = _rows(16, 64, seed=4)
    batch = obj.prepare(rows)
    again = obj.prepare({k: v.copy() for k, v in rows.items()})
    assert all(np.array_equal(batch[k], again[k]) for k in batch)
    alone = obj.prepare({k: v[5:6] for k, v in rows.items()})  # a row's examples do not depend on its batch
    assert all(np.array_equal(batch[k][5:6], alone[k]) for k in batch)
    assert set(batch) == {"inputs", "targets", "segment_ids", "positions", "loss_mask", "bidirectional"}
    assert all(v.shape == (16, 64) and v.dtype == np.int32 for v in batch.values())
    for r in range(16):
        want = np.zeros(64, dtype=np.int32)
        for seq, prefix, idx in _examples_in_row(batch, r):
            want[idx[prefix - 1]: idx[-1] + 1] = 1  # slots whose next token is a target or the final eos
            assert np.array_equal(batch["targets"][r, idx[prefix - 1]:idx[-1] + 1], seq[prefix:])
            assert np.array_equal(batch["positions"][r, idx], np.arange(idx.size))
        assert np.array_equal(batch["loss_mask"][r], want)
        pad = batch["segment_ids"][r] == 0
        assert not batch["loss_mask"][r, pad].any() and not batch["inputs"][r, pad].any()


def test_mixture_is_sampled_with_the_configured_weights():
    obj = _objective("objective.mixture=ul2r")
    counts = np.zeros(len(obj.mixture))
    for per_row in obj.examples(_rows(3000, 32, seed=5)):
        for _, _, choice in per_row:
            counts[choice] += 1
    weights = np.array([d.weight for d in UL2R_MIXTURE])
    np.testing.assert_allclose(counts / counts.sum(), weights / weights.sum(), atol=0.03)
    assert [d.kind for d in UL2R_MIXTURE] == ["S", "R", "X", "X"] and weights[0] == 0.5


def test_presets_follow_ul2_table_1_and_mode_tokens():
    assert [(d.kind, d.rate, d.mean_span) for d in UL2_MIXTURE if d.kind != "S"] == [
        ("R", 0.15, 3), ("R", 0.15, 8), ("X", 0.5, 3), ("X", 0.5, 8), ("X", 0.15, 64), ("X", 0.5, 64)]
    assert {d.kind: d.mode for d in UL2_MIXTURE} == {"R": "[NLU]", "X": "[NLG]", "S": "[S2S]"}


def test_long_rows_pack_more_examples_when_sentinels_run_out():
    obj = _objective("objective.denoisers=[{kind: X, rate: 0.5, mean_span: 3}]")
    rows = _rows(2, 1024, seed=6)
    batch = obj.prepare(rows)
    for r in range(2):
        read = _examples_in_row(batch, r)
        assert len(read) >= 2
        for seq, _, _ in read:
            assert np.isin(seq, SENTINELS).sum() <= 2 * TOK.num_sentinels
        assert (batch["segment_ids"][r] == 0).sum() <= 3  # the row stays full


def test_loss_under_jit_uses_the_prefix_and_matches_examples_run_alone(tiny_config):
    config = tiny_config("objective=ul2", "objective.examples_per_row=2", "data.seq_len=48")
    obj = build_objective(config.objective)
    model = nnx.jit(lambda: obj.build_model(config.model, nnx.Rngs(0)))()  # one compile, not one per init op
    batch = obj.prepare(_rows(2, 48, seed=8))
    graphdef, params = nnx.split(model)

    @jax.jit
    def loss_and_grad(p, b):
        return jax.value_and_grad(lambda q: obj.loss(nnx.merge(graphdef, q), b), has_aux=True)(p)

    (loss, metrics), grads = loss_and_grad(params, {k: jnp.asarray(v) for k, v in batch.items()})
    assert np.isfinite(float(loss)) and float(metrics["tokens"]) == batch["loss_mask"].sum()
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))

    @jax.jit
    def hidden(b):
        return model(b["inputs"], b["positions"], b["segment_ids"], bidirectional=b["bidirectional"].astype(bool))

    full = np.asarray(hidden(batch))
    (_, prefix, idx), *_ = _examples_in_row(batch, 0)
    changed = {k: v.copy() for k, v in batch.items()}
    changed["inputs"][0, idx[prefix - 1]] += 1  # the last input token: earlier prefix slots must see it
    assert not np.allclose(np.asarray(hidden(changed))[0, idx[0]], full[0, idx[0]])
    # each example gives the same hidden states packed as alone in its own row: no attention across examples
    for _, _, idx in _examples_in_row(batch, 0)[1:]:
        solo = {k: v.copy() for k, v in batch.items()}  # same shapes: no recompilation
        for k in batch:
            solo[k][0] = 0
            solo[k][0, : idx.size] = batch[k][0, idx]
        solo["segment_ids"][0, : idx.size] = 1
        np.testing.assert_allclose(np.asarray(hidden(solo))[0, : idx.size], full[0, idx], atol=1e-5)


# ----------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("entry,field", [
    ("[{kind: R, rate: 0.15, mean_span: 3}, {kind: R, rate: 1.5, mean_span: 3}]", "objective.denoisers[1].rate"),
    ("[{kind: X, rate: 0.5, mean_span: 0.5}]", "objective.denoisers[0].mean_span"),
    ("[{kind: X, rate: 0.5}]", "objective.denoisers[0].mean_span"),
    ("[{kind: Q, rate: 0.5, mean_span: 3}]", "objective.denoisers[0].kind"),
    ("[{kind: R, rate: 0.15, mean_span: 3, weight: -1}]", "objective.denoisers[0].weight"),
    ("[{kind: R, rate: 0.15, mean_span: 3, spans: 2}]", "objective.denoisers[0].spans"),
    ("[{kind: S, mean_span: 3}]", "objective.denoisers[0].mean_span"),
    ("[{kind: S, rate: 0.9}]", "objective.denoisers[0].rate"),
    ("[{kind: R, rate: fast, mean_span: 3}]", "objective.denoisers[0].rate"),
    ("[R]", "objective.denoisers[0]"),
    ("[{kind: S, weight: 0}]", "objective.denoisers"),
])
def test_bad_denoisers_raise_a_one_line_config_error_naming_the_field(entry, field):
    with pytest.raises(ConfigError) as err:
        _objective(f"objective.denoisers={entry}")
    assert field in str(err.value) and "\n" not in str(err.value)


def test_too_many_examples_per_row_for_seq_len_is_a_config_error():
    obj = _objective("objective.examples_per_row=8")
    with pytest.raises(ConfigError, match="objective.examples_per_row=8"):
        obj.prepare(_rows(1, 32))
    with pytest.raises(ConfigError, match="examples_per_row"):
        _objective("objective.examples_per_row=0")
