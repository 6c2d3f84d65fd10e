"""Map between our decoder parameters and Hugging Face ``transformers`` Llama checkpoints.

The mapping rests on these facts (read off transformers' ``modeling_llama`` and proved by the
logits tests in ``tests/test_hf_convert.py``):

- RoPE: HF Llama's ``rotate_half`` rotates the pairs (i, i + head_dim/2) with frequencies
  theta^(-2i/head_dim), the same half-split layout as our ``layers.rope``, so q/k weights need a
  reshape only. (The q/k permutation in Meta -> HF conversion scripts maps Meta's *interleaved*
  layout onto this one; HF-format checkpoints are already half-split.)
- RMSNorm: both compute ``w * x / rms(x)`` with ``w`` initialised to 1 (not ``x * (1 + w)``);
  eps is ``rms_norm_eps``.
- torch ``Linear`` stores ``[out, in]``; our kernels are ``[in, ...out]``, so every matrix is
  transposed (and q/k/v/o split their head axes).
- MLP: ``down(act(gate(x)) * up(x))``; ``hidden_act`` silu is our ``swiglu`` and
  ``gelu_pytorch_tanh`` / ``gelu_new`` (tanh-approximate GeLU, ``jax.nn.gelu``'s default) our
  ``geglu``. Exact-erf ``gelu`` has no equivalent here and is refused.
- Attention scale head_dim^-0.5, no biases; tied embeddings reuse ``embed_tokens`` as the output
  layer. ``head_dim`` may differ from hidden_size / heads (both sides store it explicitly).

This module is the pure mapping (configs, tensors, safetensors files); ``hf_runs.py`` writes and reads
run directories with it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import ml_dtypes  # noqa: F401  (registers the 'bfloat16' numpy dtype safetensors needs for BF16 files)
import numpy as np

from scaling_jax.config import ModelConfig
from scaling_jax.errors import CheckpointError, ConfigError
from scaling_jax.model.transformer import LAYERS, block_key, to_layout

HF_TO_MLP = {"silu": "swiglu", "gelu_pytorch_tanh": "geglu", "gelu_new": "geglu"}
MLP_TO_HF = {"swiglu": "silu", "geglu": "gelu_pytorch_tanh"}
SHAPE_FIELDS = ("layers", "d_model", "heads", "kv_heads", "head_dim", "d_ff", "mlp", "tie_embeddings", "vocab_size")
FIXED_FIELDS = SHAPE_FIELDS[:-1]  # what an import's overrides may not change (the vocabulary may grow)
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # HF tokenizers JSON first, then SentencePiece
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some older checkpoints saved; recomputed from rope_theta
DEFAULT_SHARD_BYTES = 5 * 2**30  # transformers' default max_shard_size


# ----------------------------------------------------------------------------- configs


def read_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"'{hf_dir}' has no config.json; pass a Hugging Face model directory "
                              "(save_pretrained output or a downloaded snapshot)")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON (line {e.lineno}); fix or re-save it") from None


def _rope_theta(hf: dict, where: str) -> float:
    """theta from ``rope_parameters`` (transformers >= 5) or ``rope_theta`` (4.x); scaled RoPE is refused."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for field, block in (("rope_parameters", params), ("rope_scaling", scaling)):
        kind = block.get("rope_type", block.get("type", "default"))
        if kind != "default":
            raise ConfigError(f"{where}: {field}.rope_type={kind!r} is not supported (our RoPE has no frequency "
                              "scaling); only rope_type 'default' models convert")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def model_fields_from_hf(hf: dict, where: str = "config.json") -> dict:
    """Our ``ModelConfig`` fields for an HF Llama config; anything we cannot represent is a one-line error."""
    if hf.get("model_type") != "llama":
        raise ConfigError(f"{where}: model_type={hf.get('model_type')!r} is not 'llama'; only Llama checkpoints "
                          "(LlamaForCausalLM) convert")
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field):
            raise ConfigError(f"{where}: {field}=true is not supported; our decoder has no biases")
    act = hf.get("hidden_act", "silu")
    if act not in HF_TO_MLP:
        raise ConfigError(f"{where}: hidden_act={act!r} has no equivalent; supported: {', '.join(HF_TO_MLP)} "
                          "(ours is SwiGLU or tanh-approximate GeGLU)")
    missing = [k for k in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
                           "vocab_size") if k not in hf]
    if missing:
        raise ConfigError(f"{where}: missing {', '.join(missing)}; is this a Llama config.json?")
    heads = int(hf["num_attention_heads"])
    return dict(series="custom", layers=int(hf["num_hidden_layers"]), d_model=int(hf["hidden_size"]), heads=heads,
                kv_heads=int(hf.get("num_key_value_heads") or heads),
                head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads), d_ff=int(hf["intermediate_size"]),
                mlp=HF_TO_MLP[act], tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                vocab_size=int(hf["vocab_size"]), max_seq_len=int(hf.get("max_position_embeddings", 2048)),
                rope_theta=_rope_theta(hf, where), norm_eps=float(hf.get("rms_norm_eps", 1e-6)))


def hf_config_from_model(m: ModelConfig, dtype: str, special_ids: Mapping[str, int] | None = None,
                         extra: dict | None = None) -> dict:
    """A ``LlamaForCausalLM`` config.json for our model (readable by transformers 4.x and 5.x)."""
    if m.d_model % m.heads:
        raise CheckpointError(f"model.d_model={m.d_model} is not a multiple of model.heads={m.heads}; "
                              "transformers' LlamaConfig refuses that shape, so it cannot be exported")
    for field, value, llama in (("position", m.position, "rope"), ("logits_scale", m.logits_scale, "none")):
        if value != llama:
            raise CheckpointError(f"model.{field}={value} has no Llama counterpart (Llama uses {field} {llama}), "
                                  "so the run cannot be exported to Hugging Face")
    ids = dict(special_ids or {})
    out = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": m.vocab_size,
        "hidden_size": m.d_model, "intermediate_size": m.d_ff, "num_hidden_layers": m.layers,
        "num_attention_heads": m.heads, "num_key_value_heads": m.kv_heads or m.heads, "head_dim": m.head_dim,
        "hidden_act": MLP_TO_HF[m.mlp], "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "tie_word_embeddings": m.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "initializer_range": m.init_std, "torch_dtype": dtype, "dtype": dtype,
        "bos_token_id": ids.get("bos"), "eos_token_id": ids.get("eos"), "pad_token_id": ids.get("pad"),
    }
    if extra:
        out["scaling_jax"] = extra  # provenance; transformers keeps unknown keys as attributes
    return out


# ----------------------------------------------------------------------------- tensors


def params_from_hf(tensors: Mapping[str, np.ndarray], m: ModelConfig, dtype: str = "float32",
                   where: str = "checkpoint") -> dict:
    """Our decoder's params pure dict (numpy) from HF Llama tensors; every tensor must be used exactly once."""
    left = {k: v for k, v in tensors.items() if not k.endswith(IGNORED_SUFFIXES)}
    base = "model." if "model.embed_tokens.weight" in left else ""  # LlamaForCausalLM or a bare LlamaModel
    d, h, kv, hd = m.d_model, m.heads, m.kv_heads or m.heads, m.head_dim

    def take(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in left:
            raise CheckpointError(f"{where}: tensor '{name}' is missing; the weights do not match config.json")
        value = np.asarray(left.pop(name))
        if value.shape != shape:
            raise CheckpointError(f"{where}: tensor '{name}' has shape {value.shape}, config.json implies {shape}")
        return value.astype(np.float32)

    blocks = {}
    for i in range(m.layers):
        p = f"{base}layers.{i}."
        blocks[i] = {
            "attn": {"wq": take(p + "self_attn.q_proj.weight", (h * hd, d)).T.reshape(d, h, hd),
                     "wk": take(p + "self_attn.k_proj.weight", (kv * hd, d)).T.reshape(d, kv, hd),
                     "wv": take(p + "self_attn.v_proj.weight", (kv * hd, d)).T.reshape(d, kv, hd),
                     "wo": take(p + "self_attn.o_proj.weight", (d, h * hd)).T.reshape(h, hd, d)},
            "attn_norm": {"scale": take(p + "input_layernorm.weight", (d,))},
            "mlp": {"w_gate": take(p + "mlp.gate_proj.weight", (m.d_ff, d)).T,
                    "w_up": take(p + "mlp.up_proj.weight", (m.d_ff, d)).T,
                    "w_down": take(p + "mlp.down_proj.weight", (d, m.d_ff)).T},
            "mlp_norm": {"scale": take(p + "post_attention_layernorm.weight", (d,))},
        }
    params = {"embedding": take(f"{base}embed_tokens.weight", (m.vocab_size, d)), "blocks": blocks,
              "final_norm": {"scale": take(f"{base}norm.weight", (d,))}}
    params = to_layout(params, m.scan_layers)  # HF's per-layer tensors stacked on `layers` for a scanned model
    if m.tie_embeddings:
        if "lm_head.weight" in left and not np.array_equal(take("lm_head.weight", (m.vocab_size, d)),
                                                           params["embedding"]):
            raise CheckpointError(f"{where}: tie_word_embeddings is true but lm_head.weight differs from "
                                  "embed_tokens.weight; set tie_word_embeddings to false in config.json")
    elif "lm_head.weight" in left:
        params["unembedding"] = take("lm_head.weight", (m.vocab_size, d)).T
    else:
        raise CheckpointError(f"{where}: tensor 'lm_head.weight' is missing and tie_word_embeddings is false")
    if left:
        names = sorted(left)
        raise CheckpointError(f"{where}: {len(names)} tensors have no place in a Llama decoder "
                              f"(e.g. '{names[0]}'); is this a plain LlamaForCausalLM checkpoint?")
    np_dtype = np.dtype(dtype)
    return _map_arrays(lambda a: np.ascontiguousarray(a.astype(np_dtype)), params)


def hf_from_params(params: Mapping, m: ModelConfig, dtype: str = "float32") -> dict[str, np.ndarray]:
    """HF Llama tensors (``LlamaForCausalLM`` names, ``[out, in]`` layout) from our decoder's params."""
    d, h, hd = m.d_model, m.heads, m.head_dim
    np_dtype = np.dtype(dtype)

    def out(a) -> np.ndarray:
        return np.ascontiguousarray(np.asarray(a, dtype=np.float32).astype(np_dtype))

    blocks = to_layout(params, scan_layers=False)["blocks"]  # one HF tensor per layer, whatever our layout
    tensors = {"model.embed_tokens.weight": out(params["embedding"]),
               "model.norm.weight": out(params["final_norm"]["scale"])}
    for i in range(m.layers):
        b, p = _item(blocks, i), f"model.layers.{i}."
        attn, mlp = b["attn"], b["mlp"]
        tensors |= {
            p + "self_attn.q_proj.weight": out(np.asarray(attn["wq"]).reshape(d, -1).T),
            p + "self_attn.k_proj.weight": out(np.asarray(attn["wk"]).reshape(d, -1).T),
            p + "self_attn.v_proj.weight": out(np.asarray(attn["wv"]).reshape(d, -1).T),
            p + "self_attn.o_proj.weight": out(np.asarray(attn["wo"]).reshape(h * hd, d).T),
            p + "input_layernorm.weight": out(b["attn_norm"]["scale"]),
            p + "mlp.gate_proj.weight": out(np.asarray(mlp["w_gate"]).T),
            p + "mlp.up_proj.weight": out(np.asarray(mlp["w_up"]).T),
            p + "mlp.down_proj.weight": out(np.asarray(mlp["w_down"]).T),
            p + "post_attention_layernorm.weight": out(b["mlp_norm"]["scale"]),
        }
    if not m.tie_embeddings:
        tensors["lm_head.weight"] = out(np.asarray(params["unembedding"]).T)
    return tensors


def decoder_params(params: Mapping, m: ModelConfig) -> dict:
    """The plain next-token decoder inside any objective's parameter tree.

    Multi-token prediction keeps ``layers - 1`` blocks in ``trunk`` plus one block per head; its
    head 1 (next token) is trunk + ``heads[0]``, exactly a ``layers``-block Llama. Other heads are dropped.
    The result has the trunk's layout (stacked ``layers`` or a ``blocks`` list).
    """
    if "trunk" not in params:
        return dict(params)
    trunk, heads = params["trunk"], params["heads"]
    unstacked = to_layout(trunk, scan_layers=False)
    blocks = {i: _item(unstacked["blocks"], i) for i in range(m.layers - 1)}
    blocks[m.layers - 1] = _item(heads, 0)
    out = {**{k: v for k, v in unstacked.items() if k != "blocks"}, "blocks": blocks}
    return to_layout(out, scan_layers=block_key(trunk) == LAYERS)


def resize_vocab(params: dict, vocab_size: int, real_rows: int | None = None) -> dict:
    """Embedding (and unembedding) rows up to ``vocab_size`` where every id from ``real_rows`` on (default: the
    checkpoint's row count) is the mean of the rows below it.

    An imported tokenizer may need ids above the source's vocabulary (our pad / UL2 mode tokens / sentinels).
    Mean initialisation is what transformers' ``resize_token_embeddings`` does by default: new ids start as
    an "average" token instead of random noise with outsized logits. ``real_rows``: the tokenizer's own size
    when the checkpoint pads its vocabulary (rows no token uses, zeros or untrained): those rows take the
    mean too, and stay out of it. The mean is taken in float32 whatever the parameters' dtype (a bfloat16
    running sum stalls)."""
    emb = params["embedding"]
    rows = emb.shape[0]
    real = rows if real_rows is None else min(real_rows, rows)
    if vocab_size <= real or (vocab_size <= rows and real == rows):
        return params

    def grown(table: np.ndarray, axis: int) -> np.ndarray:
        kept = np.take(table, np.arange(real), axis=axis)
        mean = kept.astype(np.float32).mean(axis, keepdims=True).astype(table.dtype)
        return np.concatenate([kept, np.repeat(mean, vocab_size - real, axis)], axis=axis)

    out = dict(params)
    out["embedding"] = grown(emb, 0)
    if "unembedding" in params:
        out["unembedding"] = grown(params["unembedding"], 1)
    return out


def _item(tree: Mapping, i: int):
    """Index ``i`` of an nnx.List's pure dict (int keys in memory, str keys after some round-trips)."""
    return tree[i] if i in tree else tree[str(i)]


def _map_arrays(fn, tree):
    if isinstance(tree, Mapping):
        return {k: _map_arrays(fn, v) for k, v in tree.items()}
    return fn(tree)


# ----------------------------------------------------------------------------- safetensors files


def load_hf_tensors(hf_dir: str) -> dict[str, np.ndarray]:
    """All tensors of a single-file or sharded (``model.safetensors.index.json``) safetensors checkpoint."""
    from safetensors.numpy import load_file

    index = os.path.join(hf_dir, INDEX_FILE)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):  # a truncated download, a hand-edited file
            raise CheckpointError(f"'{index}' is not a valid shard index (JSON with a weight_map); re-download "
                                  "it") from None
    else:
        files = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
    if not files:
        legacy = [f for f in os.listdir(hf_dir) if f.endswith((".bin", ".pt", ".pth"))]
        hint = (f" (found {legacy[0]}: re-save it with save_pretrained(..., safe_serialization=True))"
                if legacy else "")
        raise CheckpointError(f"'{hf_dir}' has no .safetensors weights{hint}")
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        path = os.path.join(hf_dir, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"{INDEX_FILE} in '{hf_dir}' names {name}, which is missing; download all shards")
        try:
            tensors.update(load_file(path))
        except Exception as e:  # safetensors raises its own SafetensorError / OSError for a damaged file
            raise CheckpointError(f"{path} is not a readable safetensors file ({e}); re-download it") from None
    return tensors


def save_hf_tensors(tensors: Mapping[str, np.ndarray], out_dir: str,
                    max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[str]:
    """Write ``model.safetensors``, or numbered shards plus an index past ``max_shard_bytes`` (as transformers does)."""
    from safetensors.numpy import save_file

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, value in tensors.items():
        if shards[-1] and size + value.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += value.nbytes
    metadata = {"format": "pt"}  # transformers refuses safetensors files without it
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata=metadata)
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, os.path.join(out_dir, name), metadata=metadata)
        weight_map |= dict.fromkeys(shard, name)
    total = sum(v.nbytes for v in tensors.values())
    with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names


# ----------------------------------------------------------------------------- tokenizers


def find_tokenizer(hf_dir: str, hf: dict, explicit: str | None) -> str:
    """The tokenizer spec for an imported model: ``--tokenizer``, else the HF dir's tokenizer file,
    else the one our own export recorded (a byte-level run), else a one-line error."""
    if explicit:
        return explicit
    for name in TOKENIZER_FILES:
        path = os.path.join(hf_dir, name)
        if os.path.isfile(path):
            return path
    recorded = (hf.get("scaling_jax") or {}).get("tokenizer")
    if recorded and recorded.split(":")[0] == "byte":
        return recorded
    raise ConfigError(f"'{hf_dir}' has no tokenizer.json or tokenizer.model; pass --tokenizer FILE (the model's "
                      "tokenizer), since token ids mean nothing without it")
