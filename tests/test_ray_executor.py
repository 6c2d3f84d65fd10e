"""``scaling-jax sweep --executor ray``: every run a Ray task that records what the local executor records, a
rerun submits nothing for finished runs, and a worker killed mid-run is retried and resumes from its checkpoint.

Ray's tests share one local Ray (2 CPUs) for the module and are skipped without Ray; the checks of the sweep
file's ``ray`` section and of the CLI flags need no Ray.
"""

import json
import os
import sys

import pytest
import yaml
from test_sweep import write_spec

from scaling_jax import cli
from scaling_jax.errors import ConfigError, UserError
from scaling_jax.run_dir import LOCK_FILE, METRICS_FILE, SUMMARY_FILE
from scaling_jax.scaling import executors, sweep
from scaling_jax.train import metrics as metrics_lib

BUDGET = [{"tokens": 1280}]  # 10 steps of 8 x 16 tokens; checkpoints at steps 5 and 10
COMPARED = ("run_id", "objective", "size", "budget", "status", "n", "n_base", "params", "tokens", "flops", "steps",
            "val_loss", "val_bpb")


@pytest.fixture(scope="module")
def ray_cluster(ray_cluster):
    """The session's Ray (conftest), with the train_fns below sent to its workers by value."""
    ray_cluster.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray_cluster
    ray_cluster.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _quiet(message: str) -> None:
    pass


def _killed_once_then_resumed(marks):
    """A train_fn for a Ray task: the first attempt dies (os._exit, as a lost VM would) right after step 6,
    one step past the step-5 checkpoint, holding the run directory's lock; the retry records the first step
    it trains and which process holds the lock."""
    def train_fn(config):
        from scaling_jax.train.loop import train

        write = metrics_lib.MetricsWriter.write
        killed, resumed = marks / "killed_pid", marks / "resumed_at"

        def first_attempt(self, row):
            write(self, row)
            if row.get("step") == 6 and "loss" in row:
                killed.write_text(str(os.getpid()))
                os._exit(1)

        def retry(self, row):
            if "loss" in row and not resumed.exists():
                resumed.write_text(str(row["step"]))
            write(self, row)

        metrics_lib.MetricsWriter.write = retry if killed.exists() else first_attempt
        summary = train(config)
        (marks / "retry_pid").write_text(str(os.getpid()))
        return summary
    return train_fn


@pytest.fixture(scope="module")
def swept(tmp_path_factory, ray_cluster):
    """The same one-run spec swept by the local executor and by Ray (whose worker is killed once)."""
    local_dir, ray_dir = tmp_path_factory.mktemp("local"), tmp_path_factory.mktemp("ray")
    local = sweep.run_sweep(sweep.load_sweep(write_spec(local_dir, BUDGET)), sizes=["xs"], say=_quiet)
    marks = ray_dir / "marks"
    marks.mkdir()
    spec = sweep.load_sweep(write_spec(ray_dir, BUDGET, ray={"num_cpus": 1, "max_retries": 1}))
    executor = executors.RayExecutor(spec.ray)
    remote = sweep.run_sweep(spec, sizes=["xs"], train_fn=_killed_once_then_resumed(marks), say=_quiet,
                             executor=executor)
    return {"local": local, "ray": remote, "spec": spec, "marks": marks, "submitted": executor.submitted}


@pytest.mark.slow
def test_a_ray_sweep_records_the_same_manifest_entries_as_the_local_executor(swept):
    local, remote = swept["local"], swept["ray"]
    assert [e["run_id"] for e in remote] == [e["run_id"] for e in local] == ["causal-xs-t1280"]
    where = {"run_dir", "source"}  # each sweep has its own directory (and data file); nothing else differs
    config = lambda e: {s: {k: v for k, v in f.items() if k not in where} for s, f in e["config"].items()}
    for a, b in zip(local, remote, strict=True):
        assert {k: b.get(k) for k in COMPARED} == {k: a.get(k) for k in COMPARED}
        assert b["status"] == "done" and b["val_loss"] > 0 and b["wall_time"] > 0
        assert config(b) == config(a)
    manifest = json.load(open(os.path.join(swept["spec"].out_dir, sweep.MANIFEST)))
    assert [(e["run_id"], e["status"], e["val_loss"]) for e in manifest["runs"]] == [
        (e["run_id"], e["status"], e["val_loss"]) for e in remote]


@pytest.mark.slow
def test_a_worker_killed_mid_run_is_retried_and_resumes_from_its_checkpoint(swept):
    marks, run_dir = swept["marks"], swept["ray"][0]["run_dir"]
    killed, retry = int((marks / "killed_pid").read_text()), int((marks / "retry_pid").read_text())
    assert killed != retry  # Ray ran the retry in a new worker process
    assert (marks / "resumed_at").read_text() == "6"  # from the step-5 checkpoint, not from scratch
    rows = metrics_lib.read_metrics(os.path.join(run_dir, METRICS_FILE))
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 11))  # the dead attempt's step 6 is gone
    assert json.load(open(os.path.join(run_dir, SUMMARY_FILE)))["step"] == 10
    # the dead worker's lock (a flock the kernel dropped with it) did not block the retry, which took it over
    holder = json.load(open(os.path.join(run_dir, LOCK_FILE)))
    assert holder["pid"] == retry and holder["released"]


@pytest.mark.slow
def test_a_rerun_submits_no_task_for_finished_runs(swept, ray_cluster):
    spec = swept["spec"]
    assert swept["submitted"] == ["causal-xs-t1280"]
    executor = executors.RayExecutor(spec.ray)
    boom = lambda config: (_ for _ in ()).throw(AssertionError("a finished run was trained again"))
    entries = sweep.run_sweep(spec, sizes=["xs"], train_fn=boom, say=_quiet, executor=executor)
    assert executor.submitted == []
    assert [(e["run_id"], e["status"], e["val_loss"]) for e in entries] == [
        (e["run_id"], e["status"], e["val_loss"]) for e in swept["ray"]]


def _fake_train(marks):
    """No training: xs is preempted (SIGTERM) on its first attempt, then finishes; s fails with a user error."""
    def train_fn(config):
        run_dir, steps = config.train.run_dir, config.train.steps
        name = os.path.basename(run_dir)
        if name.startswith("causal-s-"):
            raise ConfigError("model.d_ff=-1 must be > 0")
        os.makedirs(run_dir, exist_ok=True)
        first = not (marks / name).exists()
        (marks / name).write_text("attempted")
        summary = {"step": 3 if first else steps, "preempted": first, "val_loss": 4.5, "wall_time": 1.0}
        with open(os.path.join(run_dir, SUMMARY_FILE), "w") as f:
            json.dump(summary, f)
        return summary
    return train_fn


@pytest.mark.slow
def test_a_preempted_run_is_retried_and_a_failed_run_does_not_stop_the_others(tmp_path, ray_cluster):
    marks = tmp_path / "marks"
    marks.mkdir()
    spec = sweep.load_sweep(write_spec(tmp_path, BUDGET, ray={"num_cpus": 1, "max_retries": 1}))
    messages = []
    with pytest.raises(ConfigError, match="model.d_ff=-1 must be > 0"):  # the run's own one-line error
        sweep.run_sweep(spec, train_fn=_fake_train(marks), say=messages.append,
                        executor=executors.RayExecutor(spec.ray))
    manifest = {e["run_id"]: e for e in json.load(open(tmp_path / "sweep" / sweep.MANIFEST))["runs"]}
    assert manifest["causal-xs-t1280"]["status"] == "done" and manifest["causal-xs-t1280"]["val_loss"] == 4.5
    assert manifest["causal-s-t1280"]["status"] == "pending"  # a rerun trains it
    assert any(m.startswith("causal-s-t1280 failed (ConfigError: model.d_ff=-1") for m in messages)


@pytest.mark.slow
def test_a_request_that_no_node_offers_is_named_before_the_runs_wait(ray_cluster):
    said = []
    executors.RayExecutor(executors.RayOptions(resources={"TPU": 4}))._connect(said.append)
    assert said == ["warning: no node of the Ray cluster offers {'CPU': 1.0, 'TPU': 4} (what one run asks for); "
                    "the runs wait until such a node joins (check the resources asked for and `ray status`)"]
    said.clear()
    executors.RayExecutor(executors.RayOptions(num_cpus=2))._connect(said.append)  # this Ray has 2 CPUs
    assert said == []


# ------------------------------------------------------------------------------------------ no Ray needed


def test_the_ray_section_of_a_sweep_file_is_checked_with_one_line_errors(tmp_path):
    good = sweep.load_sweep(write_spec(tmp_path, BUDGET, ray={"num_gpus": 1, "resources": {"TPU": 4},
                                                              "max_retries": -1, "env_vars": {"A": "x", "B": 2}}))
    assert good.ray.task_options() == {"max_retries": -1, "retry_exceptions": [executors.RunPreempted],
                                       "max_calls": 1, "num_gpus": 1.0, "resources": {"TPU": 4.0},
                                       "runtime_env": {"env_vars": {"A": "x", "B": "2"}}}
    assert good.ray.describe() == "each run asks for 1 CPU, 1 GPU, 4 TPU; retried without limit"
    assert sweep.load_sweep(write_spec(tmp_path, BUDGET)).ray == executors.RayOptions()  # Ray's defaults
    cases = [({"gpus": 1}, "ray has unknown key 'gpus'; valid keys: num_cpus, num_gpus, resources, max_retries, "
                           "env_vars"),
             ({"num_gpus": -1}, "ray.num_gpus=-1 must be a number >= 0"),
             ({"num_cpus": 2.5}, r"ray.num_cpus=2.5 must be a number >= 0 \(a whole number above 1\)"),
             ({"resources": {"TPU": 0}}, "ray.resources.TPU=0 must be a number > 0"),
             ({"resources": {"GPU": 1}}, "ray.resources.GPU: ask for it with ray.num_gpus instead"),
             ({"resources": ["TPU"]}, "ray.resources must map resource names to amounts"),
             ({"max_retries": 1.5}, "ray.max_retries=1.5 must be an integer >= 0, or -1"),
             ({"env_vars": ["A=x"]}, "ray.env_vars must map variable names to values"),
             ({"env_vars": {"A": None}}, "ray.env_vars.A=None: give a variable name and a string or number value"),
             ("tpu", "ray must be a mapping")]
    for ray, message in cases:
        with pytest.raises(ConfigError, match=message) as error:
            sweep.load_sweep(write_spec(tmp_path, BUDGET, ray=ray))
        assert "\n" not in str(error.value) and str(error.value).startswith("sweep file '")


def _sweep_cli(capsys, *args):
    code = cli.main(["sweep", *args])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def test_executor_flags_are_checked_with_one_error_line(tmp_path, capsys):
    spec = write_spec(tmp_path, BUDGET)
    for args, message in ((["--executor", "dask"], "argument --executor: invalid choice: 'dask'"),
                          (["--address", "10.0.0.2:6379"], "--address applies to --executor ray, not local"),
                          (["--executor", "ray", "--address", " "], "--address is empty")):
        code, err = _sweep_cli(capsys, spec, *args)
        assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_executor_ray_without_ray_installed_names_the_pip_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as it does where Ray is not installed
    code, err = _sweep_cli(capsys, write_spec(tmp_path, BUDGET), "--executor", "ray")
    assert code == 2 and err == ['error: --executor ray needs Ray, which is not installed: pip install -e ".[ray]"']
    assert not (tmp_path / "sweep").exists()  # refused before anything was written


def test_an_address_nothing_answers_on_fails_at_once_in_one_line():
    pytest.importorskip("ray")
    executor = executors.make_executor("ray", address="127.0.0.1:1")  # (Ray itself would retry for minutes)
    with pytest.raises(UserError, match=r"cannot reach the Ray head at 127.0.0.1:1 \(connection refused\)"):
        executor._check_reachable()


def test_a_dry_run_with_ray_shows_what_each_run_asks_for(tmp_path, capsys):
    spec = write_spec(tmp_path, BUDGET, ray={"num_cpus": 8, "resources": {"TPU": 4}})
    assert cli.main(["sweep", spec, "--executor", "ray", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "ray: each run asks for 8 CPU, 4 TPU; up to 3 retries" in out
    assert yaml.safe_load(open(spec))["ray"] == {"num_cpus": 8, "resources": {"TPU": 4}}
