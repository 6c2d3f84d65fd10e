"""The decoder trunk: embed -> blocks -> final norm.

It returns hidden states; output heads belong to the objectives (a causal LM uses
``logits``, multi-token prediction adds its own heads on the same hidden states).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from scaling_jax.config import ModelConfig
from scaling_jax.model.layers import ACT, Block, RMSNorm, attention_mask, make_param
from scaling_jax.parallel.sharding import constrain


def _run_block(block: Block, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
    return block(x, positions, mask)


_run_block_remat = nnx.remat(_run_block)


class Decoder(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, num_blocks: int | None = None):
        """``num_blocks`` (default ``cfg.layers``) lets an objective keep some of the depth for its own heads;
        weight init still scales with ``cfg.layers``, the depth of the whole network."""
        init = nnx.initializers.normal(cfg.init_std)
        self.dtype = jnp.dtype(cfg.dtype)
        self.remat = cfg.remat
        self.embedding = make_param(rngs, init, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.param_dtype)
        self.unembedding = (None if cfg.tie_embeddings else
                            make_param(rngs, init, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.param_dtype))
        self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.layers if num_blocks is None else num_blocks)])
        self.final_norm = RMSNorm(cfg.d_model, cfg, rngs)

    def __call__(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                 bidirectional: jax.Array | None = None) -> jax.Array:
        """Hidden states ``[batch, length, d_model]`` after the final norm."""
        mask = attention_mask(segment_ids, bidirectional)
        return self.final_norm(self.run_blocks(self.embed(tokens), positions, mask))

    def embed(self, tokens: jax.Array) -> jax.Array:
        """Token embeddings ``[batch, length, d_model]`` in the compute dtype."""
        # Look up in a gathered table (as FSDP gathers every weight before use): SPMD cannot turn a
        # gather from a sharded table into batch-sharded activations without a full remat.
        table = constrain(self.embedding[...], (None, None))
        return constrain(jnp.take(table, tokens, axis=0).astype(self.dtype), ACT)

    def apply_block(self, block: Block, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
        """One block, rematerialised in the backward pass if the config asks (also for objectives' head blocks)."""
        return (_run_block_remat if self.remat else _run_block)(block, x, positions, mask)

    def run_blocks(self, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
        """All of this decoder's blocks, before the final norm."""
        for block in self.blocks:
            x = self.apply_block(block, x, positions, mask)
        return x

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float32 logits ``[batch, length, vocab]`` from the (tied or separate) unembedding."""
        if self.unembedding is None:
            w = self.embedding[...].astype(hidden.dtype)
            out = jnp.einsum("btd,vd->btv", hidden, w, preferred_element_type=jnp.float32)
        else:
            w = self.unembedding[...].astype(hidden.dtype)
            out = jnp.einsum("btd,dv->btv", hidden, w, preferred_element_type=jnp.float32)
        return constrain(out, ("batch", "length", "vocab"))
