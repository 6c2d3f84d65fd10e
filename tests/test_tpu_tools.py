"""Cloud TPU tooling without a TPU: the gcloud launcher's commands, the TPU presets' shardings,
the AOT script's report on CPU devices, and maintenance notices turning into a clean stop."""

import dataclasses
import glob
import http.server
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time

import jax
import pytest
from jax.sharding import AbstractMesh

from scaling_jax.config import load_config
from scaling_jax.parallel.mesh import MESH_AXES, mesh_shape
from scaling_jax.parallel.sharding import logical_to_spec, rules_from_config
from scaling_jax.train import preemption
from scaling_jax.train.state import abstract_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHERE = ["--project", "proj", "--zone", "us-east5-b", "--name", "lm", "--accelerator", "v5p-128", "--dry-run"]


def _load(relpath: str, name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, relpath))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


tpu = _load("scripts/tpu/tpu.py", "tpu_launcher")


def _commands(capsys, *argv: str) -> list[list[str]]:
    assert tpu.main([*WHERE, *argv]) == 0
    return [shlex.split(line[2:]) for line in capsys.readouterr().out.splitlines() if line.startswith("+ ")]


def test_dry_run_prints_the_gcloud_life_cycle_and_runs_nothing(capsys):
    where = ["--project", "proj", "--zone", "us-east5-b"]
    (create,) = _commands(capsys, "create")
    assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "lm", *where, "--accelerator-type", "v5p-128",
                      "--version", "v2-alpha-tpuv5"]
    queued = _commands(capsys, "--queued", "--runtime-version", "v2-custom", "create", "--spot")
    assert queued[0] == ["gcloud", "compute", "tpus", "queued-resources", "create", "lm", *where, "--node-id", "lm",
                         "--accelerator-type", "v5p-128", "--runtime-version", "v2-custom", "--spot"]
    assert queued[1][3:5] == ["queued-resources", "describe"]  # then waits for ACTIVE
    scp, ssh = _commands(capsys, "install")
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and scp[-1] == "--worker=all"
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "lm"] and "--worker=all" in ssh
    assert "pip install" in ssh[-1] and "scaling_jax[tpu,gcs]" in ssh[-1]
    scp, ssh = _commands(capsys, "run", "configs/tpu/v5p-128.yaml", "train.run_dir=gs://b/run 1",
                         "--env", "LIBTPU_INIT_ARGS=--xla_a=1 --xla_b=2")
    assert scp[5:7] == ["configs/tpu/v5p-128.yaml", "lm:scaling_jax/run-config.yaml"] and scp[-1] == "--worker=all"
    remote = ssh[ssh.index("--command") + 1]
    assert "--worker=all" in ssh and "nohup" in remote and "train.pid" in remote
    # no second trainer beside a running one; the log is appended to, so a crashed run's reason stays
    assert "kill -0 $(cat train.pid)" in remote and ">> train.log" in remote
    # the remote shell gets the overrides and env values back intact, spaces included
    start = remote.index("; (") + 3
    inner = shlex.split(remote[start:remote.index(">>", start)])
    assert inner == ["LIBTPU_INIT_ARGS=--xla_a=1 --xla_b=2", "nohup", "python3", "-m", "scaling_jax.cli", "train",
                     "run-config.yaml", "train.run_dir=gs://b/run 1"]
    (logs,) = _commands(capsys, "logs", "--worker", "3")
    assert "--worker=3" in logs and logs[-1] == "tail -n +1 -F scaling_jax/train.log"
    (stop,) = _commands(capsys, "stop")
    assert "kill -TERM" in stop[-1] and "--worker=all" in stop
    assert "while kill -0" in stop[-1]  # returns once the trainer has saved and exited
    scp, ssh = _commands(capsys, "run", "configs/tpu/v5p-128.yaml", "--foreground")
    assert "set -o pipefail" in ssh[-1] and "tee -a train.log" in ssh[-1]
    assert _commands(capsys, "delete") == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "lm", *where, "--quiet"]]
    assert _commands(capsys, "--queued", "delete")[0][3:5] == ["queued-resources", "delete"]


def test_a_dry_run_install_leaves_a_file_it_did_not_make(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    theirs = tmp_path / "scaling_jax-lm.tar.gz"
    theirs.write_text("keep")
    _commands(capsys, "install")
    assert theirs.read_text() == "keep"


def test_install_ships_the_work_tree_without_ignored_files(tmp_path):
    archive = tmp_path / "a.tar.gz"
    tpu.pack_checkout(str(archive))
    import tarfile

    names = tarfile.open(archive).getnames()
    shipped = {"scaling_jax/pyproject.toml", "scaling_jax/scaling_jax/cli.py", "scaling_jax/scripts/tpu/tpu.py"}
    assert shipped <= set(names)
    assert not [n for n in names if "/runs/" in n or "__pycache__" in n or "/.git/" in n or "egg-info" in n]


def test_launcher_rejects_missing_settings_and_unknown_accelerators(capsys, monkeypatch):
    for key in ("PROJECT", "ZONE", "NAME", "ACCELERATOR"):
        monkeypatch.delenv(f"SCALING_JAX_TPU_{key}", raising=False)
    with pytest.raises(SystemExit) as e:
        tpu.main(["--dry-run", "create"])
    assert e.value.code == 2 and "--project, --zone, --name" in capsys.readouterr().err
    assert tpu.main([*WHERE[:6], "--accelerator", "v5e-16", "--dry-run", "create"]) == 2
    assert "error: --accelerator 'v5e-16'" in capsys.readouterr().err
    monkeypatch.setenv("SCALING_JAX_TPU_ACCELERATOR", "v6e-64")
    assert tpu.main(["--project", "p", "--zone", "z", "--name", "n", "--dry-run", "create"]) == 0
    assert "v2-alpha-tpuv6e" in capsys.readouterr().out


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "tpu", "*.yaml"))))
def test_tpu_presets_shard_every_large_weight_over_fsdp_and_tensor(path):
    """Each preset fills its slice (chips from the accelerator name; v5p counts 2 TensorCores per chip)
    and its rules really split the weights: no dimension silently falls back to replication."""
    config = load_config(path)
    gen, size = re.fullmatch(r"(v\d\w?)-(\d+)", os.path.basename(path)[:-5]).groups()
    chips = int(size) // (2 if gen in ("v4", "v5p") else 1)
    mesh = AbstractMesh(mesh_shape(config.mesh, chips), MESH_AXES)
    rules = rules_from_config(config.mesh.rules)
    assert config.data.batch_size % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0
    _, shapes, axes = abstract_model(config.model)
    leaves = zip(jax.tree.leaves(shapes), jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple)), strict=True)
    for shape, names in leaves:
        spec = logical_to_spec(names, rules, mesh, shape.shape)
        for name, entry in zip(names, spec, strict=True):
            wanted = [a for logical, ax in rules if logical == name and ax
                      for a in ([ax] if isinstance(ax, str) else ax) if mesh.shape[a] > 1]
            if name in ("embed", "mlp", "heads", "kv_heads") and wanted:
                got = [entry] if isinstance(entry, str) else list(entry or ())
                assert got == wanted[:len(got)] and got, (path, names, shape.shape, spec)


aot = _load("scripts/aot_compile_tpu.py", "aot_compile_tpu")


def test_aot_report_is_xla_buffer_assignment_of_the_real_step(tiny_config):
    """On CPU devices (the TPU path differs only in the devices handed in) the report's memory is
    XLA's, its FLOPs are the analytic training FLOPs, and an HBM too small is reported, not hidden."""
    config = tiny_config("mesh.fsdp=4")
    report = aot.compile_for(config, "cpu", hbm_gib=16, devices=jax.devices()[:8])
    assert report.chips == 8 and report.mesh == {"data": 2, "fsdp": 4, "tensor": 1}
    assert report.argument_bytes > 0 and report.temp_bytes > 0 and report.alias_bytes > 0  # state is donated
    assert report.peak_bytes == report.argument_bytes + report.output_bytes - report.alias_bytes + report.temp_bytes
    from scaling_jax.model.family import flops_per_token

    assert report.flops_per_step == flops_per_token(config.model, 32) * 8 * 32
    assert report.fits and report.xla_flops_per_chip > 0
    tight = dataclasses.replace(report, hbm_bytes=report.peak_bytes - 1).check_fit()
    assert not tight.fits and dataclasses.replace(report, hbm_bytes=0.0).check_fit().fits  # unknown HBM: XLA decides
    assert "DOES NOT FIT" in aot.format_report(config, tight, 0.4)
    for bad in ("v5e-16", "v7:4x4", "v5e:4"):
        with pytest.raises(Exception, match="GEN:AxB"):
            aot.parse_topology(bad)
    assert aot.parse_topology("v5p:4x4x8") == ("v5p", (4, 4, 8))


def test_side_by_side_alternates_which_compiles_first_and_reports_medians(monkeypatch):
    """A load change during a repeated comparison falls on both sides: the first to compile alternates, and the
    reported times are medians (a slow outlier on one side does not decide the ratio)."""
    bench = _load("scripts/bench_vs_maxtext.py", "bench_vs_maxtext")
    calls, times = [], iter([10.0, 20.0, 90.0, 12.0, 11.0, 19.0])  # in call order

    def fake(side: str):
        def run(*args) -> dict:
            calls.append(side)
            return {"compile_s": next(times), "process_s": 1.0, "peak": 5, "temp": 3, "argument": 2, "code": 1}
        return run

    monkeypatch.setattr(bench, "run_ours", fake("ours"))
    monkeypatch.setattr(bench, "run_maxtext", fake("maxtext"))
    ours, theirs = bench.side_by_side("c.yaml", [], "v5e:4x4", "python", [], repeats=3)
    assert calls == ["ours", "maxtext", "maxtext", "ours", "ours", "maxtext"]
    assert [r["compile_s"] for r in ours] == [10.0, 12.0, 11.0] and [r["compile_s"] for r in theirs] == [20, 90, 19]
    assert bench.median_run(ours)["compile_s"] == 11.0 and bench.median_run(theirs)["compile_s"] == 20.0
    assert bench.main(["c.yaml", "--topology", "v5e:4x4", "--repeats", "0"]) == 2


def test_maxtext_gets_our_mesh_and_dtypes_or_the_bench_refuses():
    """The MaxText flags say our resolved (data, fsdp, tensor) mesh and dtypes; what they cannot say is refused,
    so the ratio never compares two different programs."""
    from scaling_jax.errors import UserError

    bench = _load("scripts/bench_vs_maxtext.py", "bench_vs_maxtext")
    flags = lambda *o: dict(a.split("=", 1) for a in bench.maxtext_args(  # noqa: E731
        load_config(os.path.join(ROOT, "configs", "tpu", "v5e-16.yaml"), list(o)), "v5e:4x4", "/tmp/x") if "=" in a)
    mesh = flags("mesh.data=2", "mesh.fsdp=8", "mesh.tensor=1", "model.dtype=float32")
    assert (mesh["ici_data_parallelism"], mesh["ici_fsdp_parallelism"], mesh["ici_tensor_parallelism"]) == \
        ("2", "8", "1")
    assert mesh["dtype"] == "float32" and mesh["weight_dtype"] == "float32"
    tensor = flags("mesh.data=1", "mesh.fsdp=1", "mesh.tensor=-1")
    assert (tensor["ici_fsdp_parallelism"], tensor["ici_tensor_parallelism"]) == ("1", "16")
    for override, key in (("model.position=t5_relative", "model.position"), ("objective=ul2", "objective"),
                          ("mesh.dcn_data=2", "mesh.dcn_data")):
        with pytest.raises(UserError, match=f"{key}=.* has no counterpart"):
            flags(override, "model.attention=xla") if "position" in override else flags(override)
    with pytest.raises(UserError, match="--topology 'v5e-16' is not GEN:AxB"):
        bench.maxtext_topology("v5e-16")


# ------------------------------------------------------------------------------------------ multislice


@dataclasses.dataclass(frozen=True)
class _Chip:
    """What the mesh reads from a device: ids, slice / process, platform (``jax.sharding.Mesh`` takes these)."""

    id: int
    slice_index: int
    process_index: int = 0
    platform: str = "cpu"
    device_kind: str = "fake"


def test_multislice_mesh_puts_slices_outermost_on_the_axes_that_cross_dcn():
    """2 slices x 4 chips: each mesh axis is dcn x ici, the slice factor outermost, so only data / fsdp
    collectives go between slices; the ICI sizes are per slice and one slice keeps jax.make_mesh."""
    from jax.sharding import AxisType

    from scaling_jax.parallel.mesh import build_mesh, device_grid, ici_shape

    chips = [_Chip(i, i // 4) for i in range(8)]
    ids = lambda mesh: [[[d.id for d in row] for row in plane] for plane in mesh]  # noqa: E731
    mesh = build_mesh(load_config(None, ["mesh.dcn_data=2", "mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2"]).mesh,
                      chips)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2} and mesh.axis_types == (AxisType.Auto,) * 3
    assert ids(mesh.devices) == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]  # data index = slice: tensor stays inside one
    cfg = load_config(None, ["mesh.dcn_fsdp=2", "mesh.data=2", "mesh.fsdp=-1"]).mesh
    assert mesh_shape(cfg, 8) == (2, 4, 1) and ici_shape(cfg, 8) == (2, 2, 1)
    grid = device_grid(cfg, chips)
    assert [[d.slice_index for d in row[:, 0]] for row in grid] == [[0, 0, 1, 1]] * 2  # fsdp: slice outermost
    # CPU / GPU: processes are the slices (jax.distributed gives every CPU device slice_index 0)
    procs = [_Chip(i, 0, process_index=i // 4) for i in range(8)]
    cfg = load_config(None, ["mesh.dcn_data=2", "mesh.data=1", "mesh.fsdp=-1"]).mesh
    assert ids(device_grid(cfg, procs)) == [[[0], [1], [2], [3]], [[4], [5], [6], [7]]]
    with pytest.raises(Exception, match=r"= 2 but the devices form 1 slice\(s\).*product is 1"):
        build_mesh(load_config(None, ["mesh.dcn_data=2"]).mesh, jax.devices())  # one process: one slice
    with pytest.raises(Exception, match="devices span 2 slices but mesh.dcn_data x mesh.dcn_fsdp = 1; set "
                                        "mesh.dcn_data=2"):
        build_mesh(load_config(None, []).mesh, chips)
    with pytest.raises(Exception, match="= 4 but 8 devices are in each of the 2 slices"):
        build_mesh(load_config(None, ["mesh.dcn_data=2", "mesh.data=4"]).mesh, [_Chip(i, i // 8) for i in range(16)])
    assert [d.id for d in build_mesh(load_config(None, ["mesh.fsdp=4"]).mesh, jax.devices()).devices.flat] == \
        [d.id for d in jax.devices()]  # one slice: jax.make_mesh as before


@dataclasses.dataclass(frozen=True)
class _TopologyChip:
    """A chip of an AOT TPU topology of one slice: held by several hosts, no ``slice_index``."""

    id: int
    process_index: int
    platform: str = "tpu"


def test_one_tpu_slice_on_several_hosts_is_one_slice_and_num_slices_must_match_the_dcn_axes():
    from scaling_jax.errors import UserError
    from scaling_jax.parallel.mesh import slice_groups

    chips = [_TopologyChip(i, i // 4) for i in range(16)]  # v5e:4x4: 4 hosts of 2x2 chips
    assert [len(g) for g in slice_groups(chips)[1]] == [16]
    config = load_config(None, ["mesh.dcn_data=4"])
    with pytest.raises(UserError, match="= 4 slices but --num-slices 1; pass --num-slices 4"):
        aot.slices_for(config, 1)
    assert aot.slices_for(config, 4) == ""
    assert aot.parse_chips_per_host("2x2") == (2, 2, 1) and aot.parse_chips_per_host("2x2x1") == (2, 2, 1)
    with pytest.raises(UserError, match="--chips-per-host '2,2,1' is not AxB or AxBxC"):
        aot.parse_chips_per_host("2,2,1")


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (pip install 'jax[tpu]')")
def test_aot_compiles_the_step_for_two_slices_joined_over_dcn(tmp_path):
    """``--num-slices 2`` compiles for 2 x v5e:2x2 (devices with slice_index from the topology): a config
    without DCN axes gets mesh.dcn_data=2 and the report names the DCN x ICI layout."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    script = os.path.join(ROOT, "scripts", "aot_compile_tpu.py")
    cmd = [sys.executable, script, os.path.join(ROOT, "configs", "quickstart.yaml"), "--topology", "v5e:2x2",
           "--num-slices", "2", "data.seq_len=32", "data.batch_size=8", "--json", str(tmp_path / "r.json")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "--num-slices 2: the config spans no slices over DCN, so mesh.dcn_data=2" in done.stdout
    assert "2 x v5e:2x2 (multislice): 8 chips" in done.stdout
    assert ("{'data': 8, 'fsdp': 1, 'tensor': 1} = DCN {'data': 2, 'fsdp': 1, 'tensor': 1} x ICI "
            "{'data': 4, 'fsdp': 1, 'tensor': 1} per slice") in done.stdout
    (report,) = json.loads((tmp_path / "r.json").read_text())
    assert report["slices"] == 2 and report["fits"] and report["temp_bytes"] > 0


# ------------------------------------------------------------------------------------------ maintenance


class _Metadata(http.server.BaseHTTPRequestHandler):
    """A metadata server whose maintenance-event turns to TERMINATE after ``flip_after`` polls."""

    polls = 0
    flip_after = 2

    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.headers.get("Metadata-Flavor") != "Google" or "/instance/maintenance-event" not in self.path:
            self.send_error(403 if "maintenance" in self.path else 404)
            return
        type(self).polls += 1
        if type(self).polls == 1:
            self.send_error(503)  # the server blips around maintenance; the watcher must retry
            return
        value = b"TERMINATE_ON_HOST_MAINTENANCE" if type(self).polls > self.flip_after else b"NONE"
        self.send_response(200)
        self.send_header("ETag", str(type(self).polls))
        self.end_headers()
        self.wfile.write(value)

    def log_message(self, *args):
        pass


@pytest.fixture
def metadata_server():
    _Metadata.polls = 0
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Metadata)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/computeMetadata/v1/"
    server.shutdown()


def test_maintenance_notice_becomes_a_stop_request_through_sigterm(metadata_server):
    stop = preemption.StopRequest().install()
    env = {preemption.ENV_METADATA_ROOT: metadata_server}
    try:
        watcher = preemption.watch_maintenance(env, retry_s=0.05)
        deadline = time.time() + 20
        while not stop.should_stop(0) and time.time() < deadline:
            time.sleep(0.02)  # the signal handler runs on the main thread between bytecodes
        assert stop.requested and watcher.event == "TERMINATE_ON_HOST_MAINTENANCE"
        assert _Metadata.polls == 3  # one 503 (retried), one NONE, then the notice
    finally:
        stop.uninstall()


def test_maintenance_watcher_runs_only_where_a_metadata_server_announces_maintenance():
    assert preemption.watch_maintenance({}, tpu_vm=False) is None
    assert preemption.watch_maintenance({preemption.ENV_WATCH: "off"}, tpu_vm=True) is None
    events = []
    watcher = preemption.watch_maintenance({preemption.ENV_METADATA_ROOT: "http://127.0.0.1:9/"},
                                           on_event=events.append)
    assert watcher is not None
    watcher.stop()
    assert events == []
