"""Autoregressive decoding with a KV cache: greedy, temperature, top-k and top-p sampling, stop
sequences, teacher-forced log-likelihoods, and self-speculative decoding with multi-token heads.

Works on the plain ``Decoder`` and on ``MultiTokenModel`` (trunk + per-head blocks); for the latter,
plain decoding uses head 1 (the next-token head), so its output is the model's greedy continuation.
The trunk's cache has the layout of its blocks: stacked on a leading ``layers`` axis and scanned with
them (``model.scan_layers``, the stacked cache then rides in the scan's carry so it is updated in
place), or one pair per block.

Batches of prompts are left-padded into one block of ``P`` slots; per-row positions and a
key-validity mask make padding invisible. Generated tokens go into slot ``P + count`` of their row:
plain decoding advances every row together (one write slot), speculative decoding advances each row by
its own acceptance (one write slot per row). Each chunk attends over the whole fixed-size cache with a
causal mask on slot indices, so stale keys beyond a row's length (from rejected drafts) are never seen
and get overwritten before they could be.

Every decoding step is one jitted call that takes the whole decoding state (cache, last logits or
drafts, output buffer, per-row counts and flags) and donates it, so the cache is updated in place
instead of copied; the only host work per step is reading whether every row has finished, one step
late so the host never waits for the device (the extra step leaves finished rows unchanged), plus the
new tokens when stop strings must be checked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scaling_jax.model.layers import Block
from scaling_jax.model.transformer import Decoder, slot_distance

# {"trunk": keys and values of the decoder's blocks: one stacked pair [layers, ...] when its blocks are scanned,
# else a list of pairs; "heads": [one (keys, values) pair per MTP head in use]}. Keys are
# [(layers,) batch, kv_heads, max_len, head_dim] and values [(layers,) batch, kv_heads, head_dim, max_len]:
# the layouts attention's two batched matmuls read with their contracted axis innermost, so XLA neither
# transposes the cache on every call nor falls back to its generic dot (with the slot-major [batch, max_len,
# kv_heads, head_dim] layout those transposed copies were ~25% of a batch-8 speculative step on CPU).
Cache = dict

# Chunks of up to this many queries attend one query at a time: XLA:CPU runs a one-query attention as a fast
# matrix-vector product but a few-query one as a general batched matmul, ~6x slower per query at batch 8
# (unrolling cut a batch-8 two-token step by ~20%), and each query then computes as in one-token decoding.
UNROLL_QUERIES = 8


MIN_TEMPERATURE = 1e-30


@dataclass(frozen=True)
class SamplingConfig:
    """``temperature=0`` is greedy; ``top_k=0`` and ``top_p=1`` disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()  # generation of a row ends at the first of these strings (excluded from the output)
    seed: int = 0

    def __post_init__(self):
        # logits / temperature in float32: below 1e-30 the quotient overflows (or the divisor flushes to 0), so the
        # "sample" is no longer the argmax it approaches; temperature=0 is greedy
        cold = 0 < self.temperature < MIN_TEMPERATURE
        if cold or self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1 or self.max_new_tokens < 1:
            raise ValueError(f"invalid sampling settings {self}: need temperature 0 (greedy) or >= "
                             f"{MIN_TEMPERATURE:g}, top_k >= 0, 0 < top_p <= 1, max_new_tokens >= 1")


# ----------------------------------------------------------------------------- model structure


def model_parts(model: nnx.Module) -> tuple[Decoder, list[Block]]:
    """(decoder with embedding, blocks, norm and unembedding; head blocks), heads empty for a plain decoder."""
    if isinstance(model, Decoder):
        return model, []
    trunk, heads = getattr(model, "trunk", None), getattr(model, "heads", None)
    if isinstance(trunk, Decoder) and heads is not None:
        return trunk, list(heads)
    raise TypeError(f"cannot decode with {type(model).__name__}: expected a Decoder or a trunk + heads model")


def num_heads(model: nnx.Module) -> int:
    return max(1, len(model_parts(model)[1]))


def init_cache(model: nnx.Module, batch: int, max_len: int, heads: int | None = None) -> Cache:
    """Zero keys and values of the trunk and of the first ``heads`` head blocks (default all)."""
    decoder, blocks = model_parts(model)

    def zeros(attn, *lead):
        _, kv_heads, head_dim = attn.wk.shape[-3:]
        return (jnp.zeros((*lead, batch, kv_heads, max_len, head_dim), decoder.dtype),
                jnp.zeros((*lead, batch, kv_heads, head_dim, max_len), decoder.dtype))

    if decoder.scan_layers:
        trunk = zeros(decoder.layers.attn, decoder.layers.attn.wk.shape[0])
    else:
        trunk = [zeros(block.attn) for block in decoder.blocks]
    return {"trunk": trunk, "heads": [zeros(block.attn) for block in (blocks if heads is None else blocks[:heads])]}


def chunk_mask(key_valid: jax.Array, index: jax.Array, chunk: int) -> jax.Array:
    """``[batch, 1, chunk, max_len]``: a query in slot ``index + i`` sees valid keys in slots up to its own.
    ``index`` is one slot for every row or ``[batch]`` (rows at different lengths). Its own slot is always
    visible, so a padding query never has an empty row."""
    max_len = key_valid.shape[-1]
    q_slot = jnp.reshape(index, (-1, 1)) + jnp.arange(chunk)  # [1 or batch, chunk]
    k_slot = jnp.arange(max_len)
    causal = k_slot <= q_slot[..., None]
    mask = (causal & key_valid[:, None, :]) | (k_slot == q_slot[..., None])
    return mask[:, None]


def _slot_index(index: jax.Array, batch: int, chunk: int) -> tuple[jax.Array, jax.Array]:
    """Row and slot indices ``[batch, chunk]`` of a chunk written from slot ``index`` (scalar or ``[batch]``)."""
    start = jnp.broadcast_to(jnp.reshape(index, (-1, 1)), (batch, 1))
    return jnp.arange(batch)[:, None], start + jnp.arange(chunk)


def write_slots(buffer: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
    """``buffer [batch, slots]`` with ``new [batch, chunk]`` written from slot ``index``: one slot for every row,
    or ``[batch]`` slots (one per row). A scatter with sorted unique indices: on a donated buffer (or a scan
    carry) XLA updates it in place (a ``dynamic_update_slice`` of a carried cache measured slower on CPU, as if
    copied); slots past the end are dropped."""
    rows, slots = _slot_index(index, *new.shape[:2])
    return buffer.at[rows, slots].set(new.astype(buffer.dtype), indices_are_sorted=True, unique_indices=True)


def write_kv(cache: jax.Array, new: jax.Array, index: jax.Array, values: bool, layer: jax.Array | None = None):
    """A key or value cache (see ``Cache``) with a chunk's ``new [batch, chunk, kv_heads, head_dim]`` written
    from slot ``index`` (see ``write_slots``); into layer ``layer`` of a stacked cache."""
    rows, slots = _slot_index(index, *new.shape[:2])
    at = (rows, slice(None), slice(None), slots) if values else (rows, slice(None), slots)
    at = at if layer is None else (layer, *at)
    return cache.at[at].set(new.astype(cache.dtype), indices_are_sorted=True, unique_indices=True)


def _take(x: jax.Array, at: jax.Array, axis: int = 1) -> jax.Array:
    """Per row, the entry ``at[row]`` of ``axis`` (kept as a length-1 axis): a masked sum (exact, every other
    term is zero), which XLA fuses into a loop, rather than a gather."""
    shape = [1] * x.ndim
    shape[0], shape[axis] = -1, x.shape[axis]
    hit = jnp.reshape(jnp.arange(x.shape[axis]) == jnp.reshape(at, (-1, 1)), shape)
    if x.dtype == jnp.bool_:
        return jnp.any(hit & x, axis=axis, keepdims=True)
    return jnp.sum(jnp.where(hit, x, jnp.zeros((), x.dtype)), axis=axis, keepdims=True)


def chunk_bias(decoder: Decoder, index: jax.Array, batch: int, chunk: int, max_len: int) -> jax.Array | None:
    """Relative-position biases ``[batch, heads, chunk, max_len]`` of a chunk written from slot ``index`` (see
    ``chunk_mask``); None for a RoPE model."""
    bias = decoder.relative_bias(slot_distance(index, chunk, max_len))
    return None if bias is None else jnp.broadcast_to(bias, (batch, *bias.shape[1:]))


def _block(block: Block, x: jax.Array, positions: jax.Array, mask: jax.Array, write, query=None, bias=None):
    """One block over a chunk whose keys and values ``write(k, v) -> (new cache, (keys, values))`` stores.

    ``query`` (``[batch]`` chunk offsets) computes the block's output only there (``[batch, 1, d]``): the
    keys and values of the whole chunk depend only on its input, so a head whose other outputs are never
    used still keeps its cache complete for later steps. ``bias``: ``chunk_bias`` (relative positions)."""
    q, k, v = block.attn.qkv(block.attn_norm(x), positions)
    cache, (keys, values) = write(k, v)
    if query is not None:
        q, x, mask = _take(q, query), _take(x, query), _take(mask, query, axis=2)
        bias = None if bias is None else _take(bias, query, axis=2)
    keys = jnp.transpose(keys, (0, 2, 1, 3)).astype(q.dtype)  # [batch, slots, kv_heads, head_dim], as attend wants
    values = jnp.transpose(values, (0, 3, 1, 2)).astype(q.dtype)
    if 1 < q.shape[1] <= UNROLL_QUERIES:  # a speculative chunk: one query at a time (see UNROLL_QUERIES)
        attn = jnp.concatenate([block.attn.attend(q[:, t:t + 1], keys, values, mask[:, :, t:t + 1],
                                                  None if bias is None else bias[:, :, t:t + 1])
                                for t in range(q.shape[1])], axis=1)
    else:
        attn = block.attn.attend(q, keys, values, mask, bias)
    x = x + attn
    return x + block.mlp(block.mlp_norm(x)), cache


def _head_block(block: Block, x, positions, mask, kv, index, query=None, bias=None):
    def write(k, v):
        new = (write_kv(kv[0], k, index, False), write_kv(kv[1], v, index, True))
        return new, new

    return _block(block, x, positions, mask, write, query, bias)


def run_trunk(decoder: Decoder, x: jax.Array, positions: jax.Array, mask: jax.Array, cache, index: jax.Array,
              bias: jax.Array | None = None):
    """The decoder's blocks over a chunk written at ``index`` (see ``write_slots``), before the final norm."""
    if not decoder.scan_layers:
        new = []
        for block, kv in zip(decoder.blocks, cache, strict=True):
            x, kv = _head_block(block, x, positions, mask, kv, index, bias=bias)
            new.append(kv)
        return x, new
    graphdef, params = nnx.split(decoder.layers)

    def body(carry, xs):
        h, (ck, cv) = carry
        layer, i = xs

        def write(k, v):
            new = (write_kv(ck, k, index, False, i), write_kv(cv, v, index, True, i))
            return new, tuple(jax.lax.dynamic_index_in_dim(c, i, 0, keepdims=False) for c in new)

        return _block(nnx.merge(graphdef, layer), h, positions, mask, write, bias=bias), None

    layers = jax.tree.leaves(cache)[0].shape[0]
    (x, cache), _ = jax.lax.scan(body, (x, tuple(cache)), (params, jnp.arange(layers)))
    return x, cache


def forward_cached(model: nnx.Module, tokens: jax.Array, positions: jax.Array, key_valid: jax.Array,
                   cache: Cache, index: jax.Array, query: jax.Array | None = None) -> tuple[jax.Array, Cache]:
    """Logits ``[heads, batch, chunk, vocab]`` of a chunk written at cache slot ``index`` (one for all rows,
    or ``[batch]``), for every head that ``cache`` holds (the next-token head first).

    ``query`` (``[batch]`` chunk offsets) gives the logits at those positions only (``chunk`` becomes 1);
    every head's keys and values are still written for the whole chunk.
    """
    decoder, heads = model_parts(model)
    mask = chunk_mask(key_valid, index, tokens.shape[1])
    bias = chunk_bias(decoder, index, *tokens.shape, key_valid.shape[1])
    x, trunk_cache = run_trunk(decoder, decoder.embed(tokens), positions, mask, cache["trunk"], index, bias)
    if not heads:
        x = x if query is None else _take(x, query)
        return decoder.logits(decoder.final_norm(x))[None], {"trunk": trunk_cache, "heads": []}
    logits, head_cache = [], []
    for block, kv in zip(heads, cache["heads"], strict=False):  # the heads the cache holds
        h, kv = _head_block(block, x, positions, mask, kv, index, query, bias)
        logits.append(decoder.logits(decoder.final_norm(h)))
        head_cache.append(kv)
    return jnp.stack(logits), {"trunk": trunk_cache, "heads": head_cache}


# ----------------------------------------------------------------------------- decoding steps (pure, jitted)


def start_state(model: nnx.Module, tokens: jax.Array, positions: jax.Array, key_valid: jax.Array,
                next_pos: jax.Array, done: jax.Array, heads: int, max_new_tokens: int) -> dict:
    """Prefill the prompt block ``[batch, P]`` into a fresh cache of ``key_valid.shape[1]`` slots and return
    the decoding state. ``heads``: caches and first predictions of that many heads (1: plain decoding,
    its ``logits`` are head 1's at the last prompt slot; >= 2: speculative, ``guesses`` = head 1's token and
    the drafts of heads 2..heads)."""
    batch, prompt = tokens.shape
    cache = init_cache(model, batch, key_valid.shape[1], heads)
    last = jnp.full((batch,), prompt - 1, jnp.int32)
    logits, cache = forward_cached(model, tokens, positions, key_valid, cache, jnp.int32(0), query=last)
    logits = logits[:, :, 0]  # [heads, batch, vocab]
    state = {"cache": cache, "pos": next_pos, "done": done}
    if heads == 1:
        return {**state, "logits": logits[0], "index": jnp.int32(prompt), "step": jnp.int32(0),
                "out": jnp.zeros((batch, max_new_tokens), jnp.int32)}
    return {**state, "guesses": greedy(logits).T,
            "slot": jnp.full((batch,), prompt, jnp.int32), "count": jnp.zeros((batch,), jnp.int32),
            "out": jnp.zeros((batch, max_new_tokens + heads), jnp.int32),
            "row_calls": jnp.int32(0), "hits": jnp.zeros((heads - 1,), jnp.int32)}


def plain_step(model: nnx.Module, state: dict, key_valid: jax.Array, key: jax.Array, eos_id: int,
               temperature: float, top_k: int, top_p: float) -> tuple[dict, jax.Array, tuple]:
    """Sample one token per row from the last logits, store it, and run it through the model.

    Returns ``(state, every row done, (tokens [batch, 1], emitted [batch], done [batch]))``; rows finish at
    eos or after ``max_new_tokens``."""
    step = state["step"]
    active = ~state["done"]
    token = sample_logits(state["logits"], _fold_in(key, step), temperature, top_k, top_p)
    out = jax.lax.dynamic_update_slice(state["out"], token[:, None], (0, step))
    logits, cache = forward_cached(model, token[:, None], state["pos"][:, None], key_valid, state["cache"],
                                   state["index"])
    done = state["done"] | (token == eos_id) | (step + 1 >= out.shape[1])
    new = {**state, "cache": cache, "logits": logits[0, :, -1], "out": out, "index": state["index"] + 1,
           "step": step + 1, "pos": state["pos"] + 1, "done": done}
    return new, jnp.all(done), (token[:, None], active.astype(jnp.int32), done)


def speculative_step(model: nnx.Module, state: dict, key_valid: jax.Array, eos_id: int):
    """One verify-and-draft call of self-speculative greedy decoding, entirely on device.

    Each row feeds its chunk [head-1 token, drafts of heads 2..c] at its own slot; head 1's predictions in
    the chunk accept the longest matching draft prefix (1..c tokens), and the row advances by that many.
    Heads 2..c then run only at the last accepted position, where their drafts are used (their keys and
    values are written for the whole chunk). Finished rows stay as they are.

    Returns ``(state, every row done, (chunk tokens [batch, c], emitted [batch], done [batch]))``."""
    decoder, heads = model_parts(model)
    guesses, slot, active = state["guesses"], state["slot"], ~state["done"]
    batch, c = guesses.shape
    positions = state["pos"][:, None] + jnp.arange(c, dtype=jnp.int32)
    mask = chunk_mask(key_valid, slot, c)
    bias = chunk_bias(decoder, slot, batch, c, key_valid.shape[1])
    x, trunk_cache = run_trunk(decoder, decoder.embed(guesses), positions, mask, state["cache"]["trunk"], slot, bias)
    h, head_cache = _head_block(heads[0], x, positions, mask, state["cache"]["heads"][0], slot, bias=bias)
    verify = greedy(decoder.logits(decoder.final_norm(h)))  # [batch, c]
    # matches[:, j]: drafts 1..j+1 all equal head 1's predictions (a running AND: cheaper than cumprod here)
    agree = guesses[:, 1:] == verify[:, :-1]
    running = [agree[:, 0]]
    for j in range(1, c - 1):
        running.append(running[-1] & agree[:, j])
    matches = jnp.stack(running, axis=1).astype(jnp.int32)  # [batch, c - 1]
    accepted = 1 + matches.sum(axis=1)
    last = accepted - 1
    drafts, head_caches = [_take(verify, last)[:, 0]], [head_cache]
    for block, kv in zip(heads[1:c], state["cache"]["heads"][1:], strict=True):
        h, kv = _head_block(block, x, positions, mask, kv, slot, query=last, bias=bias)
        drafts.append(greedy(decoder.logits(decoder.final_norm(h))[:, 0]))
        head_caches.append(kv)
    advance = jnp.where(active, accepted, 0)
    count = state["count"] + advance
    max_new = state["out"].shape[1] - c
    emitted = jnp.arange(c) < advance[:, None]
    eos = jnp.any((guesses == eos_id) & emitted, axis=1)
    done = state["done"] | eos | (count >= max_new)
    out = jnp.where(active[:, None], write_slots(state["out"], guesses, state["count"]), state["out"])
    new = {**state, "cache": {"trunk": trunk_cache, "heads": head_caches},
           "guesses": jnp.where(active[:, None], jnp.stack(drafts, axis=1), guesses),
           "slot": slot + advance, "pos": state["pos"] + advance, "count": count, "out": out, "done": done,
           "row_calls": state["row_calls"] + active.sum(),
           "hits": state["hits"] + jnp.where(active[:, None], matches, 0).sum(axis=0)}
    return new, jnp.all(done), (guesses, advance, done)


def full_logits(model: nnx.Module, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """Next-token (head 1) float32 logits of a whole sequence without a cache, as in training."""
    decoder, heads = model_parts(model)
    if not heads:
        return decoder.logits(decoder(tokens, positions, segment_ids))
    z = model.trunk_hidden(tokens, positions, segment_ids)
    return model.head_logits(0, z, positions, segment_ids)


# ----------------------------------------------------------------------------- sampling


def greedy(logits: jax.Array) -> jax.Array:
    """``argmax`` over the last axis (the first of equal maxima, as ``jnp.argmax``) as two plain reductions,
    which XLA:CPU runs 1.5-3x faster than argmax's (value, index) reduction at decoding's shapes."""
    top = jnp.max(logits, axis=-1, keepdims=True)
    ids = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(logits == top, ids, logits.shape[-1] - 1), axis=-1)


def _fold_in(key: jax.Array, data) -> jax.Array:
    """``jax.random.fold_in`` of one key or of each key of ``[batch]`` keys."""
    return jax.random.fold_in(key, data) if key.ndim == 0 else jax.vmap(jax.random.fold_in, (0, None))(key, data)


def sample_logits(logits: jax.Array, key: jax.Array, temperature: float, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
    """Token ids ``[batch]`` from logits ``[batch, vocab]``; the settings are static Python numbers. ``key``: one
    key for the batch, or ``[batch]`` keys, one per row (a row's draw then does not depend on the others)."""
    if temperature == 0:
        return greedy(logits)
    logits = logits.astype(jnp.float32) / temperature
    # Both filters keep exactly their count of tokens, ties going to the lower id (as a stable sort orders them):
    # a cut by logit value would keep every token tied with the last one kept.
    order = jnp.argsort(-logits, axis=-1, stable=True)  # most likely first
    ordered = jnp.take_along_axis(logits, order, axis=-1)
    rank = jnp.argsort(order, axis=-1)  # each token's place in that order
    if top_k:
        logits = jnp.where(rank < top_k, logits, -jnp.inf)
        ordered = jnp.where(jnp.arange(ordered.shape[-1]) < top_k, ordered, -jnp.inf)
    if top_p < 1.0:
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
        keep = before < top_p  # the smallest prefix whose mass reaches top_p (always >= 1 token)
        logits = jnp.where(jnp.take_along_axis(keep, rank, axis=-1), logits, -jnp.inf)
    if key.ndim == 0:
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
    return jax.vmap(jax.random.categorical)(key, logits).astype(jnp.int32)


def _bucket(n: int, size: int = 32) -> int:
    """Round lengths up so a handful of shapes compile, not one per prompt length."""
    return max(size, -(-n // size) * size)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, length: int | None = None):
    """``(tokens, valid, positions)`` ``[batch, length]`` with each prompt right-aligned."""
    length = length or _bucket(max(len(p) for p in prompts), 128)
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    valid = np.zeros((len(prompts), length), bool)
    for r, p in enumerate(prompts):
        if len(p):
            tokens[r, length - len(p):] = p
            valid[r, length - len(p):] = True
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0).astype(np.int32)
    return tokens, valid, positions


@dataclass
class Generation:
    tokens: list[list[int]]  # generated ids per row (stop string / eos and anything after removed)
    texts: list[str] = field(default_factory=list)
    forward_calls: int = 0  # model invocations after the prompt (speculative decoding makes fewer)
    # speculative decoding: per draft head (2..c), the fraction of row-calls (one row in one call, finished rows
    # not counted) whose draft was accepted, and the mean tokens a row emitted per call (1 + their sum)
    draft_acceptance: list[float] = field(default_factory=list)
    tokens_per_call: float = 1.0
    row_calls: int = 0


class CachedLM:
    """A model ready for inference: parameters split out once, each decoding step jitted once per shape
    with the decoding state (KV cache included) donated, so it is updated in place."""

    def __init__(self, model: nnx.Module, tokenizer, max_len: int | None = None):
        """``max_len``: the longest sequence the text-level calls (``generate``, ``loglikelihood``) give the model,
        typically the ``data.seq_len`` it trained on: a longer prompt loses its oldest tokens (the bos that starts
        it stays), as lm-eval and BIG-bench's own model wrappers truncate; None reads prompts whole."""
        self.max_len = max_len
        self.graphdef, self.state = nnx.split(model)
        # the steps take the parameters as a flat list: flattening an nnx.State costs ~0.1 ms of host time a call
        self._leaves, self._treedef = jax.tree.flatten(self.state)
        self.tokenizer = tokenizer
        self.heads = num_heads(model)
        self._prompt_len = 0

    def _model(self, state):
        return nnx.merge(self.graphdef, state)

    def _model_of(self, leaves):
        return nnx.merge(self.graphdef, jax.tree.unflatten(self._treedef, leaves))

    @partial(jax.jit, static_argnums=(0, 7, 8))
    def _start(self, state, tokens, positions, key_valid, next_pos, done, heads, max_new_tokens):
        return start_state(self._model(state), tokens, positions, key_valid, next_pos, done, heads, max_new_tokens)

    @partial(jax.jit, static_argnums=(0, 5, 6, 7), donate_argnums=(2,))
    def _plain_step(self, leaves, dstate, key_valid, key, temperature, top_k, top_p):
        return plain_step(self._model_of(leaves), dstate, key_valid, key, self.tokenizer.eos_id, temperature, top_k,
                          top_p)

    @partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
    def _speculative_step(self, leaves, dstate, key_valid):
        return speculative_step(self._model_of(leaves), dstate, key_valid, self.tokenizer.eos_id)

    @partial(jax.jit, static_argnums=(0,))
    def _full_logprobs(self, state, tokens, positions, segment_ids):
        logits = full_logits(self._model(state), tokens, positions, segment_ids)
        return jax.nn.log_softmax(logits, axis=-1)

    def __hash__(self):  # jit treats ``self`` as static: identity hashing is what we want
        return id(self)

    def __eq__(self, other):
        return self is other

    # ------------------------------------------------------------------------- token level

    def _begin(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, heads: int):
        """Pad the batch to a power of two (fewer shapes to compile; padding rows start finished), prefill it,
        and return ``(decoding state, key_valid, done)``."""
        batch = 1 << (len(prompts) - 1).bit_length()
        done = np.arange(batch) >= len(prompts)
        prompts = list(prompts) + [prompts[0]] * (batch - len(prompts))
        # Shapes only grow (longest prompt bucket seen so far): a task's prompts then compile a few times, not
        # once per length.
        self._prompt_len = max(self._prompt_len, _bucket(max(len(p) for p in prompts), 128))
        tokens, valid, positions = left_pad(prompts, self.tokenizer.pad_id, self._prompt_len)
        # speculative rows write up to 2 chunks past max_new_tokens (a finished row re-runs its last chunk)
        extra = _bucket(max_new_tokens + (2 * heads if heads > 1 else 0))
        key_valid = jnp.asarray(np.concatenate([valid, np.ones((batch, extra), bool)], 1))
        state = self._start(self.state, jnp.asarray(tokens), jnp.asarray(positions), key_valid,
                            jnp.asarray(valid.sum(1), jnp.int32), jnp.asarray(done), heads, max_new_tokens)
        return state, key_valid, done

    def _drive(self, step, state: dict, max_calls: int, stop: Sequence[str], done: np.ndarray) -> tuple[dict, int]:
        """Call ``step(state) -> (state, all done, (tokens, emitted, done))`` until every row has finished.

        The finished check reads the previous call's flags after the next call is queued, so the host never
        stalls the device; the one extra call leaves finished rows as they were. With stop strings, each
        row's new tokens are read (one call late too) and only a window at its end is decoded and searched.
        Returns the final state and the number of calls that did work."""
        stopped = done.copy()  # rows finished on the host: padding, stop strings
        window = 4 * max((len(s) for s in stop), default=0)  # tokens that can hold a stop string
        tails: list[list[int]] = [[] for _ in done]
        pending = None
        for calls in range(max_calls):
            state, all_done, emitted = step(state)
            if pending is not None and self._all_finished(pending, stopped, tails, stop, window):
                return state, calls
            pending = (all_done, emitted)
        return state, max_calls

    def _all_finished(self, pending, stopped: np.ndarray, tails: list[list[int]], stop: Sequence[str],
                      window: int) -> bool:
        all_done, (tokens, emitted, done) = pending
        if bool(all_done):
            return True
        if not stop:
            return False
        tokens, emitted, done = np.asarray(tokens), np.asarray(emitted), np.asarray(done)
        for r in np.flatnonzero(~stopped & (emitted > 0)):
            tails[r] = tails[r][-window:] + tokens[r, :emitted[r]].tolist()
            stopped[r] = any(s in self.tokenizer.decode(tails[r]) for s in stop)
        return bool((stopped | done).all())

    def generate_ids(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
                     request_ids: Sequence[int] | None = None) -> Generation:
        """Sample up to ``max_new_tokens`` per row; a row ends at eos or a stop string. Row ``r`` draws from its
        own random stream, ``sampling.seed`` folded with ``request_ids[r]`` (default ``r``): a request's samples
        are the same whatever batch it shares and wherever it sits in it."""
        state, key_valid, done = self._begin(prompts, sampling.max_new_tokens, 1)
        ids = list(range(len(prompts)) if request_ids is None else request_ids)
        ids += [0] * (len(done) - len(ids))  # the batch's padding rows (finished from the start)
        key = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(sampling.seed), jnp.asarray(ids, jnp.uint32))

        def step(s):
            return self._plain_step(self._leaves, s, key_valid, key, sampling.temperature, sampling.top_k,
                                    sampling.top_p)

        state, calls = self._drive(step, state, sampling.max_new_tokens, sampling.stop, done)
        out = np.asarray(state["out"])[:len(prompts), :calls]
        return self._result(out.tolist(), sampling.stop, calls)

    def speculative_greedy_ids(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                               stop: Sequence[str] = (), heads: int | None = None) -> Generation:
        """Greedy decoding of a multi-token-prediction model, drafting with heads 2..c and verifying with head 1
        (``heads``: c, default every head of the model).

        Each call feeds every row's [head-1 token, c-1 drafts]; head 1's predictions inside that chunk accept
        the longest matching draft prefix, and each row advances by its own acceptance, so every row's output
        is exactly plain greedy decoding (up to float ties), in fewer model calls when drafts hit.
        """
        c = self.heads if heads is None else heads
        if self.heads < 2 or not 2 <= c <= self.heads:
            raise ValueError(f"speculative decoding needs a multi-token-prediction model (objective=mtp, heads >= 2) "
                             f"and 2 <= heads <= {self.heads}; got a model with {self.heads} head(s), heads={heads}")
        state, key_valid, done = self._begin(prompts, max_new_tokens, c)

        def step(s):
            return self._speculative_step(self._leaves, s, key_valid)

        state, calls = self._drive(step, state, max_new_tokens, stop, done)
        out, count = np.asarray(state["out"]), np.asarray(state["count"])
        rows = [out[r, :min(int(count[r]), max_new_tokens)].tolist() for r in range(len(prompts))]
        result = self._result(rows, stop, calls)
        result.row_calls = int(state["row_calls"])
        result.draft_acceptance = [int(h) / max(result.row_calls, 1) for h in np.asarray(state["hits"])]
        result.tokens_per_call = 1 + sum(result.draft_acceptance)
        return result

    def _result(self, rows: list[list[int]], stop: Sequence[str], calls: int) -> Generation:
        eos = self.tokenizer.eos_id
        rows = [r[:r.index(eos)] if eos in r else r for r in rows]
        texts = [truncate_at_stop(self.tokenizer.decode(r), stop) for r in rows]
        if stop:  # keep the ids consistent with the text (byte-level tokenizers map one to one)
            rows = [r if self.tokenizer.decode(r) == t else [int(i) for i in self.tokenizer.encode(t)]
                    for r, t in zip(rows, texts, strict=True)]
        return Generation(tokens=rows, texts=texts, forward_calls=calls)

    def logprobs(self, prefixes: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Per-token log-probabilities of each continuation given its prefix (teacher forcing, one forward)."""
        seqs = [list(p) + list(c) for p, c in zip(prefixes, continuations, strict=True)]
        length = _bucket(max(len(s) for s in seqs), 128)
        tokens = np.full((len(seqs), length), self.tokenizer.pad_id, np.int32)
        seg = np.zeros((len(seqs), length), np.int32)
        for r, s in enumerate(seqs):
            tokens[r, :len(s)], seg[r, :len(s)] = s, 1
        positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape)
        logp = np.asarray(self._full_logprobs(self.state, jnp.asarray(tokens), jnp.asarray(positions),
                                              jnp.asarray(seg)))
        out = []
        for r, (p, c) in enumerate(zip(prefixes, continuations, strict=True)):
            where = np.arange(len(p) - 1, len(p) + len(c) - 1)  # logits at t predict token t+1
            out.append(logp[r, where, np.asarray(c, np.int64)] if len(c) else np.zeros(0, np.float32))
        return out

    # ------------------------------------------------------------------------- text level

    def encode_prompt(self, text: str) -> list[int]:
        return [self.tokenizer.bos_id] + [int(t) for t in self.tokenizer.encode(text)]

    def fit_prompt(self, prompt: list[int], room: int) -> list[int]:
        """``prompt`` (bos first) cut to its bos and newest tokens so that ``room`` more tokens still fit in
        ``max_len`` (at least the bos stays, so a continuation longer than ``max_len`` is read past it)."""
        if self.max_len is None or len(prompt) + room <= self.max_len:
            return prompt
        keep = max(self.max_len - room - 1, 0)
        return prompt[:1] + (prompt[len(prompt) - keep:] if keep else [])

    def generate(self, prompts: Sequence[str], sampling: SamplingConfig, batch_size: int = 64) -> list[str]:
        """Texts continuing each prompt (a document start, as in training, precedes every prompt); prompt ``i``
        samples from ``sampling.seed`` folded with ``i``, whatever ``batch_size``."""
        out: list[str] = []
        # room for the answer, but never more than half the window: a budget as long as the window (48 new tokens
        # at seq_len 32) cut every prompt to its bos and the model answered nothing it was asked
        room = sampling.max_new_tokens if self.max_len is None else min(sampling.max_new_tokens, self.max_len // 2)
        for i in range(0, len(prompts), batch_size):
            chunk = [self.fit_prompt(self.encode_prompt(p), room) for p in prompts[i:i + batch_size]]
            out += self.generate_ids(chunk, sampling, request_ids=range(i, i + len(chunk))).texts
        return out

    def loglikelihood(self, contexts: Sequence[str], continuations: Sequence[str], batch_size: int = 32,
                      end_of_text: bool = False) -> list[np.ndarray]:
        """Per-token log-probabilities of ``continuation`` after ``context`` (then of eos, with ``end_of_text``:
        the probability that generation writes exactly the continuation and stops)."""
        end = [self.tokenizer.eos_id] if end_of_text else []
        out: list[np.ndarray] = []
        for i in range(0, len(contexts), batch_size):
            cont = [[int(t) for t in self.tokenizer.encode(c)] + end for c in continuations[i:i + batch_size]]
            # the model reads context + continuation minus its last token
            pre = [self.fit_prompt(self.encode_prompt(c), len(k) - 1) for c, k in zip(contexts[i:i + batch_size],
                                                                                        cont, strict=True)]
            out += self.logprobs(pre, cont)
        return out


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """The text before the earliest stop string (unchanged if none occurs)."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]
