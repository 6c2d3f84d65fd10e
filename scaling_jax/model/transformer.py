"""The decoder trunk: embed -> blocks -> final norm.

It returns hidden states; output heads belong to the objectives (a causal LM uses
``logits``, multi-token prediction adds its own heads on the same hidden states).

Blocks have one of two parameter layouts (``model.scan_layers``):

- scanned (the default): one ``Block`` whose parameters are stacked on a leading ``layers`` logical
  axis (params key ``layers``), applied with ``jax.lax.scan``. XLA compiles one layer body, so compile
  time stays flat in depth (MaxText's ``scan_layers``), and the remat policy wraps that body.
- unscanned: an ``nnx.List`` of blocks (params ``blocks/0/...``) run by a Python loop: the layout of runs
  written before scanning existed, and easier to step through in a debugger.

``to_layout`` converts a parameter tree between them; both give the same numbers for the same weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scaling_jax.config import ModelConfig
from scaling_jax.model.layers import ACT, Block, Mask, MaskSpec, RMSNorm, Rotary, as_rotary, make_param
from scaling_jax.model.position_bias import position_distance, relative_bias
from scaling_jax.model.remat import checkpoint_policy, policy_name, remat
from scaling_jax.parallel.sharding import active_mesh, constrain

LAYERS = "layers"  # params key (and logical axis) of stacked blocks
BLOCKS = "blocks"  # params key of a list of blocks
KVCache = Any  # stacked: one (keys, values) pair [layers, batch, max_len, kv_heads, head_dim]; else a list of pairs


def stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs, n: int) -> Block:
    """``n`` blocks as one module, every parameter stacked on a leading ``layers`` axis (traced once).

    Only ``rngs.params()`` is drawn (once), so the shapes-only stand-in of ``train/memory.py`` works too."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYERS})
    def make(layer_rngs: nnx.Rngs) -> Block:
        return Block(cfg, layer_rngs)

    return make(nnx.Rngs(params=rngs.params()))


def _policy_device() -> jax.Device | None:
    """The device a step is traced for (offload support differs by platform); None: the default device."""
    mesh = active_mesh()
    return None if mesh is None else mesh.devices.flat[0]


def _run_block(block: Block, x: jax.Array, positions: jax.Array | Rotary, mask: Mask) -> jax.Array:
    return block(x, positions, mask)


class Decoder(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, num_blocks: int | None = None):
        """``num_blocks`` (default ``cfg.layers``) lets an objective keep some of the depth for its own heads;
        weight init still scales with ``cfg.layers``, the depth of the whole network."""
        init = nnx.initializers.normal(cfg.init_std)
        self.dtype = jnp.dtype(cfg.dtype)
        self.remat = policy_name(cfg.remat)
        self.scan_layers = cfg.scan_layers
        self.embedding = make_param(rngs, init, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.param_dtype)
        self.unembedding = (None if cfg.tie_embeddings else
                            make_param(rngs, init, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.param_dtype))
        n = cfg.layers if num_blocks is None else num_blocks
        if cfg.scan_layers:
            self.layers = stacked_blocks(cfg, rngs, n)
        else:
            self.blocks = nnx.List([Block(cfg, rngs) for _ in range(n)])
        self.final_norm = RMSNorm(cfg.d_model, cfg, rngs)
        # model.position=t5_relative: one [heads, buckets] table of attention biases shared by every block
        self.position_bias = (make_param(rngs, init, (cfg.heads, cfg.relative_buckets), ("heads", None),
                                         cfg.param_dtype) if cfg.position == "t5_relative" else None)
        self.relative_max_distance = cfg.relative_max_distance
        self.logits_scale = cfg.logits_scale
        self.rope_args = (cfg.head_dim, cfg.rope_theta) if cfg.position == "rope" else None  # None: no RoPE

    def __call__(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                 bidirectional: jax.Array | None = None) -> jax.Array:
        """Hidden states ``[batch, length, d_model]`` after the final norm.

        The blocks get the rows' segment ids and prefix flags (``MaskSpec``), not a mask: the attention kernel
        (``model.attention``) builds its own mask form; only the xla kernel materialises ``[batch, 1, t, t]``."""
        mask = MaskSpec(segment_ids, bidirectional)
        return self.final_norm(self.run_blocks(self.embed(tokens), positions, mask))

    def embed(self, tokens: jax.Array) -> jax.Array:
        """Token embeddings ``[batch, length, d_model]`` in the compute dtype."""
        # Look up in a gathered table (as FSDP gathers every weight before use): SPMD cannot turn a
        # gather from a sharded table into batch-sharded activations without a full remat.
        table = constrain(self.embedding[...], (None, None))
        return constrain(jnp.take(table, tokens, axis=0).astype(self.dtype), ACT)

    def relative_bias(self, distance: jax.Array) -> jax.Array | None:
        """Relative-position attention biases ``[batch, heads, q, k]`` for query-minus-key ``distance``
        ``[batch, q, k]``; None for a RoPE model."""
        if self.position_bias is None:
            return None
        return relative_bias(self.position_bias[...], distance, self.relative_max_distance, self.dtype)

    def with_position_bias(self, mask: Mask, positions: jax.Array) -> Mask:
        """``mask`` carrying this model's relative-position biases (computed once, shared by every block)."""
        if self.position_bias is None or not isinstance(mask, MaskSpec) or mask.bias is not None:
            return mask
        return dataclasses.replace(mask, bias=self.relative_bias(position_distance(positions)))

    def rotary(self, positions: jax.Array | Rotary) -> jax.Array | Rotary:
        """A RoPE model's ``positions`` as their ``Rotary`` tables, for every block to share (computed here,
        outside the layer scan and remat, XLA emits them once); other models' positions (and tables) as given."""
        return positions if self.rope_args is None else as_rotary(positions, *self.rope_args)

    def apply_block(self, block: Block, x: jax.Array, positions: jax.Array | Rotary, mask: Mask) -> jax.Array:
        """One (unstacked) block under the remat policy: the unscanned layout and objectives' head blocks."""
        mask = self.with_position_bias(mask, positions)
        positions = self.rotary(positions)
        if self.remat == "none":
            return block(x, positions, mask)
        policy = checkpoint_policy(self.remat, _policy_device())
        return nnx.remat(_run_block, policy=policy)(block, x, positions, mask)

    def run_blocks(self, x: jax.Array, positions: jax.Array | Rotary, mask: Mask) -> jax.Array:
        """All of this decoder's blocks, before the final norm."""
        mask = self.with_position_bias(mask, positions)
        positions = self.rotary(positions)
        if not self.scan_layers:
            for block in self.blocks:
                x = self.apply_block(block, x, positions, mask)
            return x
        graphdef, params = nnx.split(self.layers)
        params = matmul_weights_in(params, self.dtype)

        def body(h: jax.Array, layer) -> tuple[jax.Array, None]:
            return nnx.merge(graphdef, layer)(h, positions, mask), None

        return jax.lax.scan(remat(body, self.remat, _policy_device(), prevent_cse=False), x, params)[0]

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        """Zero keys and values for every block, in the layout of the blocks themselves."""
        if self.scan_layers:
            n, _, kv, hd = self.layers.attn.wk.shape
            return (jnp.zeros((n, batch, max_len, kv, hd), self.dtype),) * 2
        return [(jnp.zeros((batch, max_len, *block.attn.wk.shape[1:]), self.dtype),) * 2 for block in self.blocks]

    def run_blocks_cached(self, x: jax.Array, positions: jax.Array, mask: jax.Array, cache: KVCache,
                          index: jax.Array) -> tuple[jax.Array, KVCache]:
        """Inference: every block reads and extends its KV cache (see ``Attention.cached``)."""
        bias = self.relative_bias(slot_distance(index, x.shape[1], mask.shape[-1]))
        if not self.scan_layers:
            new = []
            for block, kv in zip(self.blocks, cache, strict=True):
                x, kv = block.cached(x, positions, mask, kv, index, bias)
                new.append(kv)
            return x, new
        graphdef, params = nnx.split(self.layers)

        def body(h: jax.Array, xs):
            layer, kv = xs
            return nnx.merge(graphdef, layer).cached(h, positions, mask, kv, index, bias)

        return jax.lax.scan(body, x, (params, cache))

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float32 logits ``[batch, length, vocab]`` from the (tied or separate) unembedding."""
        if self.unembedding is None:
            w = self.embedding[...].astype(hidden.dtype)
            out = jnp.einsum("btd,vd->btv", hidden, w, preferred_element_type=jnp.float32)
        else:
            w = self.unembedding[...].astype(hidden.dtype)
            out = jnp.einsum("btd,dv->btv", hidden, w, preferred_element_type=jnp.float32)
        if self.logits_scale == "rsqrt_d_model":  # T5X's decoder-only models with tied embeddings
            out = out / jnp.sqrt(jnp.float32(hidden.shape[-1]))
        return constrain(out, ("batch", "length", "vocab"))


def matmul_weights_in(stacked: nnx.State, dtype) -> nnx.State:
    """Stacked blocks with their matmul weights (two or more dimensions per layer) cast to the compute
    ``dtype`` once, before the scan; norm scales stay as they are (RMSNorm reads them in float32).

    Cast inside the loop instead, each layer's weight gradient becomes float32 there and the loop stacks the
    float32 gradients in whatever layout XLA picks for them: on v6e-64.yaml with fsdp 64 that layout pads each
    chip's 48-wide shard of ``embed`` to 128 lanes (112 MiB per stacked MLP gradient instead of 42). Cast here,
    the loop stacks compute-dtype gradients and the cast back to float32 happens once, after it. The numbers
    are the same: the gradient of a cast is the cast of the gradient, on either side of the loop."""
    cast = lambda a: a.astype(dtype) if a.ndim > 2 and jnp.issubdtype(a.dtype, jnp.floating) else a  # noqa: E731
    return jax.tree.map(cast, stacked)


def slot_distance(index: jax.Array, chunk: int, max_len: int) -> jax.Array:
    """``[1 or batch, chunk, max_len]`` query-minus-key distances of a KV-cache chunk written from slot ``index``
    (one for all rows, or ``[batch]``). A row's positions advance with its slots (a left-padded prompt, then one
    slot per token), so for every key a query may see, the slot distance is the position distance."""
    q_slot = jnp.reshape(index, (-1, 1)) + jnp.arange(chunk)
    return q_slot[:, :, None] - jnp.arange(max_len)[None, None, :]


# ----------------------------------------------------------------------------- parameter layouts


def block_key(params: Mapping) -> str:
    """Where a decoder's params pure dict keeps its blocks: ``layers`` (stacked) or ``blocks`` (a list)."""
    return LAYERS if LAYERS in params else BLOCKS


def _stack(arrays: tuple) -> Any:
    return np.stack(arrays) if all(isinstance(a, np.ndarray) for a in arrays) else jnp.stack(arrays)


def stack_blocks(blocks: Mapping) -> dict:
    """A block list's pure dict (``{0: tree, 1: tree, ...}``, int or str keys) -> one tree stacked on axis 0."""
    return jax.tree.map(lambda *xs: _stack(xs), *[blocks[k] for k in sorted(blocks, key=int)])


def unstack_blocks(stacked: Mapping) -> dict[int, Any]:
    """A stacked blocks tree -> ``{0: tree, 1: tree, ...}`` (the unscanned layout)."""
    n = jax.tree.leaves(stacked)[0].shape[0]
    return {i: jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(n)}


def to_layout(params: Mapping, scan_layers: bool) -> dict:
    """A params pure dict (a decoder's, or a model whose ``trunk`` is one) in the scanned or unscanned layout.

    The same weights in either layout give the same outputs; optimizer moments, which mirror the parameter
    tree, convert the same way."""
    if "trunk" in params:
        return {**params, "trunk": to_layout(params["trunk"], scan_layers)}
    rest = {k: v for k, v in params.items() if k not in (LAYERS, BLOCKS)}
    if scan_layers and BLOCKS in params:
        return {**rest, LAYERS: stack_blocks(params[BLOCKS])}
    if not scan_layers and LAYERS in params:
        return {**rest, BLOCKS: unstack_blocks(params[LAYERS])}
    return dict(params)
