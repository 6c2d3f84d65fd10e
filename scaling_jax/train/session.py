"""What a run is built from before any state exists: tokenizer, objective, data, the eval step, and its
``compute.Compute`` (mesh, optimizer, state layout, jitted train step). ``build_session`` serves the
trainer, the benchmarks and tests; it writes no files (the run directory belongs to ``loop.Trainer``).
Its memory pre-flight (``memory.py``) refuses a model that cannot fit the devices before data loads and
before the step compiles.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax

from scaling_jax import paths
from scaling_jax.config import Config
from scaling_jax.data import pipeline, sources, synthetic
from scaling_jax.data.instructions import InstructionData
from scaling_jax.data.tokenizer import build_tokenizer, read_saved_info, resolve_vocab
from scaling_jax.errors import CheckpointError, DataError
from scaling_jax.objectives.base import build_objective, check_fresh_vocab
from scaling_jax.objectives.causal import CausalLM
from scaling_jax.parallel.mesh import build_mesh
from scaling_jax.parallel.sharding import rules_from_config
from scaling_jax.run_dir import CHECKPOINT_DIR, TOKENIZER_DIR
from scaling_jax.train import memory
from scaling_jax.train.compute import Compute, build_compute, check_batch_fits_mesh
from scaling_jax.train.state import TrainState
from scaling_jax.train.step import batch_shardings, make_eval_step


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
            counts.append(None if byte_counts is None else (*byte_counts, rate))
        if None in counts and len(counts) > 1:
            raise DataError(f"data.source={synthetic.SOURCE} cannot be part of data.mixture; use it alone")
        self.baseline_bpb = (synthetic.uniform_bits_per_byte(tokenizer.token_byte_lengths()) if None in counts
                             else sources.unigram_bits_from_counts(counts))
        if len(parts) == 1:
            self.train_rows, self.val_rows = parts[0][0], parts[0][1]
        else:
            self.train_rows = [(train, rate) for train, _, rate in parts]
            self.val_rows = pipeline.mixed_rows([(val, rate) for _, val, rate in parts], seed=None)

    def _component(self, d, tokenizer) -> tuple[Any, Any, tuple]:
        """Rows of one source: prepared shards, a seqio task/mixture, or documents tokenized here."""
        from scaling_jax.data import prepare

        if d.source == synthetic.SOURCE:
            return self._synthetic(d, tokenizer)
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

    def _synthetic(self, d, tokenizer) -> tuple[Any, Any, None]:
        """Random text tokens (``data/synthetic.py``); validation rows use another seed than training rows."""
        ids = synthetic.text_ids(tokenizer.token_byte_lengths())
        train = synthetic.SyntheticRows(d.seq_len, ids, seed=d.shuffle_seed)
        val = synthetic.SyntheticRows(d.seq_len, ids, seed=d.shuffle_seed + 1)
        self.num_train_docs += train.num_documents
        self.num_val_docs += val.num_documents
        return train, val, None


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
    """A run before any state exists: its ``compute`` (mesh, layout, jitted step) plus its data and eval step."""

    config: Config
    tokenizer: Any
    compute: Compute
    data: DataBundle
    train_ds: Any
    val_batches: list
    eval_sharding: dict
    eval_fn: Callable

    objective = property(lambda self: self.compute.objective)
    mesh = property(lambda self: self.compute.mesh)
    rules = property(lambda self: self.compute.rules)
    tx = property(lambda self: self.compute.tx)
    abstract = property(lambda self: self.compute.abstract)
    state_sharding = property(lambda self: self.compute.state_sharding)
    batch_sharding = property(lambda self: self.compute.batch_sharding)
    step_fn = property(lambda self: self.compute.step_fn)

    def init_state(self) -> TrainState:
        return self.compute.init_state()


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
    if not config.stage.parent:
        check_fresh_vocab(objective, tokenizer, config.model.vocab_size, d.tokenizer)
    mesh = build_mesh(config.mesh)
    check_batch_fits_mesh(config, mesh, rules_from_config(config.mesh.rules))
    if preflight:
        memory.preflight(config, mesh, objective)
    data = InstructionData(config, tokenizer) if d.instructions else DataBundle(config, tokenizer)

    train_ds = pipeline.train_dataset(data.train_rows, d, jax.process_index(), jax.process_count(), objective.prepare)
    compute = build_compute(config, objective, train_ds[0], mesh=mesh)
    # Validation is next-token loss for every objective (UL2's own loss covers only its targets), so
    # runs with different objectives compare on one metric.
    eval_objective = objective if objective.next_token_eval else CausalLM(config.objective, tokenizer)
    val_batches = pipeline.eval_batches(data.val_rows, d, t.eval_batches, jax.process_index(), jax.process_count(),
                                        eval_objective.prepare)
    if preflight and mesh.devices.flat[0].platform != "cpu":  # CPU: the estimate only (sessions that never step)
        memory.check_compiled_step(compute.step_fn, compute.abstract_args(train_ds[0]),
                                   memory.device_budget(memory.local_devices(mesh)))
    eval_sharding = batch_shardings(mesh, compute.rules, val_batches[0])
    eval_fn = make_eval_step(compute.layout.graphdef, eval_objective, mesh, compute.rules,
                             compute.layout.params_sharding, eval_sharding, tokenizer.token_byte_lengths())
    return Session(config, tokenizer, compute, data, train_ds, val_batches, eval_sharding, eval_fn)
