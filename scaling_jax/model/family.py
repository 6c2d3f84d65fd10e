"""Named size series and the analytic size and cost of a model.

Pure Python on purpose: ``info`` and the scaling fits use these numbers without importing JAX,
and a test checks ``param_counts`` against the real parameter tree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from scaling_jax.errors import ConfigError

SHAPE_FIELDS = ("layers", "d_model", "heads", "kv_heads", "head_dim", "d_ff", "tie_embeddings", "mlp")


def passuntil_shape(i: int) -> dict:
    """PassUntil series (Hu et al. 2023): layers 4i, heads floor(i(8+i)/4), head dim 64,
    d_model 64*heads, d_ff 2.5*d_model, tied embeddings, gated GeLU."""
    heads = (i * (8 + i)) // 4
    d_model = 64 * heads
    return dict(layers=4 * i, d_model=d_model, heads=heads, kv_heads=0, head_dim=64,
                d_ff=(5 * d_model) // 2, tie_embeddings=True, mlp="geglu")


def kaplan_shape(layers: int, d_model: int) -> dict:
    """Kaplan et al. (2020) shapes: d_attn = d_model in 64-wide heads, d_ff = 4 d_model.
    The gated MLP has three matrices, so d_ff is scaled by 2/3 to keep 8 d_model^2 per layer."""
    if d_model % 64:
        raise ConfigError(f"model.series=kaplan:{layers}x{d_model}: d_model must be a multiple of 64")
    return dict(layers=layers, d_model=d_model, heads=d_model // 64, kv_heads=0, head_dim=64,
                d_ff=(8 * d_model) // 3, tie_embeddings=False, mlp="geglu")


def series_shape(series: str) -> dict | None:
    """Shape fields of a named series member, or None for ``custom``."""
    if series == "custom":
        return None
    if m := re.fullmatch(r"passuntil:(\d+)", series):
        if int(m.group(1)) < 1:
            raise ConfigError(f"model.series={series}: the PassUntil index starts at 1")
        return passuntil_shape(int(m.group(1)))
    if m := re.fullmatch(r"kaplan:(\d+)x(\d+)", series):
        return kaplan_shape(int(m.group(1)), int(m.group(2)))
    raise ConfigError(f"model.series='{series}' is unknown; use custom, passuntil:I or kaplan:LAYERSxD_MODEL")


def apply_series(model, explicit: set[str]) -> None:
    """Fill the shape fields of ``model`` from its series; refuse hand-set fields that disagree
    (a saved resolved config repeats the series' own values, which is fine)."""
    shape = series_shape(model.series)
    if shape is None:
        return
    clash = sorted(k for k in explicit & set(SHAPE_FIELDS) if getattr(model, k) != shape[k])
    if clash:
        raise ConfigError(f"model.{clash[0]} conflicts with model.series={model.series}; "
                          "drop it or set model.series=custom to choose the shape by hand")
    for key, value in shape.items():
        setattr(model, key, value)


@dataclass(frozen=True)
class ParamCounts:
    total: int
    embedding: int  # the input embedding table (the unembedding too when untied)
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
