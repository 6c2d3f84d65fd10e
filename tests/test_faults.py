"""Fault injection: kills, preemption, damaged checkpoints, full disks, non-finite steps, a second writer.

Subprocesses only where a real process must die (SIGKILL, SIGTERM, a held lock); everything else runs
in-process on tiny states. The SIGKILL/SIGTERM helpers are reused from test_checkpoint.py, with a smaller
model (``SMALL``): each killed or signalled process costs its start-up, so the runs themselves are cheap.
"""

import errno
import fcntl
import glob
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import programs_built
from test_checkpoint import _command, _env, _losses, _signal_after_step, _wait_for_step

from scaling_jax import run_dir as run_dirs
from scaling_jax.cli import main
from scaling_jax.config import OptimizerConfig, load_config
from scaling_jax.errors import CheckpointError
from scaling_jax.train import lock as lock_lib
from scaling_jax.train.checkpoint import DAMAGED_DIR, DIGEST_FILE, Checkpointer, damage, file_digests
from scaling_jax.train.health import first_nonfinite, guard_nonfinite, squared_norms, tensor_names
from scaling_jax.train.loop import train
from scaling_jax.train.metrics import read_metrics
from scaling_jax.train.preemption import StopRequest
from scaling_jax.train.session import build_session
from scaling_jax.train.state import TrainState, make_optimizer

# ----------------------------------------------------------------------------- checkpoints on tiny states


def _state(step: int) -> TrainState:
    rng = np.random.default_rng(step)
    params = {"w": jnp.asarray(rng.normal(size=(64, 64)), jnp.float32), "b": jnp.asarray(rng.normal(size=64),
                                                                                         jnp.float32)}
    return TrainState(step=jnp.int32(step), params=params, opt_state={"mu": jax.tree.map(jnp.zeros_like, params)},
                      rng=jnp.zeros(2, jnp.uint32))


def _data_iter():
    return iter(grain.MapDataset.range(1000).to_iter_dataset())


def _saved_run(run_dir, steps=(2, 4), keep=3):
    """A run dir with finished, digested checkpoints at ``steps``; returns the Checkpointer's directory."""
    ckpt = Checkpointer(run_dir, keep, async_save=True)
    it = _data_iter()
    for step in steps:
        for _ in range(step - int(it.get_state()["next_index"])):
            next(it)
        ckpt.save(step, _state(step), it, {"step": step})
    ckpt.close()
    return ckpt.directory


def _restore(run_dir):
    ckpt = Checkpointer(run_dir, 3)
    latest = ckpt.latest_step(set_aside_damaged=True)  # as the trainer asks; only the lock holder moves
    abstract = jax.eval_shape(lambda: _state(0))
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abstract)
    it = _data_iter()
    state, meta = ckpt.restore(latest, abstract, shardings, it)
    ckpt.close()
    return latest, state, meta, it


def _biggest_array_file(step_dir):
    return max(glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True), key=os.path.getsize)


def _truncate(step_dir):
    path = _biggest_array_file(step_dir)
    os.truncate(path, os.path.getsize(path) // 2)


def _flip_bytes(step_dir):
    """orbax itself restores such a file without complaint (wrong numbers); only the digest notices."""
    path = _biggest_array_file(step_dir)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def _drop_meta(step_dir):
    shutil.rmtree(os.path.join(step_dir, "meta"))


def _snapshot(root):
    return {os.path.relpath(p, root): open(p, "rb").read() for p in glob.glob(f"{root}/**", recursive=True)
            if os.path.isfile(p)}


@pytest.mark.parametrize("spoil", [_truncate, _flip_bytes, _drop_meta])
def test_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, capfd, spoil):
    directory = _saved_run(tmp_path)
    bad = os.path.join(directory, "4")
    spoil(bad)
    damaged_bytes = _snapshot(bad)
    lock_lib.acquire_run_lock(str(tmp_path))  # the writer (lock holder) moves it aside; never deletes it
    try:
        latest, state, meta, it = _restore(tmp_path)
    finally:
        lock_lib.release_run_lock(str(tmp_path))
    assert latest == 2 and int(state.step) == 2 and meta == {"step": 2} and it.get_state()["next_index"] == 2
    np.testing.assert_array_equal(state.params["w"], _state(2).params["w"])
    warning = capfd.readouterr().err
    assert f"checkpoint {bad} is damaged" in warning and "not deleted" in warning
    (moved,) = glob.glob(str(tmp_path / DAMAGED_DIR / "4-*"))
    assert _snapshot(moved) == damaged_bytes  # kept byte for byte
    assert not os.path.exists(bad)


def test_an_unreadable_file_is_damage_but_a_permission_error_moves_nothing(tmp_path, monkeypatch):
    """EIO while verifying a step: damaged (set aside, the older step restored). No read permission: the bytes
    may be intact, so one error line and nothing moved (root ignores file modes: the errors are injected)."""
    from scaling_jax.train import checkpoint as checkpoint_lib

    directory = _saved_run(tmp_path)

    def failing(error):
        def crc32(path, chunk=0):
            raise error
        return crc32

    monkeypatch.setattr(checkpoint_lib, "_crc32", failing(OSError(errno.EIO, "Input/output error")))
    assert damage(os.path.join(directory, "4")).endswith("is unreadable (Input/output error)")
    monkeypatch.setattr(checkpoint_lib, "_crc32", failing(PermissionError(errno.EACCES, "Permission denied")))
    lock_lib.acquire_run_lock(str(tmp_path))
    checkpointer = Checkpointer(tmp_path, 3)
    try:
        with pytest.raises(CheckpointError, match="cannot read .* \\(permission denied\\); give this user read"):
            checkpointer.latest_step(set_aside_damaged=True)
    finally:
        checkpointer.close()
        lock_lib.release_run_lock(str(tmp_path))
    assert sorted(os.listdir(directory)) == ["2", "4"] and not (tmp_path / DAMAGED_DIR).exists()


def test_a_reader_without_the_lock_skips_damage_but_moves_nothing(tmp_path, capfd):
    directory = _saved_run(tmp_path)
    _truncate(os.path.join(directory, "4"))
    assert Checkpointer(tmp_path, 3).latest_step() == 2
    assert "left in place" in capfd.readouterr().err and os.path.isdir(os.path.join(directory, "4"))


def test_every_checkpoint_damaged_is_an_error_that_moves_nothing(tmp_path):
    directory = _saved_run(tmp_path)
    for step in ("2", "4"):
        _flip_bytes(os.path.join(directory, step))
    lock_lib.acquire_run_lock(str(tmp_path))
    try:
        with pytest.raises(CheckpointError, match="no intact checkpoint"):
            Checkpointer(tmp_path, 3).latest_step()
    finally:
        lock_lib.release_run_lock(str(tmp_path))
    assert sorted(os.listdir(directory)) == ["2", "4"]


def test_digest_covers_every_file_and_detects_each_change(tmp_path):
    directory = _saved_run(tmp_path, steps=(2,))
    step_dir = os.path.join(directory, "2")
    with open(os.path.join(step_dir, DIGEST_FILE)) as f:
        assert json.load(f) == file_digests(step_dir)
    assert damage(step_dir) is None
    _flip_bytes(step_dir)
    assert "checksum mismatch" in damage(step_dir)


def test_disk_full_during_save_is_one_error_and_the_previous_checkpoint_stays(tmp_path, capfd):
    """RLIMIT_FSIZE makes writes fail like a full disk (EFBIG instead of ENOSPC), for any user, root included."""
    directory = _saved_run(tmp_path, steps=(2,), keep=1)
    intact = _snapshot(os.path.join(directory, "2"))
    ckpt = Checkpointer(tmp_path, 1)
    it = _data_iter()
    noise = jnp.asarray(np.random.default_rng(0).normal(size=(256, 256)), jnp.float32)  # incompressible
    big = _state(4).replace(params={"w": noise, "b": jnp.ones(64)})
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, limits[1]))
    try:
        with pytest.raises(CheckpointError) as info:
            ckpt.save(4, big, it, {"step": 4})
            ckpt.wait()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, old_handler)
        ckpt.manager.close()
    message = str(info.value)
    assert "could not write checkpoint step 4" in message and os.strerror(errno.EFBIG) in message
    assert "step 2 is intact" in message and "\n" not in message
    assert "Traceback" not in capfd.readouterr().err  # orbax's own logged traceback is dropped
    assert _snapshot(os.path.join(directory, "2")) == intact
    assert Checkpointer(tmp_path, 1).latest_step() == 2


@pytest.mark.slow
@pytest.mark.parametrize("async_save", [True, False])
def test_a_full_disk_during_training_prints_one_error_line_and_nothing_else(tmp_path, async_save):
    """A training process whose checkpoint write hits the file-size limit (as a full disk would) printed our error
    line amid ~320 lines of orbax's and asyncio's tracebacks: write threads posting to orbax's closed event loop,
    orbax's finalize thread, and asyncio's never-retrieved write tasks at exit. Now stderr is the one line."""
    env = {k: v for k, v in _env().items() if k != "JAX_COMPILATION_CACHE_DIR"}  # no program cache to write
    command = _command(tmp_path / "run", "train.steps=3", "train.checkpoint_every=1", "train.compilation_cache=none",
                       f"train.async_checkpointing={str(async_save).lower()}")
    limited = ["bash", "-c", 'ulimit -f 64 && exec "$@"', "limited", *command]  # 64 KiB files: the state is ~0.9 MB
    proc = subprocess.run(limited, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"error: could not write checkpoint step 1 to {tmp_path / 'run' / 'checkpoints'} ({os.strerror(errno.EFBIG)}); "
        "free disk space or make it writable (no earlier checkpoint exists)"], proc.stderr


def test_orbax_logged_tracebacks_of_a_failed_save_are_dropped_from_either_of_its_threads(tmp_path, caplog):
    """A failed save reaches the user once, as our CheckpointError; orbax logs it first with a traceback, from
    the write's thread or from its commit thread depending on timing (the second showed up in 1 of ~4 runs of
    the disk-full test above). Both of orbax's messages, word for word, are dropped; other errors are kept."""
    from absl import logging as absl_logging

    Checkpointer(tmp_path, 1).manager.close()  # installs the filter
    try:
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
    except OSError:
        with caplog.at_level("ERROR", logger="absl"):
            absl_logging.error("[process=0] Failed to run 2 Handler Commit operations or the Commit callback in "
                               "background save thread, directory: /x/4", exc_info=True)
            absl_logging.exception("[process=0][thread=t][operation_id=1] _SignalingThread.run() raised an "
                                   "exception: Failed writing")
            absl_logging.error("an unrelated orbax error")
    assert [r.getMessage() for r in caplog.records] == ["an unrelated orbax error"]


# ----------------------------------------------------------------------------- non-finite steps


def test_first_nonfinite_names_the_first_bad_tensor_in_step_order():
    params = {"a": jnp.ones(3), "b": {"c": jnp.ones(2)}}
    names = tensor_names(params)
    assert names == ["params/a", "params/b/c", "loss", "grads/a", "grads/b/c"]
    culprit = lambda loss, grads: names[int(first_nonfinite(jnp.float32(loss), squared_norms(grads), 2))]  # noqa: E731
    grads = {"a": jnp.ones(3), "b": {"c": jnp.array([1.0, jnp.inf])}}
    assert culprit(1.0, grads) == "grads/b/c"
    assert culprit(1.0, {"a": jnp.array([0.0, jnp.nan, 1.0]), "b": grads["b"]}) == "grads/a"
    assert culprit(float("nan"), grads) == "loss"
    assert culprit(1.0, {"a": jnp.full(3, 3e38), "b": {"c": jnp.ones(2)}}) == "grads/a"  # its norm overflows
    assert int(first_nonfinite(jnp.float32(1.0), squared_norms(params), 2)) == -1


def test_guard_keeps_the_previous_state_on_a_nonfinite_update():
    state = _state(3)
    new_params = jax.tree.map(lambda x: x + 1, state.params)
    new_opt = jax.tree.map(lambda x: x + 1, state.opt_state)
    for loss, skipped in ((1.0, 0.0), (float("nan"), 1.0)):
        metrics = {"loss": jnp.float32(loss), "grad_norm": jnp.float32(2.0)}
        squares = squared_norms(state.params)
        params, opt, out = jax.jit(guard_nonfinite)(state, new_params, new_opt, squares, metrics)
        expected = state if skipped else state.replace(params=new_params, opt_state=new_opt)
        jax.tree.map(np.testing.assert_array_equal, (params, opt), (expected.params, expected.opt_state))
        assert float(out["skipped"]) == skipped
        assert int(out["nonfinite_tensor"]) == (len(jax.tree.leaves(state.params)) if skipped else -1)


def test_a_skipped_update_keeps_adams_moments_while_the_schedule_follows_the_step():
    """The logged lr is schedule(step): after a skipped update optax must apply that one, not the one before."""
    tx, _ = make_optimizer(OptimizerConfig(lr=1.0, schedule="cosine", warmup_steps=4), 10)
    params, grads = {"w": jnp.ones((4, 4))}, {"w": jnp.full((4, 4), 0.1)}
    opt = tx.init(params)
    for _ in range(3):
        opt = tx.update(grads, opt, params)[1]
    state = TrainState(step=jnp.int32(3), params=params, opt_state=opt, rng=jnp.zeros(2, jnp.uint32))
    new_opt = tx.update(grads, opt, params)[1]
    metrics = {"loss": jnp.float32(jnp.nan), "grad_norm": jnp.float32(1.0)}
    _, kept, _ = guard_nonfinite(state, params, new_opt, squared_norms(grads), metrics)

    def nodes(tree, kind):
        return [n for n in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, kind)) if isinstance(n, kind)]

    assert [int(n.count) for n in nodes(kept, optax.ScaleByScheduleState)] == [4]  # = the step after this one
    (adam,), (old_adam,) = nodes(kept, optax.ScaleByAdamState), nodes(opt, optax.ScaleByAdamState)
    assert int(adam.count) == 3
    jax.tree.map(np.testing.assert_array_equal, (adam.mu, adam.nu), (old_adam.mu, old_adam.nu))


def _params_target() -> dict:
    """What ``restore_partial`` restores of a ``_state``: its parameters, on one device."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return {"params": jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                                   jax.eval_shape(lambda: _state(0)).params)}


def test_the_latest_step_then_its_parameters_read_its_bytes_once_for_the_check(tmp_path, monkeypatch):
    """eval and convert take the newest intact step, then restore its parameters: one digest check, not two."""
    from scaling_jax.train import checkpoint as checkpoint_lib

    _saved_run(tmp_path)
    checked, crc32 = [], checkpoint_lib._crc32
    monkeypatch.setattr(checkpoint_lib, "_crc32", lambda path, *a: checked.append(path) or crc32(path, *a))
    target = _params_target()
    checkpointer = Checkpointer(tmp_path, 3)
    try:
        step = checkpointer.latest_step()
        once = len(checked)
        jax.tree.map(np.testing.assert_array_equal, checkpointer.restore_partial(step, target)["params"],
                     _state(4).params)
    finally:
        checkpointer.close()
    assert step == 4 and once > 0 and len(checked) == once == len(set(checked))


@pytest.mark.parametrize("harm", [_flip_bytes, _truncate])
def test_a_damaged_step_named_by_the_caller_is_refused_not_restored(tmp_path, harm):
    """continue --from RUN/checkpoints/STEP and convert --step read one step's parameters (restore_partial):
    flipped bytes restored as wrong weights without an error, a cut file raised a bare exception."""
    directory = _saved_run(tmp_path)
    harm(os.path.join(directory, "4"))
    target = _params_target()
    checkpointer = Checkpointer(tmp_path, 3)
    try:
        with pytest.raises(CheckpointError, match=f"checkpoint {directory}/4 is damaged .*pass another step"):
            checkpointer.restore_partial(4, target)
        intact = checkpointer.restore_partial(2, target)["params"]
    finally:
        checkpointer.close()
    jax.tree.map(np.testing.assert_array_equal, intact, _state(2).params)


TINY_RUN = ["model.series=custom", "model.layers=1", "model.d_model=32", "model.heads=1", "model.head_dim=32",
            "model.d_ff=64", "data.seq_len=32", "data.batch_size=8", "data.max_docs=30", "optimizer.warmup_steps=1",
            "train.eval_every=0", "train.eval_batches=1", "train.progress=false", "train.plot=false",
            "train.tensorboard=false", "train.async_checkpointing=false"]


def _poison_batch(monkeypatch, config, index):
    """Make the loss NaN on data batch ``index`` only (wherever it comes in the run), in-graph."""
    from scaling_jax.objectives.causal import CausalLM

    bad = jnp.asarray(build_session(config).train_ds[index]["targets"])
    original = CausalLM.loss

    def loss(self, model, batch):
        value, metrics = original(self, model, batch)
        hit = jnp.all(batch["targets"] == bad)
        poison = jnp.where(hit, jnp.float32(jnp.nan), jnp.float32(1.0))
        return value * poison, {**metrics, "loss": metrics["loss"] * poison}

    monkeypatch.setattr(CausalLM, "loss", loss)


def _rows(run_dir):
    return read_metrics(os.path.join(run_dir, "metrics.jsonl"))


@pytest.mark.slow
def test_nan_policy_halt_names_step_batch_and_tensor(tmp_path, monkeypatch, capsys):
    args = TINY_RUN + ["train.steps=6", "train.checkpoint_every=2", f"train.run_dir={tmp_path}"]
    _poison_batch(monkeypatch, load_config(None, args), 2)
    assert main(["train", "configs/quickstart.yaml", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: non-finite values at step 3 (data batch 2): first non-finite tensor is loss")
    assert "train.nan_policy=skip_batch or rollback" in err[-1] and "step 2) is intact" in err[-1]
    assert Checkpointer(tmp_path, 3).latest_step() == 2


@pytest.mark.slow
def test_without_a_digest_resume_warns_and_the_halt_calls_the_checkpoint_unverified(tmp_path, monkeypatch, capsys):
    args = TINY_RUN + ["train.steps=2", "train.checkpoint_every=2", f"train.run_dir={tmp_path}"]
    assert main(["train", "configs/quickstart.yaml", *args]) == 0
    os.remove(tmp_path / "checkpoints" / "2" / DIGEST_FILE)  # a flipped byte would now load unnoticed
    _poison_batch(monkeypatch, load_config(None, args), 2)
    capsys.readouterr()
    assert main(["train", str(tmp_path), "train.steps=4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert f"checkpoint step 2 has no digest ({DIGEST_FILE}), so its bytes cannot be checked" in "\n".join(err)
    assert err[-1].startswith("error: non-finite values at step 3") and "is intact" not in err[-1]
    assert "the last checkpoint (step 2) has no digest, so it is unverified" in err[-1]


@pytest.mark.slow
def test_nan_policy_skip_batch_drops_one_update_and_counts_it(tmp_path, monkeypatch, capsys):
    config = load_config(None, TINY_RUN + ["train.steps=5", "train.checkpoint_every=0", "train.nan_policy=skip_batch",
                                           f"train.run_dir={tmp_path}"])
    _poison_batch(monkeypatch, config, 2)
    summary = train(config)
    rows = {r["step"]: r for r in _rows(tmp_path) if "loss" in r}
    assert summary["step"] == 5 and np.isfinite(summary["val_loss"])
    assert [rows[s]["skipped"] for s in range(1, 6)] == [0, 0, 1, 0, 0]
    assert np.isnan(rows[3]["loss"]) and np.isfinite(rows[4]["loss"])
    assert "step 3: non-finite loss on data batch 2; update skipped (1 so far" in capsys.readouterr().err


@pytest.mark.slow
def test_nan_policy_rollback_restores_the_checkpoint_and_skips_the_bad_window(tmp_path, monkeypatch):
    config = load_config(None, TINY_RUN + ["train.steps=8", "train.checkpoint_every=3", "train.nan_policy=rollback",
                                           f"train.run_dir={tmp_path}"])
    _poison_batch(monkeypatch, config, 4)  # step 5; the step-3 checkpoint's data position is 3
    summary = train(config)
    rows = _rows(tmp_path)
    (event,) = [r for r in rows if "rollback_from_step" in r]
    assert event == {"step": 3, "rollback_from_step": 5, "skipped_data_batches": [3, 4], "batch_size": 8}
    losses = [r for r in rows if "loss" in r]
    assert [r["step"] for r in losses] == list(range(1, 9)) and all(r["skipped"] == 0 for r in losses)
    assert summary["step"] == 8 and np.isfinite(summary["val_loss"])
    restored = Checkpointer(tmp_path, 3)
    assert restored.latest_step() == 8 and restored.read_meta(8)["step"] == 8


# ----------------------------------------------------------------------------- one writer per run dir

HOLD = ("import sys, time; from scaling_jax.train.lock import RunLock; RunLock(sys.argv[1]).acquire(); "
        "print('held', flush=True); time.sleep(600)")


def _holder(run_dir):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_writer_on_a_live_run_dir_is_refused(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc = _holder(run_dir)
    try:
        code = main(["train", "configs/quickstart.yaml", *TINY_RUN, "train.steps=2", f"train.run_dir={run_dir}"])
    finally:
        proc.kill()
        proc.wait()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert f"is in use by another run (pid {proc.pid} on" in err[0] and "choose another train.run_dir" in err[0]
    assert sorted(os.listdir(run_dir)) == [".lock"]  # nothing else written


def test_a_start_that_loses_the_lock_race_takes_back_nothing_of_the_winners(tmp_path, monkeypatch, capsys):
    """Both starts find the directory missing; the other locks it first and writes: the loser's clean-up of
    its own failed fresh start must not delete the winner's run directory."""
    run_dir, holders = tmp_path / "run", []
    claim = run_dirs.claim

    def claim_then_lose_the_race(path, *args, **kwargs):
        claimed = claim(path, *args, **kwargs)
        holders.append(_holder(path))
        (run_dir / "winners_metrics.jsonl").write_text("{}\n")
        return claimed

    monkeypatch.setattr(run_dirs, "claim", claim_then_lose_the_race)
    try:
        code = main(["train", "configs/quickstart.yaml", *TINY_RUN, "train.steps=2", f"train.run_dir={run_dir}"])
    finally:
        for proc in holders:
            proc.kill()
            proc.wait()
    assert code == 2 and "is in use by another run" in capsys.readouterr().err
    assert sorted(os.listdir(run_dir)) == [".lock", "winners_metrics.jsonl"]


def test_a_killed_holders_lock_does_not_block(tmp_path):
    proc = _holder(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    lock = lock_lib.RunLock(str(tmp_path)).acquire()  # the kernel dropped the dead process's flock
    assert json.loads(open(lock.path).read())["pid"] == os.getpid()
    lock.release()


def test_a_bucket_run_is_locked_in_its_local_mirror_and_keyed_by_its_url(tmp_path):
    run, mirror = "gs://bucket/runs/lm/", tmp_path / "mirror"
    mirror.mkdir()
    lock_lib.acquire_run_lock(run, str(mirror))
    try:
        assert lock_lib.holds_run_lock("gs://bucket/runs/lm")  # the same run, however the URL is spelled
        assert (mirror / ".lock").exists()
        with pytest.raises(CheckpointError, match="is in use by another run"):
            lock_lib.RunLock(run, str(mirror)).acquire()  # a second trainer on this host
    finally:
        lock_lib.release_run_lock(run)
    assert not lock_lib.holds_run_lock(run)


def test_without_flock_a_dead_holder_is_taken_over_and_a_live_one_refused(tmp_path, monkeypatch, capfd):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "no locks")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    path = tmp_path / ".lock"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    path.write_text(json.dumps({"pid": int(dead.stdout), "host": lock_lib.socket.gethostname(), "since": 0}))
    lock = lock_lib.RunLock(str(tmp_path)).acquire()
    assert "taking over the stale lock" in capfd.readouterr().err
    lock.release()

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        path.write_text(json.dumps({"pid": live.pid, "host": lock_lib.socket.gethostname(), "since": 0,
                                    "start_time": lock_lib._start_time(live.pid)}))
        with pytest.raises(CheckpointError, match=f"in use by another run \\(pid {live.pid}"):
            lock_lib.RunLock(str(tmp_path)).acquire()
        path.write_text(json.dumps({"pid": live.pid, "host": "another-host", "since": 0}))
        with pytest.raises(CheckpointError, match="if that run is dead, delete"):
            lock_lib.RunLock(str(tmp_path)).acquire()
    finally:
        live.kill()
        live.wait()


# ----------------------------------------------------------------------------- real processes: kills, preemption


# test_checkpoint's RUN overridden by TINY_RUN (later overrides win), with its asynchronous checkpoints: what
# these tests prove (exact resume, saves on a signal) does not depend on the model's shape, and the in-process
# runs below compile the programs the TINY_RUN tests above already compiled (the session's compilation cache).
SMALL = [*TINY_RUN, "train.async_checkpointing=true"]


def _checkpoint_writes(run_dir):
    return glob.glob(os.path.join(run_dir, "checkpoints", "*.orbax-checkpoint-tmp*"))


def _kill_during_checkpoint_write(proc, run_dir, timeout=180):
    """SIGKILL as soon as an async save's temporary directory exists; True if the kill landed mid-write."""
    deadline, before = time.time() + timeout, set(_checkpoint_writes(run_dir))
    while time.time() < deadline and proc.poll() is None:
        if set(_checkpoint_writes(run_dir)) - before:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return bool(set(_checkpoint_writes(run_dir)) - before)
        time.sleep(0.002)
    raise AssertionError("no checkpoint write was seen")


@pytest.mark.slow
def test_sigkill_at_five_random_points_gives_a_bitwise_identical_loss_trace(tmp_path):
    steps = [*SMALL, "train.steps=40", "train.checkpoint_every=5", "train.keep_checkpoints=2"]
    straight = tmp_path / "straight"  # the uninterrupted reference runs alongside the killed runs
    reference_err = open(tmp_path / "straight.err", "w+")  # a file, not a pipe nobody drains until the end
    reference = subprocess.Popen(_command(straight, *steps), env=_env(), stdout=subprocess.DEVNULL,
                                 stderr=reference_err)

    killed = tmp_path / "killed"
    rng = random.Random(10)
    targets = [rng.randint(lo, lo + 7) for lo in (2, 10, 18, 26)]  # one random step per window: each run progresses
    mid_write = False
    for i in range(5):
        proc = subprocess.Popen(_command(killed, *steps), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if i == 2:
            mid_write = _kill_during_checkpoint_write(proc, killed)
        else:
            _wait_for_step(proc, killed, targets[i - (i > 2)], poll=0.005)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        with open(killed / "metrics.jsonl", "rb") as f:
            assert f.read().endswith(b"\n")  # whole-line appends: a kill never tears a row
    assert mid_write, "the kill did not land during an async checkpoint write"
    resumed = subprocess.run(_command(killed, *steps), env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at step" in resumed.stdout
    with reference_err:
        assert reference.wait(timeout=300) == 0, (reference_err.seek(0), reference_err.read())[1]

    expected, got = _losses(straight), _losses(killed)
    assert sorted(got) == list(range(1, 41)) == sorted(expected)
    assert got == expected  # exact float equality, every step


@pytest.mark.slow
def test_sigterm_right_after_a_periodic_save_commits_once_and_reports_the_grace(tmp_path):
    run_dir = tmp_path / "run"
    code, out, err, saved = _signal_after_step(run_dir, signal.SIGTERM, *SMALL, "train.checkpoint_every=1",
                                               "train.preemption_grace_s=0.000001")
    assert code == 0, err
    assert f"SIGTERM: saved checkpoint at step {saved}" in out
    assert "took longer than train.preemption_grace_s=1e-06 s" in out
    assert damage(str(run_dir / "checkpoints" / str(saved))) is None
    assert json.load(open(run_dir / "checkpoints" / str(saved) / DIGEST_FILE))  # committed and digested


@pytest.mark.slow
def test_ctrl_c_saves_like_sigterm_and_says_how_to_resume(tmp_path, capsys):
    run_dir = tmp_path / "run"
    base = [*SMALL, "train.checkpoint_every=0", "train.eval_every=2"]
    code, out, err, saved = _signal_after_step(run_dir, signal.SIGINT, *base)
    assert code == 130, err
    assert saved is not None and 3 <= saved < 500
    assert "press Ctrl-C again to quit without saving" in err
    assert f"Ctrl-C: saved checkpoint at step {saved}" in out and f"resume with: scaling-jax train {run_dir}" in out
    last_eval = max(r["step"] for r in _rows(run_dir) if "val_loss" in r)
    assert f"validation at step {last_eval}:" in out  # the last periodic eval, named as such
    assert f"stopped by Ctrl-C at step {saved}, validation is from step {last_eval}" in out
    # the resume need not be a process of its own: the CLI in this process, as the user would type it
    code = main(_command(run_dir, *base, f"train.steps={saved + 1}")[3:])
    out, err = capsys.readouterr()
    assert code == 0 and f"resuming at step {saved}" in out, err


def test_a_second_ctrl_c_aborts_at_once():
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN where a parent process set it
    request = StopRequest().install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert request.requested and request.reason == "Ctrl-C" and request.should_stop(1)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler raises at the next bytecode; never reached
    finally:
        request.uninstall()
    assert signal.getsignal(signal.SIGINT) is before  # the handler it replaced is back


@pytest.mark.slow
def test_resume_skips_a_truncated_newest_checkpoint_with_a_warning(tmp_path, capsys):
    """No process dies here, so both runs go through the CLI in this process (``main``), not a subprocess."""
    run_dir = tmp_path / "run"
    base = ["train", "configs/quickstart.yaml", *TINY_RUN, "train.checkpoint_every=2", f"train.run_dir={run_dir}"]
    assert main([*base, "train.steps=4"]) == 0
    _truncate(str(run_dir / "checkpoints" / "4"))
    capsys.readouterr()
    code = main([*base, "train.steps=6"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"checkpoint {run_dir}/checkpoints/4 is damaged" in err and "truncated" in err
    assert "resuming at step 2" in out
    assert sorted(_losses(run_dir)) == list(range(1, 7))
    assert len(glob.glob(str(run_dir / DAMAGED_DIR / "4-*"))) == 1


def test_saving_a_replicated_state_on_cpu_devices_compiles_nothing(tmp_path):
    """orbax's replica-parallel saving slices a replicated array once per device, each slice its own compiled
    program (56 for a 7-array state on 8 CPU devices); on CPU the arrays are written whole instead."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((8,), ("data",), devices=jax.devices())
    replicated = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P())), _state(3))
    with programs_built() as built:
        ckpt = Checkpointer(str(tmp_path / "run"), 1, async_save=False)
        ckpt.save(3, replicated, _data_iter(), {"step": 3})
        ckpt.close()
    assert built == []
    restored = _restore(tmp_path / "run")[1]
    np.testing.assert_array_equal(np.asarray(restored.params["w"]), np.asarray(_state(3).params["w"]))
