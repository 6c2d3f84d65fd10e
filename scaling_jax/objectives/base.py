"""The objective interface: a host-side data transform plus a loss on the model.

The trainer only calls these two methods, so causal LM, multi-token prediction and UL2
denoising are interchangeable by config (``objective=NAME``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from scaling_jax.config import ModelConfig, ObjectiveConfig
from scaling_jax.data.tokenizer import Tokenizer
from scaling_jax.errors import ConfigError
from scaling_jax.model.transformer import Decoder

Batch = dict[str, np.ndarray]
Metrics = dict[str, jax.Array]


class Objective(Protocol):
    name: str
    next_token_eval: bool  # False: validation uses the causal objective on the same model instead

    def prepare(self, rows: Batch) -> Batch:
        """Packed rows (``tokens``, ``segment_ids``: ``[batch, seq_len + 1]``) -> model batch (numpy)."""

    def loss(self, model, batch: dict[str, jax.Array]) -> tuple[jax.Array, Metrics]:
        """Mean loss over target tokens and metrics; ``nll_sum`` and ``tokens`` allow exact sums."""

    def build_model(self, cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
        """The module to train: the decoder, plus any output heads this objective owns."""

    def value_and_grad(self, graphdef: nnx.GraphDef, params: dict, batch: dict[str, jax.Array]):
        """``((loss, metrics), grads)`` for the params pure dict."""

    def size_extras(self) -> dict[str, int]:
        """Keyword arguments for ``param_counts`` / ``flops_per_token`` (blocks and heads it adds)."""


class ObjectiveBase:
    """Defaults: the plain decoder and plain reverse-mode autodiff of ``loss``."""

    name = "base"
    next_token_eval = True  # `loss` / `nll_sum` are next-token prediction (validation can use them as is)

    def __init__(self, cfg: ObjectiveConfig, tokenizer: Tokenizer | None = None):
        self.cfg = cfg
        self.tokenizer = tokenizer

    def size_extras(self) -> dict[str, int]:
        return {}

    def build_model(self, cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
        return Decoder(cfg, rngs)

    def value_and_grad(self, graphdef: nnx.GraphDef, params: dict, batch: dict[str, jax.Array]):
        return jax.value_and_grad(make_loss_fn(graphdef, self), has_aux=True)(params, batch)


def make_loss_fn(graphdef: nnx.GraphDef, objective: Objective) -> Callable:
    """``loss_fn(params, batch) -> (loss, metrics)`` on the params pure dict (for grads and eval)."""

    def loss_fn(params: dict, batch: dict[str, jax.Array]):
        return objective.loss(nnx.merge(graphdef, params), batch)

    return loss_fn


def masked_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> Metrics:
    """Token-mean cross entropy over ``mask``, computed in float32, with exact sums for eval."""
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    weights = mask.astype(jnp.float32)
    count = weights.sum()
    nll_sum = (nll * weights).sum()
    correct = ((jnp.argmax(logits, axis=-1) == targets) * weights).sum()
    denom = jnp.maximum(count, 1.0)
    return {"loss": nll_sum / denom, "accuracy": correct / denom, "nll_sum": nll_sum, "tokens": count}


OBJECTIVES = {  # name -> (module, class); imported on use so one objective's deps never load another's
    "causal": ("scaling_jax.objectives.causal", "CausalLM"),
    "mtp": ("scaling_jax.objectives.multi_token", "MultiTokenPrediction"),
    "ul2": ("scaling_jax.objectives.denoisers", "MixtureOfDenoisers"),
    "finetune": ("scaling_jax.objectives.finetune", "InstructionFinetune"),
}


def special_ids(objective: Objective, tokenizer: Tokenizer) -> dict[str, int]:
    """Every reserved id the objective may emit: pad/bos/eos, plus mode tokens and sentinels if it uses them."""
    ids = {"pad": tokenizer.pad_id, "bos": tokenizer.bos_id, "eos": tokenizer.eos_id}
    token_ids = getattr(objective, "ids", None)  # UL2-style objectives keep their TokenIds here
    if token_ids is not None:
        ids.update(token_ids.modes)
        ids.update({f"sentinel {k}": int(v) for k, v in enumerate(token_ids.sentinels)})
    return ids


def ids_past(objective: Objective, tokenizer: Tokenizer, rows: int) -> dict[str, int]:
    """The reserved ids ``objective`` emits that an embedding of ``rows`` rows has no row for."""
    return {name: i for name, i in special_ids(objective, tokenizer).items() if i >= rows}


def check_fresh_vocab(objective: Objective, tokenizer: Tokenizer, vocab_size: int, spec: str) -> None:
    """A fresh model's embedding holds every id its objective emits: an id past it makes the loss NaN (the
    embedding lookup fills it, the softmax has no such class). A continuation checks its parent instead, where
    ``stage.extend_vocab`` can grow the embedding."""
    missing = ids_past(objective, tokenizer, vocab_size)
    if missing:
        first = max(missing, key=missing.get)
        raise ConfigError(f"objective {objective.name} uses {len(missing)} reserved ids past model.vocab_size="
                          f"{vocab_size} ({first} = id {missing[first]} of data.tokenizer='{spec}'); set "
                          f"model.vocab_size={tokenizer.vocab_size} or 0 (take it from the tokenizer)")


def build_objective(cfg: ObjectiveConfig, tokenizer: Tokenizer | None = None) -> Objective:
    """The configured objective; ``tokenizer`` supplies special ids (UL2's sentinels and mode tokens)."""
    if cfg.name not in OBJECTIVES:
        raise ConfigError(f"objective.name='{cfg.name}' is unknown; choose one of {', '.join(OBJECTIVES)}")
    module, cls = OBJECTIVES[cfg.name]
    return getattr(importlib.import_module(module), cls)(cfg, tokenizer)
