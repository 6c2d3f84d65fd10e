"""Multi-token prediction (Gloeckle et al. 2024, arXiv 2404.19737).

A shared trunk (the first ``model.layers - 1`` decoder blocks) feeds ``n = objective.heads``
independent heads, one transformer block each; head i (1-based) predicts token t+i. The final
RMSNorm and the (tied or separate) unembedding are shared by all heads, so with n=1 the model is
exactly the causal decoder of ``model.layers`` blocks. The trunk's blocks are stacked and scanned as
``model.scan_layers`` says; the few head blocks stay a list (they are already scanned over in the
memory-efficient gradient below).

Batch layout (every field ``[batch, seq_len]``, so the trainer shards them like causal LM's):
``inputs, segment_ids, positions`` as in causal LM; head 1's targets are ``targets`` / ``loss_mask``
(identical to causal LM's, so the eval step's bits-per-byte counts each target byte once) and head
i >= 2's are ``targets_i`` / ``loss_mask_i``.

The optimised loss is the weighted mean of the per-head token-mean cross entropies (``loss_mtp``).
The reported ``loss``, ``accuracy``, ``nll_sum`` and ``tokens`` are head 1's alone: head 1 is the
next-token predictor, so training and validation loss and bits per byte stay comparable with causal LM.

The default gradient is the paper's memory-efficient one: trunk forward once, then each head's
forward and backward in turn (a scan over heads, accumulating the gradient at the trunk output),
then one trunk backward, so at most one head's activations and logits are alive at a time and peak
memory grows with n only by the heads' weights and optimizer state.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scaling_jax.config import ModelConfig, ObjectiveConfig, check_mtp_layers
from scaling_jax.errors import ConfigError
from scaling_jax.model.layers import Block, MaskSpec, Rotary
from scaling_jax.model.transformer import Decoder, block_key
from scaling_jax.objectives.base import Batch, Metrics, ObjectiveBase, masked_cross_entropy
from scaling_jax.objectives.causal import shift_rows

# ----------------------------------------------------------------------------- config


def head_weights(cfg: ObjectiveConfig) -> tuple[float, ...]:
    """Validated per-head loss weights, normalised to sum to 1 (uniform when none are given)."""
    n = cfg.heads
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"objective.heads={n!r} must be an integer >= 1")
    raw = cfg.head_weights or [1.0] * n
    if len(raw) != n:
        raise ConfigError(f"objective.head_weights has {len(raw)} entries but objective.heads={n}; give one per head")
    if any(isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0 for w in raw):
        raise ConfigError(f"objective.head_weights={raw!r} must be numbers >= 0")
    total = float(sum(raw))
    if total <= 0:
        raise ConfigError(f"objective.head_weights={raw!r} must not all be 0")
    return tuple(float(w) / total for w in raw)


# ----------------------------------------------------------------------------- data


def target_keys(head: int) -> tuple[str, str]:
    """Batch keys of head ``head`` (1-based): head 1 uses causal LM's own keys."""
    return ("targets", "loss_mask") if head == 1 else (f"targets_{head}", f"loss_mask_{head}")


def future_targets(rows: Batch, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Targets ``tokens[t + offset]`` and their mask ``[..., seq_len]`` for inputs ``tokens[:-1]``.

    A target counts only if it lies inside the row and no document boundary separates it from
    position t (compared by runs of equal segment ids, so it holds even if an id came back), and
    position t is not padding (segment 0).
    """
    tokens, seg = np.asarray(rows["tokens"]), np.asarray(rows["segment_ids"])
    seq_len = tokens.shape[-1] - 1
    run = np.concatenate([np.zeros_like(seg[..., :1]), np.cumsum(seg[..., 1:] != seg[..., :-1], axis=-1)], axis=-1)
    targets = np.zeros(tokens.shape[:-1] + (seq_len,), np.int32)
    mask = np.zeros(tokens.shape[:-1] + (seq_len,), np.int32)
    valid = max(0, seq_len + 1 - offset)  # positions whose t + offset is still in the row
    targets[..., :valid] = tokens[..., offset:]
    mask[..., :valid] = (run[..., :valid] == run[..., offset:]) & (seg[..., :valid] != 0)
    return targets, mask


def prepare_rows(rows: Batch, heads: int) -> Batch:
    """Causal LM's batch plus one ``targets_i`` / ``loss_mask_i`` pair per extra head."""
    batch = shift_rows(rows)
    for head in range(2, heads + 1):
        t_key, m_key = target_keys(head)
        batch[t_key], batch[m_key] = future_targets(rows, head)
    return batch


# ----------------------------------------------------------------------------- model


class MultiTokenModel(nnx.Module):
    """Trunk (a ``Decoder`` holding ``layers - 1`` blocks, the embedding, final norm and unembedding) + head blocks."""

    def __init__(self, cfg: ModelConfig, heads: int, rngs: nnx.Rngs):
        check_mtp_layers(cfg.layers)  # also built outside a validated config (scripts, notebooks)
        self.trunk = Decoder(cfg, rngs, num_blocks=cfg.layers - 1)
        self.heads = nnx.List([Block(cfg, rngs) for _ in range(heads)])

    def trunk_hidden(self, tokens: jax.Array, positions: jax.Array | Rotary, segment_ids: jax.Array) -> jax.Array:
        """The shared trunk's output ``z`` (before any head and before the final norm). ``positions`` may be
        ``self.trunk.rotary(positions)``, computed once for the trunk and every head."""
        return self.trunk.run_blocks(self.trunk.embed(tokens), positions, MaskSpec(segment_ids))

    def head_logits(self, index: int, z: jax.Array, positions: jax.Array | Rotary,
                    segment_ids: jax.Array) -> jax.Array:
        """float32 logits of head ``index`` (0-based) from the trunk output."""
        hidden = self.trunk.apply_block(self.heads[index], z, positions, MaskSpec(segment_ids))
        return self.trunk.logits(self.trunk.final_norm(hidden))


# ----------------------------------------------------------------------------- loss and gradients


def combine_heads(per_head: Sequence[Metrics], weights: Sequence[float]) -> tuple[jax.Array, Metrics]:
    """Weighted objective and metrics; the headline ``loss``/``accuracy``/sums are the next-token head's."""
    total = sum(w * m["loss"] for w, m in zip(weights, per_head, strict=True))
    metrics = {**per_head[0], "loss_mtp": total}
    for i, m in enumerate(per_head, start=1):
        metrics[f"loss_head{i}"] = m["loss"]
        metrics[f"accuracy_head{i}"] = m["accuracy"]
    return total, metrics


def head_metrics(model: MultiTokenModel, index: int, z: jax.Array, batch: dict[str, jax.Array],
                 positions: jax.Array | Rotary) -> Metrics:
    t_key, m_key = target_keys(index + 1)
    logits = model.head_logits(index, z, positions, batch["segment_ids"])
    return masked_cross_entropy(logits, batch[t_key], batch[m_key])


def _merge(graphdef: nnx.GraphDef, params: dict, trunk: dict | None = None, head: tuple[int, dict] | None = None):
    """The model with some parameter subtrees replaced (the ones being differentiated)."""
    p = {**params, "trunk": {**params["trunk"], **(trunk or {})}}
    if head is not None:
        p["heads"] = {**params["heads"], head[0]: head[1]}
    return nnx.merge(graphdef, p)


def memory_efficient_value_and_grad(graphdef: nnx.GraphDef, params: dict, batch: dict[str, jax.Array],
                                    weights: Sequence[float]):
    """``((loss, metrics), grads)`` equal to plain autodiff of the weighted loss, one head alive at a time.

    Trunk forward once (``jax.vjp``, output z); per head, value and gradient w.r.t. (its block,
    the shared final norm and (tied or separate) unembedding, z); accumulate dz and the shared
    gradients; one trunk backward.
    The heads run as a ``lax.scan`` over their stacked weights: a loop body runs to completion
    before the next iteration on every backend, which is what bounds memory. (A straight-line
    Python loop ordered by ``optimization_barrier`` compiled to the naive path's peak on XLA:CPU,
    which removes the barriers before scheduling.) The body is compiled once, whatever n.
    """
    blocks = block_key(params["trunk"])  # stacked `layers` or a `blocks` list
    trunk_p = {k: params["trunk"][k] for k in ("embedding", blocks)}  # what the trunk's backward differentiates
    tied = "unembedding" not in params["trunk"]
    shared_p = {k: params["trunk"][k] for k in ("embedding" if tied else "unembedding", "final_norm")}
    positions = _merge(graphdef, params).trunk.rotary(batch["positions"])  # one table for trunk and heads

    def trunk_fn(tp: dict) -> jax.Array:
        return _merge(graphdef, params, trunk=tp).trunk_hidden(batch["inputs"], positions, batch["segment_ids"])

    z, trunk_vjp = jax.vjp(trunk_fn, trunk_p)

    def head_fn(hp: dict, sp: dict, z_in: jax.Array, targets: jax.Array, mask: jax.Array, weight: jax.Array):
        # Every head block has the same structure: the current one's weights go into slot 0.
        model = _merge(graphdef, params, trunk=sp, head=(0, hp))
        logits = model.head_logits(0, z_in, positions, batch["segment_ids"])
        metrics = masked_cross_entropy(logits, targets, mask)
        return weight * metrics["loss"], metrics

    grad_fn = jax.value_and_grad(head_fn, argnums=(0, 1, 2), has_aux=True)

    def body(carry, xs):
        dz, shared_grads = carry
        (_, metrics), (g_head, g_shared, g_z) = grad_fn(xs["head"], shared_p, z, xs["targets"], xs["mask"], xs["w"])
        carry = (dz + g_z.astype(jnp.float32), jax.tree.map(jnp.add, shared_grads, g_shared))
        return carry, (g_head, metrics)

    n = len(weights)
    keys = [target_keys(i + 1) for i in range(n)]
    xs = {"head": jax.tree.map(lambda *leaves: jnp.stack(leaves), *[params["heads"][i] for i in range(n)]),
          "targets": jnp.stack([batch[t] for t, _ in keys]), "mask": jnp.stack([batch[m] for _, m in keys]),
          "w": jnp.asarray(weights, jnp.float32)}
    init = (jnp.zeros(z.shape, jnp.float32), jax.tree.map(jnp.zeros_like, shared_p))
    (dz, shared_grads), (stacked_grads, stacked_metrics) = jax.lax.scan(body, init, xs)
    (trunk_grads,) = trunk_vjp(dz.astype(z.dtype))
    embedding_grad = trunk_grads["embedding"] + shared_grads["embedding"] if tied else trunk_grads["embedding"]
    grads_trunk = {**shared_grads, blocks: trunk_grads[blocks], "embedding": embedding_grad}
    head_grads = {i: jax.tree.map(lambda g, i=i: g[i], stacked_grads) for i in range(n)}
    loss, metrics = combine_heads([{k: v[i] for k, v in stacked_metrics.items()} for i in range(n)], weights)
    return (loss, metrics), {"trunk": grads_trunk, "heads": head_grads}


class MultiTokenPrediction(ObjectiveBase):
    """``objective=mtp``: n heads, head i predicts token t+i; ``memory_efficient=False`` uses plain autodiff."""

    name = "mtp"

    def __init__(self, cfg: ObjectiveConfig, tokenizer=None, memory_efficient: bool = True):
        super().__init__(cfg, tokenizer)
        self.weights = head_weights(cfg)
        self.heads = cfg.heads
        self.memory_efficient = memory_efficient

    def size_extras(self) -> dict[str, int]:
        """For ``param_counts`` / ``flops_per_token``: blocks beyond ``model.layers``, and unembeddings per token."""
        return {"extra_layers": self.heads - 1, "output_heads": self.heads}

    def build_model(self, cfg: ModelConfig, rngs: nnx.Rngs) -> MultiTokenModel:
        return MultiTokenModel(cfg, self.heads, rngs)

    def prepare(self, rows: Batch) -> Batch:
        return prepare_rows(rows, self.heads)

    def loss(self, model: MultiTokenModel, batch: dict[str, jax.Array]) -> tuple[jax.Array, Metrics]:
        positions = model.trunk.rotary(batch["positions"])  # one table for trunk and heads
        z = model.trunk_hidden(batch["inputs"], positions, batch["segment_ids"])
        return combine_heads([head_metrics(model, i, z, batch, positions) for i in range(self.heads)], self.weights)

    def value_and_grad(self, graphdef: nnx.GraphDef, params: dict, batch: dict[str, jax.Array]):
        if not self.memory_efficient:
            return super().value_and_grad(graphdef, params, batch)
        return memory_efficient_value_and_grad(graphdef, params, batch, self.weights)
