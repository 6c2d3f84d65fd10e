"""Test setup: 8 simulated CPU devices for mesh tests, one compilation cache, and small shared builders."""

import atexit
import compileall
import contextlib
import gc
import os
import shutil
import sys
import tempfile

# Many tests (and the training subprocesses of the fault tests) compile the same tiny programs; a persistent
# compilation cache compiles each distinct program once (its directory is chosen in pytest_configure). Every
# program is written to it, however quickly it compiled.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
# The tests' programs are tiny: compiling them dominates running them, so XLA's backend (LLVM) optimisation
# is skipped (HLO passes, fusion and buffer assignment still run; results are the same programs' results).
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# The workers and ~60 trainer, eval and Ray processes each import the package. Where PYTHONDONTWRITEBYTECODE is set
# (the development machine sets it) none of them writes its bytecode, so each compiled the package's sources again:
# 0.5-0.9 CPU-s of every start. Compiled once here, before the workers start, into the package's own __pycache__
# (ignored by git), which Python reads even where it may not write; an edited file is recompiled as usual.
if "PYTEST_XDIST_WORKER" not in os.environ:
    compileall.compile_dir(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scaling_jax"),
                           quiet=1)

from importlib.metadata import version  # noqa: E402

# XLA:CPU's newer MLIR fusion emitters compile the tests' programs more slowly than its LLVM IR emitters:
# test_sharding.py + test_scan_layers.py took 46-49 s with this flag and 71-83 s without (alternated, one process,
# load ~1.7), the whole suite 445 s against 633 s. jax >= 0.11 has only the new emitters and refuses the flag, so
# it is set only where XLA knows it; before any backend starts, so this process and its subprocesses read it.
FAST_COMPILE_XLA_FLAGS = "--xla_cpu_use_fusion_emitters=false" if \
    tuple(int(p) for p in version("jax").split(".")[:2]) < (0, 11) else ""
# XLA:CPU splits each program's LLVM module into parts it compiles on a thread pool; on this project's 2 cores,
# with two test workers compiling at once, the parts only add per-module work. One part: 5 compile-heavy files
# (sharding, scan_layers, multi_token, checkpoint, decode) with an empty compilation cache took 52.9 and 67.3 s
# against 69.1 and 80.4 s (alternated, load 2.3-2.5); the generated code is the same. jax 0.10 and 0.12 know it.
FAST_COMPILE_XLA_FLAGS += " --xla_cpu_parallel_codegen_split_count=1"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_XLA_FLAGS}".strip()

import pytest  # noqa: E402

from scaling_jax.cli import no_notebook_probe  # noqa: E402
from scaling_jax.config import load_config  # noqa: E402
from scaling_jax.parallel.cpu_threads import ensure_threads_for_collectives  # noqa: E402

# What jax.monitoring records once per program built. It times jax's compile-or-get-cached call, so it fires whether
# XLA compiled the program or the persistent cache gave it back (a hit also records the cache's own events: counting
# those as well counted a program twice whenever a warm cache served it).
PROGRAM_BUILT_EVENT = "/jax/core/compile/backend_compile_duration"


# The compilation cache serves the training subprocesses (which inherit the environment) and the test processes:
# many tests build the same tiny trainer (a resume, a copied run, a refused setting), and a hit skips XLA's compile
# of its state init, train and eval steps (~1.5 CPU-s of a ~4 CPU-s build). It is kept between runs in pytest's
# cache directory, so running the inner loop again compiles only the programs a change touched: `-m "not slow"`
# took 112.8 s with it warm and 173.9 s with it empty (2 workers, load ~2.3). Its keys are the programs' HLO,
# compile options, flags and jax version, so a stale entry is never served (an entry cut short by a killed run is
# read as a miss, with jax's warning); `--cache-clear` empties it, and past CACHE_KEEP_BYTES the oldest entries go.
# A directory the caller set (JAX_COMPILATION_CACHE_DIR) is used as is.
CACHE_KEEP_BYTES = 512 << 20


@pytest.hookimpl(trylast=True)  # after xdist's, which tells whether this process is its controller
def pytest_configure(config):
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        if getattr(config, "cache", None) is not None:  # pytest's cacheprovider (absent with -p no:cacheprovider)
            cache = str(config.cache.mkdir("jax_compilation_cache"))
            if "PYTEST_XDIST_WORKER" not in os.environ:
                _forget_oldest(cache, CACHE_KEEP_BYTES)
        else:
            cache = tempfile.mkdtemp(prefix="scaling_jax_tests_jax_cache_")
            atexit.register(shutil.rmtree, cache, ignore_errors=True)
        os.environ["JAX_COMPILATION_CACHE_DIR"] = cache  # before the xdist workers and any subprocess start
    if config.pluginmanager.has_plugin("dsession"):
        return  # xdist's controller only hands tests to its workers: importing JAX here (~1.5 s) delayed their start
    import jax

    jax.config.update("jax_num_cpu_devices", 8)  # before any JAX op; single-device tests use devices()[:1]
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    ensure_threads_for_collectives()  # 16 client threads for 8 devices (else queued steps can deadlock XLA:CPU)


def pytest_collection_finish(session):
    # What a test process holds once jax, the package and every test module are imported (~1M objects) lives until
    # it ends; each of Python's full collections walked all of it again. Frozen, they are left out, and young
    # collections run 10x less often: in test_decode + test_scan_layers + test_run_dir, one process, the
    # collector's time went from 5.8 s (15 full collections) to 1.8 s (6) out of ~65 s.
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


def pytest_unconfigure(config):
    # As a process ends, pytest's check for unraisable exceptions runs five full garbage collections, ~0.8 s each
    # over a test worker's ~1M objects: 4 s of every run's tail. One collection here still lets the session's
    # garbage run its finalisers (and report through that check); freezing what survives makes the five skip it.
    gc.collect()
    gc.freeze()


def _forget_oldest(directory: str, keep_bytes: int) -> None:
    """Delete the least recently written entries until the directory holds at most half of ``keep_bytes``, once it
    holds more than ``keep_bytes`` (jax's own size limit rescans the directory on every write)."""
    entries = sorted(os.scandir(directory), key=lambda entry: entry.stat().st_mtime)
    total = sum(entry.stat().st_size for entry in entries)
    if total <= keep_bytes:
        return
    for entry in entries:
        if total <= keep_bytes // 2:
            break
        total -= entry.stat().st_size
        os.remove(entry.path)


@contextlib.contextmanager
def programs_built():
    """The programs built inside the block (a list of event names, one per program, compiled or from the cache)."""
    import jax

    built: list[str] = []

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == PROGRAM_BUILT_EVENT:
            built.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield built
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


TINY = ["model.layers=2", "model.d_model=64", "model.heads=4", "model.kv_heads=2", "model.head_dim=16",
        "model.d_ff=128", "data.seq_len=32", "data.batch_size=8", "optimizer.warmup_steps=2"]


@pytest.fixture
def tiny_config():
    """A ~70k-parameter GQA model: compiles in seconds, still exercises every axis."""
    def make(*overrides: str):
        return load_config(None, TINY + list(overrides))
    return make


# One run of a tiny model that several files only read or copy (the bad-input, run-directory and lm-eval tests):
# trained once per test process. Tests must not change it in place: copy it first (shutil.copytree).
TINY_RUN = ["model.series=custom", "model.layers=1", "model.d_model=32", "model.heads=1", "model.head_dim=32",
            "model.d_ff=64", "data.seq_len=32", "data.batch_size=8", "data.max_docs=20", "train.steps=1",
            "optimizer.warmup_steps=1", "train.eval_batches=1", "train.progress=false", "train.plot=false",
            "train.tensorboard=false", "train.async_checkpointing=false"]


@pytest.fixture(scope="session")
def tiny_trained_run(tmp_path_factory):
    """The 1-step run of ``TINY_RUN`` (``scaling-jax train``; checkpoint at step 1), shared read-only."""
    from scaling_jax.cli import main

    root = tmp_path_factory.mktemp("tiny_trained_run")
    assert main(["train", os.path.abspath("configs/quickstart.yaml"), *TINY_RUN, f"train.run_dir={root / 'run'}"]) == 0
    return root / "run"


# The files that take longest go to the workers first (one file per worker: --dist loadfile), so the run does not
# end with one worker finishing a long file while the other idles. Ordered by each file's seconds in a whole-suite
# run with an empty compilation cache, as CI runs it (2 workers, 2026-11-27; files under ~4 s follow in name order);
# the Ray files run as one unit (see RAY_FILES) where the first of them stands.
LONGEST_FIRST = ("test_faults.py", "test_ray_executor.py", "test_gcs_sweep.py", "test_prepare_ray.py",
                 "test_decode.py", "test_scan_layers.py", "test_multiprocess.py", "test_gcs_run.py", "test_run_dir.py",
                 "test_checkpoint.py", "test_continuation.py", "test_multi_token.py", "test_lm_eval_adapter.py",
                 "test_sharding.py", "test_trainer_seams.py", "test_attention.py", "test_compile_cache.py",
                 "test_emergence.py", "test_t5x_convert.py", "test_report.py", "test_prepare.py", "test_bad_inputs.py",
                 "test_eval_tasks.py", "test_seqio_adapter.py", "test_train.py", "test_sweep.py", "test_pipeline.py",
                 "test_maxtext_convert.py", "test_laws.py", "test_packing.py", "test_cli.py", "test_bigbench.py",
                 "test_noise_scale.py", "test_hf_convert.py", "test_memory.py")


@pytest.hookimpl(wrapper=True)
def pytest_collection(session):
    # The test modules import flax, whose notebook probe would import all of IPython (~0.4 s of every test
    # process's collection); the CLI answers it without the import (cli.no_notebook_probe), and so does collection.
    # IPython is importable again once the modules are collected. And pytest keeps the test modules it rewrote (for
    # its assertion messages) in tests/__pycache__ (ignored by git) only where bytecode may be written: where
    # PYTHONDONTWRITEBYTECODE is set, every test process rewrote all of them again (collection 5.5 s against 2.7 s).
    with no_notebook_probe(), _writing_bytecode():
        return (yield)


@contextlib.contextmanager
def _writing_bytecode():
    before, sys.dont_write_bytecode = sys.dont_write_bytecode, False
    try:
        yield
    finally:
        sys.dont_write_bytecode = before


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file is kept


# The files that need a local Ray share one (starting one costs ~10 CPU-s, 6-8 s): a session fixture, and an
# xdist scheduler that sends these files to one worker as a unit (every other file is a unit of its own).
RAY_FILES = ("test_ray_executor.py", "test_gcs_sweep.py", "test_prepare_ray.py")


@pytest.fixture(scope="session")
def ray_cluster():
    ray = pytest.importorskip("ray")
    # Ray's processes inherit this environment: workers get the 8 CPU devices this process has, so they compile
    # the very programs the local runs compiled and find them in the shared compilation cache
    # (JAX_COMPILATION_CACHE_DIR). Set for the start only: other tests' subprocesses choose their own devices.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("JAX_NUM_CPU_DEVICES", "8")
        ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.hookimpl(optionalhook=True)  # a hook of xdist's: pytest without xdist must not refuse it
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadfile":
        return None  # xdist's own scheduler for any other --dist
    config.option.loadscopereorder = False  # xdist would send the files with most tests first, not LONGEST_FIRST
    from xdist.scheduler import LoadFileScheduling

    class RayFilesTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = super()._split_scope(nodeid)
            return "ray" if os.path.basename(path) in RAY_FILES else path

    return RayFilesTogether(config, log)


def assert_fixture_script_reproduces(script_name: str, fixtures: str, variants, tmp_path, **tolerance) -> None:
    """Run ``tests/fixtures/SCRIPT_NAME.py``'s ``make_fixture(variant, out)`` again (where its framework is
    installed) and compare the fresh ``reference.npz`` with the committed one: same inputs, same logits."""
    import importlib.util

    import numpy as np

    path = os.path.join(os.path.dirname(fixtures), f"{script_name}.py")
    spec = importlib.util.spec_from_file_location(script_name, path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for variant in variants:
        fresh = np.load(os.path.join(script.make_fixture(variant, str(tmp_path)), "reference.npz"))
        stored = np.load(os.path.join(fixtures, variant, "reference.npz"))
        np.testing.assert_array_equal(fresh["input_ids"], stored["input_ids"])
        np.testing.assert_allclose(fresh["logits"], stored["logits"], **tolerance)


def decoder_logits(params: dict, cfg, input_ids):
    """Our decoder's logits for ``input_ids`` (one document per row) with ``params`` (a pure dict in our layout):
    what an imported checkpoint is compared against the source framework's own logits with."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from scaling_jax.model.transformer import Decoder

    graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, nnx.Rngs(0))))

    @jax.jit
    def forward(params, ids):
        nnx.replace_by_pure_dict(state, params)
        model = nnx.merge(graphdef, state)
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
        return model.logits(model(ids, positions, jnp.ones_like(ids)))

    return np.asarray(forward(jax.tree.map(jnp.asarray, params), jnp.asarray(input_ids)))
