"""Multi-process training on one machine, as on a TPU pod: two JAX processes joined by
``jax.distributed`` over 127.0.0.1 (gloo collectives between CPU devices) must train exactly like
one process holding all the devices; and each process must read its own slice of the data."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import FAST_COMPILE_XLA_FLAGS

from scaling_jax.cli import main
from scaling_jax.config import load_config
from scaling_jax.data import pipeline
from scaling_jax.errors import ConfigError
from scaling_jax.parallel import distributed
from scaling_jax.train.metrics import read_metrics

SIGTERM_WORKER = r"""
import os, signal, sys, time
import jax
jax.config.update("jax_num_cpu_devices", 2)
import numpy as np
from jax.experimental import multihost_utils
from scaling_jax.parallel.distributed import initialize
from scaling_jax.train.preemption import StopRequest

index, port = int(sys.argv[1]), sys.argv[2]
initialize(f"127.0.0.1:{port}", 2, index)
stop = StopRequest().install()
step = 0
while not stop.should_stop(step) and step < 300:
    multihost_utils.process_allgather(np.int32(step))  # a collective per step: lockstep, as in training
    if index == 1 and step == 5:
        os.kill(os.getpid(), signal.SIGTERM)  # only this process is told
    step += 1
    time.sleep(0.02)
print(f"stopped at step {step} requested {stop.requested}", flush=True)
"""

DEVICES = 8
DEFAULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "defaults.yaml")
RUN = ["model.series=custom", "model.layers=1", "model.d_model=32", "model.heads=2", "model.head_dim=16",
       "model.d_ff=64", "data.seq_len=16", "data.batch_size=8", "data.val_fraction=0.2", "train.eval_batches=2",
       "optimizer.lr=1e-2", "optimizer.warmup_steps=1", "optimizer.schedule=constant", "mesh.data=2", "mesh.fsdp=4",
       "train.progress=false", "train.tensorboard=false", "train.plot=false", "train.async_checkpointing=false",
       "train.eval_every=0"]
TEXTS = [f"line {i}: pack my box with five dozen liquor jugs " * 2 for i in range(40)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(run_dir, data, *overrides: str) -> list[str]:
    return [*RUN, f"data.source={data}", "data.format=jsonl", f"train.run_dir={run_dir}",
            "train.shared_filesystem=true", *overrides]  # one machine: every process sees the same disk


def _launch(run_dir, data, processes: int, *overrides: str):
    """Start ``scaling-jax train`` in ``processes`` processes sharing DEVICES CPU devices; returns a function
    that waits for them and gives the metrics rows of the run."""
    args = _args(run_dir, data, *overrides)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(DEVICES // processes),
           # the resumed run compiles the same programs again: reuse them (halves its CPU time)
           "JAX_COMPILATION_CACHE_DIR": os.path.join(os.path.dirname(run_dir), "xla-cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    env["XLA_FLAGS"] = FAST_COMPILE_XLA_FLAGS  # no device count of the caller's
    port = _free_port()
    procs = []
    for i in range(processes):
        flags = [] if processes == 1 else ["--coordinator-address", f"127.0.0.1:{port}",
                                          "--num-processes", str(processes), "--process-id", str(i)]
        cmd = [sys.executable, "-m", "scaling_jax.cli", "train", DEFAULTS, *args, *flags]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))

    def finish() -> list[dict]:
        outputs = []
        for p in procs:
            try:
                outputs.append(p.communicate(timeout=600)[0])  # generous: shared CI machines stall
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                raise
        for i, (p, out) in enumerate(zip(procs, outputs, strict=True)):
            assert p.returncode == 0, f"process {i} failed:\n{out[-3000:]}"
        if processes > 1:
            assert f"on {DEVICES} cpu devices" in outputs[0]  # the mesh spans both processes' devices
        return read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    return finish


def _train(run_dir, data, processes: int, *overrides: str) -> list[dict]:
    """``scaling-jax train`` in ``processes`` processes sharing DEVICES CPU devices; metrics rows of the run."""
    return _launch(run_dir, data, processes, *overrides)()


def _train_here(run_dir, data, *overrides: str) -> list[dict]:
    """One process holding all DEVICES devices: this test process itself (conftest gives it 8 CPU devices), through
    the same CLI; no subprocess start-up to pay."""
    assert jax.device_count() == DEVICES
    assert main(["train", DEFAULTS, *_args(run_dir, data, *overrides)]) == 0
    return read_metrics(os.path.join(run_dir, "metrics.jsonl"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return path


@pytest.mark.slow
def test_two_processes_train_like_one_and_resume_from_their_joint_checkpoint(tmp_path, corpus):
    """Same global batch, same mesh (data 2 x fsdp 4): the loss trace of 2 processes x 4 devices equals
    that of 1 process x 8 devices. The 2 processes are 2 slices (multislice on CPU: each process is one):
    data spans them over "DCN" (mesh.dcn_data=2, ICI data 1 x fsdp 4 within each), so the gradient
    reduction crosses processes. The 2-process run stops at step 3 and resumes from the checkpoint
    both processes wrote, so multi-host save and restore are covered too."""
    dcn = ["mesh.dcn_data=2", "mesh.data=1"]  # per slice: data 1 x fsdp 4; the whole mesh is data 2 x fsdp 4
    first_half = _launch(tmp_path / "two", corpus, 2, "train.steps=3", *dcn)
    single = _train_here(tmp_path / "one", corpus, "train.steps=6")  # while the two processes start up
    first_half()
    assert (tmp_path / "two" / "checkpoints" / "3").is_dir()
    multi = _train(tmp_path / "two", corpus, 2, "train.steps=6", *dcn)
    saved = load_config(str(tmp_path / "two" / "config.yaml"))
    assert (saved.mesh.dcn_data, saved.mesh.data, saved.mesh.fsdp) == (2, 1, 4)

    def trace(rows, key):
        return [(r["step"], r[key]) for r in rows if key in r]

    one, two = trace(single, "loss"), trace(multi, "loss")
    assert [s for s, _ in two] == [1, 2, 3, 4, 5, 6] == [s for s, _ in one]  # process 0 alone logs, once per step
    np.testing.assert_allclose([v for _, v in two], [v for _, v in one], rtol=1e-5, atol=0)
    assert one[-1][1] < one[0][1]
    assert [s for s, _ in trace(multi, "val_loss")] == [3, 6]  # each run evaluates at its end
    np.testing.assert_allclose(trace(multi, "val_loss")[-1][1], trace(single, "val_loss")[-1][1], rtol=1e-5)
    print("max relative loss difference, 2 vs 1 process:",
          max(abs(a - b) / abs(b) for (_, a), (_, b) in zip(two, one, strict=True)))


@pytest.mark.slow
def test_sigterm_to_one_process_stops_every_process_at_the_same_step():
    """On a pod the signal reaches workers at different moments; JAX's preemption service must make
    all of them stop (and so checkpoint) after one agreed step instead of one leaving a collective."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = FAST_COMPILE_XLA_FLAGS  # no device count of the caller's
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-c", SIGTERM_WORKER, str(i), port], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    lines = [next(ln for ln in out.splitlines() if ln.startswith("stopped at")) for out in outs]
    assert lines[0] == lines[1], lines
    step = int(lines[0].split()[3])
    assert 5 < step < 300 and lines[0].endswith("requested True")


def test_each_process_reads_a_disjoint_slice_whose_union_is_the_single_process_stream():
    """Rows carry their index, so what each process read is known exactly; three epochs of batches
    cross the reshuffle at each epoch boundary."""
    config = load_config(None, ["data.seq_len=8", "data.batch_size=8", "data.shuffle_seed=3"])
    rows = [{"tokens": np.array([i], np.int32)} for i in range(50)]
    identity = lambda r: r  # noqa: E731
    per_epoch = len(rows) // 8  # whole global batches in one pass
    batches = 3 * per_epoch
    single = pipeline.train_dataset(rows, config.data, 0, 1, identity)
    stream = [single[b]["tokens"][:, 0] for b in range(batches)]
    assert len(set(np.concatenate(stream[:per_epoch]))) == per_epoch * 8  # shuffled, not repeated, within an epoch
    for count in (2, 4):
        parts = [pipeline.train_dataset(rows, config.data, p, count, identity) for p in range(count)]
        for b in range(batches):
            local = [parts[p][b]["tokens"][:, 0] for p in range(count)]
            assert all(x.shape == (8 // count,) for x in local)
            # the processes' batch b, stacked in process order, is the single-process batch b: the union
            # is the same stream and no row is read by two processes
            np.testing.assert_array_equal(np.concatenate(local), stream[b])
    val = [pipeline.eval_batches(rows, config.data, 3, p, 2, identity) for p in range(2)]
    whole = pipeline.eval_batches(rows, config.data, 3, 0, 1, identity)
    for b in range(3):
        np.testing.assert_array_equal(np.concatenate([val[0][b]["tokens"], val[1][b]["tokens"]]), whole[b]["tokens"])


def test_distributed_settings_come_from_flags_env_or_cluster_and_default_to_none():
    assert distributed.resolve(env={}, tpu_vm=False) is None
    s = distributed.resolve("10.0.0.2:8476", 4, 1, env={}, tpu_vm=False)
    assert (s.coordinator_address, s.num_processes, s.process_id, s.auto) == ("10.0.0.2:8476", 4, 1, False)
    env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}
    assert distributed.resolve(env=env, tpu_vm=False).num_processes == 2
    assert distributed.resolve(process_id=1, env=env, tpu_vm=False).process_id == 1  # flags beat env
    assert distributed.resolve("h:1", 1, 0, env={}, tpu_vm=False) is None  # one process: nothing to join
    assert distributed.resolve(env={}, tpu_vm=True).auto  # TPU VM: JAX reads the worker list itself
    assert distributed.resolve(env={"SLURM_NTASKS": "4"}, tpu_vm=False).source == "SLURM"
    assert distributed.resolve(env={"SLURM_NTASKS": "1"}, tpu_vm=False) is None
    assert distributed.resolve(env={"SCALING_JAX_DISTRIBUTED": "off", **env}, tpu_vm=True) is None
    for bad, needle in (((None, 2, 0), "--coordinator-address"), (("h:1", 2, 2), "process id 2"),
                        (("h", 2, 0), "HOST:PORT")):
        with pytest.raises(ConfigError, match=needle):
            distributed.resolve(*bad, env={}, tpu_vm=False)
    assert distributed.agree_to_stop(True) and not distributed.agree_to_stop(False)  # one process: the local flag
