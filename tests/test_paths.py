"""Run files on object stores: the remote branch runs on fsspec's in-memory store (the same code
path as gs://, with gcsfs swapped for memory), the local branch on tmp_path."""

import importlib
import os
import sys
import uuid

import pytest

from scaling_jax import paths
from scaling_jax.errors import CheckpointError
from scaling_jax.run_dir import MIRROR_SKIP


@pytest.fixture
def bucket():
    return f"memory://bucket-{uuid.uuid4().hex[:8]}/runs/lm"


def test_urls_stay_urls_and_local_paths_become_absolute(tmp_path):
    assert paths.is_remote("gs://b/run") and not paths.is_remote("runs/x") and not paths.is_remote("file:///x")
    assert paths.absolute("gs://b/run/") == "gs://b/run"  # os.path.abspath would give <cwd>/gs:/b/run
    assert paths.absolute("runs/x") == os.path.abspath("runs/x")
    assert paths.join("gs://b/run", "checkpoints", "3") == "gs://b/run/checkpoints/3"
    assert paths.join(str(tmp_path), "a") == os.path.join(str(tmp_path), "a")


@pytest.mark.parametrize("kind", ["local", "remote"])
def test_file_operations_behave_alike_on_both_kinds_of_path(kind, tmp_path, bucket):
    root = str(tmp_path / "run") if kind == "local" else bucket
    paths.prepare_dir(root)
    assert paths.isdir(root) and paths.listdir(root) == []  # the write probe is gone again
    paths.write_text(paths.join(root, "config.yaml"), "a: 1\n")
    paths.write_text(paths.join(root, "config.yaml"), "a: 2\n")
    paths.makedirs(paths.join(root, "shards"))
    for i in range(2):
        paths.write_text(paths.join(root, "shards", f"{i}.txt"), str(i))
    assert paths.read_text(paths.join(root, "config.yaml")) == "a: 2\n"
    assert paths.listdir(root) == ["config.yaml", "shards"]
    assert [os.path.basename(m) for m in paths.glob(paths.join(root, "shards", "*.txt"))] == ["0.txt", "1.txt"]
    assert all(paths.is_remote(m) == (kind == "remote") for m in paths.glob(paths.join(root, "shards", "*.txt")))
    paths.remove(paths.join(root, "shards"))
    assert not paths.exists(paths.join(root, "shards", "0.txt"))
    if kind == "remote":
        with pytest.raises(CheckpointError, match="append"):
            paths.open_file(paths.join(root, "metrics.jsonl"), "a")


def test_file_as_run_dir_is_one_line_error(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        paths.prepare_dir(str(tmp_path / "f"))


def test_mirror_pushes_only_changed_files_skips_checkpoints_and_pulls_them_back(tmp_path, bucket):
    mirror = paths.RunMirror(bucket, MIRROR_SKIP, cache_root=str(tmp_path / "cache"))
    assert mirror.local.startswith(str(tmp_path / "cache"))
    with open(os.path.join(mirror.local, "metrics.jsonl"), "a") as f:
        f.write('{"step": 1}\n')
    os.makedirs(os.path.join(mirror.local, "plots"))
    with open(os.path.join(mirror.local, "plots", "loss.png"), "wb") as f:
        f.write(b"\x89PNG")
    os.makedirs(os.path.join(mirror.local, "checkpoints", "1"))  # orbax writes these to the bucket itself
    with open(os.path.join(mirror.local, "checkpoints", "1", "x"), "w") as f:
        f.write("not mine")
    assert sorted(mirror.push()) == ["metrics.jsonl", os.path.join("plots", "loss.png")]
    assert mirror.push() == []  # nothing changed
    with open(os.path.join(mirror.local, "metrics.jsonl"), "a") as f:
        f.write('{"step": 2}\n')
    assert mirror.push() == ["metrics.jsonl"]
    assert "checkpoints" not in paths.listdir(bucket)

    resumed = paths.RunMirror(bucket, MIRROR_SKIP, cache_root=str(tmp_path / "other-host"))
    assert sorted(resumed.pull()) == ["metrics.jsonl", "plots/loss.png"]
    with open(os.path.join(resumed.local, "metrics.jsonl")) as f:
        assert f.read() == '{"step": 1}\n{"step": 2}\n'
    assert resumed.push() == []  # what was pulled is not sent back


def test_a_local_run_dir_is_its_own_mirror(tmp_path):
    mirror = paths.RunMirror(str(tmp_path), MIRROR_SKIP)
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    assert mirror.local == str(tmp_path) and mirror.push() == [] and mirror.pull() == []


def test_gs_without_gcsfs_names_the_extra_to_install(monkeypatch):
    registry = importlib.import_module("fsspec.registry")
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # as on a machine without the gcs extra
    for protocol in ("gs", "gcs"):
        monkeypatch.delitem(registry._registry, protocol, raising=False)  # forget an already imported gcsfs
    with pytest.raises(CheckpointError, match=r"scaling_jax\[gcs\]"):
        paths.exists("gs://bucket/run")


def test_pull_makes_the_mirror_an_exact_copy_and_keeps_the_lock(tmp_path, bucket):
    writer = paths.RunMirror(bucket, MIRROR_SKIP, cache_root=str(tmp_path / "a"))
    (open(os.path.join(writer.local, "metrics.jsonl"), "w")).close()
    writer.push()
    stale = paths.RunMirror(bucket, MIRROR_SKIP, cache_root=str(tmp_path / "b"))
    for name in ("old-run.png", ".lock"):  # left by an earlier run that used this cache; the lock is the trainer's
        with open(os.path.join(stale.local, name), "w") as f:
            f.write("x")
    assert stale.pull() == ["metrics.jsonl"]
    assert sorted(os.listdir(stale.local)) == [".lock", "metrics.jsonl"]
