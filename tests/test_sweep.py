"""Sweeps: every run's schedule is its own budget; finished runs are skipped, interrupted ones resumed; the
manifest records what each run cost and reached."""

import json
import os
import signal

import pytest
import yaml

from scaling_jax.errors import ConfigError
from scaling_jax.model.family import flops_per_token
from scaling_jax.scaling import sweep
from scaling_jax.train import metrics as metrics_lib
from scaling_jax.train.loop import train
from scaling_jax.train.state import make_schedule

TEXTS = [f"line {i}: the quick brown fox jumps over the lazy dog\n" * 4 for i in range(40)]
COMMON = {"data.seq_len": 16, "data.batch_size": 8, "data.val_fraction": 0.2, "train.eval_batches": 1,
          "train.progress": False, "train.tensorboard": False, "train.plot": False,
          "train.async_checkpointing": False}
SIZES = [{"name": "xs", "layers": 1, "d_model": 32, "heads": 2, "head_dim": 16, "d_ff": 64},
         {"name": "s", "layers": 1, "d_model": 48, "heads": 3, "head_dim": 16, "d_ff": 96}]


def write_spec(tmp_path, budgets, objectives=("causal",), **extra) -> str:
    data = tmp_path / "data.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    spec = {"name": "t", "out_dir": str(tmp_path / "sweep"), "objectives": list(objectives), "sizes": SIZES,
            "budgets": budgets, "overrides": {**COMMON, "data.source": str(data)}, **extra}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_each_run_gets_a_schedule_as_long_as_its_own_budget(tmp_path):
    two_layers = [dict(size, layers=2) for size in SIZES]  # mtp turns the last layer into its head blocks
    spec = sweep.load_sweep(write_spec(tmp_path, [{"tokens_per_param": 2}, {"flops": 5e9}],
                                       objectives=("causal", "mtp"), warmup_fraction=0.1, sizes=two_layers))
    runs = sweep.plan(spec)
    assert len(runs) == 2 * 2 * 2
    for run in runs:
        cfg = run.config
        assert cfg.train.steps == run.steps and run.tokens == run.steps * 8 * 16
        assert cfg.train.compilation_cache == os.path.join(spec.out_dir, "compilation_cache")  # shared by the runs
        assert cfg.optimizer.warmup_steps == round(0.1 * run.steps)
        schedule = make_schedule(cfg.optimizer, cfg.train.steps)  # the cosine ends exactly where the run ends
        assert float(schedule(run.steps)) == pytest.approx(cfg.optimizer.lr * cfg.optimizer.min_lr_ratio)
        assert float(schedule(run.steps // 2)) > 2 * cfg.optimizer.lr * cfg.optimizer.min_lr_ratio
        if run.budget == "k2":  # tokens = 2 N of the plain decoder, whatever the objective adds
            assert abs(run.tokens - 2 * run.n_base) <= 8 * 16 / 2
        else:  # equal compute: each objective gets the tokens its own FLOPs/token allow
            assert run.flops == pytest.approx(5e9, rel=0.05)
    by_id = {r.run_id: r for r in runs}
    assert by_id["mtp-s-c5e09"].tokens < by_id["causal-s-c5e09"].tokens  # MTP's extra head costs FLOPs
    assert by_id["mtp-s-k2"].tokens == by_id["causal-s-k2"].tokens
    assert by_id["mtp-s-k2"].n > by_id["causal-s-k2"].n == by_id["mtp-s-k2"].n_base


@pytest.mark.slow
def test_sweep_skips_finished_runs_and_resumes_an_interrupted_one(tmp_path, monkeypatch):
    spec = sweep.load_sweep(write_spec(tmp_path, [{"tokens": 1280}]))  # 10 steps of 8 x 16 tokens each
    calls = []

    def recording_train(config):
        calls.append(os.path.basename(config.train.run_dir))
        return train(config)

    write = metrics_lib.MetricsWriter.write

    def preempt_at_step_6(self, row):  # a TPU maintenance event in the middle of the second run
        write(self, row)
        if self.run_dir.endswith("causal-s-t1280") and row.get("step") == 6 and "loss" in row:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(metrics_lib.MetricsWriter, "write", preempt_at_step_6)
    entries = {e["run_id"]: e for e in sweep.run_sweep(spec, train_fn=recording_train, say=lambda m: None)}
    assert calls == ["causal-xs-t1280", "causal-s-t1280"]
    assert entries["causal-xs-t1280"]["status"] == "done" and entries["causal-s-t1280"]["status"] == "interrupted"
    stopped = json.load(open(tmp_path / "sweep" / "causal-s-t1280" / "summary.json"))["step"]
    assert 6 <= stopped < 10

    monkeypatch.setattr(metrics_lib.MetricsWriter, "write", write)
    calls.clear()
    entries = {e["run_id"]: e for e in sweep.run_sweep(spec, train_fn=recording_train, say=lambda m: None)}
    assert calls == ["causal-s-t1280"]  # the finished run is skipped
    rows = metrics_lib.read_metrics(str(tmp_path / "sweep" / "causal-s-t1280" / "metrics.jsonl"))
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 11))  # resumed, no step twice
    manifest = json.load(open(tmp_path / "sweep" / sweep.MANIFEST))
    for entry in manifest["runs"]:
        assert entry["status"] == "done" and entry["steps"] == 10
        assert entry["tokens"] == 1280 and entry["wall_time"] > 0 and entry["val_loss"] > 0
        cfg = entry["config"]
        assert entry["flops"] == pytest.approx(1280 * flops_per_token(_model(cfg), 16))
        assert cfg["train"]["steps"] == 10 and cfg["train"]["run_dir"] == entry["run_dir"]

    calls.clear()
    sweep.run_sweep(spec, train_fn=recording_train, say=lambda m: None)
    assert calls == []


def test_a_run_that_raises_is_not_left_running_in_the_manifest(tmp_path):
    """Locally a run's error ends the sweep; its manifest entry says what a rerun will find (pending)."""
    spec = sweep.load_sweep(write_spec(tmp_path, [{"tokens": 1280}]))

    def failing(config):
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        sweep.run_sweep(spec, train_fn=failing, say=lambda m: None)
    manifest = json.load(open(tmp_path / "sweep" / sweep.MANIFEST))
    assert [e["status"] for e in manifest["runs"]] == ["pending", "pending"]


def _model(cfg: dict):
    from scaling_jax.config import ModelConfig

    return ModelConfig(**cfg["model"])


def test_a_changed_config_refuses_to_reuse_a_run_directory(tmp_path):
    spec = sweep.load_sweep(write_spec(tmp_path, [{"tokens": 1280}]))
    run = sweep.plan(spec, sizes=["xs"])[0]
    os.makedirs(run.config.train.run_dir)
    from scaling_jax.config import save_config

    save_config(run.config, os.path.join(run.config.train.run_dir, "config.yaml"))
    assert sweep.run_status(run) == "interrupted"
    changed = sweep.load_sweep(spec.path, ["optimizer.lr=1e-2"])
    with pytest.raises(ConfigError, match="optimizer.lr differs"):
        sweep.run_status(sweep.plan(changed, sizes=["xs"])[0])
    cosmetic = sweep.load_sweep(spec.path, ["train.progress=true"])  # watching differently is fine
    assert sweep.run_status(sweep.plan(cosmetic, sizes=["xs"])[0]) == "interrupted"


def test_sweep_files_are_checked_with_one_line_errors(tmp_path):
    assert list(sweep.expand_sizes(["passuntil:1..3", "kaplan:2x64"], "f")) == [
        "passuntil1", "passuntil2", "passuntil3", "kaplan2x64"]
    cases = [({"budgets": [{"tokens": -5}]}, "must be > 0"),
             ({"budgets": [{"steps": 5}]}, "exactly one of"),
             ({"sizes": [7]}, "series string"),
             ({"objective": ["causal"]}, "unknown key 'objective'"),
             ({"objectives": {"../escape": {"objective.name": "causal"}}}, "objective label '../escape'"),
             ({"sizes": [{"name": "/abs", "layers": 1}]}, "size label '/abs'"),
             ({"budgets": [{"tokens": 640}, {"tokens": 640.0}]}, "appears twice"),
             ({"sizes": [{"name": "xs", "layers": 1}, {"name": "xs", "layers": 2}]}, "size 'xs' appears twice"),
             ({"sizes": ["passuntil:1", "passuntil:1..2"]}, "size 'passuntil1' appears twice")]
    for change, message in cases:
        spec = {"objectives": ["causal"], "sizes": ["passuntil:1"], "budgets": [{"tokens": 100}], **change}
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(spec))
        with pytest.raises(ConfigError, match=message):
            sweep.load_sweep(str(path))
    good = sweep.load_sweep(write_spec(tmp_path, [{"tokens": 1280}]))
    relative = {"objectives": ["causal"], "sizes": ["passuntil:1"], "budgets": [{"tokens": 100}], "out_dir": "rel/sw"}
    (tmp_path / "rel.yaml").write_text(yaml.safe_dump(relative))
    # runs are recorded where they are, whatever directory the sweep (or a Ray worker) runs in
    assert sweep.load_sweep(str(tmp_path / "rel.yaml")).out_dir == os.path.abspath("rel/sw")
    with pytest.raises(ConfigError, match="--sizes 'xl' is not in sweep"):
        sweep.plan(good, sizes=["xl"])


@pytest.mark.parametrize("theirs", [{"mine": True}, {"format_version": 1, "source": "corpus.txt"},
                                    {"sweep": "another", "runs": []}])
def test_a_sweep_never_replaces_a_manifest_that_is_not_its_own(tmp_path, theirs):
    """A user's manifest.json, a prepared data directory's, or another sweep's: refused before any run."""
    spec = sweep.load_sweep(write_spec(tmp_path, [{"tokens": 1280}]))
    os.makedirs(spec.out_dir)
    manifest = os.path.join(spec.out_dir, sweep.MANIFEST)
    with open(manifest, "w") as f:
        json.dump(theirs, f)
    with pytest.raises(ConfigError, match="point the sweep's out_dir at a new directory"):
        sweep.run_sweep(spec, train_fn=lambda config: pytest.fail("nothing may run"), say=lambda _: None)
    assert json.load(open(manifest)) == theirs and os.listdir(spec.out_dir) == [sweep.MANIFEST]


def test_seeds_axis_repeats_every_point_with_its_own_init_and_data_seed(tmp_path):
    spec = sweep.load_sweep(write_spec(tmp_path, [{"tokens": 1280}], seeds=[3, 0]))
    runs = sweep.plan(spec)
    assert [r.run_id for r in runs] == ["causal-xs-t1280-s3", "causal-xs-t1280-s0",
                                        "causal-s-t1280-s3", "causal-s-t1280-s0"]
    for run in runs:
        assert run.config.train.seed == run.config.data.shuffle_seed == run.seed  # init and data order
        assert run.config.train.run_dir == os.path.join(spec.out_dir, run.run_id)
        assert sweep.manifest_entry(run, "pending")["seed"] == run.seed
    from scaling_jax.config import to_dict

    def unseeded(run):  # the config with what a seed sets (and the run's directory) taken out
        cfg = to_dict(run.config)
        del cfg["train"]["seed"], cfg["data"]["shuffle_seed"], cfg["train"]["run_dir"]
        return cfg

    for a, b in ((runs[0], runs[1]), (runs[2], runs[3])):  # seeds of one point differ in nothing else
        assert unseeded(a) == unseeded(b)
        assert (a.n, a.tokens, a.flops, a.steps) == (b.n, b.tokens, b.flops, b.steps)
    # one pass of the grid per seed (the spec's order), smallest compute first within it: a sweep stopped
    # part-way has every point at its first seed
    assert [r.run_id for r in sweep.run_order(runs)] == ["causal-xs-t1280-s3", "causal-s-t1280-s3",
                                                         "causal-xs-t1280-s0", "causal-s-t1280-s0"]
    assert sweep.format_plan(runs).splitlines()[1].startswith("causal-xs-t1280-s3 ")


def test_a_spec_without_seeds_keeps_its_run_ids_its_seeds_and_its_finished_runs(tmp_path):
    spec = sweep.load_sweep(write_spec(tmp_path, [{"tokens": 1280}]), ["train.seed=7", "data.shuffle_seed=5"])
    assert spec.seeds is None
    runs = sweep.plan(spec)
    assert [r.run_id for r in runs] == ["causal-xs-t1280", "causal-s-t1280"]  # the ids sweeps always had
    for run in runs:
        assert run.seed is None and (run.config.train.seed, run.config.data.shuffle_seed) == (7, 5)
        assert "seed" not in sweep.manifest_entry(run, "pending")  # an old sweep's manifest is unchanged
    from scaling_jax.config import save_config

    done = runs[0]  # a run finished by an earlier sweep command: still recognised, still skipped
    os.makedirs(done.config.train.run_dir)
    save_config(done.config, os.path.join(done.config.train.run_dir, "config.yaml"))
    with open(os.path.join(done.config.train.run_dir, "summary.json"), "w") as f:
        json.dump({"step": done.steps, "val_loss": 2.5, "wall_time": 1.0}, f)
    calls = []
    entries = sweep.run_sweep(spec, sizes=["xs"], train_fn=calls.append, say=lambda m: None)
    assert calls == [] and [(e["run_id"], e["status"], e["val_loss"]) for e in entries] == [
        ("causal-xs-t1280", "done", 2.5)]


def test_seeds_must_be_distinct_non_negative_integers_and_own_the_seed_fields(tmp_path):
    cases = [({"seeds": [0, 1, 1]}, "1 is listed twice"), ({"seeds": [-1]}, "-1 is not"),
             ({"seeds": [0, 1.5]}, "1.5 is not"), ({"seeds": [True]}, "True is not"), ({"seeds": []}, "got \\[\\]"),
             ({"seeds": 3}, "got 3"), ({"seeds": "0, 1"}, "got '0, 1'")]
    for change, detail in cases:
        spec = {"objectives": ["causal"], "sizes": ["passuntil:1"], "budgets": [{"tokens": 100}], **change}
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(spec))
        with pytest.raises(ConfigError, match=f"seeds must be a non-empty list of distinct integers >= 0.*{detail}"):
            sweep.load_sweep(str(path))
    path = write_spec(tmp_path, [{"tokens": 1280}], seeds=[0, 1])
    for overrides in (["train.seed=4"], ["data.shuffle_seed=4"]):  # which seed would win is a guess: refused
        with pytest.raises(ConfigError, match=f"seeds sets train.seed and data.shuffle_seed of every run, and "
                                              f"overrides sets {overrides[0].split('=')[0]} too"):
            sweep.load_sweep(path, overrides)
    assert sweep.load_sweep(path).seeds == [0, 1]
