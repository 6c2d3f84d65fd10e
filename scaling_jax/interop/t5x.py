"""T5X decoder-only checkpoints as run directories: ``scaling-jax convert --from-t5x CKPT_DIR --out RUN_DIR``.

The mapping rests on T5X's ``t5x/examples/decoder_only`` network and layers (proved against T5X's own logits
by ``tests/test_t5x_convert.py``):

- Tensors: ``decoder/token_embedder/embedding [vocab, d]``; per layer ``layers_i/pre_self_attention_layer_norm``
  and ``pre_mlp_layer_norm`` scales, ``self_attention/{query,key,value}/kernel [d, heads*head_dim]`` and
  ``out/kernel [heads*head_dim, d]`` (heads major in the joined axis), ``mlp/wi_0`` (activated), ``wi_1``
  (linear), ``wo``; ``decoder_norm/scale``; ``relpos_bias/rel_embedding [heads, buckets]`` shared by all layers;
  ``logits_dense/kernel [d, vocab]`` only when the output layer is not the embedding.
- T5's "LayerNorm" is our RMSNorm (scale, no bias, no mean subtraction), eps 1e-6 (not in the checkpoint).
- No ``1/sqrt(head_dim)`` in T5X's attention: T5 folds it into the query initialiser. Our attention applies it,
  so the imported query kernel is multiplied by ``sqrt(head_dim)`` (exact for power-of-4 head dims).
- Positions: T5 relative-position biases with causal buckets (``model.position=t5_relative``); the bucket
  count is the table's width, the maximum distance (128 in T5X's network) is not stored: override
  ``model.relative_max_distance`` if the model was built with another.
- Gated MLP ``mlp_activations = ('gelu', 'linear')``: flax's ``nn.gelu`` is the tanh approximation, our
  ``geglu``; ``('silu' | 'swish', 'linear')`` is ``swiglu``. Read from ``config.gin`` beside the checkpoint when
  there is one (T5X writes it into the model directory), else T5.1.1's gated GeLU.
- Logits through the shared embedding are divided by ``sqrt(emb_dim)`` (``model.logits_scale=rsqrt_d_model``).
- Dropout is a training setting only; our decoder has none.

Encoder-decoder checkpoints (a ``target/encoder`` tree), non-gated MLPs and anything else this mapping does
not know are refused with a one-line error naming what was found.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import tempfile

import numpy as np

from scaling_jax.config import Config, parse_overrides
from scaling_jax.errors import CheckpointError, ConfigError
from scaling_jax.interop.hf_weights import resize_vocab
from scaling_jax.interop.runs import (
    Source,
    check_model_overrides,
    check_out,
    grown_vocab_size,
    import_run,
    tokenizer_choice,
)
from scaling_jax.interop.t5x_checkpoint import find_checkpoint, leaf_shape, read_array, read_leaves
from scaling_jax.interop.t5x_vocab import T5_EXTRA_IDS, t5x_tokenizer
from scaling_jax.model.transformer import to_layout

GIN_FILE = "config.gin"
ACTIVATIONS = {("gelu", "linear"): "geglu", ("silu", "linear"): "swiglu", ("swish", "linear"): "swiglu"}
T5X_NORM_EPS = 1e-6  # t5x LayerNorm's epsilon
T5X_MAX_DISTANCE = 128  # t5x decoder_only network's RelativePositionBiases(max_distance=128)
LAYER_TENSORS = ("pre_self_attention_layer_norm/scale", "self_attention/query/kernel", "self_attention/key/kernel",
                 "self_attention/value/kernel", "self_attention/out/kernel", "pre_mlp_layer_norm/scale",
                 "mlp/wi_0/kernel", "mlp/wi_1/kernel", "mlp/wo/kernel")
TOP_TENSORS = ("token_embedder/embedding", "relpos_bias/rel_embedding", "decoder_norm/scale")
FIXED_FIELDS = ("layers", "d_model", "heads", "kv_heads", "head_dim", "d_ff", "tie_embeddings", "position",
                "relative_buckets", "logits_scale")  # what the tensors fix; overrides may not contradict them


# ----------------------------------------------------------------------------- gin


def read_gin(ckpt_dir: str) -> tuple[dict[str, str], str | None]:
    """Values T5X's ``config.gin`` sets (last binding wins, any scope), and the file's directory: the
    checkpoint directory's or its model directory's. Only plain ``name = value`` lines are read."""
    for where in (ckpt_dir, os.path.dirname(os.path.normpath(ckpt_dir))):
        path = os.path.join(where, GIN_FILE)
        if os.path.isfile(path):
            values: dict[str, str] = {}
            with open(path) as f:
                for line in f:
                    m = re.match(r"^\s*(?:[\w.@/]*\.)?(\w+)\s*=\s*(.+?)\s*$", line.split("#")[0])
                    if m:
                        values[m.group(1)] = m.group(2)
            return values, where
    return {}, None


def _literal(gin: dict[str, str], key: str, default=None):
    if key not in gin:
        return default
    try:
        return ast.literal_eval(gin[key])
    except (ValueError, SyntaxError):
        return gin[key]  # a gin reference (@...) or macro (%...)


def gin_mlp(gin: dict[str, str], where: str) -> str | None:
    """``geglu`` / ``swiglu`` from ``mlp_activations``; None when gin does not say; an error for the rest."""
    acts = _literal(gin, "mlp_activations")
    if acts is None:
        return None
    key = tuple(acts) if isinstance(acts, (list, tuple)) else (acts,)
    if key not in ACTIVATIONS:
        raise ConfigError(f"{where}: mlp_activations={key!r} is not supported; our decoder's MLP is gated "
                          "('gelu', 'linear') or ('silu', 'linear')")
    return ACTIVATIONS[key]


def gin_vocabulary(gin: dict[str, str], gin_dir: str | None) -> tuple[str | None, int]:
    """The SentencePiece file and ``extra_ids`` of seqio's vocabulary in gin (relative paths from the gin file's
    directory); T5's 100 extra ids when gin does not say."""
    extra = _literal(gin, "extra_ids", T5_EXTRA_IDS)
    extra = extra if isinstance(extra, int) and extra >= 0 else T5_EXTRA_IDS
    path = _literal(gin, "sentencepiece_model_file")
    if not isinstance(path, str) or path.startswith(("@", "%")):
        return None, extra
    if not os.path.isabs(path) and "://" not in path and gin_dir is not None:
        path = os.path.join(gin_dir, path)
    return path, extra


# ----------------------------------------------------------------------------- tensors


def check_architecture(leaves: dict, where: str) -> dict:
    """Shape fields of a T5X decoder-only model from its parameter names and shapes; anything else (an
    encoder-decoder, a non-gated MLP, unknown parameters, inconsistent shapes) is a one-line error."""
    tops = sorted({name.split("/")[0] for name in leaves})
    if "encoder" in tops:
        raise ConfigError(f"{where}: an encoder-decoder checkpoint (found target/encoder/...); only T5X decoder-only "
                          "models (t5x/examples/decoder_only) convert to our decoder")
    if tops != ["decoder"]:
        raise ConfigError(f"{where}: expected a target/decoder tree of a T5X decoder-only model, found "
                          f"{', '.join('target/' + t for t in tops) or 'no parameters'}")
    names = {name.removeprefix("decoder/") for name in leaves}
    layers = sorted({int(m.group(1)) for n in names if (m := re.match(r"layers_(\d+)/", n))})
    if any(n.startswith("layers_") and "/mlp/wi/" in n for n in names):
        raise ConfigError(f"{where}: a non-gated MLP (target/decoder/layers_0/mlp/wi); our decoder's MLP is gated "
                          "(wi_0 activated, wi_1 linear: mlp_activations=('gelu', 'linear'))")
    if not layers or layers != list(range(len(layers))):
        raise ConfigError(f"{where}: found no target/decoder/layers_0 ... layers_N-1 blocks (names: "
                          f"{', '.join(sorted(names)[:4])} ...); is this a T5X decoder-only checkpoint?")
    expected = {*TOP_TENSORS, *(f"layers_{i}/{t}" for i in range(len(layers)) for t in LAYER_TENSORS)}
    unknown = sorted(names - expected - {"logits_dense/kernel"})
    if unknown:
        raise ConfigError(f"{where}: target/decoder/{unknown[0]} (and {len(unknown) - 1} more) has no place in a "
                          "T5X decoder-only model as t5x/examples/decoder_only builds it; not supported")
    missing = sorted(expected - names)
    if missing:
        raise CheckpointError(f"{where}: tensor target/decoder/{missing[0]} is missing; is the checkpoint complete?")
    shape = {n: leaf_shape(leaves[f"decoder/{n}"]) for n in names}
    vocab, d = shape["token_embedder/embedding"]
    heads, buckets = shape["relpos_bias/rel_embedding"]
    joined, d_ff = shape["layers_0/self_attention/query/kernel"][1], shape["layers_0/mlp/wi_0/kernel"][1]
    if joined % heads:
        raise ConfigError(f"{where}: query kernel width {joined} is not a multiple of the {heads} heads of "
                          "relpos_bias/rel_embedding")
    head_dim = joined // heads
    fields = dict(layers=len(layers), d_model=d, heads=heads, kv_heads=heads, head_dim=head_dim, d_ff=d_ff,
                  vocab_size=vocab, tie_embeddings="logits_dense/kernel" not in names, relative_buckets=buckets)
    want = {"token_embedder/embedding": (vocab, d), "relpos_bias/rel_embedding": (heads, buckets),
            "decoder_norm/scale": (d,), "logits_dense/kernel": (d, vocab)}
    for i in range(len(layers)):
        p = f"layers_{i}/"
        want |= {p + "pre_self_attention_layer_norm/scale": (d,), p + "pre_mlp_layer_norm/scale": (d,),
                 p + "self_attention/query/kernel": (d, joined), p + "self_attention/key/kernel": (d, joined),
                 p + "self_attention/value/kernel": (d, joined), p + "self_attention/out/kernel": (joined, d),
                 p + "mlp/wi_0/kernel": (d, d_ff), p + "mlp/wi_1/kernel": (d, d_ff), p + "mlp/wo/kernel": (d_ff, d)}
    for n in sorted(names):
        if shape[n] is not None and shape[n] != want[n]:
            raise CheckpointError(f"{where}: target/decoder/{n} has shape {shape[n]}, but the embedding, position "
                                  f"table and layer 0 imply {want[n]}; the checkpoint is inconsistent")
    return fields


def params_from_t5x(leaves: dict, fields: dict, ckpt_dir: str, scan_layers: bool, dtype: str) -> dict:
    """Our decoder's params pure dict (numpy) from T5X's tensors (see the module docstring for the mapping)."""
    d, h, hd = fields["d_model"], fields["heads"], fields["head_dim"]

    def take(name: str) -> np.ndarray:
        value = read_array(leaves[f"decoder/{name}"], ckpt_dir, f"decoder/{name}")
        if value.shape != leaf_shape(leaves[f"decoder/{name}"]):  # inline arrays were checked; specs say it here
            raise CheckpointError(f"{ckpt_dir}: target/decoder/{name} holds shape {value.shape}, its spec says "
                                  f"{leaf_shape(leaves[f'decoder/{name}'])}; the checkpoint is damaged")
        return value

    query_scale = np.float32(np.sqrt(hd))  # T5 folds 1/sqrt(head_dim) into the query weights; we apply it
    blocks = {}
    for i in range(fields["layers"]):
        p = f"layers_{i}/"
        blocks[i] = {
            "attn": {"wq": take(p + "self_attention/query/kernel").reshape(d, h, hd) * query_scale,
                     "wk": take(p + "self_attention/key/kernel").reshape(d, h, hd),
                     "wv": take(p + "self_attention/value/kernel").reshape(d, h, hd),
                     "wo": take(p + "self_attention/out/kernel").reshape(h, hd, d)},
            "attn_norm": {"scale": take(p + "pre_self_attention_layer_norm/scale")},
            "mlp": {"w_gate": take(p + "mlp/wi_0/kernel"), "w_up": take(p + "mlp/wi_1/kernel"),
                    "w_down": take(p + "mlp/wo/kernel")},
            "mlp_norm": {"scale": take(p + "pre_mlp_layer_norm/scale")},
        }
    params = {"embedding": take("token_embedder/embedding"), "blocks": blocks,
              "final_norm": {"scale": take("decoder_norm/scale")},
              "position_bias": take("relpos_bias/rel_embedding")}
    if not fields["tie_embeddings"]:
        params["unembedding"] = take("logits_dense/kernel")
    params = to_layout(params, scan_layers)
    np_dtype = np.dtype(dtype)
    return _map(lambda a: np.ascontiguousarray(np.asarray(a).astype(np_dtype)), params)


def _map(fn, tree):
    return {k: _map(fn, v) for k, v in tree.items()} if isinstance(tree, dict) else fn(tree)


# ----------------------------------------------------------------------------- import


def _model_settings(fields: dict, gin: dict[str, str], user: dict, where: str) -> dict:
    """Dotted ``model.*`` settings: the tensors' shape, then gin / T5X defaults for what tensors cannot say."""
    via_embedding = _literal(gin, "logits_via_embedding")
    if via_embedding is not None and bool(via_embedding) != fields["tie_embeddings"]:
        raise ConfigError(f"{where}: config.gin says logits_via_embedding={via_embedding} but the checkpoint "
                          f"{'has no' if fields['tie_embeddings'] else 'has a'} logits_dense kernel")
    model = {**fields, "series": "custom", "position": "t5_relative",
             "relative_max_distance": T5X_MAX_DISTANCE, "norm_eps": T5X_NORM_EPS,
             "mlp": gin_mlp(gin, where) or "geglu",
             "logits_scale": "rsqrt_d_model" if fields["tie_embeddings"] else "none"}
    check_model_overrides(user, model, FIXED_FIELDS, "the T5X checkpoint", "drop the override: the weights fix it")
    return {f"model.{k}": v for k, v in model.items()}


def import_t5x(ckpt_dir: str, run_dir: str, overrides: list[str] | None = None, tokenizer: str | None = None) -> Config:
    """Write a run directory (config.yaml, tokenizer/, a step-0 orbax checkpoint) from a T5X decoder-only
    checkpoint (a ``checkpoint_STEP`` directory, or a model directory: its newest one).

    ``overrides`` are dotted config overrides for everything the weights do not fix (data, optimizer, train, mesh,
    dtypes, ``model.relative_max_distance`` / ``norm_eps`` / ``mlp`` where the model was built with other values
    than T5X's defaults; ``model.vocab_size`` may only grow). ``tokenizer`` (``--tokenizer``) is the model's
    SentencePiece file when ``config.gin`` does not point at a readable one. On any error nothing is written.
    """
    check_out(run_dir)
    ckpt = find_checkpoint(ckpt_dir)
    leaves = read_leaves(ckpt)
    fields = check_architecture(leaves, ckpt)
    gin, gin_dir = read_gin(ckpt)
    user = parse_overrides(overrides or [])
    settings = _model_settings(fields, gin, user, ckpt)
    spec = tokenizer_choice(tokenizer, user)
    gin_vocab, extra_ids = gin_vocabulary(gin, gin_dir)
    if spec is None:
        if gin_vocab is None or not os.path.isfile(gin_vocab):
            seen = f"config.gin names '{gin_vocab}', which is not a local file" if gin_vocab else \
                "no config.gin beside it names a SentencePiece file"
            raise ConfigError(f"{ckpt}: no tokenizer ({seen}); pass --tokenizer FILE with the model's SentencePiece "
                              "model, since token ids mean nothing without it")
        spec = gin_vocab
    work = tempfile.mkdtemp(prefix="t5x-vocab-")
    try:
        source_tok = t5x_tokenizer(str(spec), extra_ids, work)
        seqio_size = getattr(source_tok, "base_size", source_tok.vocab_size)
        if seqio_size > fields["vocab_size"]:
            raise ConfigError(f"{ckpt}: the tokenizer has {seqio_size} ids (with {extra_ids} extra ids) but the "
                              f"checkpoint's embedding only {fields['vocab_size']} rows; pass the model's own "
                              "SentencePiece file")
        settings["model.vocab_size"] = grown_vocab_size(fields["vocab_size"], source_tok, user)

        def make_params(config: Config) -> dict:
            m = config.model
            params = params_from_t5x(leaves, fields, ckpt, m.scan_layers, m.param_dtype)
            return resize_vocab(params, m.vocab_size)

        return import_run(run_dir, Source("t5x", "t5x-decoder", ckpt), source_tok, settings | user, make_params)
    finally:
        shutil.rmtree(work, ignore_errors=True)
