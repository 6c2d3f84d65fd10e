"""The analytic size and cost of a model (the named size series that fill its shape are ``series.py``).

Pure Python on purpose: ``info`` and the scaling fits use these numbers without importing JAX,
and a test checks ``param_counts`` against the real parameter tree.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParamCounts:
    total: int
    # the input embedding table (the unembedding too when untied, and a T5 relative-position bias table: Kaplan's
    # N leaves out positional embeddings)
    embedding: int
    non_embedding: int  # Kaplan's N: what scaling laws are fitted against
    matmul: int  # parameters used in matmuls per token, unembedding included (FLOPs basis)


def param_counts(model, extra_layers: int = 0, output_heads: int = 1) -> ParamCounts:
    """Sizes of the decoder plus ``extra_layers`` blocks an objective adds (multi-token prediction's heads);
    ``output_heads`` is how many times the shared unembedding is applied per token (FLOPs, not parameters)."""
    d, v, L = model.d_model, model.vocab_size, model.layers + extra_layers
    kv = model.kv_heads or model.heads
    attn = d * model.head_dim * (2 * model.heads + 2 * kv)  # q, o and k, v projections
    mlp = 3 * d * model.d_ff  # gate, up, down
    per_layer = attn + mlp + 2 * d  # two RMSNorm scales
    embed = v * d * (1 if model.tie_embeddings else 2)
    if getattr(model, "position", "rope") == "t5_relative":  # one [heads, buckets] table; a lookup, no matmul
        embed += model.heads * model.relative_buckets
    total = L * per_layer + d + embed  # + final norm
    non_embedding = total - embed
    matmul = L * (attn + mlp) + output_heads * v * d
    return ParamCounts(total=total, embedding=embed, non_embedding=non_embedding, matmul=matmul)


def attention_flops_per_token(model, seq_len: int, causal: bool = True, extra_layers: int = 0) -> float:
    """Training FLOPs of the score and value matmuls: 3 x 4 S H d_h per layer, halved if causal
    (MaxText's convention; equals Kaplan's 6 n_layer n_ctx d_attn)."""
    full = 12.0 * seq_len * model.heads * model.head_dim * (model.layers + extra_layers)
    return full / 2 if causal else full


def flops_per_token(model, seq_len: int, causal: bool = True, extra_layers: int = 0, output_heads: int = 1) -> float:
    """Training FLOPs per token: 6 x matmul parameters + the attention term (extras as in ``param_counts``)."""
    return (6.0 * param_counts(model, extra_layers, output_heads).matmul
            + attention_flops_per_token(model, seq_len, causal, extra_layers))
