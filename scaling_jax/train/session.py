"""What a run is built from before any state exists: tokenizer, objective, mesh, data, optimizer, the
jitted train and eval steps. ``build_session`` serves the trainer, the benchmarks and tests; it
writes no files (the run directory belongs to ``loop.Trainer``). Its memory pre-flight (``memory.py``)
refuses a model that cannot fit the devices before data loads and before the step compiles.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import optax
from jax.sharding import Mesh

from scaling_jax import paths
from scaling_jax.config import Config
from scaling_jax.data import pipeline, sources
from scaling_jax.data.instructions import InstructionData
from scaling_jax.data.tokenizer import build_tokenizer, read_saved_info, resolve_vocab
from scaling_jax.errors import CheckpointError, ConfigError
from scaling_jax.objectives.base import build_objective
from scaling_jax.objectives.causal import CausalLM
from scaling_jax.parallel.mesh import build_mesh
from scaling_jax.parallel.sharding import requested_split, rules_from_config
from scaling_jax.run_dir import CHECKPOINT_DIR, TOKENIZER_DIR
from scaling_jax.train import memory
from scaling_jax.train.state import TrainState, init_state, make_optimizer, state_layout
from scaling_jax.train.step import batch_shardings, jit_train_step, make_eval_step, make_train_step


class DataBundle:
    """Train and validation rows of every source (one, or a ``data.mixture``) plus the unigram bits/byte baseline.

    ``train_rows`` is one source's random-access rows, or ``[(rows, rate), ...]`` for a mixture;
    ``val_rows`` is random-access either way (a mixture's validation rows interleave by rate, unshuffled).
    """

    def __init__(self, config: Config, tokenizer):
        d = config.data
        parts, counts = [], []
        self.num_train_docs = self.num_val_docs = 0
        for component, rate in sources.source_components(d):
            train, val, byte_counts = self._component(component, tokenizer)
            parts.append((train, val, rate))
            counts.append((*byte_counts, rate))
        self.baseline_bpb = sources.unigram_bits_from_counts(counts)
        if len(parts) == 1:
            self.train_rows, self.val_rows = parts[0][0], parts[0][1]
        else:
            self.train_rows = [(train, rate) for train, _, rate in parts]
            self.val_rows = pipeline.mixed_rows([(val, rate) for _, val, rate in parts], seed=None)

    def _component(self, d, tokenizer) -> tuple[Any, Any, tuple]:
        """Rows of one source: prepared shards, a seqio task/mixture, or documents tokenized here."""
        from scaling_jax.data import prepare

        if prepare.is_prepared(d.source):
            train, val = (prepare.ShardRows(d.source, split, d.seq_len, tokenizer) for split in sources.SPLITS)
            self.num_train_docs += train.num_documents
            self.num_val_docs += val.num_documents
            return train, val, (train.byte_counts, val.byte_counts)
        if d.source.startswith("seqio:"):
            from scaling_jax.data.seqio_adapter import seqio_documents  # the only path that imports TensorFlow

            train_ids, val_ids = seqio_documents(d, tokenizer)
            train_ids = pipeline.shuffled(train_ids, d.shuffle_seed)
            texts = [[tokenizer.decode(ids) for ids in docs] for docs in (train_ids, val_ids)]
        else:
            train_docs = sources.load_documents(d, "train")
            val_docs = sources.load_documents(d, "validation")
            texts = [[x.text for x in train_docs], [x.text for x in val_docs]]
            train_ids = pipeline.tokenize_documents(pipeline.shuffled(train_docs, d.shuffle_seed), tokenizer)
            val_ids = pipeline.tokenize_documents(val_docs, tokenizer)
        self.num_train_docs += len(train_ids)
        self.num_val_docs += len(val_ids)
        rows = [pipeline.PackedRows(ids, d.seq_len, tokenizer.bos_id, tokenizer.eos_id) for ids in (train_ids, val_ids)]
        return rows[0], rows[1], tuple(sources.byte_counts(t) for t in texts)




def sync_run_tokenizer(files_dir: str, tokenizer, spec: str, checkpoint_dir: str | None = None) -> None:
    """The tokenizer travels with the run: saved in ``RUN_DIR/tokenizer``; resuming with another is an error.

    ``files_dir`` is where the run's files are written (a bucket run's local mirror); ``checkpoint_dir``
    (default ``files_dir/checkpoints``) is where its checkpoints are, which may be the bucket.
    """
    directory = os.path.join(files_dir, TOKENIZER_DIR)
    saved = read_saved_info(directory)
    if saved is not None and saved["fingerprint"] == tokenizer.fingerprint():
        return
    checkpoints = checkpoint_dir or os.path.join(files_dir, CHECKPOINT_DIR)
    trained = any(name.isdigit() for name in paths.listdir(checkpoints))
    if saved is not None and trained:
        raise CheckpointError(f"run dir {files_dir} was trained with another tokenizer ({saved['kind']} "
                              f"{saved['spec']}, vocab {saved['vocab_size']}) than data.tokenizer={spec}; "
                              f"set data.tokenizer={directory} to resume, or use a new train.run_dir")
    if jax.process_index() == 0:
        tokenizer.save(directory)


@dataclass
class Session:
    """Everything a run is built from, before any state exists (shared by train, bench, info)."""

    config: Config
    tokenizer: Any
    objective: Any
    mesh: Mesh
    rules: Any
    data: DataBundle
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    abstract: TrainState
    state_sharding: TrainState
    batch_sharding: dict
    eval_sharding: dict
    train_ds: Any
    val_batches: list
    step_fn: Callable
    eval_fn: Callable

    def init_state(self) -> TrainState:
        cfg = self.config
        build = self.objective.build_model
        return jax.jit(lambda: init_state(cfg.model, self.tx, cfg.train.seed, build),
                       out_shardings=self.state_sharding)()


def check_batch_fits_mesh(config: Config, mesh: Mesh, rules) -> None:
    """Batch and sequence length must split evenly over the mesh axes their logical axes map to."""
    d = config.data
    for field, value, logical in (("data.batch_size", d.batch_size, "batch"), ("data.seq_len", d.seq_len, "length")):
        split = requested_split(logical, rules, mesh)
        if value % split:
            raise ConfigError(f"{field}={value} must be divisible by {split}, the mesh axes that shard '{logical}' "
                              f"(mesh {dict(mesh.shape)}); change {field} or the mesh")


def build_session(config: Config, tokenizer=None, preflight: bool = True) -> Session:
    """Everything but state for ``config`` (``tokenizer``: one already built from ``data.tokenizer``).

    ``preflight``: refuse (``ConfigError``) a model whose per-device memory estimate exceeds this process's
    devices, before loading data; on an accelerator also compile the train step now and check XLA's peak
    (jit's cache serves the first real step, so it still compiles once). Planning for other devices
    (``info``, AOT compiles) does not build a session at all."""
    t, d = config.train, config.data
    tokenizer = tokenizer or build_tokenizer(d.tokenizer, d.seqio_modules)
    resolve_vocab(config.model, tokenizer, d.tokenizer)
    objective = build_objective(config.objective, tokenizer)
    mesh = build_mesh(config.mesh)
    rules = rules_from_config(config.mesh.rules)
    check_batch_fits_mesh(config, mesh, rules)
    if preflight:
        memory.preflight(config, mesh, objective)
    data = InstructionData(config, tokenizer) if d.instructions else DataBundle(config, tokenizer)

    tx, schedule = make_optimizer(config.optimizer, t.steps)
    layout = state_layout(config.model, tx, t.seed, objective.build_model, mesh, rules)
    graphdef, abstract, state_sharding = layout.graphdef, layout.abstract, layout.state_sharding

    train_ds = pipeline.train_dataset(data.train_rows, d, jax.process_index(), jax.process_count(), objective.prepare)
    # Validation is next-token loss for every objective (UL2's own loss covers only its targets), so
    # runs with different objectives compare on one metric.
    eval_objective = objective if objective.next_token_eval else CausalLM(config.objective, tokenizer)
    val_batches = pipeline.eval_batches(data.val_rows, d, t.eval_batches, jax.process_index(), jax.process_count(),
                                        eval_objective.prepare)
    batch_sharding = batch_shardings(mesh, rules, train_ds[0])
    eval_sharding = batch_shardings(mesh, rules, val_batches[0])
    step_fn = jit_train_step(make_train_step(graphdef, objective, tx, schedule, mesh, rules, t.noise_scale),
                             state_sharding, batch_sharding, mesh)
    if preflight and mesh.devices.flat[0].platform != "cpu":  # CPU: the estimate only (sessions that never step)
        args = memory.abstract_args(abstract, state_sharding, train_ds[0], batch_sharding)
        memory.check_compiled_step(step_fn, args, memory.device_budget(memory.local_devices(mesh)))
    eval_fn = make_eval_step(graphdef, eval_objective, mesh, rules, layout.params_sharding, eval_sharding,
                             tokenizer.token_byte_lengths())
    return Session(config, tokenizer, objective, mesh, rules, data, tx, schedule, abstract, state_sharding,
                   batch_sharding, eval_sharding, train_ds, val_batches, step_fn, eval_fn)
