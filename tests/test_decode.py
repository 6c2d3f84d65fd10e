"""KV-cache decoding: cached greedy == argmax of full forward passes, sampling filters, stop strings,
teacher-forced log-probabilities, self-speculative decoding == plain greedy (each row advancing by its own
acceptance), and every decoding step donating its state (the KV cache is updated in place)."""

import dataclasses
import functools
import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY
from flax import nnx

from scaling_jax.config import load_config
from scaling_jax.data.tokenizer import ByteTokenizer
from scaling_jax.model.decode import CachedLM, SamplingConfig, full_logits, greedy, sample_logits, truncate_at_stop
from scaling_jax.model.transformer import Decoder
from scaling_jax.objectives.multi_token import MultiTokenModel

PROMPTS = ["def f(x):\n    return", "import os", "class A:\n    pass\n\n\nclass B(A):"]
PROMPTS_8 = PROMPTS + ["x = [1, 2, 3]", "for i in range(10):\n", "    if a:", "#", "print('hello')"]


# Decode steps for the mtp tests: they share one model per layout (see ``mixed``), so one batch/length of
# prefill + plain + speculative steps compiles once and serves the greedy, speculative, stop and donation tests.
STEPS = 24


@pytest.fixture(scope="module")
def tok():
    return ByteTokenizer()


@partial(jax.jit, static_argnums=0)
def _full_forward(graphdef, state, tokens, seg):
    """Full-forward logits of right-padded rows (one compile per model structure and shape, whatever the
    weights; causal, so the padding after a position never changes its logits)."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return full_logits(nnx.merge(graphdef, state), tokens, positions, seg)


def _padded_logits(model, seqs, length=64):
    """Logits ``[rows, length, vocab]`` of each sequence, right-padded to one fixed length."""
    graphdef, state = nnx.split(model)
    tokens = jnp.asarray([list(s) + [0] * (length - len(s)) for s in seqs])
    seg = jnp.asarray([[1] * len(s) + [0] * (length - len(s)) for s in seqs])
    return _full_forward(graphdef, state, tokens, seg)


def _reference_greedy(model, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """Re-run every whole sequence without a cache for every new token (rows padded independently)."""
    seqs = [list(p) for p in prompts]
    for _ in range(steps):
        logits = np.asarray(_padded_logits(model, seqs))
        for r, seq in enumerate(seqs):
            seq.append(int(np.argmax(logits[r, len(seq) - 1])))  # the first of ties, as jnp.argmax
    return [seq[len(p):] for seq, p in zip(seqs, prompts, strict=True)]


def _mixed_acceptance_model(config) -> MultiTokenModel:
    """A random 3-head model whose draft heads are scaled up until their drafts are sometimes right and
    sometimes wrong (an untrained model's heads all just repeat the current token), so rows accept different
    numbers of drafts in the same call."""
    model = MultiTokenModel(config.model, 3, nnx.Rngs(7))
    for head in list(model.heads)[1:]:
        head.mlp.w_down[...] = head.mlp.w_down[...] * 30.0
    return model


@pytest.fixture(scope="module")
def mixed(tok):
    """``mixed(scan) -> (lm, model, prompts, plain)``: one 3-layer mixed-acceptance model per cache layout, its
    ``CachedLM``, the 8 prompts and their plain greedy decoding (``STEPS`` tokens), built once per module."""
    @functools.cache
    def make(scan: bool):
        config = load_config(None, TINY + ["model.layers=3", f"model.scan_layers={str(scan).lower()}"])
        model = _mixed_acceptance_model(config)
        lm = CachedLM(model, tok)
        prompts = [lm.encode_prompt(p) for p in PROMPTS_8]
        return lm, model, prompts, lm.generate_ids(prompts, SamplingConfig(max_new_tokens=STEPS))
    return make


@pytest.mark.parametrize("kind, scan", [("decoder", True), ("mtp", True), ("decoder", False), ("mtp", False)])
def test_cached_greedy_equals_argmax_of_full_forward_passes(tiny_config, tok, mixed, kind, scan):
    """Both block layouts: the stacked cache scanned with the stacked blocks, and one cache per listed block.
    The mtp model is the shared mixed-acceptance one (its head 1 is an ordinary random block)."""
    if kind == "decoder":  # 2 layers: the stacked cache still scans over more than one block
        model = Decoder(tiny_config(f"model.scan_layers={str(scan).lower()}").model, nnx.Rngs(1))
        lm = CachedLM(model, tok)
        prompts = [lm.encode_prompt(p) for p in PROMPTS_8]  # different lengths: rows are left-padded together
        out = lm.generate_ids(prompts, SamplingConfig(max_new_tokens=STEPS))
    else:
        lm, model, prompts, out = mixed(scan)
    assert len({len(p) for p in prompts}) > 1
    for got, want in zip(out.tokens, _reference_greedy(model, prompts, STEPS), strict=True):
        want = want[:want.index(tok.eos_id)] if tok.eos_id in want else want
        assert got == want


@pytest.mark.parametrize("scan", [True, False])
def test_self_speculative_decoding_equals_plain_greedy_at_batch_1_and_8(mixed, scan):
    """Left-padded prompts of 8 lengths, both cache layouts; each row advances by its own acceptance, so the
    batch takes exactly as many calls as its slowest row alone, and its rows as many row-calls as alone."""
    lm, _, prompts, plain = mixed(scan)
    spec = lm.speculative_greedy_ids(prompts, STEPS)
    assert spec.tokens == plain.tokens
    assert 0 < min(spec.draft_acceptance) and max(spec.draft_acceptance) < 1, "rows should disagree"
    alone = [lm.speculative_greedy_ids([p], STEPS) for p in prompts]
    assert [a.tokens[0] for a in alone] == plain.tokens
    assert min(a.forward_calls for a in alone) < max(a.forward_calls for a in alone)
    assert spec.forward_calls == max(a.forward_calls for a in alone)
    assert spec.row_calls == sum(a.row_calls for a in alone)
    two_heads = lm.speculative_greedy_ids(prompts, STEPS, heads=2)  # draft with head 2 only
    assert two_heads.tokens == plain.tokens and len(two_heads.draft_acceptance) == 1


def test_speculative_decoding_stops_where_plain_decoding_stops(mixed):
    lm, _, prompts, _ = mixed(True)
    prompts = prompts[:5]  # 5 rows: padded to 8, the padding rows start done
    free = lm.generate_ids(prompts, SamplingConfig(max_new_tokens=STEPS)).texts
    stop = next(t[3:5] for t in free if len(t) >= 5 and t[3:5].strip())
    plain = lm.generate_ids(prompts, SamplingConfig(max_new_tokens=STEPS, stop=(stop,)))
    spec = lm.speculative_greedy_ids(prompts, STEPS, stop=(stop,))
    assert spec.texts == plain.texts and spec.tokens == plain.tokens
    assert any(stop not in t and len(t) < len(f) for t, f in zip(spec.texts, free, strict=True))


@pytest.mark.parametrize("scan", [True, False])
def test_decoding_steps_donate_their_state(mixed, scan):
    """The jitted plain and speculative steps take the whole decoding state (KV cache included) as a donated
    argument: after a call the input buffers are gone (XLA reused them in place), and XLA reported none of them
    unusable."""
    lm, _, prompts, _ = mixed(scan)
    for heads in (1, 3):
        state, key_valid, _ = lm._begin(prompts, STEPS, heads)
        cache = jax.tree.leaves(state["cache"])
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # "Some donated buffers were not usable" would fail here
            if heads == 1:
                new, _, _ = lm._plain_step(lm._leaves, state, key_valid, jax.random.key(0), 0.0, 0, 1.0)
            else:
                new, _, _ = lm._speculative_step(lm._leaves, state, key_valid)
        assert all(x.is_deleted() for x in jax.tree.leaves(state))
        assert len(cache) == len(jax.tree.leaves(new["cache"])) and all(x.is_deleted() for x in cache)
        assert not any(x.is_deleted() for x in jax.tree.leaves(new))


def test_greedy_is_argmax_first_of_ties():
    logits = jnp.asarray([[0.0, 2.0, 2.0, 1.0], [3.0, -1.0, 3.0, 3.0], [-jnp.inf, -5.0, -jnp.inf, -5.0]])
    assert greedy(logits).tolist() == jnp.argmax(logits, axis=-1).tolist() == [1, 0, 1]
    random = jax.random.normal(jax.random.key(0), (4, 3, 384))
    assert (greedy(random) == jnp.argmax(random, axis=-1)).all()


def test_speculative_decoding_accepts_every_draft_when_the_heads_agree_with_greedy(tiny_config, tok):
    """With every block's output projections zeroed, each head's logits are the tied embedding's similarity
    to the current token, so greedy repeats the last token and every head drafts that same token: a call
    then emits all n tokens. (The mixed-acceptance model's shapes and batch: its compiled steps are reused.)"""
    model = MultiTokenModel(tiny_config("model.layers=3").model, 3, nnx.Rngs(5))
    for block in [model.trunk.layers] + list(model.heads):  # the stacked trunk blocks zero all layers at once
        block.attn.wo[...] = jnp.zeros_like(block.attn.wo[...])
        block.mlp.w_down[...] = jnp.zeros_like(block.mlp.w_down[...])
    lm = CachedLM(model, tok)
    prompts = [lm.encode_prompt(p) for p in PROMPTS_8]
    spec = lm.speculative_greedy_ids(prompts, STEPS)
    assert spec.tokens == lm.generate_ids(prompts, SamplingConfig(max_new_tokens=STEPS)).tokens
    assert spec.forward_calls == STEPS // 3 and spec.draft_acceptance == [1.0, 1.0]


def test_speculative_decoding_refuses_a_single_head_model(tiny_config, tok):
    lm = CachedLM(Decoder(tiny_config().model, nnx.Rngs(0)), tok)
    with pytest.raises(ValueError, match="multi-token"):
        lm.speculative_greedy_ids([[1, 70]], 4)


def test_logprobs_are_the_full_forward_log_softmax_at_each_target(tiny_config, tok):
    model = Decoder(tiny_config().model, nnx.Rngs(2))
    lm = CachedLM(model, tok)
    prefix, cont = lm.encode_prompt("x = 1"), list(tok.encode("\ny"))
    got = lm.logprobs([prefix, prefix[:3]], [cont, cont])[0]
    # 8 copies of the row: the 8-row full forward the greedy test compiled for this model shape
    logp = jax.nn.log_softmax(_padded_logits(model, [prefix + cont] * 8)[0], -1)
    want = [float(logp[len(prefix) - 1 + i, c]) for i, c in enumerate(cont)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_stop_string_ends_a_row_and_is_excluded(tiny_config, tok):
    """8 copies of one prompt: the batch and length the greedy test compiled for this model shape."""
    lm = CachedLM(Decoder(tiny_config().model, nnx.Rngs(3)), tok)
    prompt = [lm.encode_prompt("abc")] * 8
    free = lm.generate_ids(prompt, SamplingConfig(max_new_tokens=STEPS)).texts
    assert len(set(free)) == 1
    free = free[0]
    assert len(free) >= 6, "the tiny model should emit some bytes"
    stop = free[4:6]
    out = lm.generate_ids(prompt, SamplingConfig(max_new_tokens=STEPS, stop=(stop,)))
    assert out.texts == [free[:free.find(stop)]] * 8
    assert out.forward_calls < STEPS or free.find(stop) + len(stop) == STEPS
    assert truncate_at_stop("a\nb;c", ["\n", ";"]) == "a"
    assert truncate_at_stop("abc", ["\n"]) == "abc"


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = jax.random.normal(jax.random.key(0), (16, 50))
    greedy = sample_logits(logits, jax.random.key(1), 0.0)
    assert (sample_logits(logits, jax.random.key(1), 1.0, top_k=1) == greedy).all()
    assert (sample_logits(logits, jax.random.key(1), 1.0, top_p=1e-6) == greedy).all()


def test_temperature_sampling_follows_the_softmax_and_filters_keep_only_their_set():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.log(jnp.asarray(np.tile(probs, (20000, 1)), jnp.float32))
    draws = np.asarray(sample_logits(logits, jax.random.key(0), 1.0))
    freq = np.bincount(draws, minlength=4) / len(draws)
    assert np.all(np.abs(freq - probs) < 4 * np.sqrt(probs * (1 - probs) / len(draws)))
    top2 = np.asarray(sample_logits(logits, jax.random.key(1), 1.0, top_k=2))
    assert set(top2.tolist()) == {0, 1}
    assert abs((top2 == 0).mean() - 0.5 / 0.8) < 0.02  # renormalised over the kept tokens
    nucleus = np.asarray(sample_logits(logits, jax.random.key(2), 1.0, top_p=0.7))  # 0.5 + 0.3 reaches 0.7
    assert set(nucleus.tolist()) == {0, 1}
    hot = np.asarray(sample_logits(logits, jax.random.key(3), 2.0))
    want = probs ** 0.5 / (probs ** 0.5).sum()
    assert np.all(np.abs(np.bincount(hot, minlength=4) / len(hot) - want) < 0.02)
    # ties: each filter still keeps exactly its count (HF's top-p keeps 2 of 4 equal tokens at p=0.5)
    tied = lambda p: jnp.log(jnp.asarray(np.tile(p, (2000, 1)), jnp.float32))  # noqa: E731
    kept = lambda logits, **f: set(np.asarray(sample_logits(logits, jax.random.key(4), 1.0, **f)).tolist())  # noqa: E731
    assert kept(tied([0.4, 0.4, 0.2]), top_k=1) == {0}
    assert kept(tied([0.25] * 4), top_p=0.5) == {0, 1}
    assert kept(tied([0.5, 0.25, 0.25]), top_p=0.75) == {0, 1}
    assert kept(tied([0.25] * 4), top_k=3, top_p=0.5) == {0, 1}


def test_invalid_sampling_settings_are_refused():
    with pytest.raises(ValueError, match="temperature 0 .greedy. or >= 1e-30"):
        SamplingConfig(temperature=1e-39)  # logits / T overflows: the "coldest" sample was not the argmax
    with pytest.raises(ValueError):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError):
        SamplingConfig(temperature=-1.0)


def test_a_prompt_longer_than_max_len_keeps_its_bos_and_newest_tokens(tiny_config, tok):
    """Text-level calls cut a long prompt as lm-eval does (oldest tokens go), keeping the bos that starts it:
    each equals the token-level call on the prompt cut by hand; prompts that fit are read whole."""
    model = Decoder(tiny_config().model, nnx.Rngs(2))
    lm, whole = CachedLM(model, tok, max_len=40), CachedLM(model, tok)
    context, continuation = "0123456789" * 5 + "x = 1", "\ny"
    ids = lm.encode_prompt(context)  # bos + 55 bytes
    cont = [int(t) for t in tok.encode(continuation)]
    cut = ids[:1] + ids[-(40 - (len(cont) - 1) - 1):]  # bos + 38 newest: 39 + 2 - 1 tokens read = 40
    assert len(cut) + len(cont) - 1 == 40 and cut[-5:] == ids[-5:]
    got = lm.loglikelihood([context, "x = 1"], [continuation, continuation])
    want = whole.logprobs([cut, lm.encode_prompt("x = 1")], [cont, cont])
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    sampling = SamplingConfig(max_new_tokens=8)
    assert lm.generate([context], sampling) == whole.generate_ids([ids[:1] + ids[-31:]], sampling).texts
    assert lm.fit_prompt(ids, 100) == ids[:1]  # a continuation longer than max_len: only the bos is left
    long_answer = SamplingConfig(max_new_tokens=48)  # longer than the window: half of it stays the prompt's
    assert lm.generate([context], long_answer) == whole.generate_ids([ids[:1] + ids[-19:]], long_answer).texts


def test_a_sampled_prompt_gives_the_same_text_whatever_batch_it_is_in(tiny_config, tok):
    """Each request draws from its own stream (the seed folded with its index), so the batch size and the rows
    beside it do not change its samples; different requests still draw differently."""
    lm = CachedLM(Decoder(tiny_config().model, nnx.Rngs(4)), tok)
    prompts = PROMPTS + PROMPTS[:2]  # 5 prompts: batches of 2, 2, 1 against one batch of 5 (padded to 8)
    sampling = SamplingConfig(max_new_tokens=12, temperature=1.0, seed=7)
    one_batch = lm.generate(prompts, sampling, batch_size=8)
    assert lm.generate(prompts, sampling, batch_size=2) == one_batch
    assert one_batch[0] != one_batch[3]  # the same prompt as request 0 and 3: two streams
    assert lm.generate(prompts, dataclasses.replace(sampling, seed=8), batch_size=8) != one_batch
