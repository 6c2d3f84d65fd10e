"""Named size series: ``model.series`` picks a member and fills the model's shape fields.

A config-time concern (``config.py`` applies it while parsing), so it sits below the config and
imports nothing of the package but errors; ``model/family.py`` computes sizes and costs of any shape.
"""

from __future__ import annotations

import re

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
