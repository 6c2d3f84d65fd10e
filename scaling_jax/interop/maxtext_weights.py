"""Map between our decoder parameters and MaxText Llama-family (``decoder_block: llama2``) checkpoints.

Pure functions over MaxText's config keys and numpy trees; ``maxtext_runs.py`` reads and writes the orbax
files and run directories. What the mapping rests on (read off MaxText 0.2.5's ``layers/`` and
``models/llama2.py``, and proved against MaxText's own logits by ``tests/test_maxtext_convert.py``):

- RoPE: MaxText's default ``RotaryEmbedding`` rotates the half-split pairs (i, i + head_dim/2) with
  timescales ``rope_min_timescale * (rope_max_timescale / rope_min_timescale) ** (2i / head_dim)``, which
  for ``rope_min_timescale: 1`` is our ``rope`` with ``rope_theta = rope_max_timescale``: no permutation.
  (``rope_type: llama3.1`` / ``yarn`` and linear scaling are other layouts or scaled RoPE: refused.)
- Query scaling: MaxText applies no 1/sqrt(head_dim) in attention; it folds that factor into the query
  kernel's initialiser. Our attention scales by 1/sqrt(head_dim), so ``wq = query.kernel * sqrt(head_dim)``
  (exact, and so bit-identical on the way back, when sqrt(head_dim) is a power of two: 16, 64, 256).
- Tied logits (``logits_via_embedding``) are divided by sqrt(emb_dim) when ``normalize_embedding_logits``
  (MaxText's default): our ``model.logits_scale=rsqrt_d_model``. MaxText computes them against a bfloat16
  copy of the embedding table, so a float32 tied model's MaxText logits carry that rounding; ours do not.
- RMSNorm ``x / rms(x) * scale`` (scale initialised to 1), eps ``normalization_layer_epsilon``; no embedding
  scaling; MLP ``wo(act(wi_0 x) * wi_1 x)`` with ``mlp_activations: [silu, linear]`` (our ``swiglu``) or
  ``[gelu, linear]`` (jax's tanh GeLU: our ``geglu``).
- Kernels are stored ``[in, ...out]`` like ours; a scanned checkpoint stacks every layer tensor on axis
  ``param_scan_axis`` (1 by default: ``[emb, layers, heads, head_dim]``), an unscanned one names the layers
  ``layers_0``, ``layers_1``, ...
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from scaling_jax.config import ModelConfig
from scaling_jax.errors import CheckpointError, ConfigError
from scaling_jax.model.transformer import to_layout

# MaxText's base.yml defaults for every key read here: a config file need only give what it changes.
DEFAULTS: dict[str, Any] = {
    "model_name": "default", "decoder_block": "llama2", "global_parameter_scale": 1,
    "base_emb_dim": 2048, "base_num_query_heads": 16, "base_num_kv_heads": 16, "base_mlp_dim": 7168,
    "base_num_decoder_layers": 16, "head_dim": 128, "vocab_size": 32000, "mlp_activations": ["silu", "linear"],
    "logits_via_embedding": False, "normalize_embedding_logits": True, "normalization_layer_epsilon": 1e-5,
    "rope_max_timescale": 10000, "rope_min_timescale": 1, "max_target_length": 2048, "scan_layers": True,
    "param_scan_axis": 1, "tokenizer_path": "",
}
# Architecture fields our decoder cannot represent, with the only value it can: anything else is refused.
REQUIRED: dict[str, Any] = {
    "model_name": "default", "decoder_block": "llama2", "global_parameter_scale": 1, "use_qk_norm": False,
    "attention_bias": False, "mlp_bias": False, "num_experts": 1, "rope_type": "default",
    "rope_min_timescale": 1, "rope_linear_scaling_factor": 1.0, "attention_type": "global",
    "attn_logits_soft_cap": 0.0, "final_logits_soft_cap": 0.0, "use_post_attn_norm": False,
    "use_post_ffw_norm": False, "fused_qkv": False, "fused_mlp": False, "trainable_position_size": -1,
    "use_untrainable_positional_embedding": False, "mlp_activations_limit": -1.0, "mtp_num_layers": 0,
    "quantization": "", "use_multimodal": False, "share_kv_projections": False, "attention_sink": False,
    "first_num_dense_layers": 0, "shared_experts": 0, "use_m3_model": False,
}
ACTIVATIONS = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu"}
MLP_TO_ACTIVATION = {"swiglu": "silu", "geglu": "gelu"}
# Our ModelConfig fields the weights fix (an override may not contradict them; the vocabulary may grow).
FIXED_FIELDS = ("layers", "d_model", "heads", "kv_heads", "head_dim", "d_ff", "mlp", "tie_embeddings", "logits_scale")


# ----------------------------------------------------------------------------- configs


def _supported(value: Any, wanted: Any) -> bool:
    """Whether a key's value means what our decoder does (absent, or ``wanted``; a negative ``wanted`` is an
    "off" sentinel, so any value <= 0 is off too)."""
    if value is None:
        return True
    if isinstance(wanted, bool):
        return isinstance(value, (bool, int)) and bool(value) is wanted
    if isinstance(wanted, (int, float)):
        try:
            number = float(value)
        except (TypeError, ValueError):
            return False
        return number <= 0 if wanted < 0 else number == wanted
    return str(value) == wanted


def model_fields_from_maxtext(keys: Mapping[str, Any], where: str = "the MaxText config") -> dict:
    """Our ``ModelConfig`` fields for MaxText config ``keys`` (missing keys take base.yml's defaults);
    an architecture field we cannot represent is a one-line error naming it."""
    k = {**DEFAULTS, **keys}
    for field, wanted in REQUIRED.items():
        if not _supported(k.get(field), wanted):
            hint = (f"; pass that model's keys (MaxText's configs/models/{k[field]}.yml) with --maxtext-config "
                    "and model_name=default"
                    if field == "model_name" else "")
            raise ConfigError(f"{where}: {field}={k[field]!r} is not supported (ours is a plain Llama decoder: "
                              f"{field}={wanted!r}){hint}")
    acts = k["mlp_activations"]
    acts = [acts] if isinstance(acts, str) else list(acts)
    if len(acts) != 2 or acts[1] != "linear" or acts[0] not in ACTIVATIONS:
        raise ConfigError(f"{where}: mlp_activations={acts!r} is not supported; use [silu, linear] (SwiGLU) or "
                          "[gelu, linear] (tanh GeGLU)")
    try:
        fields = dict(series="custom", layers=int(k["base_num_decoder_layers"]), d_model=int(k["base_emb_dim"]),
                      heads=int(k["base_num_query_heads"]), kv_heads=int(k["base_num_kv_heads"]),
                      head_dim=int(k["head_dim"]), d_ff=int(k["base_mlp_dim"]), mlp=ACTIVATIONS[acts[0]],
                      tie_embeddings=bool(k["logits_via_embedding"]), vocab_size=int(k["vocab_size"]),
                      max_seq_len=int(k["max_target_length"]), rope_theta=float(k["rope_max_timescale"]),
                      norm_eps=float(k["normalization_layer_epsilon"]))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: a shape key is not a number ({e}); check base_* / head_dim / vocab_size") from None
    fields["logits_scale"] = ("rsqrt_d_model" if fields["tie_embeddings"] and k["normalize_embedding_logits"]
                              else "none")
    return fields


def maxtext_keys_from_model(m: ModelConfig, scan_layers: bool = True) -> dict[str, Any]:
    """The MaxText config keys that rebuild our model (for a YAML next to an exported checkpoint)."""
    if m.position != "rope":
        raise CheckpointError(f"model.position={m.position} has no MaxText llama2 equivalent; only RoPE models export")
    if m.logits_scale == "rsqrt_d_model" and not m.tie_embeddings:
        raise CheckpointError("model.logits_scale=rsqrt_d_model with untied embeddings has no MaxText equivalent "
                              "(MaxText scales only tied logits)")
    return {
        "model_name": "default", "decoder_block": "llama2", "base_emb_dim": m.d_model,
        "base_num_query_heads": m.heads, "base_num_kv_heads": m.kv_heads or m.heads, "head_dim": m.head_dim,
        "base_mlp_dim": m.d_ff, "base_num_decoder_layers": m.layers, "vocab_size": m.vocab_size,
        "mlp_activations": [MLP_TO_ACTIVATION[m.mlp], "linear"], "logits_via_embedding": m.tie_embeddings,
        "normalize_embedding_logits": m.logits_scale == "rsqrt_d_model",
        "normalization_layer_epsilon": m.norm_eps, "rope_max_timescale": m.rope_theta, "rope_min_timescale": 1,
        "rope_type": "default", "max_target_length": m.max_seq_len, "scan_layers": scan_layers,
        "param_scan_axis": 1, "weight_dtype": "float32",
    }


# ----------------------------------------------------------------------------- tensors


def _layer_tensors(m: ModelConfig) -> dict[tuple[str, ...], tuple[tuple[int, ...], str]]:
    """One layer's MaxText tensors: path under the layer -> (shape, our name under a block)."""
    d, h, kv, hd, f = m.d_model, m.heads, m.kv_heads or m.heads, m.head_dim, m.d_ff
    return {
        ("self_attention", "query", "kernel"): ((d, h, hd), "attn/wq"),
        ("self_attention", "key", "kernel"): ((d, kv, hd), "attn/wk"),
        ("self_attention", "value", "kernel"): ((d, kv, hd), "attn/wv"),
        ("self_attention", "out", "kernel"): ((h, hd, d), "attn/wo"),
        ("pre_self_attention_layer_norm", "scale"): ((d,), "attn_norm/scale"),
        ("post_self_attention_layer_norm", "scale"): ((d,), "mlp_norm/scale"),
        ("mlp", "wi_0", "kernel"): ((d, f), "mlp/w_gate"),
        ("mlp", "wi_1", "kernel"): ((d, f), "mlp/w_up"),
        ("mlp", "wo", "kernel"): ((f, d), "mlp/w_down"),
    }


def flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """A nested dict -> {path tuple: leaf}."""
    out: dict[tuple[str, ...], Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out |= flatten(value, (*prefix, str(key)))
        else:
            out[(*prefix, str(key))] = value
    return out


def _set(tree: dict, path: str, value: Any) -> None:
    parts = path.split("/")
    for part in parts[:-1]:
        tree = tree.setdefault(part, {})
    tree[parts[-1]] = value


def _get(tree: Mapping, path: str) -> Any:
    for part in path.split("/"):
        tree = tree[part]
    return tree


def params_from_maxtext(weights: Mapping, m: ModelConfig, scan_layers: bool, scan_axis: int = 1,
                        dtype: str = "float32", where: str = "checkpoint") -> dict:
    """Our decoder's params (numpy, in ``m.scan_layers``' layout) from MaxText's model weights
    ``{"token_embedder": ..., "decoder": ...}``; every tensor must be used exactly once, at the shape the
    config implies (``scan_layers`` / ``scan_axis``: the checkpoint's layer layout)."""
    left = flatten(weights)
    mismatch = ("base_emb_dim, base_num_query_heads, base_num_kv_heads, head_dim, base_mlp_dim, "
                "base_num_decoder_layers, vocab_size")

    def take(path: tuple[str, ...], shape: tuple[int, ...]) -> np.ndarray:
        name = "/".join(path)
        if path not in left:
            hint = (" (the config says scan_layers=" + ("true" if scan_layers else "false")
                    + "; does the checkpoint say otherwise?)") if "layers" in name else ""
            raise CheckpointError(f"{where}: tensor '{name}' is missing; the weights do not match the MaxText "
                                  f"config{hint}")
        value = np.asarray(left.pop(path))
        if value.shape != shape:
            raise CheckpointError(f"{where}: tensor '{name}' has shape {value.shape}, the MaxText config implies "
                                  f"{shape}; fix the config's {mismatch} to match the checkpoint")
        return value.astype(np.float32)

    layer = _layer_tensors(m)
    blocks: dict[int, dict] = {i: {} for i in range(m.layers)}
    for sub, (shape, ours) in layer.items():
        if scan_layers:
            axis = min(scan_axis, len(shape))
            stacked = take(("decoder", "layers", *sub), (*shape[:axis], m.layers, *shape[axis:]))
            stacked = np.moveaxis(stacked, axis, 0)
            for i in range(m.layers):
                _set(blocks[i], ours, stacked[i])
        else:
            for i in range(m.layers):
                _set(blocks[i], ours, take(("decoder", f"layers_{i}", *sub), shape))
    scale = np.float32(math.sqrt(m.head_dim))  # MaxText's query kernel carries 1/sqrt(head_dim); ours does not
    for b in blocks.values():
        b["attn"]["wq"] = b["attn"]["wq"] * scale
    params = {"embedding": take(("token_embedder", "embedding"), (m.vocab_size, m.d_model)), "blocks": blocks,
              "final_norm": {"scale": take(("decoder", "decoder_norm", "scale"), (m.d_model,))}}
    if not m.tie_embeddings:
        if ("decoder", "logits_dense", "kernel") not in left:
            raise CheckpointError(f"{where}: tensor 'decoder/logits_dense/kernel' is missing; the checkpoint has "
                                  "tied logits: set logits_via_embedding=true")
        params["unembedding"] = take(("decoder", "logits_dense", "kernel"), (m.d_model, m.vocab_size))
    if left:
        names = sorted("/".join(p) for p in left)
        hint = ("; it has untied logits: set logits_via_embedding=false" if "decoder/logits_dense/kernel" in names
                else "; is this a MaxText llama2 checkpoint?")
        raise CheckpointError(f"{where}: {len(names)} tensors have no place in a Llama decoder (e.g. '{names[0]}')"
                              f"{hint}")
    np_dtype = np.dtype(dtype)
    out = to_layout(params, m.scan_layers)
    return _map_arrays(lambda a: np.ascontiguousarray(a.astype(np_dtype)), out)


def maxtext_from_params(params: Mapping, m: ModelConfig, scan_layers: bool = True, scan_axis: int = 1) -> dict:
    """MaxText's model weights ``{"token_embedder": ..., "decoder": ...}`` (float32 numpy) from our decoder's
    params, scanned (layers stacked on ``scan_axis``) or unscanned (``layers_0``, ...)."""
    blocks = to_layout(params, scan_layers=False)["blocks"]
    per_layer = [blocks[i] if i in blocks else blocks[str(i)] for i in range(m.layers)]
    scale = np.float32(math.sqrt(m.head_dim))
    decoder: dict = {"decoder_norm": {"scale": _f32(params["final_norm"]["scale"])}}
    for sub, (_, ours) in _layer_tensors(m).items():
        values = [_f32(_get(b, ours)) for b in per_layer]
        if ours == "attn/wq":
            values = [v / scale for v in values]
        if scan_layers:
            axis = min(scan_axis, values[0].ndim)
            _set(decoder, "/".join(("layers", *sub)), np.ascontiguousarray(np.stack(values, axis=axis)))
        else:
            for i, v in enumerate(values):
                _set(decoder, "/".join((f"layers_{i}", *sub)), np.ascontiguousarray(v))
    if not m.tie_embeddings:
        decoder["logits_dense"] = {"kernel": _f32(params["unembedding"])}
    return {"token_embedder": {"embedding": _f32(params["embedding"])}, "decoder": decoder}


def _f32(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32))


def _map_arrays(fn, tree):
    if isinstance(tree, Mapping):
        return {k: _map_arrays(fn, v) for k, v in tree.items()}
    return fn(tree)
