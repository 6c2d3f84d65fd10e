"""The command line: one clear line and exit code 2 for each kind of bad input; info's numbers."""

import os
import subprocess
import sys

import jax
import pytest
from conftest import FAST_COMPILE_XLA_FLAGS

from scaling_jax.cli import main
from scaling_jax.config import load_config
from scaling_jax.info import describe, sharded_param_bytes
from scaling_jax.parallel.mesh import build_mesh
from scaling_jax.parallel.sharding import rules_from_config
from scaling_jax.train.state import abstract_model, param_shardings

TINY = ["model.series=custom", "model.layers=1", "model.d_model=32", "model.heads=1", "model.head_dim=32",
        "model.d_ff=64", "data.seq_len=32", "data.batch_size=4", "data.max_docs=20", "train.steps=2",
        "optimizer.warmup_steps=1", "train.progress=false", "train.plot=false"]


def _cli(*args, devices=1):
    """``python -m scaling_jax.cli ARGS`` in a process with ``devices`` CPU devices (for what depends on the
    device count, or on the process itself: its exit code and everything it writes to stderr)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE_XLA_FLAGS}"}
    return subprocess.run([sys.executable, "-m", "scaling_jax.cli", *args], capture_output=True, text=True, env=env)


def _cli_here(capsys, *args):
    """``scaling_jax.cli.main(ARGS)`` in this process (what ``python -m scaling_jax.cli`` exits with), as a
    finished process: for errors raised before any device is used (a subprocess costs seconds of imports)."""
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["scaling-jax", *args], code, out, err)


def _assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("overrides, devices, fragments", [  # devices None: in this process (its 8 CPU devices)
    (["model.layer=3"], None, ["unknown config key 'model.layer'", "model.layers"]),
    (["train.steps=many"], None, ["train.steps must be int"]),
    (["mesh.data=3"], 1, ["mesh data x fsdp x tensor = 3x1x1", "1 devices are available"]),  # a whole process
    (["data.batch_size=12"], None, ["data.batch_size=12 must be divisible by 8", "'batch'"]),
    (["data.seq_len=31", "mesh.rules=[[length, data], [batch, null]]"], None,
     ["data.seq_len=31 must be divisible by 8", "'length'"]),
    # the data source is read after the mesh check, so the batch must fit the mesh first
    (["data.batch_size=8", "data.source=/nonexistent/*.txt"], None, ["data.source", "/nonexistent/*.txt"]),
    # UL2's mode and sentinel ids sit above the byte ids: a vocabulary that holds only those made the loss NaN
    (["data.batch_size=8", "objective=ul2", "model.vocab_size=300"], None,
     ["objective ul2 uses", "past model.vocab_size=300", "set model.vocab_size=384 or 0"]),
])
def test_bad_inputs_fail_with_one_line(tmp_path, capsys, overrides, devices, fragments):
    args = ["train", "configs/quickstart.yaml", *TINY, *overrides, f"train.run_dir={tmp_path / 'run'}"]
    result = _cli_here(capsys, *args) if devices is None else _cli(*args, devices=devices)
    _assert_one_line_error(result, *fragments)


def test_unwritable_output_paths_non_utf8_files_and_non_yaml_overrides_are_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    result = _cli_here(capsys, "data", "prepare", "--output", str(tmp_path / "afile" / "out"), "data.source=stdlib",
                       "data.tokenizer=byte", "data.max_docs=5")
    _assert_one_line_error(result, f"'{tmp_path / 'afile'}' is a file", "pass --output naming a writable place")
    (tmp_path / "latin1.yaml").write_bytes("model:\n  layers: 2  # caf\xe9\n".encode("latin-1"))
    _assert_one_line_error(_cli_here(capsys, "info", str(tmp_path / "latin1.yaml")), "latin1.yaml", "is not UTF-8")
    # a glob is not YAML (a leading * is an alias): the override is its text, and the data error names it
    result = _cli_here(capsys, "train", "configs/quickstart.yaml", *TINY, "data.batch_size=8",
                       "data.source=*.nothing_matches_this", f"train.run_dir={tmp_path / 'run'}")
    _assert_one_line_error(result, "data.source", "*.nothing_matches_this")
    _assert_one_line_error(_cli_here(capsys, "info", "configs/quickstart.yaml", "model.layers={"),
                           "model.layers must be int")


def test_empty_data_source_is_one_line(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    result = _cli_here(capsys, "train", "configs/quickstart.yaml", *TINY, "data.batch_size=8",  # 8 devices here
                       f"data.source={tmp_path / 'empty.txt'}", f"train.run_dir={tmp_path / 'run'}")
    _assert_one_line_error(result, "gives no train documents", "data.source")


def test_unwritable_or_file_run_dir_is_one_line(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    _assert_one_line_error(_cli_here(capsys, "train", "configs/quickstart.yaml", *TINY, f"train.run_dir={a_file}"),
                           "is a file")
    assert a_file.read_text() == "keep me"
    # /proc refuses new directories even to root, so this holds wherever the tests run
    _assert_one_line_error(_cli_here(capsys, "train", "configs/quickstart.yaml", *TINY,
                                     "train.run_dir=/proc/scaling-jax-run"), "is not writable", "train.run_dir")


def test_missing_config_file_and_debug_traceback(tmp_path, capsys):
    _assert_one_line_error(_cli_here(capsys, "train", str(tmp_path / "none.yaml")), "does not exist")
    debug = _cli("--debug", "train", str(tmp_path / "none.yaml"))  # a real process: its traceback on stderr
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_info_prints_size_flops_and_memory(capsys):
    result = _cli_here(capsys, "info", "configs/quickstart.yaml", "--devices", "8", "mesh.fsdp=8")
    assert result.returncode == 0, result.stderr
    assert "803,968 total" in result.stdout and "754,816 non-embedding" in result.stdout
    assert "FLOPs/token" in result.stdout and "memory/device" in result.stdout
    assert "'fsdp': 8" in result.stdout


def test_info_param_memory_equals_the_real_shards():
    config = load_config(None, ["model.layers=2", "model.d_model=64", "model.heads=4", "model.head_dim=16",
                                "model.d_ff=128", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    mesh = build_mesh(config.mesh, jax.devices())
    _, shapes, axes = abstract_model(config.model)
    shardings = param_shardings(mesh, rules_from_config([]), shapes, axes)
    device0 = jax.devices()[0]
    real = 0
    for shape, sharding in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings), strict=True):
        index = sharding.devices_indices_map(shape.shape)[device0]
        real += 4 * int(jax.numpy.prod(jax.numpy.array([len(range(*s.indices(n))) for s, n in
                                                          zip(index, shape.shape, strict=True)] or [1])))
    assert sharded_param_bytes(config, 8) == real
    assert describe(config, 8)["memory_per_device_bytes"]["params_grads_optimizer"] == pytest.approx(4 * real)


def test_a_command_never_imports_ipython_yet_leaves_it_importable():
    """flax.nnx's notebook probe would import all of IPython at every command's start (where it is installed);
    a command answers it without the import, and the process can still import IPython afterwards."""
    pytest.importorskip("IPython")
    code = ("import sys; from scaling_jax.cli import main; assert main(['info', 'configs/quickstart.yaml']) == 0; "
            "during = 'IPython' in sys.modules; import IPython; print(during, 'flax.nnx' in sys.modules, "
            "IPython.get_ipython())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "False True None"


def test_a_full_disk_is_one_error_line_that_says_how_to_go_on(monkeypatch, capsys):
    """The metrics log is appended every step, so a filling disk stopped training with an OSError traceback."""
    import errno

    from scaling_jax import cli

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cli, "_info", full)
    assert main(["info", "configs/quickstart.yaml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: No space left on device; free disk space (or raise the file-size limit) and run the "
                   "command again: a run resumes from its newest checkpoint (scaling-jax resume RUN_DIR)"]
