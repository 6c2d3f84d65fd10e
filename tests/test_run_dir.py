"""Run directories: a run writes only into a directory it made, resumes by the directory itself, and a
failed fresh start leaves nothing behind."""

import hashlib
import json
import os
import shutil

import pytest
from conftest import TINY_RUN
from test_bad_inputs import TINY

from scaling_jax import run_dir as run_dirs
from scaling_jax.cli import main
from scaling_jax.config import load_config
from scaling_jax.errors import CheckpointError
from scaling_jax.train.checkpoint import Checkpointer
from scaling_jax.train.loop import check_shared_storage
from scaling_jax.train.metrics import read_metrics

QUICKSTART = os.path.abspath("configs/quickstart.yaml")


def _tree_digest(root) -> dict:
    """sha1 of every file under ``root`` (the lock file's holder record changes on every start)."""
    out = {}
    for directory, _, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            if name != ".lock":
                with open(path, "rb") as f:
                    out[os.path.relpath(path, root)] = hashlib.sha1(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def trained(tiny_trained_run):
    """A 1-step run whose directory the tests below copy, resume and move around (the session's shared run of
    this TINY, trained by ``main(["train", QUICKSTART, *TINY, ...]) == 0``; only copies of it are changed)."""
    assert TINY == TINY_RUN
    return tiny_trained_run


def _copy(trained, dest):
    shutil.copytree(trained, dest)
    return dest


def test_empty_run_dir_is_refused_and_the_users_config_is_untouched(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text("mine\n")
    assert main(["train", QUICKSTART, *TINY, "train.run_dir="]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: train.run_dir is empty")
    assert os.listdir(tmp_path) == ["config.yaml"] and (tmp_path / "config.yaml").read_text() == "mine\n"


def test_a_directory_holding_other_files_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text("mine\n")
    (tmp_path / "notes.txt").write_text("notes\n")
    before = _tree_digest(tmp_path)
    assert main(["train", QUICKSTART, *TINY, "train.run_dir=."]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "(the current directory) already holds files that are not a scaling_jax run (config.yaml, notes.txt)" \
        in err
    assert _tree_digest(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["config.yaml", "notes.txt"]


def test_a_copied_run_trains_in_the_copy_whatever_its_stored_run_dir(trained, tmp_path, monkeypatch):
    original = _tree_digest(trained)
    copy = _copy(trained, tmp_path / "copy")
    monkeypatch.chdir(tmp_path)  # the stored train.run_dir is the original's absolute path
    assert main(["train", "copy/config.yaml", "train.steps=2"]) == 0
    assert Checkpointer(str(copy), 3).latest_step() == 2
    assert load_config(str(copy / "config.yaml")).train.run_dir == "copy"
    assert _tree_digest(trained) == original  # the original run is untouched


def test_resume_by_directory_from_another_working_directory(trained, tmp_path, monkeypatch, capsys):
    copy = _copy(trained, tmp_path / "runs" / "a")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["resume", str(copy), "train.steps=2"]) == 0
    assert "resuming at step 1" in capsys.readouterr().out
    assert Checkpointer(str(copy), 3).latest_step() == 2
    assert os.listdir(elsewhere) == []


def test_a_run_resumed_with_a_larger_batch_counts_each_update_at_the_size_it_ran(trained, tmp_path):
    """Step 1 ran 8 x 32 tokens, steps 2-3 run 16 x 32: the tokens and FLOPs axes and the summary add them up."""
    copy = _copy(trained, tmp_path / "bigger")
    with open(copy / run_dirs.SUMMARY_FILE) as f:
        first = json.load(f)
    assert first["tokens"] == 8 * 32
    assert main(["resume", str(copy), "data.batch_size=16", "train.steps=3", "train.eval_every=0"]) == 0
    rows = [r for r in read_metrics(str(copy / "metrics.jsonl")) if "loss" in r]
    per_token = first["flops"] / first["tokens"]
    assert [(r["step"], r["tokens"]) for r in rows] == [(1, 256), (2, 256 + 512), (3, 256 + 1024)]
    assert all(r["flops"] == pytest.approx(r["tokens"] * per_token) for r in rows)
    with open(copy / run_dirs.SUMMARY_FILE) as f:
        summary = json.load(f)
    assert summary["tokens"] == summary["total_tokens"] == 1280
    assert summary["flops"] == pytest.approx(1280 * per_token)


def test_a_run_resumed_with_a_smaller_batch_reads_on_after_the_rows_it_trained_on(trained, tmp_path, capsys):
    """Step 1 read rows 0-7 (batch 8, batch index 1). At batch 4 the next rows are batch 2, not batch 1 (rows 4-7
    again, as the kept batch index gave); the resume names the changed setting."""
    copy = _copy(trained, tmp_path / "smaller")
    assert main(["resume", str(copy), "data.batch_size=4", "mesh.data=4", "mesh.tensor=2", "train.steps=2",
                 "train.eval_every=0"]) == 0
    said = capsys.readouterr().err
    assert "data.batch_size 8 -> 4" in said and "stream changes" not in said
    checkpointer = Checkpointer(str(copy), 3)
    meta = run_dirs.CheckpointMeta.from_json(checkpointer.read_meta(checkpointer.latest_step()))
    assert meta.data_index == 3  # batches 0-1 of 4 rows were step 1's rows 0-7; step 2 read batch 2


def test_resume_refuses_a_changed_clipping_and_a_damaged_metrics_log_with_one_line(trained, tmp_path, capsys):
    """Turning clipping off changes the optimizer state's tree: the error blamed the model in five lines. A
    damaged line (not a torn last one) in metrics.jsonl was a ValueError traceback."""
    copy = _copy(trained, tmp_path / "changed")
    assert main(["resume", str(copy), "optimizer.clip_norm=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gradient clipping on but the config turns it off" in err[0]
    metrics = copy / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(['{"step": 1, garbage', *lines[1:]]) + "\n")
    assert len(lines) >= 2 and main(["resume", str(copy), "train.steps=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "metrics.jsonl:1: corrupt metrics line" in err[0] and "repair or delete" in err[0]


def test_a_finished_run_resumed_for_more_steps_and_killed_is_not_left_looking_finished(trained, tmp_path):
    """Its old summary said step 1, not preempted, while checkpoints went on: report and sweep read it as done."""
    from scaling_jax.train.loop import Trainer

    copy = _copy(trained, tmp_path / "longer")
    trainer = Trainer(load_config(str(copy / "config.yaml"), ["train.steps=3", f"train.run_dir={copy}"]))

    def killed(step):
        raise KeyboardInterrupt

    trainer.add_hook(killed, every=2, at_end=False)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    with open(copy / run_dirs.SUMMARY_FILE) as f:
        summary = json.load(f)
    assert summary["step"] == 1 and summary["preempted"] is True and "resumed" in summary["stopped_by"]


def test_resuming_a_finished_run_keeps_its_validation_in_the_summary(trained, tmp_path):
    """No step is left, so nothing is evaluated: the summary still reports the run's last logged validation."""
    copy = _copy(trained, tmp_path / "done")
    with open(copy / run_dirs.SUMMARY_FILE) as f:
        before = json.load(f)
    assert "val_loss" in before
    assert main(["resume", str(copy)]) == 0
    with open(copy / run_dirs.SUMMARY_FILE) as f:
        after = json.load(f)
    assert (after["val_loss"], after["val_bpb"], after["val_step"]) == (before["val_loss"], before["val_bpb"],
                                                                       before["step"])


def test_resume_refuses_what_is_not_a_run_and_a_second_run_dir(trained, tmp_path, capsys):
    assert main(["resume", QUICKSTART]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    assert main(["resume", str(trained), f"train.run_dir={tmp_path / 'other'}"]) == 2
    assert f"resume trains in '{trained}' itself" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_a_run_written_before_markers_is_adopted(trained, tmp_path):
    copy = _copy(trained, tmp_path / "old")
    os.remove(copy / run_dirs.MARKER)
    assert run_dirs.is_run_dir(str(copy))
    assert main(["train", str(copy), "train.steps=2"]) == 0
    assert (copy / run_dirs.MARKER).exists() and Checkpointer(str(copy), 3).latest_step() == 2


@pytest.mark.parametrize("layout", ["project", "tokenizer_only", "our_config_their_checkpoints"])
def test_a_users_directory_that_looks_like_an_old_run_is_refused_and_kept(tmp_path, capsys, layout):
    """Only a config.yaml a run saved, beside step-numbered checkpoints or metrics, makes a run from before the
    marker; a project with its own config.yaml and checkpoints (or just a tokenizer folder) is someone's files."""
    user = tmp_path / "project"
    (user / "checkpoints").mkdir(parents=True)
    (user / "checkpoints" / "model.pt").write_text("weights")
    (user / "config.yaml").write_text("# mine\nlr: 3e-4\n")
    if layout == "tokenizer_only":
        shutil.rmtree(user)
        (user / "tokenizer").mkdir(parents=True)
        (user / "tokenizer" / "tokenizer.json").write_text("{}")
    if layout == "our_config_their_checkpoints":
        shutil.copy(QUICKSTART, user / "config.yaml")
    before = _tree_digest(user)
    assert not run_dirs.is_run_dir(str(user))
    assert main(["train", QUICKSTART, *TINY, f"train.run_dir={user}"]) == 2
    assert "already holds files that are not a scaling_jax run" in capsys.readouterr().err
    assert _tree_digest(user) == before


@pytest.mark.parametrize("existed", [False, True])
def test_a_failed_fresh_start_leaves_nothing_behind(tmp_path, capsys, existed):
    (tmp_path / "empty.txt").write_text("")
    run = tmp_path / "run"
    if existed:
        run.mkdir()
    assert main(["train", QUICKSTART, *TINY, f"train.run_dir={run}", f"data.source={tmp_path / 'empty.txt'}"]) == 2
    assert "gives no train documents" in capsys.readouterr().err
    assert (os.listdir(run) == []) if existed else not run.exists()
    nested = tmp_path / "made" / "for" / "it"  # every directory the start made goes, its parents too
    assert main(["train", QUICKSTART, *TINY, f"train.run_dir={nested}", f"data.source={tmp_path / 'empty.txt'}"]) == 2
    assert sorted(os.listdir(tmp_path)) == (["empty.txt", "run"] if existed else ["empty.txt"])
    # and the directory is not left locked: a good start right after works
    assert main(["train", QUICKSTART, *TINY, f"train.run_dir={run}"]) == 0


def test_a_failed_resume_keeps_every_file(trained, tmp_path, capsys):
    copy = _copy(trained, tmp_path / "run")
    before = _tree_digest(copy)
    assert main(["train", str(copy), "model.d_model=64"]) == 2
    assert "the config says 64" in capsys.readouterr().err
    assert _tree_digest(copy) == before


def test_several_processes_need_a_bucket_or_a_declared_shared_filesystem():
    local = load_config(None, ["train.run_dir=runs/x"]).train
    check_shared_storage(local, 1)
    with pytest.raises(CheckpointError, match="this job runs 2 processes.*train.shared_filesystem=true"):
        check_shared_storage(local, 2)
    check_shared_storage(load_config(None, ["train.run_dir=runs/x", "train.shared_filesystem=true"]).train, 2)
    check_shared_storage(load_config(None, ["train.run_dir=gs://bucket/runs/x"]).train, 2)


@pytest.mark.parametrize("preset", sorted(os.listdir("configs/tpu")))
def test_tpu_presets_ask_for_a_bucket(preset, tmp_path, capsys):
    config = load_config(os.path.join("configs/tpu", preset))
    assert config.train.run_dir == "", "a TPU preset must not default to a path on the VM's own disk"
    with pytest.raises(CheckpointError, match=r"train.run_dir=gs://BUCKET/runs/NAME"):
        run_dirs.check_claimable(config.train.run_dir)


def test_checkpoint_meta_of_an_older_checkpoint_gets_its_missing_fields():
    older = {"config": {"model": {}}, "tokenizer": "byte:384", "step": 7, "tokens": 700, "flops": 1.5,
             "wall_time": 3.0, "lineage": [{"stage": "pretrain"}], "a_field_from_the_future": 1}
    meta = run_dirs.CheckpointMeta.from_json(older)
    assert (meta.version, meta.total_step, meta.offset, meta.data_index) == (0, 7, {"step": 0, "tokens": 0,
                                                                                       "flops": 0.0}, None)
    assert meta.stage_record == {"stage": "pretrain"}
    again = run_dirs.CheckpointMeta.from_json(meta.to_json())
    assert again == meta


def test_a_trainer_run_directly_releases_its_lock(trained, tmp_path):
    from scaling_jax.train.lock import holds_run_lock
    from scaling_jax.train.loop import Trainer

    copy = str(_copy(trained, tmp_path / "run"))
    trainer = Trainer(load_config(os.path.join(copy, "config.yaml"), [f"train.run_dir={copy}", "train.steps=2"]))
    assert holds_run_lock(copy)
    trainer.run()
    assert not holds_run_lock(copy)


def test_a_run_saved_before_scanned_layers_resumes_in_its_own_layout(tmp_path, capsys):
    import yaml

    run = tmp_path / "old"
    assert main(["train", QUICKSTART, *TINY, f"train.run_dir={run}", "model.scan_layers=false"]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    del saved["model"]["scan_layers"]  # as config.yaml was written before the field existed
    saved["model"]["remat"] = False  # and remat was a bool
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    assert main(["train", str(run), "train.steps=2"]) == 0
    assert "resuming at step 1" in capsys.readouterr().out
    meta = run_dirs.CheckpointMeta.from_json({"config": {"model": {"layers": 2}}, "tokenizer": "t", "step": 1,
                                              "tokens": 1, "flops": 1.0})
    assert meta.config["model"]["scan_layers"] is False  # a checkpoint's meta from before the field


def test_a_failed_fresh_start_takes_back_the_parents_it_made_only_while_they_are_empty(tmp_path):
    """runs/exp/a claimed (making runs/exp), then runs/exp/b started beside it: a failed start of a deleted all of
    runs/exp, b's checkpoints included. Now a goes, and each parent a made goes only if nothing else is in it."""
    a, b = tmp_path / "runs" / "exp" / "a", tmp_path / "runs" / "exp" / "b"
    claimed = run_dirs.claim(str(a))
    assert claimed.made_parents == (str(tmp_path / "runs" / "exp"), str(tmp_path / "runs"))
    (b / "checkpoints").mkdir(parents=True)
    (b / "checkpoints" / "state").write_text("b's weights")
    run_dirs.discard_fresh(str(a), claimed)
    assert not a.exists() and (b / "checkpoints" / "state").read_text() == "b's weights"
    alone = tmp_path / "other" / "deep" / "run"
    run_dirs.discard_fresh(str(alone), run_dirs.claim(str(alone)))
    assert not (tmp_path / "other").exists()  # nothing else there: every parent it made is taken back
