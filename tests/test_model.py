"""The decoder's math against independent references, and its size against the formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scaling_jax.config import load_config
from scaling_jax.model.family import flops_per_token, param_counts
from scaling_jax.model.layers import attention_mask, rope, rotary_angles
from scaling_jax.model.transformer import Decoder
from scaling_jax.series import passuntil_shape


@pytest.mark.parametrize("overrides", [
    ["model.series=passuntil:1"],
    ["model.series=kaplan:2x128"],
    ["model.kv_heads=1", "model.heads=4", "model.tie_embeddings=false", "model.mlp=swiglu"],
])
def test_param_count_formula_matches_real_parameter_tree(overrides):
    cfg = load_config(None, overrides).model
    _, state = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, nnx.Rngs(0))))
    real = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
    counts = param_counts(cfg)
    assert counts.total == real
    embed_leaves = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    assert counts.non_embedding == real - embed_leaves


def test_passuntil_series_follows_the_paper():
    for i, heads in [(1, 2), (2, 5), (3, 8), (4, 12), (6, 21)]:
        shape = passuntil_shape(i)
        assert shape["layers"] == 4 * i and shape["heads"] == heads == (i * (8 + i)) // 4
        assert shape["d_model"] == 64 * heads and shape["d_ff"] * 2 == 5 * shape["d_model"]


def test_flops_per_token_is_kaplan_6n_plus_attention():
    cfg = load_config(None, ["model.series=passuntil:2"]).model
    n = param_counts(cfg).matmul
    expected = 6 * n + 6 * cfg.layers * 512 * cfg.heads * cfg.head_dim
    assert flops_per_token(cfg, 512) == pytest.approx(expected)


def _rope_reference(x, positions, theta):
    """Slow loop over (position, pair) with explicit 2x2 rotations."""
    b, t, h, d = x.shape
    out = np.zeros_like(x)
    half = d // 2
    for bi in range(b):
        for ti in range(t):
            for i in range(half):
                angle = positions[bi, ti] * theta ** (-i / half)
                c, s = np.cos(angle), np.sin(angle)
                a, bb = x[bi, ti, :, i], x[bi, ti, :, i + half]
                out[bi, ti, :, i] = a * c - bb * s
                out[bi, ti, :, i + half] = bb * c + a * s
    return out


def test_rope_matches_explicit_rotations_and_is_relative():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
    pos = np.array([[0, 1, 2, 3, 4], [7, 8, 0, 1, 2]])
    rotated = rope(jnp.asarray(x), rotary_angles(jnp.asarray(pos), 8, 10000.0))
    np.testing.assert_allclose(rotated, _rope_reference(x, pos, 10000.0), atol=1e-5)
    # relative: <rope(q, m), rope(k, n)> depends only on m - n
    q, k = x[:1, :1], x[:1, 1:2]
    dot = lambda m, n: float(jnp.sum(rope(jnp.asarray(q), rotary_angles(jnp.array([[m]]), 8, 1e4)) *  # noqa: E731
                                     rope(jnp.asarray(k), rotary_angles(jnp.array([[n]]), 8, 1e4))))
    assert dot(5, 2) == pytest.approx(dot(13, 10), rel=1e-4)


def test_attention_mask_is_causal_within_segments_only():
    seg = jnp.array([[1, 1, 2, 2, 2, 0]])
    mask = np.asarray(attention_mask(seg))[0, 0]
    expected = np.zeros((6, 6), bool)
    for q in range(6):
        for k in range(6):
            expected[q, k] = (seg[0, q] == seg[0, k] != 0 and k <= q) or q == k
    np.testing.assert_array_equal(mask, expected)


def test_prefix_mask_is_bidirectional_on_inputs_and_causal_after():
    seg = jnp.ones((1, 5), jnp.int32)
    prefix = jnp.array([[True, True, True, False, False]])
    mask = np.asarray(attention_mask(seg, prefix))[0, 0]
    assert mask[0, 2] and mask[1, 2]  # inputs see each other, forwards too
    assert not mask[2, 3] and mask[3, 2] and not mask[3, 4] and mask[4, 3]


def test_bf16_compute_stays_close_to_fp32():
    cfg32 = load_config(None, ["model.layers=2", "model.d_model=64", "model.heads=2", "model.head_dim=32",
                               "model.d_ff=128"]).model
    cfg16 = load_config(None, ["model.layers=2", "model.d_model=64", "model.heads=2", "model.head_dim=32",
                               "model.d_ff=128", "model.dtype=bfloat16"]).model
    tokens = jnp.arange(24).reshape(2, 12) + 3
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    seg = jnp.ones((2, 12), jnp.int32)
    m32, m16 = Decoder(cfg32, nnx.Rngs(0)), Decoder(cfg16, nnx.Rngs(0))
    l32 = m32.logits(m32(tokens, pos, seg))
    l16 = m16.logits(m16(tokens, pos, seg))
    assert l16.dtype == jnp.float32
    np.testing.assert_allclose(l16, l32, atol=0.05)
