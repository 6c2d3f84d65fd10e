"""The training loop: ``Trainer`` takes one run from its first (or resumed) step to its summary.

``train(config)`` starts a run or resumes the latest checkpoint in ``train.run_dir`` (a local
path or a bucket). The host never waits on the step it just dispatched: metrics of step k are
fetched after step k+1 is queued, so logging costs no device idle time. What the run is built
from (data, mesh, jitted steps) is ``session.build_session``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import jax

from scaling_jax import log, paths, run_dir
from scaling_jax.config import Config, TrainConfig, save_config, to_dict
from scaling_jax.data import pipeline
from scaling_jax.data.tokenizer import build_tokenizer
from scaling_jax.errors import CheckpointError
from scaling_jax.model.family import flops_per_token, param_counts
from scaling_jax.run_dir import CheckpointMeta
from scaling_jax.train import metrics as metrics_lib
from scaling_jax.train.checkpoint import CHECKPOINT_DIR, DIGEST_FILE, Checkpointer, model_signature
from scaling_jax.train.compile_cache import CompilationCache
from scaling_jax.train.continuation import STREAM_FREE_FIELDS, start_from_parent
from scaling_jax.train.health import NonFinitePolicy, tensor_names
from scaling_jax.train.hooks import Hook, ProfileTrace
from scaling_jax.train.lock import acquire_run_lock, holds_run_lock, release_run_lock
from scaling_jax.train.preemption import StopRequest, watch_maintenance
from scaling_jax.train.projection import LiveProjection
from scaling_jax.train.session import Session, build_session, sync_run_tokenizer
from scaling_jax.train.start import StageStart, StartSpec
from scaling_jax.train.step import to_global

LN2 = math.log(2.0)


def check_compatible(meta: CheckpointMeta, config: Config, tokenizer_fingerprint: str, where: str) -> None:
    """Refuse to resume a checkpoint whose parameters or token ids mean something else."""
    saved, current = model_signature(meta.config["model"]), model_signature(to_dict(config)["model"])
    for key in ("name", "heads"):  # objectives with their own heads change the parameter tree
        saved[f"objective.{key}"] = meta.config["objective"][key]
        current[f"objective.{key}"] = getattr(config.objective, key)
    for key in saved:
        if saved[key] != current[key]:
            name = key if key.startswith("objective.") else f"model.{key}"
            raise CheckpointError(f"checkpoint in {where} has {name}={saved[key]!r} but the config says "
                                  f"{current[key]!r}; use the run's own config or a new train.run_dir")
    clipped = meta.config.get("optimizer", {}).get("clip_norm", 0) > 0
    if clipped != (config.optimizer.clip_norm > 0):  # clipping has its own optimizer state: another state tree
        raise CheckpointError(f"checkpoint in {where} was trained with gradient clipping "
                              f"{'on' if clipped else 'off'} but the config turns it {'off' if clipped else 'on'} "
                              f"(optimizer.clip_norm={config.optimizer.clip_norm:g}); keep optimizer.clip_norm "
                              f"{'> 0' if clipped else '= 0'}, or start a stage with `scaling-jax continue --from`")
    if meta.tokenizer != tokenizer_fingerprint:
        raise CheckpointError(f"checkpoint in {where} was trained with another tokenizer "
                              f"(data.tokenizer differs); use the run's tokenizer or a new train.run_dir")


def resume_changes(saved: dict, config: Config) -> tuple[list[str], bool]:
    """Settings a resume changes against the checkpoint's config (``section.key old -> new``; the train section's
    length, logging and cadence are the resume's to choose) and whether the data rows' stream itself changes
    (anything in data.* but the batch size and how it is read)."""
    current, changes, stream = to_dict(config), [], False
    for section, values in current.items():
        if section == "train" or not isinstance(values, dict):
            continue
        for key, value in values.items():
            old = saved.get(section, {}).get(key, value)
            if old != value:
                changes.append(f"{section}.{key} {old!r} -> {value!r}")
                stream |= section == "data" and key not in STREAM_FREE_FIELDS
    return changes, stream


def check_shared_storage(t: TrainConfig, process_count: int) -> None:
    """A job of several processes needs one run directory every host sees: on local disk each host would keep
    only its own checkpoint shards, and a preempted or deleted VM would take them with it."""
    if process_count > 1 and not paths.is_remote(t.run_dir) and not t.shared_filesystem:
        raise CheckpointError(f"train.run_dir '{t.run_dir}' is a local path, but this job runs {process_count} "
                              "processes: each host would hold only its own checkpoint shards on its own disk; use "
                              "a bucket (train.run_dir=gs://BUCKET/runs/NAME), or set train.shared_filesystem=true "
                              "if every host mounts this path from one shared filesystem (NFS, Filestore)")


Start = StartSpec | Callable[[Session], StageStart]  # a spec, or a function making the state (tests, tools)


def begin_from(start: Start, session: Session) -> StageStart:
    """The initial state ``start`` says: fresh weights, a parent checkpoint, or what a start function makes."""
    if callable(start):
        return start(session)
    if start.kind == "scratch":
        return StageStart(session.init_state())
    return start_from_parent(session, start)


def write_json(path: str, obj: Any) -> None:
    """Atomic: a reader never sees half a file."""
    with open(f"{path}.tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(f"{path}.tmp", path)


class Trainer:
    """One run from its first (or resumed) step to its summary, one method per concern.

    The run directory may be a bucket (``gs://``): orbax writes checkpoints there directly, and every
    other file of the run (config, metrics, TensorBoard, plots, tokenizer, lineage, summary) is
    written into ``files.local`` and uploaded by ``files.push()`` after each checkpoint and at exit
    (for a local run directory ``files.local`` is the directory itself and pushing is a no-op).
    """

    def __init__(self, config: Config, start: Start | None = None):
        t = config.train
        self.config, self.t = config, t
        self.is_main = jax.process_index() == 0
        check_shared_storage(t, jax.process_count())
        # only process 0 claims (the others would see its first files and take the directory for someone else's),
        # and none writes into the directory before it has
        self.claimed = run_dir.claim(t.run_dir) if self.is_main else run_dir.Claim(fresh=False, created=False)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("scaling_jax: run directory claimed")
        self.files = paths.RunMirror(t.run_dir, run_dir.MIRROR_SKIP)
        self.logged_any = False  # a fresh run that fails before its first step leaves nothing behind
        self.compilation_cache = CompilationCache(t.compilation_cache, t.run_dir)  # before anything compiles
        try:
            self._build(start)
        except BaseException:
            self.compilation_cache.close()
            self.discard_if_untrained()
            raise

    def _build(self, start: Start | None) -> None:
        t, d = self.t, self.config.data
        if self.is_main:  # before anything else is written to the run dir
            acquire_run_lock(t.run_dir, self.files.local)
            run_dir.mark(t.run_dir)
            self.files.pull()  # a resumed bucket run continues its own metrics
        tokenizer = build_tokenizer(d.tokenizer, d.seqio_modules)  # checked against the run's before data loads
        sync_run_tokenizer(self.files.local, tokenizer, d.tokenizer, paths.join(t.run_dir, CHECKPOINT_DIR))
        self.session = session = build_session(self.config, tokenizer)
        self.checkpointer = Checkpointer(t.run_dir, t.keep_checkpoints, t.async_checkpointing)
        try:  # a refused resume (another model) must not leave orbax's threads behind
            self.data_iter = pipeline.make_iterator(session.train_ds, d)
            self._begin(start)
        except BaseException:
            self.data_iter.close()
            self.checkpointer.close()
            raise
        self._measure()

    def _measure(self) -> None:
        """Sizes, writers and counters of a built run (its state restored or initialised)."""
        config, t, d, session = self.config, self.t, self.config.data, self.session
        extras = session.objective.size_extras()  # blocks / output heads an objective adds (mtp)
        self.counts = param_counts(config.model, **extras)
        self.tokens_per_step = d.batch_size * d.seq_len
        self.flops_per_step = flops_per_token(config.model, d.seq_len, **extras) * self.tokens_per_step
        self.peak = t.peak_flops_per_device or metrics_lib.peak_flops_per_device(jax.devices()[0].device_kind)
        self.writer = metrics_lib.MetricsWriter(self.files.local, tensorboard=t.tensorboard, enabled=self.is_main)
        self.step = int(jax.device_get(self.state.step))
        kept_rows = self.writer.truncate_after(self.step, self.position, d.batch_size)
        self.nonfinite = NonFinitePolicy(t.nan_policy, tensor_names(session.abstract.params), t.max_rollbacks)
        self.nonfinite.count_logged(kept_rows)  # a resumed run's summary counts the updates dropped before it
        self.saved = self.step if self.resumed else None  # newest step with a checkpoint
        self.unverified = self.saved if self.resumed and not self.checkpointer.has_digest(self.saved) else None
        if self.unverified is not None:
            log.warning(f"checkpoint step {self.saved} has no digest ({DIGEST_FILE}), so its bytes cannot be "
                        "checked: a damaged array would load as wrong numbers")
        self.pending: tuple | None = None  # (step, device metrics, batch index) not yet fetched to the host
        # A step's time runs from the previous step's metrics reaching the host to its own, less the hooks' time in
        # between, so an eval or a save is never counted as a step. The device finishes steps in order and the host
        # fetches each once the next is queued, so in a steady run this is the device's step time. The first step
        # is fetched before the second is queued, so its compile and one-time set-up (the first fetch alone took
        # ~0.6 s on an H100) stay in its own time. Timing loop rounds instead gave the first rows of a GPU run the
        # host's dispatch time or two steps' wait (MFU 209%, 25%, 2280% on an H100).
        self.last_fetched, self.hook_seconds = 0.0, 0.0
        self.stopped_by: str | None = None  # "SIGTERM" / "Ctrl-C" when a stop request ended the run early
        # a resumed run's summary keeps the validation it already logged (a run resumed at its last step evaluates
        # nothing new; one stopped after a periodic eval may not reach the next)
        self.last_eval: dict = last_validation(kept_rows)
        self.bar = metrics_lib.ProgressBar(t.steps, self.step, enabled=self.is_main and t.progress)
        self.projection = LiveProjection(t.steps, skip_until=config.optimizer.warmup_steps,
                                         enabled=self.is_main and t.project_loss)
        self.projection.resume(kept_rows)
        self.hooks: list[Hook] = []
        self.add_hook(self.evaluate, every=t.eval_every, after_log=True, name="eval")
        # after its step's row is logged: a run killed right after the save must not lose that row for good
        # (a resume keeps the rows up to the checkpoint and starts after it), and a bucket run pushes it too
        self.add_hook(lambda step: self.checkpoint(self.wall()), every=t.checkpoint_every, after_log=True,
                      name="checkpoint")
        self.profile = None
        if t.profile_steps:
            self.profile = ProfileTrace(os.path.join(self.files.local, run_dir.TENSORBOARD_DIR), t.profile_skip,
                                        t.profile_steps, lambda: jax.block_until_ready(self.state), self.say)
            self.hooks.append(self.profile.hook())

    def add_hook(self, fn: Callable[[int], None], every: int, at_end: bool = True, after_log: bool = False,
                 name: str = "") -> Hook:
        """Run ``fn(step)`` after every ``every``-th update (and the last, with ``at_end``); see ``hooks.Hook``."""
        hook = Hook(fn, every, at_end, after_log, name)
        self.hooks.append(hook)
        return hook

    # ------------------------------------------------------------------------- start

    def discard_if_untrained(self) -> None:
        """A fresh run that failed before logging a step takes back all it wrote (its directory too, if it made
        it) and releases the lock; a run with checkpoints or metrics keeps everything. Only while it holds the
        lock: a start that lost the lock to another (both found the directory fresh) takes nothing back."""
        if self.claimed.fresh and not self.logged_any and holds_run_lock(self.t.run_dir):
            run_dir.discard_fresh(self.t.run_dir, self.claimed)
            if self.files.local != self.t.run_dir:
                shutil.rmtree(self.files.local, ignore_errors=True)
        release_run_lock(self.t.run_dir)

    def _begin(self, start: Start | None) -> None:
        """The run's own latest checkpoint if it has one, else ``start`` (default: the config's ``StartSpec``)."""
        config, session, checkpointer = self.config, self.session, self.checkpointer
        latest = checkpointer.latest_step(set_aside_damaged=True)
        self.resumed = latest is not None
        self.wall_offset = 0.0
        if latest is None:
            begin = begin_from(start or StartSpec.from_config(config), session)
            self.state, self.offset, self.history = begin.state, begin.offset, begin.history
            self.counted = {"step": 0, "tokens": 0, "flops": 0.0}
            self.record = {"stage": config.stage.name, "objective": session.objective.name,
                           "run_dir": paths.absolute(self.t.run_dir), "parent": begin.parent,
                           "parent_step": begin.parent_step, "start_step": self.offset["step"]}
            if begin.data_index:
                self.data_iter.seek(begin.data_index)
        else:
            saved = CheckpointMeta.from_json(checkpointer.read_meta(latest))
            check_compatible(saved, config, session.tokenizer.fingerprint(), checkpointer.directory)
            changes, stream_changed = resume_changes(saved.config, config)
            if changes and self.is_main:
                log.warning(f"resuming step {latest} with settings that differ from the checkpoint's: "
                            f"{'; '.join(changes)}" + ("; the data rows' stream changes, so its rows from here on "
                                                       "are not the ones the run would have read" if stream_changed
                                                       else ""))
            self.state, raw = checkpointer.restore(latest, session.abstract, session.state_sharding, self.data_iter)
            meta = CheckpointMeta.from_json(raw)
            saved_batch = int(meta.config.get("data", {}).get("batch_size", config.data.batch_size))
            if not stream_changed and saved_batch != config.data.batch_size:  # the position is a batch index:
                rows = self.data_iter.index * saved_batch  # at another batch size, the first whole new batch
                self.data_iter.seek(-(-rows // config.data.batch_size))  # after the rows already trained on
            self.wall_offset, self.offset, self.counted = float(meta.wall_time), meta.offset, _counted(meta)
            self.history, self.record = meta.lineage[:-1], meta.stage_record
        if self.is_main:
            save_config(config, os.path.join(self.files.local, run_dir.CONFIG_FILE))

    # ------------------------------------------------------------------------- bookkeeping

    def stage_totals(self, step: int) -> tuple[int, float]:
        """This run's tokens and FLOPs after ``step`` updates, counted on from the restored checkpoint's own
        totals: a run resumed with another batch size or sequence length counts each update at its own size."""
        done = step - self.counted["step"]
        return self.counted["tokens"] + done * self.tokens_per_step, self.counted["flops"] + done * self.flops_per_step

    def at(self, step: int) -> dict:
        """Compute axes of a row: totals over every stage so far (``step`` counts this run's updates)."""
        tokens, flops = self.stage_totals(step)
        return {"total_step": self.offset["step"] + step, "tokens": self.offset["tokens"] + tokens,
                "flops": self.offset["flops"] + flops}

    def lineage(self, step: int) -> list:
        (tokens, flops), totals = self.stage_totals(step), self.at(step)
        return self.history + [{**self.record, "steps": step, "tokens": tokens, "flops": flops,
                                "total_tokens": totals["tokens"], "total_flops": totals["flops"]}]

    def say(self, message: str) -> None:
        if self.is_main and self.t.progress:
            self.bar.write(message)
        else:
            log.info(message)

    def announce(self) -> None:
        if not self.is_main:
            return
        s = self.session
        log.info(f"model: {self.counts.total:,} params ({self.counts.non_embedding:,} non-embedding), "
                 f"{self.flops_per_step / self.tokens_per_step:.3g} FLOPs/token; mesh {dict(s.mesh.shape)} on "
                 f"{jax.device_count()} {jax.devices()[0].platform} devices; data: {s.data.num_train_docs} train / "
                 f"{s.data.num_val_docs} validation documents; run dir {self.t.run_dir}"
                 + (f"; resuming at step {self.step}" if self.resumed else ""))

    def log_row(self, step: int, host: dict, dt: float, wall: float) -> None:
        scalars = {k: float(v) for k, v in host.items() if k not in ("nll_sum", "tokens")}  # sums are for eval
        row = {"step": step, **scalars, **self.at(step),
               "step_time": dt, "tokens_per_s": self.tokens_per_step / dt, "wall_time": wall}
        if self.peak:
            row["mfu"] = self.flops_per_step / dt / (self.peak * jax.device_count())
        projected = self.projection.observe(step, row["loss"])  # refitted now and then, not every step
        if projected is not None:
            row.update(projected.metrics())
        self.writer.write(row)
        self.logged_any = True
        self.bar.update(step, row["loss"], row["tokens_per_s"], note=self.projection.label(),
                        **({"mfu": row["mfu"]} if "mfu" in row else {}))

    # ------------------------------------------------------------------------- evaluation and checkpoints

    def evaluate(self, step: int) -> dict:
        s = self.session
        sums = {"nll_sum": 0.0, "tokens": 0.0, "bytes": 0.0}
        for batch in s.val_batches:
            out = jax.device_get(s.eval_fn(self.state.params, to_global(batch, s.eval_sharding)))
            for k in sums:
                sums[k] += float(out[k])
        row = {"step": step, **self.at(step),
               "val_loss": sums["nll_sum"] / max(sums["tokens"], 1.0),
               "val_bpb": sums["nll_sum"] / LN2 / max(sums["bytes"], 1.0)}
        self.writer.write(row)
        self.say(f"step {step}: val loss {row['val_loss']:.4f} nats/token, {row['val_bpb']:.3f} bits/byte "
                 f"(unigram baseline {s.data.baseline_bpb:.3f})")
        self.last_eval = row
        return row

    def checkpoint(self, wall: float) -> None:
        step = self.step
        meta = CheckpointMeta(config=to_dict(self.config), tokenizer=self.session.tokenizer.fingerprint(), step=step,
                              **self.at(step), wall_time=wall, offset=self.offset, lineage=self.lineage(step),
                              data_index=self.position)
        self.checkpointer.save(step, self.state, self.data_iter, meta.to_json())
        self.saved = step
        if self.is_main:
            write_json(os.path.join(self.files.local, run_dir.LINEAGE_FILE), meta.lineage)
            self.files.push()  # metrics up to this checkpoint reach the bucket with it

    # ------------------------------------------------------------------------- non-finite updates

    def flush(self) -> bool:
        """Log the pending step and act on ``train.nan_policy`` if its update was non-finite; True: rolled back."""
        if self.pending is None:
            return False
        (done, device_metrics, batch_index), self.pending = self.pending, None
        host = jax.device_get(device_metrics)  # one transfer per step serves the NaN policy and the log
        now = time.perf_counter()
        seconds, self.last_fetched, self.hook_seconds = now - self.last_fetched - self.hook_seconds, now, 0.0
        verdict = self.nonfinite.inspect(done, host, batch_index)
        self.log_row(done, host, seconds, self.wall_offset + now - self.started)
        if verdict == "halt":
            raise self.nonfinite.diverged(self._last_checkpoint_note())
        if verdict == "rollback":
            self.roll_back(done, batch_index)
        return verdict == "rollback"

    def _last_checkpoint_note(self) -> str:
        """What can be said of the newest checkpoint: intact only where its digest (or this run's save) shows it."""
        if self.saved is None:
            return ""
        if self.saved == self.unverified:
            return f"; the last checkpoint (step {self.saved}) has no digest, so it is unverified and may be damaged"
        return f"; the last checkpoint (step {self.saved}) is intact"

    def roll_back(self, bad_step: int, bad_batch: int) -> None:
        """Restore the newest checkpoint and skip the data from it through the bad batch."""
        s, checkpointer = self.session, self.checkpointer
        checkpointer.wait()
        target = self.nonfinite.rollback_target(checkpointer.latest_step(set_aside_damaged=True))
        self.state, raw = checkpointer.restore(target, s.abstract, s.state_sharding, self.data_iter)
        self.step = self.saved = int(jax.device_get(self.state.step))
        self.counted = _counted(CheckpointMeta.from_json(raw))
        resumed = self.data_iter.index
        self.data_iter.seek(max(bad_batch + 1, resumed))  # past the bad window, without computing its batches
        kept_rows = self.writer.truncate_after(self.step)
        if self.is_main:  # the summary must not name a validation the log no longer has
            self.last_eval = last_validation(kept_rows)
        self.projection.forget_after(self.step)
        self.writer.write({"step": self.step, "rollback_from_step": bad_step,
                           metrics_lib.ROLLBACK_WINDOW: [resumed, bad_batch],
                           metrics_lib.ROLLBACK_BATCH: self.config.data.batch_size})
        self.say(f"warning: non-finite {self.nonfinite.last[2]} at step {bad_step}; rolled back to the step-"
                 f"{self.step} checkpoint and skipped data batches {resumed}..{bad_batch} (train.nan_policy=rollback)")
        self.last_fetched, self.hook_seconds = time.perf_counter(), 0.0  # the restore is not the next step's time

    # ------------------------------------------------------------------------- the loop

    def run(self) -> dict:
        """Train to ``train.steps`` (or a stop request), then write the summary.

        The run's lock, taken when the Trainer was built, is released when this returns or raises (or by
        ``discard_if_untrained`` when building failed), so ``Trainer(config).run()`` never leaves it held."""
        try:
            return self._run()
        except BaseException:
            self.discard_if_untrained()  # while the lock is still held: nobody else's files can be there yet
            raise
        finally:
            release_run_lock(self.t.run_dir)

    def _run(self) -> dict:
        """The loop itself: steps, periodic eval and checkpoints, a checkpoint on a stop request."""
        t, s = self.t, self.session
        self.announce()
        self.mark_unfinished()
        preemption = StopRequest().install()  # SIGTERM; on several processes JAX's preemption sync point
        watcher = watch_maintenance()  # Cloud TPU maintenance notice -> SIGTERM
        self.started = self.last_fetched = time.perf_counter()
        first = True
        try:
            while self.step < t.steps and not preemption.should_stop(self.step):
                batch = to_global(next(self.data_iter), s.batch_sharding)
                self.state, device_metrics = s.step_fn(self.state, batch)
                if self.flush():
                    continue
                self.step += 1
                self.pending = (self.step, device_metrics, self.position - 1)
                self.run_hooks()
                if first:  # fetched before the next is queued: its one-time set-up stays in its own time
                    first = False
                    self.flush()
            self.flush()
            if preemption.requested and self.step < t.steps:
                self.save_on_stop(preemption, self.wall())
            self.checkpointer.wait()
        finally:
            preemption.uninstall()
            if watcher is not None:
                watcher.stop()
            self.close()
        return self.finish(self.wall())

    def run_hooks(self) -> None:
        """The hooks due after this update, in order; a rollback (found when a hook first logs) ends the round."""
        for hook in self.hooks:
            if hook.due(self.step, self.t.steps):
                if hook.after_log and self.flush():
                    return
                began = time.perf_counter()
                hook.fn(self.step)
                self.hook_seconds += time.perf_counter() - began

    @property
    def position(self) -> int:
        """Index of the next batch in the data stream (what a checkpoint records as its data position)."""
        return self.data_iter.index

    def wall(self) -> float:
        """Wall-clock seconds of training so far, earlier sessions of this run included."""
        return self.wall_offset + time.perf_counter() - self.started

    def save_on_stop(self, preemption: StopRequest, wall: float) -> None:
        """SIGTERM, maintenance or Ctrl-C: checkpoint the step just finished, within the grace period if possible."""
        if self.saved != self.step:
            self.checkpoint(wall)
        self.checkpointer.wait()
        took = time.monotonic() - (preemption.at or time.monotonic())  # since the signal
        self.stopped_by = preemption.reason
        self.say(f"{preemption.reason}: saved checkpoint at step {self.step} {took:.1f} s after the signal; resume "
                 f"with: scaling-jax train {self.t.run_dir}")
        if preemption.reason == "SIGTERM" and took > self.t.preemption_grace_s:
            self.say(f"warning: that took longer than train.preemption_grace_s={self.t.preemption_grace_s:g} s; a "
                     "real preemption would have killed the run first and lost the steps since the last periodic "
                     "checkpoint (lower train.checkpoint_every)")

    def close(self) -> None:
        """Release files and threads however the run ended; what was logged still reaches the bucket."""
        if self.profile is not None:
            self.profile.stop(self.step)
        self.bar.close()
        self.writer.close()
        self.data_iter.close()  # stops data worker processes
        self.compilation_cache.close()
        try:
            self.checkpointer.close()
        finally:
            if self.is_main:
                self.files.push()

    def mark_unfinished(self) -> None:
        """A summary from an earlier session says the run ended there: while steps remain it is marked preempted,
        so a session killed before writing its own is not read as a finished run (report, sweep)."""
        path = os.path.join(self.files.local, run_dir.SUMMARY_FILE)
        if self.is_main and self.step < self.t.steps and os.path.exists(path):
            try:
                with open(path) as f:
                    summary = json.load(f)
            except ValueError:  # damaged: the session's own summary replaces it at the end
                return
            if isinstance(summary, dict) and not summary.get("preempted"):
                write_json(path, {**summary, "preempted": True, "stopped_by": "did not finish: resumed for more "
                                  f"steps ({self.t.steps})"})

    def finish(self, wall: float) -> dict:
        step, totals = self.step, self.at(self.step)
        tokens, flops = self.stage_totals(step)
        summary = {"step": step, "preempted": step < self.t.steps, "stopped_by": self.stopped_by,
                   "tokens": tokens, "flops": flops, "wall_time": wall,
                   "params": self.counts.total, "non_embedding_params": self.counts.non_embedding,
                   "baseline_bpb": self.session.data.baseline_bpb, "stage": self.config.stage.name,
                   "total_step": totals["total_step"], "total_tokens": totals["tokens"],
                   "total_flops": totals["flops"], "skipped_updates": self.nonfinite.skipped,
                   "compilation_cache": self.compilation_cache.summary(),
                   **{k: self.last_eval[k] for k in ("val_loss", "val_bpb") if k in self.last_eval}}
        if self.last_eval:
            summary["val_step"] = self.last_eval["step"]  # after a stop: the last periodic eval, not the stop step
        if self.is_main:
            write_json(os.path.join(self.files.local, run_dir.SUMMARY_FILE), summary)
            if self.t.plot and not summary["preempted"]:
                metrics_lib.plot_loss(self.files.local, self.session.data.baseline_bpb)
            self.files.push()
        return summary


def last_validation(rows: list[dict]) -> dict:
    """The newest validation row of a run's logged rows ({} if none)."""
    return next((r for r in reversed(rows) if "val_loss" in r), {})


def train(config: Config, start: Start | None = None) -> dict:
    """Run (or resume) training as configured; returns the final summary.

    A run directory with a checkpoint always resumes from its own latest one. Otherwise ``start``
    (default: ``StartSpec.from_config(config)``) says where the initial state comes from, e.g. a parent's
    checkpoint for a continuation stage.
    The run directory's lock is held from the Trainer's start until this returns or raises; a fresh run that
    fails before its first step leaves nothing behind.
    """
    return Trainer(config, start).run()


def _counted(meta: CheckpointMeta) -> dict:
    """A checkpoint's own run totals (its step, and the tokens and FLOPs of this stage up to it)."""
    offset = meta.offset
    return {"step": meta.step, "tokens": meta.tokens - offset["tokens"], "flops": meta.flops - offset["flops"]}
