"""The training loop: data, jitted step, metrics, evaluation, checkpoints, preemption.

``train(config)`` starts a run or resumes the latest checkpoint in ``train.run_dir``. The
host never waits on the step it just dispatched: metrics of step k are fetched after step
k+1 is queued, so logging costs no device idle time.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import optax
from jax.sharding import Mesh

from scaling_jax.config import Config, save_config, to_dict
from scaling_jax.data import pipeline, sources
from scaling_jax.data.tokenizer import build_tokenizer
from scaling_jax.errors import CheckpointError, ConfigError
from scaling_jax.model.family import flops_per_token, param_counts
from scaling_jax.objectives.base import build_objective
from scaling_jax.objectives.causal import CausalLM
from scaling_jax.parallel.mesh import build_mesh
from scaling_jax.parallel.sharding import requested_split, rules_from_config
from scaling_jax.train import metrics as metrics_lib
from scaling_jax.train.checkpoint import Checkpointer, model_signature
from scaling_jax.train.state import (
    TrainState,
    abstract_model,
    init_state,
    make_optimizer,
    param_shardings,
    state_shardings,
)
from scaling_jax.train.step import batch_shardings, jit_train_step, make_eval_step, make_train_step, to_global

LN2 = math.log(2.0)


def prepare_run_dir(run_dir: str) -> None:
    """Create the run directory and prove it is writable before any compute is spent."""
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise CheckpointError(f"train.run_dir '{run_dir}' is a file; point train.run_dir at a directory")
    try:
        os.makedirs(run_dir, exist_ok=True)
        probe = os.path.join(run_dir, f".write-probe-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise CheckpointError(f"train.run_dir '{run_dir}' is not writable ({e.strerror}); "
                              "choose a writable train.run_dir") from None


def check_compatible(meta: dict, config: Config, tokenizer_fingerprint: str, where: str) -> None:
    """Refuse to resume a checkpoint whose parameters or token ids mean something else."""
    saved, current = model_signature(meta["config"]["model"]), model_signature(to_dict(config)["model"])
    for key in ("name", "heads"):  # objectives with their own heads change the parameter tree
        saved[f"objective.{key}"] = meta["config"]["objective"][key]
        current[f"objective.{key}"] = getattr(config.objective, key)
    for key in saved:
        if saved[key] != current[key]:
            name = key if key.startswith("objective.") else f"model.{key}"
            raise CheckpointError(f"checkpoint in {where} has {name}={saved[key]!r} but the config says "
                                  f"{current[key]!r}; use the run's own config or a new train.run_dir")
    if meta.get("tokenizer") != tokenizer_fingerprint:
        raise CheckpointError(f"checkpoint in {where} was trained with another tokenizer "
                              f"(data.tokenizer differs); use the run's tokenizer or a new train.run_dir")


@dataclass
class Preemption:
    """SIGTERM (TPU maintenance / preemption) asks for a checkpoint and a clean exit."""

    requested: bool = False

    def install(self):
        def handler(signum, frame):
            self.requested = True

        return signal.signal(signal.SIGTERM, handler)


class DataBundle:
    """Tokenized train and validation rows plus the unigram bits/byte baseline."""

    def __init__(self, config: Config, tokenizer):
        d = config.data
        train_docs = sources.load_documents(d, "train")
        val_docs = sources.load_documents(d, "validation")
        self.baseline_bpb = sources.unigram_bits_per_byte((x.text for x in train_docs), (x.text for x in val_docs))
        order = pipeline.shuffled(train_docs, d.shuffle_seed)
        self.train_rows = pipeline.PackedRows(pipeline.tokenize_documents(order, tokenizer), d.seq_len,
                                              tokenizer.bos_id, tokenizer.eos_id)
        self.val_rows = pipeline.PackedRows(pipeline.tokenize_documents(val_docs, tokenizer), d.seq_len,
                                            tokenizer.bos_id, tokenizer.eos_id)
        self.num_train_docs, self.num_val_docs = len(train_docs), len(val_docs)


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


def build_session(config: Config) -> Session:
    t, d = config.train, config.data
    tokenizer = build_tokenizer(d.tokenizer)
    objective = build_objective(config.objective, tokenizer)
    mesh = build_mesh(config.mesh)
    rules = rules_from_config(config.mesh.rules)
    for field, value, logical in (("data.batch_size", d.batch_size, "batch"), ("data.seq_len", d.seq_len, "length")):
        split = requested_split(logical, rules, mesh)
        if value % split:
            raise ConfigError(f"{field}={value} must be divisible by {split}, the mesh axes that shard '{logical}' "
                              f"(mesh {dict(mesh.shape)}); change {field} or the mesh")
    data = DataBundle(config, tokenizer)

    tx, schedule = make_optimizer(config.optimizer, t.steps)
    graphdef, shapes, axes = abstract_model(config.model, objective.build_model)
    params_sharding = param_shardings(mesh, rules, shapes, axes)
    abstract = jax.eval_shape(lambda: init_state(config.model, tx, t.seed, objective.build_model))
    state_sharding = state_shardings(mesh, abstract, params_sharding)

    train_ds = pipeline.train_dataset(data.train_rows, d, jax.process_index(), jax.process_count(), objective.prepare)
    # Validation is next-token loss for every objective (UL2's own loss covers only its targets), so
    # runs with different objectives compare on one metric.
    eval_objective = objective if objective.next_token_eval else CausalLM(config.objective, tokenizer)
    val_batches = pipeline.eval_batches(data.val_rows, d, t.eval_batches, jax.process_index(), jax.process_count(),
                                        eval_objective.prepare)
    batch_sharding = batch_shardings(mesh, rules, train_ds[0])
    eval_sharding = batch_shardings(mesh, rules, val_batches[0])
    step_fn = jit_train_step(make_train_step(graphdef, objective, tx, schedule, mesh, rules),
                             state_sharding, batch_sharding, mesh)
    eval_fn = make_eval_step(graphdef, eval_objective, mesh, rules, params_sharding, eval_sharding,
                             tokenizer.token_byte_lengths())
    return Session(config, tokenizer, objective, mesh, rules, data, tx, schedule, abstract, state_sharding,
                   batch_sharding, eval_sharding, train_ds, val_batches, step_fn, eval_fn)


def train(config: Config) -> dict:
    """Run (or resume) training as configured; returns the final summary."""
    t, d = config.train, config.data
    prepare_run_dir(t.run_dir)
    is_main = jax.process_index() == 0
    session = build_session(config)
    tokenizer, objective, mesh, data = session.tokenizer, session.objective, session.mesh, session.data
    step_fn, eval_fn, batch_sharding = session.step_fn, session.eval_fn, session.batch_sharding
    data_iter = pipeline.make_iterator(session.train_ds, d)

    checkpointer = Checkpointer(t.run_dir, t.keep_checkpoints, t.async_checkpointing)
    latest = checkpointer.latest_step()
    wall_offset = 0.0
    if latest is None:
        state = session.init_state()
    else:
        check_compatible(checkpointer.read_meta(latest), config, tokenizer.fingerprint(), checkpointer.directory)
        state, meta = checkpointer.restore(latest, session.abstract, session.state_sharding, data_iter)
        wall_offset = float(meta["wall_time"])
    if is_main:
        save_config(config, os.path.join(t.run_dir, "config.yaml"))

    extras = objective.size_extras()  # blocks / output heads an objective adds (mtp)
    counts = param_counts(config.model, **extras)
    tokens_per_step = d.batch_size * d.seq_len
    flops_per_step = flops_per_token(config.model, d.seq_len, **extras) * tokens_per_step
    peak = t.peak_flops_per_device or metrics_lib.peak_flops_per_device(jax.devices()[0].device_kind)
    writer = metrics_lib.MetricsWriter(t.run_dir, tensorboard=t.tensorboard, enabled=is_main)
    start_step = int(jax.device_get(state.step))
    writer.truncate_after(start_step)

    def evaluate(step: int) -> dict:
        sums = {"nll_sum": 0.0, "tokens": 0.0, "bytes": 0.0}
        for batch in session.val_batches:
            out = jax.device_get(eval_fn(state.params, to_global(batch, session.eval_sharding)))
            for k in sums:
                sums[k] += float(out[k])
        row = {"step": step, "tokens": step * tokens_per_step, "flops": step * flops_per_step,
               "val_loss": sums["nll_sum"] / max(sums["tokens"], 1.0),
               "val_bpb": sums["nll_sum"] / LN2 / max(sums["bytes"], 1.0)}
        writer.write(row)
        say(f"step {step}: val loss {row['val_loss']:.4f} nats/token, {row['val_bpb']:.3f} bits/byte "
                  f"(unigram baseline {data.baseline_bpb:.3f})")
        return row

    def checkpoint(step: int, wall: float) -> None:
        meta = {"config": to_dict(config), "tokenizer": tokenizer.fingerprint(), "step": step,
                "tokens": step * tokens_per_step, "flops": step * flops_per_step, "wall_time": wall,
                "lineage": [{"stage": "pretrain", "objective": objective.name, "run_dir": os.path.abspath(t.run_dir),
                             "start_step": 0, "end_step": step}]}
        checkpointer.save(step, state, data_iter, meta)

    if is_main:
        print(f"model: {counts.total:,} params ({counts.non_embedding:,} non-embedding), "
              f"{flops_per_step / tokens_per_step:.3g} FLOPs/token; mesh {dict(mesh.shape)} on "
              f"{jax.device_count()} {jax.devices()[0].platform} devices; data: {data.num_train_docs} train / "
              f"{data.num_val_docs} validation documents; run dir {t.run_dir}"
              + (f"; resuming at step {start_step}" if latest is not None else ""), flush=True)
    bar = metrics_lib.ProgressBar(t.steps, start_step, enabled=is_main and t.progress)

    def say(message: str) -> None:
        if is_main and t.progress:
            bar.write(message)
        elif is_main:
            print(message, flush=True)

    preemption = Preemption()
    previous_handler = preemption.install()
    started = time.perf_counter()
    last_time, pending = started, None
    last_eval: dict = {}

    def log(step: int, device_metrics: dict) -> None:
        nonlocal last_time
        host = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        now = time.perf_counter()
        dt, last_time = now - last_time, now
        scalars = {k: v for k, v in host.items() if k not in ("nll_sum", "tokens")}  # sums are for eval
        row = {"step": step, **scalars, "tokens": step * tokens_per_step, "flops": step * flops_per_step,
               "step_time": dt, "tokens_per_s": tokens_per_step / dt, "wall_time": wall_offset + now - started}
        if peak:
            row["mfu"] = flops_per_step / dt / (peak * jax.device_count())
        writer.write(row)
        bar.update(step, row["loss"], row["tokens_per_s"], **({"mfu": row["mfu"]} if "mfu" in row else {}))

    step = start_step
    try:
        while step < t.steps and not preemption.requested:
            batch = to_global(next(data_iter), batch_sharding)
            state, device_metrics = step_fn(state, batch)
            if pending is not None:
                log(*pending)
            step += 1
            pending = (step, device_metrics)
            at_end = step == t.steps
            if (t.eval_every and step % t.eval_every == 0) or at_end:
                log(*pending)
                pending = None
                last_eval = evaluate(step)
            if (t.checkpoint_every and step % t.checkpoint_every == 0) or at_end:
                checkpoint(step, wall_offset + time.perf_counter() - started)
        if pending is not None:
            log(*pending)
        if preemption.requested and step < t.steps:
            checkpoint(step, wall_offset + time.perf_counter() - started)
            say(f"SIGTERM: saved checkpoint at step {step}; rerun the same command to resume")
        checkpointer.wait()
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        bar.close()
        writer.close()
        checkpointer.close()

    summary = {"step": step, "preempted": step < t.steps, "tokens": step * tokens_per_step,
               "flops": step * flops_per_step, "wall_time": wall_offset + time.perf_counter() - started,
               "params": counts.total, "non_embedding_params": counts.non_embedding,
               "baseline_bpb": data.baseline_bpb,
               **{k: last_eval[k] for k in ("val_loss", "val_bpb") if k in last_eval}}
    if is_main:
        with open(os.path.join(t.run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        if t.plot and not summary["preempted"]:
            metrics_lib.plot_loss(t.run_dir, data.baseline_bpb)
    return summary
