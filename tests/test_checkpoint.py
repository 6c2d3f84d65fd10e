"""Checkpoints: exact resume after SIGKILL, clean exit on SIGTERM, restore onto another mesh."""

import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import FAST_COMPILE_XLA_FLAGS

from scaling_jax.config import load_config
from scaling_jax.errors import CheckpointError
from scaling_jax.train.checkpoint import Checkpointer
from scaling_jax.train.loop import train
from scaling_jax.train.metrics import read_metrics
from scaling_jax.train.session import build_session

RUN = ["model.series=custom", "model.layers=2", "model.d_model=64", "model.heads=2", "model.head_dim=32",
       "model.d_ff=128",
       "data.seq_len=64", "data.batch_size=8", "data.max_docs=60", "optimizer.warmup_steps=2",
       "train.eval_every=0", "train.eval_batches=2", "train.plot=false", "train.tensorboard=false",
       "train.progress=false"]


def _command(run_dir, *extra):
    return [sys.executable, "-m", "scaling_jax.cli", "train", "configs/quickstart.yaml", *RUN,
            f"train.run_dir={run_dir}", *extra]


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = FAST_COMPILE_XLA_FLAGS  # no device count of the caller's
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _losses(run_dir):
    return {row["step"]: row["loss"] for row in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if "loss" in row}


def _wait_for_step(proc, run_dir, step, timeout=180, poll=0.2):
    """Until ``step`` is logged (a fast model's kill lands near ``step`` only with a short ``poll``)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        if os.path.exists(path) and max(_losses(run_dir), default=0) >= step:
            return
        time.sleep(poll)
    raise AssertionError(f"run did not reach step {step}")


def _signal_after_step(run_dir, signum, *extra, step=3) -> tuple[int, str, str, int | None]:
    """Train in a subprocess, send ``signum`` once step ``step`` is logged: (exit code, stdout, stderr, latest)."""
    proc = subprocess.Popen(_command(run_dir, "train.steps=500", *extra), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_step(proc, run_dir, step)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err, Checkpointer(run_dir, 3).latest_step()


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_zero(tmp_path):
    run_dir = tmp_path / "run"
    code, out, err, saved = _signal_after_step(run_dir, signal.SIGTERM, "train.checkpoint_every=0")
    assert code == 0, err
    assert saved is not None and 3 <= saved < 500
    assert "SIGTERM: saved checkpoint at step" in out


def _two_steps(run_dir, *extra: str) -> list[str]:
    return [*RUN, "train.steps=2", "train.checkpoint_every=1", "mesh.data=8", "train.async_checkpointing=false",
            f"train.run_dir={run_dir}", *extra]


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory):
    """RUN trained 2 steps on an 8-way data mesh with a checkpoint after each: tests read it, or change a copy."""
    run_dir = tmp_path_factory.mktemp("two_step_run") / "run"
    train(load_config("configs/quickstart.yaml", _two_steps(run_dir)))
    return run_dir


def _copy(run_dir, tmp_path):
    shutil.copytree(run_dir, tmp_path / "run")
    return tmp_path / "run"


def test_restore_onto_a_different_mesh_gives_the_same_parameters(two_step_run):
    saved = Checkpointer(two_step_run, 3)
    session = build_session(load_config("configs/quickstart.yaml", _two_steps(two_step_run)))
    reference, _ = saved.restore(2, session.abstract, session.state_sharding, None)

    other = load_config("configs/quickstart.yaml", _two_steps(two_step_run, "mesh.data=2", "mesh.fsdp=2",
                                                              "mesh.tensor=2"))
    session = build_session(other)
    restored, meta = saved.restore(2, session.abstract, session.state_sharding, None)
    assert meta["step"] == 2
    assert reference.params["layers"]["attn"]["wq"].sharding.mesh.shape == {"data": 8, "fsdp": 1, "tensor": 1}
    wq = restored.params["layers"]["attn"]["wq"]  # stacked blocks: (layers, embed, heads, kv)
    assert wq.sharding.mesh.shape == {"data": 2, "fsdp": 2, "tensor": 2}
    assert wq.sharding.spec[1] == "fsdp"
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 restored.params, reference.params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 restored.opt_state, reference.opt_state)


def test_resuming_with_another_model_shape_is_refused(two_step_run, tmp_path):
    run_dir = _copy(two_step_run, tmp_path)
    with pytest.raises(CheckpointError, match="model.d_model=64 but the config says 128"):
        train(load_config("configs/quickstart.yaml", _two_steps(run_dir, "model.d_model=128")))


def test_an_unfinished_save_never_becomes_latest(two_step_run, tmp_path):
    """A save killed mid-write leaves orbax's temporary directory behind; resume must ignore it."""
    run_dir = _copy(two_step_run, tmp_path)
    partial = run_dir / "checkpoints" / "3.orbax-checkpoint-tmp-1234567"
    partial.mkdir()
    (partial / "state").mkdir()  # half-written: no metadata, no commit marker
    assert Checkpointer(run_dir, 3).latest_step() == 2
    summary = train(load_config("configs/quickstart.yaml", _two_steps(run_dir, "train.steps=3")))
    assert summary["step"] == 3 and Checkpointer(run_dir, 3).latest_step() == 3
