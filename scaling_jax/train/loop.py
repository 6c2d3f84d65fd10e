"""The training loop: data, jitted step, metrics, evaluation, checkpoints, preemption.

``train(config)`` starts a run or resumes the latest checkpoint in ``train.run_dir``. The
host never waits on the step it just dispatched: metrics of step k are fetched after step
k+1 is queued, so logging costs no device idle time.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import optax
from jax.sharding import Mesh

from scaling_jax.config import Config, save_config, to_dict
from scaling_jax.data import pipeline, sources
from scaling_jax.data.instructions import InstructionData
from scaling_jax.data.tokenizer import build_tokenizer, read_saved_info
from scaling_jax.errors import CheckpointError, ConfigError
from scaling_jax.model.family import flops_per_token, param_counts
from scaling_jax.objectives.base import build_objective
from scaling_jax.objectives.causal import CausalLM
from scaling_jax.parallel.mesh import build_mesh
from scaling_jax.parallel.sharding import requested_split, rules_from_config
from scaling_jax.train import metrics as metrics_lib
from scaling_jax.train.checkpoint import CHECKPOINT_DIR, Checkpointer, model_signature
from scaling_jax.train.health import NonFinitePolicy, tensor_names
from scaling_jax.train.lock import acquire_run_lock, releases_run_lock
from scaling_jax.train.preemption import StopRequest, watch_maintenance
from scaling_jax.train.state import TrainState, init_state, make_optimizer, state_layout
from scaling_jax.train.step import batch_shardings, jit_train_step, make_eval_step, make_train_step, to_global

LN2 = math.log(2.0)


def data_position(data_iter, default: int) -> int:
    """Index of the next batch the grain iterator yields (``default`` if its state does not say)."""
    state = data_iter.get_state()
    return int(state.get("next_index", default)) if isinstance(state, dict) else default


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


RUN_TOKENIZER_DIR = "tokenizer"


def sync_run_tokenizer(run_dir: str, tokenizer, spec: str) -> None:
    """The tokenizer travels with the run: saved in ``RUN_DIR/tokenizer``; resuming with another is an error."""
    directory = os.path.join(run_dir, RUN_TOKENIZER_DIR)
    saved = read_saved_info(directory)
    if saved is not None and saved["fingerprint"] == tokenizer.fingerprint():
        return
    checkpoints = os.path.join(run_dir, CHECKPOINT_DIR)
    trained = os.path.isdir(checkpoints) and any(name.isdigit() for name in os.listdir(checkpoints))
    if saved is not None and trained:
        raise CheckpointError(f"run dir {run_dir} was trained with another tokenizer ({saved['kind']} "
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


def build_session(config: Config) -> Session:
    t, d = config.train, config.data
    tokenizer = build_tokenizer(d.tokenizer, d.seqio_modules)
    if os.path.isdir(t.run_dir):  # train() made it; a bare session (bench, tests) leaves no files
        sync_run_tokenizer(t.run_dir, tokenizer, d.tokenizer)
    objective = build_objective(config.objective, tokenizer)
    mesh = build_mesh(config.mesh)
    rules = rules_from_config(config.mesh.rules)
    check_batch_fits_mesh(config, mesh, rules)
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
    eval_fn = make_eval_step(graphdef, eval_objective, mesh, rules, layout.params_sharding, eval_sharding,
                             tokenizer.token_byte_lengths())
    return Session(config, tokenizer, objective, mesh, rules, data, tx, schedule, abstract, state_sharding,
                   batch_sharding, eval_sharding, train_ds, val_batches, step_fn, eval_fn)


NO_OFFSET = {"step": 0, "tokens": 0, "flops": 0.0}


@dataclass
class StageStart:
    """How a run without a checkpoint of its own begins: a state, and what the stages before it spent.

    ``offset`` (step, tokens, FLOPs of all earlier stages) is added to every metric row so a
    continuation's curves extend its parent's on one compute axis.
    """

    state: TrainState
    offset: dict = dataclasses.field(default_factory=lambda: dict(NO_OFFSET))
    history: list = dataclasses.field(default_factory=list)  # lineage records of the earlier stages, oldest first
    parent: str | None = None  # checkpoint directory the state came from
    parent_step: int | None = None


def default_start(config: Config) -> Callable[[Session], StageStart]:
    """Fresh weights, or (``stage.parent`` set) the parent checkpoint as its stage config says."""
    if not config.stage.parent:
        return lambda session: StageStart(session.init_state())
    from scaling_jax.train.continuation import start_from_parent  # only continuations pay for the import

    return start_from_parent


def write_json(path: str, obj: Any) -> None:
    """Atomic: a reader never sees half a file."""
    with open(f"{path}.tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(f"{path}.tmp", path)


@releases_run_lock  # one writer per run dir: taken below, released however train() ends
def train(config: Config, start: Callable[[Session], StageStart] | None = None) -> dict:
    """Run (or resume) training as configured; returns the final summary.

    A run directory with a checkpoint always resumes from its own latest one. Otherwise ``start``
    (default: ``default_start(config)``) makes the initial state, e.g. a parent's for a continuation.
    """
    t, d = config.train, config.data
    prepare_run_dir(t.run_dir)
    is_main = jax.process_index() == 0
    if is_main:  # before anything is written to the run dir
        acquire_run_lock(t.run_dir)
    session = build_session(config)
    tokenizer, objective, mesh, data = session.tokenizer, session.objective, session.mesh, session.data
    step_fn, eval_fn, batch_sharding = session.step_fn, session.eval_fn, session.batch_sharding
    data_iter = pipeline.make_iterator(session.train_ds, d)

    checkpointer = Checkpointer(t.run_dir, t.keep_checkpoints, t.async_checkpointing)
    latest = checkpointer.latest_step()
    wall_offset = 0.0
    if latest is None:
        begin = (start or default_start(config))(session)
        state, offset, history = begin.state, begin.offset, begin.history
        record = {"stage": config.stage.name, "objective": objective.name, "run_dir": os.path.abspath(t.run_dir),
                  "parent": begin.parent, "parent_step": begin.parent_step, "start_step": offset["step"]}
    else:
        check_compatible(checkpointer.read_meta(latest), config, tokenizer.fingerprint(), checkpointer.directory)
        state, meta = checkpointer.restore(latest, session.abstract, session.state_sharding, data_iter)
        wall_offset = float(meta["wall_time"])
        offset, history = meta.get("offset", NO_OFFSET), meta.get("lineage", [{}])[:-1]
        record = meta.get("lineage", [{}])[-1]
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

    def at(step: int) -> dict:
        """Compute axes of a row: totals over every stage so far (``step`` counts this run's updates)."""
        return {"total_step": offset["step"] + step, "tokens": offset["tokens"] + step * tokens_per_step,
                "flops": offset["flops"] + step * flops_per_step}

    def lineage(step: int) -> list:
        return history + [{**record, "steps": step, "tokens": step * tokens_per_step,
                           "flops": step * flops_per_step, "total_tokens": at(step)["tokens"],
                           "total_flops": at(step)["flops"]}]

    def evaluate(step: int) -> dict:
        sums = {"nll_sum": 0.0, "tokens": 0.0, "bytes": 0.0}
        for batch in session.val_batches:
            out = jax.device_get(eval_fn(state.params, to_global(batch, session.eval_sharding)))
            for k in sums:
                sums[k] += float(out[k])
        row = {"step": step, **at(step),
               "val_loss": sums["nll_sum"] / max(sums["tokens"], 1.0),
               "val_bpb": sums["nll_sum"] / LN2 / max(sums["bytes"], 1.0)}
        writer.write(row)
        say(f"step {step}: val loss {row['val_loss']:.4f} nats/token, {row['val_bpb']:.3f} bits/byte "
                  f"(unigram baseline {data.baseline_bpb:.3f})")
        return row

    def checkpoint(step: int, wall: float) -> None:
        meta = {"config": to_dict(config), "tokenizer": tokenizer.fingerprint(), "step": step, **at(step),
                "wall_time": wall, "offset": offset, "lineage": lineage(step)}
        checkpointer.save(step, state, data_iter, meta)
        if is_main:
            write_json(os.path.join(t.run_dir, "lineage.json"), meta["lineage"])

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

    preemption = StopRequest().install()  # SIGTERM; on several processes JAX's preemption sync point
    watcher = watch_maintenance()  # Cloud TPU maintenance notice -> SIGTERM
    started = time.perf_counter()
    last_time, pending = started, None
    last_eval: dict = {}

    def log(step: int, metrics: dict) -> None:
        nonlocal last_time
        host = {k: float(v) for k, v in metrics.items()}
        now = time.perf_counter()
        dt, last_time = now - last_time, now
        scalars = {k: v for k, v in host.items() if k not in ("nll_sum", "tokens")}  # sums are for eval
        row = {"step": step, **scalars, **at(step),
               "step_time": dt, "tokens_per_s": tokens_per_step / dt, "wall_time": wall_offset + now - started}
        if peak:
            row["mfu"] = flops_per_step / dt / (peak * jax.device_count())
        writer.write(row)
        bar.update(step, row["loss"], row["tokens_per_s"], **({"mfu": row["mfu"]} if "mfu" in row else {}))

    nonfinite = NonFinitePolicy(t.nan_policy, tensor_names(session.abstract.params), t.max_rollbacks, is_main)
    position = data_position(data_iter, start_step)  # index of the next batch in the data stream
    saved = start_step if latest is not None else None  # newest step with a checkpoint

    def flush() -> bool:
        """Log the pending step and act on ``train.nan_policy`` if its update was non-finite; True: rolled back."""
        nonlocal pending
        if pending is None:
            return False
        (done, device_metrics, batch_index), pending = pending, None
        host = jax.device_get(device_metrics)  # one transfer per step serves the NaN policy and the log
        verdict = nonfinite.inspect(done, host, batch_index)
        log(done, host)
        if verdict == "halt":
            raise nonfinite.diverged(f"; the last checkpoint (step {saved}) is intact" if saved else "")
        if verdict == "rollback":
            roll_back(done, batch_index)
        return verdict == "rollback"

    def roll_back(bad_step: int, bad_batch: int) -> None:
        """Restore the newest checkpoint and skip the data from it through the bad batch."""
        nonlocal state, step, position, saved
        checkpointer.wait()
        target = nonfinite.rollback_target(checkpointer.latest_step())
        state, _ = checkpointer.restore(target, session.abstract, session.state_sharding, data_iter)
        step = saved = int(jax.device_get(state.step))
        resumed = data_position(data_iter, step)
        for _ in range(bad_batch + 1 - resumed):
            next(data_iter)
        position = max(bad_batch + 1, resumed)
        writer.truncate_after(step)
        writer.write({"step": step, "rollback_from_step": bad_step, "skipped_data_batches": [resumed, bad_batch]})
        say(f"warning: non-finite {nonfinite.last[2]} at step {bad_step}; rolled back to the step-{step} checkpoint "
            f"and skipped data batches {resumed}..{bad_batch} (train.nan_policy=rollback)")

    step = start_step
    try:
        while step < t.steps and not preemption.should_stop(step):
            batch = to_global(next(data_iter), batch_sharding)
            position += 1
            state, device_metrics = step_fn(state, batch)
            if flush():
                continue
            step += 1
            pending = (step, device_metrics, position - 1)
            at_end = step == t.steps
            if (t.eval_every and step % t.eval_every == 0) or at_end:
                if flush():
                    continue
                last_eval = evaluate(step)
            if (t.checkpoint_every and step % t.checkpoint_every == 0) or at_end:
                checkpoint(step, wall_offset + time.perf_counter() - started)
                saved = step
        flush()
        if preemption.requested and step < t.steps:
            if saved != step:
                checkpoint(step, wall_offset + time.perf_counter() - started)
            checkpointer.wait()
            took = time.monotonic() - (preemption.at or time.monotonic())  # since the signal
            say(f"SIGTERM: saved checkpoint at step {step} {took:.1f} s after the signal; rerun the same command "
                "to resume")
            if took > t.preemption_grace_s:
                say(f"warning: that took longer than train.preemption_grace_s={t.preemption_grace_s:g} s; a real "
                    "preemption would have killed the run first and lost the steps since the last periodic "
                    "checkpoint (lower train.checkpoint_every)")
        checkpointer.wait()
    finally:
        preemption.uninstall()
        if watcher is not None:
            watcher.stop()
        bar.close()
        writer.close()
        checkpointer.close()

    totals = at(step)
    summary = {"step": step, "preempted": step < t.steps, "tokens": step * tokens_per_step,
               "flops": step * flops_per_step, "wall_time": wall_offset + time.perf_counter() - started,
               "params": counts.total, "non_embedding_params": counts.non_embedding,
               "baseline_bpb": data.baseline_bpb, "stage": config.stage.name, "total_step": totals["total_step"],
               "total_tokens": totals["tokens"], "total_flops": totals["flops"],
               "skipped_updates": nonfinite.skipped,
               **{k: last_eval[k] for k in ("val_loss", "val_bpb") if k in last_eval}}
    if is_main:
        write_json(os.path.join(t.run_dir, "summary.json"), summary)
        if t.plot and not summary["preempted"]:
            metrics_lib.plot_loss(t.run_dir, data.baseline_bpb)
    return summary
