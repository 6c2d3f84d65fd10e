"""Autoregressive decoding with a KV cache: greedy, temperature, top-k and top-p sampling, stop
sequences, teacher-forced log-likelihoods, and self-speculative decoding with multi-token heads.

Works on the plain ``Decoder`` and on ``MultiTokenModel`` (trunk + per-head blocks); for the latter,
plain decoding uses head 1 (the next-token head), so its output is the model's greedy continuation.
The trunk's cache has the layout of its blocks: stacked on a leading ``layers`` axis and scanned with
them (``model.scan_layers``), or one pair per block.

Batches of prompts are left-padded into one block of ``P`` slots, so every row writes its next
token into the same cache slot (one ``dynamic_update_slice``), while per-row positions and a
key-validity mask make padding invisible. Each chunk attends over the whole fixed-size cache
with a causal mask on slot indices, so stale keys beyond the current length (from rejected
speculative drafts) are never seen and get overwritten before they could be.
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
from scaling_jax.model.transformer import Decoder

# {"trunk": the decoder's own cache (transformer.KVCache), "heads": [one (keys, values) pair per MTP head]};
# each array [(layers,) batch, max_len, kv_heads, head_dim]
Cache = dict


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
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1 or self.max_new_tokens < 1:
            raise ValueError(f"invalid sampling settings {self}: need temperature >= 0, top_k >= 0, "
                             "0 < top_p <= 1, max_new_tokens >= 1")


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


def init_cache(model: nnx.Module, batch: int, max_len: int) -> Cache:
    decoder, heads = model_parts(model)
    return {"trunk": decoder.init_cache(batch, max_len),
            "heads": [(jnp.zeros((batch, max_len, *block.attn.wk.shape[1:]), decoder.dtype),) * 2
                      for block in heads]}


def chunk_mask(key_valid: jax.Array, index: jax.Array, chunk: int) -> jax.Array:
    """``[batch, 1, chunk, max_len]``: a query in slot ``index + i`` sees valid keys in slots up to its own.
    Its own slot is always visible, so a padding query never has an empty row."""
    max_len = key_valid.shape[-1]
    q_slot = index + jnp.arange(chunk)
    k_slot = jnp.arange(max_len)
    causal = k_slot[None, :] <= q_slot[:, None]
    mask = (causal[None] & key_valid[:, None, :]) | (k_slot[None, :] == q_slot[:, None])[None]
    return mask[:, None]


def forward_cached(model: nnx.Module, tokens: jax.Array, positions: jax.Array, key_valid: jax.Array,
                   cache: Cache, index: jax.Array, all_heads: bool = False) -> tuple[jax.Array, Cache]:
    """Logits ``[heads, batch, chunk, vocab]`` of a chunk written at cache slot ``index``.

    ``all_heads=False`` runs (and caches) only the next-token head; ``True`` runs every MTP head
    (self-speculative decoding needs them all, and their caches must then stay current).
    """
    decoder, heads = model_parts(model)
    mask = chunk_mask(key_valid, index, tokens.shape[1])
    x, trunk_cache = decoder.run_blocks_cached(decoder.embed(tokens), positions, mask, cache["trunk"], index)
    if not heads:
        return decoder.logits(decoder.final_norm(x))[None], {"trunk": trunk_cache, "heads": []}
    logits, head_cache = [], list(cache["heads"])
    for j, block in enumerate(heads if all_heads else heads[:1]):
        h, head_cache[j] = block.cached(x, positions, mask, cache["heads"][j], index)
        logits.append(decoder.logits(decoder.final_norm(h)))
    return jnp.stack(logits), {"trunk": trunk_cache, "heads": head_cache}


def full_logits(model: nnx.Module, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """Next-token (head 1) float32 logits of a whole sequence without a cache, as in training."""
    decoder, heads = model_parts(model)
    if not heads:
        return decoder.logits(decoder(tokens, positions, segment_ids))
    z = model.trunk_hidden(tokens, positions, segment_ids)
    return model.head_logits(0, z, positions, segment_ids)


# ----------------------------------------------------------------------------- sampling


def sample_logits(logits: jax.Array, key: jax.Array, temperature: float, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
    """Token ids ``[batch]`` from logits ``[batch, vocab]``; the settings are static Python numbers."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
        keep = before < top_p  # the smallest prefix whose mass reaches top_p (always >= 1 token)
        threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


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


class CachedLM:
    """A model ready for inference: parameters split out once, the cached forward jitted once per shape."""

    def __init__(self, model: nnx.Module, tokenizer):
        self.graphdef, self.state = nnx.split(model)
        self.tokenizer = tokenizer
        self.heads = num_heads(model)
        self._empty_cache = partial(init_cache, model)
        self._prompt_len = 0

    def _model(self, state):
        return nnx.merge(self.graphdef, state)

    @partial(jax.jit, static_argnums=(0,), static_argnames=("all_heads",))
    def _forward(self, state, tokens, positions, key_valid, cache, index, all_heads=False):
        return forward_cached(self._model(state), tokens, positions, key_valid, cache, index, all_heads)

    @partial(jax.jit, static_argnums=(0, 8, 9, 10))
    def _sample_step(self, state, logits, key, positions, key_valid, cache, index, temperature, top_k, top_p):
        token = sample_logits(logits, key, temperature, top_k, top_p)
        out, cache = forward_cached(self._model(state), token[:, None], positions[:, None], key_valid, cache, index)
        return token, out[0, :, -1], cache

    @partial(jax.jit, static_argnums=(0,))
    def _full_logprobs(self, state, tokens, positions, segment_ids):
        logits = full_logits(self._model(state), tokens, positions, segment_ids)
        return jax.nn.log_softmax(logits, axis=-1)

    def __hash__(self):  # jit treats ``self`` as static: identity hashing is what we want
        return id(self)

    def __eq__(self, other):
        return self is other

    # ------------------------------------------------------------------------- token level

    def _prefill(self, prompts: Sequence[Sequence[int]], extra: int, all_heads: bool = False):
        # Shapes only grow (longest prompt bucket seen so far): a task's prompts then compile a few times, not
        # once per length.
        self._prompt_len = max(self._prompt_len, _bucket(max(len(p) for p in prompts), 128))
        tokens, valid, positions = left_pad(prompts, self.tokenizer.pad_id, self._prompt_len)
        prompt_len = tokens.shape[1]
        max_len = prompt_len + _bucket(extra)
        key_valid = jnp.asarray(np.concatenate([valid, np.ones((len(prompts), max_len - prompt_len), bool)], 1))
        cache = self._empty_cache(len(prompts), max_len)
        logits, cache = self._forward(self.state, jnp.asarray(tokens), jnp.asarray(positions), key_valid, cache,
                                      jnp.int32(0), all_heads=all_heads)
        next_pos = valid.sum(1).astype(np.int32)
        return logits[:, :, -1], cache, key_valid, next_pos, prompt_len

    def generate_ids(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig) -> Generation:
        """Sample up to ``max_new_tokens`` per row; a row ends at eos or a stop string."""
        rows_wanted = len(prompts)
        batch = 1 << (rows_wanted - 1).bit_length()  # power-of-two batches: fewer shapes to compile
        prompts = list(prompts) + [prompts[0]] * (batch - rows_wanted)
        logits, cache, key_valid, next_pos, start = self._prefill(prompts, sampling.max_new_tokens)
        logits = logits[0]
        key = jax.random.key(sampling.seed)
        rows: list[list[int]] = [[] for _ in prompts]
        done = np.arange(batch) >= rows_wanted  # padding rows count as finished
        calls = 0
        for step in range(sampling.max_new_tokens):
            token, logits, cache = self._sample_step(
                self.state, logits, jax.random.fold_in(key, step), jnp.asarray(next_pos), key_valid, cache,
                jnp.int32(start + step), sampling.temperature, sampling.top_k, sampling.top_p)
            calls += 1
            next_pos = next_pos + 1
            for r, t in enumerate(np.asarray(token)):
                if not done[r]:
                    rows[r].append(int(t))
                    done[r] = self._finished(rows[r], sampling.stop)
            if done.all():
                break
        return self._result(rows[:rows_wanted], sampling.stop, calls)

    def _finished(self, row: list[int], stop: Sequence[str]) -> bool:
        if row[-1] == self.tokenizer.eos_id:
            return True
        if not stop:
            return False
        tail = self.tokenizer.decode(row[-64:])
        return any(s in tail for s in stop)

    def _result(self, rows: list[list[int]], stop: Sequence[str], calls: int) -> Generation:
        eos = self.tokenizer.eos_id
        rows = [r[:r.index(eos)] if eos in r else r for r in rows]
        texts = [truncate_at_stop(self.tokenizer.decode(r), stop) for r in rows]
        if stop:  # keep the ids consistent with the text (byte-level tokenizers map one to one)
            rows = [r if self.tokenizer.decode(r) == t else [int(i) for i in self.tokenizer.encode(t)]
                    for r, t in zip(rows, texts, strict=True)]
        return Generation(tokens=rows, texts=texts, forward_calls=calls)

    def speculative_greedy_ids(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                               stop: Sequence[str] = ()) -> Generation:
        """Greedy decoding of a multi-token-prediction model, drafting with heads 2..n and verifying with head 1.

        Each call feeds [head-1 token, n-1 drafts]; head 1's predictions inside that chunk accept the
        longest matching draft prefix. A batch advances by its rows' minimum acceptance, so every row's
        output is exactly plain greedy decoding (up to float ties), in fewer model calls when drafts hit.
        """
        n = self.heads
        if n < 2:
            raise ValueError("speculative decoding needs a multi-token-prediction model (objective=mtp, heads >= 2)")
        last, cache, key_valid, next_pos, index = self._prefill(prompts, max_new_tokens + n, all_heads=True)
        guesses = np.asarray(jnp.argmax(last, axis=-1)).T  # [batch, n]: head-1 token, then the drafts
        rows = np.zeros((len(prompts), 0), np.int32)
        calls = 0
        while rows.shape[1] < max_new_tokens:
            positions = next_pos[:, None] + np.arange(n, dtype=np.int32)[None]
            logits, cache = self._forward(self.state, jnp.asarray(guesses, jnp.int32), jnp.asarray(positions),
                                          key_valid, cache, jnp.int32(index), all_heads=True)
            calls += 1
            predicted = np.asarray(jnp.argmax(logits, axis=-1))  # [n, batch, n]
            verify = predicted[0]
            matches = np.cumprod(guesses[:, 1:] == verify[:, :-1], axis=1)
            accepted = int((1 + matches.sum(1)).min())
            rows = np.concatenate([rows, guesses[:, :accepted]], axis=1)
            index += accepted
            next_pos = next_pos + accepted
            guesses = predicted[:, :, accepted - 1].T.copy()
            guesses[:, 0] = verify[:, accepted - 1]
            ended = [self.tokenizer.eos_id in r or (stop and any(s in self.tokenizer.decode(r) for s in stop))
                     for r in rows.tolist()]
            if all(ended):
                break
        return self._result([r[:max_new_tokens] for r in rows.tolist()], stop, calls)

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

    def generate(self, prompts: Sequence[str], sampling: SamplingConfig, batch_size: int = 64) -> list[str]:
        """Texts continuing each prompt (a document start, as in training, precedes every prompt)."""
        out: list[str] = []
        for i in range(0, len(prompts), batch_size):
            chunk = [self.encode_prompt(p) for p in prompts[i:i + batch_size]]
            out += self.generate_ids(chunk, sampling).texts
        return out

    def loglikelihood(self, contexts: Sequence[str], continuations: Sequence[str],
                      batch_size: int = 32) -> list[np.ndarray]:
        """Per-token log-probabilities of ``continuation`` after ``context``."""
        out: list[np.ndarray] = []
        for i in range(0, len(contexts), batch_size):
            pre = [self.encode_prompt(c) for c in contexts[i:i + batch_size]]
            cont = [list(self.tokenizer.encode(c)) for c in continuations[i:i + batch_size]]
            out += self.logprobs(pre, cont)
        return out


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """The text before the earliest stop string (unchanged if none occurs)."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]
