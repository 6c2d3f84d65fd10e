"""The persistent compilation cache: where a run's compiled programs go, and a resumed process reading them back."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from conftest import FAST_COMPILE_XLA_FLAGS, TINY_RUN

from scaling_jax.run_dir import CHECKPOINT_DIR, COMPILATION_CACHE_DIR, SUMMARY_FILE
from scaling_jax.train.compile_cache import CompilationCache, cache_dir_for


def test_the_cache_goes_in_the_run_unless_the_caller_chose_one():
    assert cache_dir_for("run", "runs/a", None) == os.path.join("runs/a", COMPILATION_CACHE_DIR)
    assert cache_dir_for("run", "gs://b/runs/a", None) == f"gs://b/runs/a/{COMPILATION_CACHE_DIR}"
    assert cache_dir_for("/shared/sweep", "runs/a", None) == "/shared/sweep"  # e.g. a sweep's
    assert cache_dir_for("run", "runs/a", "/caller/cache") == "/caller/cache"  # JAX_COMPILATION_CACHE_DIR
    assert cache_dir_for("/shared/sweep", "runs/a", "/caller/cache") == "/caller/cache"
    assert cache_dir_for("none", "runs/a", "/caller/cache") is None


def test_a_run_borrows_the_processs_cache_directory_and_gives_it_back(tmp_path):
    """Runs one after another in one process (a local sweep) each write where they say, and leave the process's
    cache as they found it."""
    found = jax.config.jax_compilation_cache_dir  # the test suite's own cache
    kept = CompilationCache("run", str(tmp_path / "a"))
    assert kept.directory == found and not kept.switched
    kept.close()
    without = CompilationCache("none", str(tmp_path / "b"))  # no cache, even though the caller set one
    assert jax.config.jax_compilation_cache_dir is None
    shared = CompilationCache(str(tmp_path / "shared"), str(tmp_path / "c"))  # the process has none now
    assert jax.config.jax_compilation_cache_dir == shared.directory == str(tmp_path / "shared")
    jax.jit(lambda x: x * 3 + 1)(jnp.arange(7.0)).block_until_ready()  # a program no other test compiles
    shared.close()
    shared.close()  # twice is harmless
    assert os.listdir(tmp_path / "shared")  # the program went where that run said
    assert jax.config.jax_compilation_cache_dir is None
    without.close()
    assert jax.config.jax_compilation_cache_dir == found


def _train(run_dir) -> dict:
    """``scaling-jax train`` for 2 steps (checkpoints at 1 and 2) in a fresh process with no cache directory of the
    caller's (the test suite's)."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(XLA_FLAGS=FAST_COMPILE_XLA_FLAGS, JAX_PLATFORMS="cpu",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")  # the tiny programs compile in well under 1 s
    command = [sys.executable, "-m", "scaling_jax.cli", "train", "configs/quickstart.yaml", *TINY_RUN,
               "train.steps=2", "train.checkpoint_every=1", f"train.run_dir={run_dir}"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(os.path.join(run_dir, SUMMARY_FILE)) as f:
        return json.load(f)["compilation_cache"]


@pytest.mark.slow
def test_a_resumed_run_reads_its_compiled_programs_back_from_its_own_directory(tmp_path):
    first = _train(tmp_path / "run")
    assert first["dir"] == str(tmp_path / "run" / COMPILATION_CACHE_DIR)
    assert first["programs_read"] == 0 and first["programs_written"] > 0
    assert len(os.listdir(first["dir"])) >= first["programs_written"]
    # moved to another path (the cache's keys must not hold its directory), preempted after its step-1
    # checkpoint, resumed with the same config
    moved = tmp_path / "moved"
    os.rename(tmp_path / "run", moved)
    shutil.rmtree(moved / CHECKPOINT_DIR / "2")
    resumed = _train(moved)
    assert resumed["dir"] == str(moved / COMPILATION_CACHE_DIR)
    # nothing is compiled again: the train and eval steps come back from the first process's entries (the
    # fresh start's weight initialisation is the one program a resume does not run)
    assert resumed["programs_written"] == 0, resumed
    assert 2 <= resumed["programs_read"] <= first["programs_written"], resumed
