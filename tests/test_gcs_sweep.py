"""A sweep whose out_dir is a bucket, end to end, against the local GCS emulator of ``test_gcs_run``.

Run directories, their status, ``manifest.json`` and the sweep's own report live in the bucket; a rerun reads
the runs' status from there and skips what is done; ``report`` reads the bucket and writes locally.
"""

import json

import pytest
import yaml
from test_gcs_run import BUCKET, _on_host, emulator_env, gcs  # noqa: F401  (gcs: the emulator fixture, module-scoped)
from test_sweep import COMMON, SIZES, TEXTS  # the local sweep tests' corpus, overrides and sizes

from scaling_jax import paths
from scaling_jax.cli import main
from scaling_jax.errors import ConfigError
from scaling_jax.scaling import sweep
from scaling_jax.train import loop

RUN_IDS = ["causal-xs-t512", "causal-s-t512"]  # 4 steps of 8 x 16 tokens each


def _spec(tmp_path, out_dir: str, **extra) -> str:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    spec = {"name": "t", "out_dir": out_dir, "objectives": ["causal"], "sizes": SIZES, "budgets": [{"tokens": 512}],
            "evals_per_run": 2, "checkpoints_per_run": 1, "overrides": {**COMMON, "data.source": str(data)}, **extra}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


@pytest.mark.slow
def test_a_sweep_into_a_bucket_finishes_skips_on_rerun_and_reports_locally(gcs, tmp_path, monkeypatch,  # noqa: F811
                                                                           capsys):
    out_dir = f"gs://{BUCKET}/sweeps/t"
    spec_path = _spec(tmp_path, out_dir)
    monkeypatch.chdir(tmp_path)  # where os.makedirs("gs://...") would leave a stray local gs: directory
    _on_host(monkeypatch, tmp_path / "host")  # the runs' local mirrors: this test's own

    assert main(["sweep", spec_path]) == 0  # its report too: drawn locally, uploaded into the bucket
    out = capsys.readouterr().out
    assert f"manifest: {out_dir}/manifest.json" in out and f"report: {out_dir}/report/report.md" in out
    manifest = json.loads(paths.read_text(paths.join(out_dir, sweep.MANIFEST)))
    entries = {e["run_id"]: e for e in manifest["runs"]}
    assert sorted(entries) == sorted(RUN_IDS)
    for run_id, e in entries.items():
        assert e["status"] == "done" and e["val_loss"] > 0 and e["steps"] == 4
        assert e["run_dir"] == f"{out_dir}/{run_id}" == e["config"]["train"]["run_dir"]
        files = paths.file_sizes(e["run_dir"])
        assert {"config.yaml", "metrics.jsonl", "summary.json"} <= set(files)
        assert any(name.startswith("checkpoints/4/") for name in files)
    assert {"report.md", "report.json", "loss_vs_tokens.png"} <= set(paths.listdir(paths.join(out_dir, "report")))
    assert not (tmp_path / "gs:").exists()

    # A rerun, on another host (no local mirror): the status comes from the bucket, nothing trains again.
    before = {run_id: gcs.cat_file(f"{BUCKET}/sweeps/t/{run_id}/metrics.jsonl") for run_id in RUN_IDS}
    _on_host(monkeypatch, tmp_path / "host-b")
    calls = []
    monkeypatch.setattr(loop, "train", lambda config: calls.append(config.train.run_dir) or {})
    assert main(["sweep", spec_path, "--no-report"]) == 0
    assert calls == []
    assert capsys.readouterr().out.count("done, skipped") == 2
    assert {run_id: gcs.cat_file(f"{BUCKET}/sweeps/t/{run_id}/metrics.jsonl") for run_id in RUN_IDS} == before
    rerun = json.loads(paths.read_text(paths.join(out_dir, sweep.MANIFEST)))
    assert [(e["run_id"], e["status"], e["val_loss"]) for e in rerun["runs"]] == [
        (e["run_id"], "done", e["val_loss"]) for e in manifest["runs"]]

    # A changed config is refused from the bucket's config.yaml, as for a local out_dir.
    with pytest.raises(ConfigError, match="made by a different config"):
        sweep.run_status(sweep.plan(sweep.load_sweep(spec_path, ["optimizer.lr=1e-2"]), sizes=["xs"])[0])

    # report: reads the manifest and the runs' metrics from the bucket, writes where --out says.
    local = tmp_path / "report"
    assert main(["report", out_dir, "--out", str(local)]) == 0
    table = [line for line in (local / "report.md").read_text().splitlines() if line.startswith("| causal-")]
    assert sorted(line.split(" | ")[0].removeprefix("| ") for line in table) == sorted(RUN_IDS)
    for line in table:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[-1] == "done" and float(cells[7]) == pytest.approx(entries[cells[0]]["val_loss"], abs=1e-4)
    assert (local / "loss_vs_tokens.png").stat().st_size > 0
    capsys.readouterr()
    assert main(["report", out_dir]) == 2  # no local default inside a bucket: one line asking for a local --out
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the default output directory")
    assert "must be a local directory; pass --out LOCAL_DIR" in err[0]


@pytest.mark.slow
def test_a_ray_sweep_into_a_bucket_trains_in_workers_and_skips_on_rerun(gcs, ray_cluster, tmp_path):  # noqa: F811
    import os

    from scaling_jax.scaling import executors

    out_dir = f"gs://{BUCKET}/sweeps/ray"
    (tmp_path / "worker-tmp").mkdir()
    # the workers reach the emulator through the sweep file's ray.env_vars (the session's Ray started before the
    # emulator), and keep their run mirrors under this test's temp dir
    env = {k: os.environ[k] for k in emulator_env('')}
    spec = sweep.load_sweep(_spec(tmp_path, out_dir, ray={"env_vars": {**env, "TMPDIR": str(tmp_path / "worker-tmp")}}))
    executor = executors.RayExecutor(spec.ray)
    entries = sweep.run_sweep(spec, sizes=["xs"], say=lambda m: None, executor=executor)
    assert executor.submitted == ["causal-xs-t512"]
    assert [(e["run_id"], e["status"]) for e in entries] == [("causal-xs-t512", "done")]
    manifest = json.loads(paths.read_text(paths.join(out_dir, sweep.MANIFEST)))
    assert [(e["run_id"], e["status"], e["val_loss"]) for e in manifest["runs"]] == [
        ("causal-xs-t512", "done", entries[0]["val_loss"])]
    assert entries[0]["val_loss"] > 0 and paths.exists(f"{out_dir}/causal-xs-t512/checkpoints/4")

    again = executors.RayExecutor(spec.ray)
    boom = lambda config: (_ for _ in ()).throw(AssertionError("a finished run was trained again"))  # noqa: E731
    sweep.run_sweep(spec, sizes=["xs"], train_fn=boom, say=lambda m: None, executor=again)
    assert again.submitted == []
