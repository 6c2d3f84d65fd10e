"""A run directory in a Google Cloud Storage bucket, end to end, against a local GCS emulator.

The same code paths as a real bucket: orbax/tensorstore write checkpoints through the GCS JSON
API (``TENSORSTORE_GCS_HTTP_URL``), gcsfs carries everything else (``STORAGE_EMULATOR_HOST``),
and orbax's path layer uses gcsfs because ``EPATH_USE_TF=false``. The emulator serves from
memory in a thread of this process. It omits the ``x-goog-generation`` header of media downloads,
which tensorstore reads to version OCDBT manifests, so the fixture adds it the way GCS sends it.
"""

import json
import logging
import os
import socket
import tempfile

import pytest

from scaling_jax import paths
from scaling_jax.config import load_config
from scaling_jax.train.checkpoint import COMMIT_MARKER, DAMAGED_DIR, DIGEST_FILE
from scaling_jax.train.loop import train
from scaling_jax.train.metrics import read_metrics

BUCKET = "scaling-jax-test"
# A 1-layer, d_model 32 model on 30 documents: what is tested is where the run's files go, not the model.
RUN = ["model.series=custom", "model.layers=1", "model.d_model=32", "model.heads=1", "model.head_dim=32",
       "model.d_ff=64", "data.seq_len=32", "data.batch_size=8", "data.max_docs=30", "optimizer.warmup_steps=2",
       "train.eval_every=0", "train.eval_batches=2", "train.tensorboard=false", "train.progress=false",
       "train.checkpoint_every=2", "train.keep_checkpoints=3", "train.async_checkpointing=false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _forget_etils_choices() -> None:
    """etils caches whether to use TensorFlow for gs:// on its first path operation (any earlier test's local
    checkpoint), and the gcsfs instance it made then (with that emulator's listings, which a later module's
    emulator does not have); forget both so ``EPATH_USE_TF`` and this emulator apply."""
    from etils.epath import backend, gpath

    gpath._is_tf_installed.cache_clear()
    backend._FileSystemSpecBackend._get_filesystem.cache_clear()


def _with_generation_headers(download):
    def handler(request, response, storage, *args, **kwargs):
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = obj["generation"]
            response["x-goog-metageneration"] = obj["metageneration"]
        except Exception:  # a missing object: download answers 404 itself
            pass
        return download(request, response, storage, *args, **kwargs)
    return handler


def emulator_env(url: str) -> dict[str, str]:
    """What points gcsfs, tensorstore and orbax's paths at the emulator at ``url`` (``gcs`` sets it in this process;
    a Ray worker needs it too)."""
    return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",
            "EPATH_USE_TF": "false"}


@pytest.fixture(scope="module")
def gcs():
    # Imported here, not with the module: every test process collects this file, and gcsfs with aiohttp costs
    # ~1 s of a collection that `-m "not slow"` (which runs none of these tests) would pay for nothing.
    emulator = pytest.importorskip("gcp_storage_emulator.server", reason="needs the test extra (gcp-storage-emulator)")
    emulator_objects = pytest.importorskip("gcp_storage_emulator.handlers.objects")
    gcsfs = pytest.importorskip("gcsfs", reason="needs the gcs extra (gcsfs)")
    patch = pytest.MonkeyPatch()
    patch.setattr(emulator_objects, "download", _with_generation_headers(emulator_objects.download))
    port = _free_port()
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    # A client that hangs up early (tensorstore does, after a HEAD-like read) is not an error worth a traceback.
    server._api._httpd.handle_error = lambda request, client_address: None
    url = f"http://127.0.0.1:{port}"
    env = emulator_env(url)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    quiet = {name: logging.getLogger(name).level for name in ("gcsfs", "gcp_storage_emulator")}
    for name in quiet:  # "no default credentials" / "not found" probes are expected against an emulator
        logging.getLogger(name).setLevel(logging.CRITICAL)
    gcsfs.GCSFileSystem.clear_instance_cache()
    _forget_etils_choices()
    try:
        yield gcsfs.GCSFileSystem()
    finally:
        gcsfs.GCSFileSystem.clear_instance_cache()
        _forget_etils_choices()
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        for name, level in quiet.items():
            logging.getLogger(name).setLevel(level)
        server.stop()
        patch.undo()


def _on_host(monkeypatch, root) -> None:
    """A fresh machine: the run's local mirror lives under the temp dir, so a new temp dir is a new host."""
    monkeypatch.setattr(tempfile, "tempdir", str(root))


def _losses(rows) -> dict:
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


@pytest.mark.slow
def test_bucket_run_resumes_on_a_new_host_past_a_damaged_checkpoint_and_matches_a_local_run(
        gcs, tmp_path, monkeypatch, capfd):
    run = f"gs://{BUCKET}/runs/lm"
    _on_host(monkeypatch, tmp_path / "host-a")
    train(load_config("configs/quickstart.yaml", RUN + ["train.steps=4", f"train.run_dir={run}"]))

    files = paths.file_sizes(run)
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "lineage.json", "tokenizer/tokenizer_info.json",
                 "plots/loss.png", f"checkpoints/4/{DIGEST_FILE}", f"checkpoints/4/{COMMIT_MARKER}"):
        assert name in files, f"{name} missing from the bucket"
    assert not any(name.startswith(".lock") for name in files)  # the lock stays on the host
    assert json.loads(paths.read_text(paths.join(run, "summary.json")))["step"] == 4
    assert json.loads(paths.read_text(paths.join(run, "lineage.json")))[-1]["run_dir"] == run

    # Flip one byte of an array file of the newest checkpoint, in the bucket.
    array_file = next(name for name in files if name.startswith("checkpoints/4/state/") and "/d/" in name)
    blob = f"{BUCKET}/runs/lm/{array_file}"
    data = bytearray(gcs.cat_file(blob))
    data[len(data) // 2] ^= 0xFF
    gcs.pipe_file(blob, bytes(data))

    _on_host(monkeypatch, tmp_path / "host-b")  # nothing local survives: metrics, tokenizer come back from the bucket
    summary = train(load_config("configs/quickstart.yaml", RUN + ["train.steps=6", f"train.run_dir={run}"]))
    assert summary["step"] == 6
    err = capfd.readouterr().err
    assert "checkpoints/4 is damaged" in err and "not deleted" in err
    moved = [name for name in paths.file_sizes(paths.join(run, DAMAGED_DIR)) if name.startswith("4-")]
    assert moved, "the damaged step was not moved aside in the bucket"

    local_dir = tmp_path / "local"
    train(load_config("configs/quickstart.yaml", RUN + ["train.steps=6", f"train.run_dir={local_dir}"]))
    bucket_rows = read_metrics(paths.join(run, "metrics.jsonl"))
    local_rows = read_metrics(os.path.join(local_dir, "metrics.jsonl"))
    assert sorted(_losses(bucket_rows)) == list(range(1, 7))  # steps 3-4 were retrained, not duplicated
    assert _losses(bucket_rows) == _losses(local_rows)  # the resumed bucket run is bit-for-bit the local one


@pytest.mark.slow
def test_a_stage_continues_a_bucket_parent_into_a_bucket_child_that_eval_can_load(gcs, tmp_path, monkeypatch,
                                                                                   capsys):
    from scaling_jax.cli import main
    from scaling_jax.eval.harness import load_run

    parent, child = f"gs://{BUCKET}/stages/lm", f"gs://{BUCKET}/stages/lm-ul2r"
    _on_host(monkeypatch, tmp_path / "host")
    train(load_config("configs/quickstart.yaml", RUN + ["train.steps=2", f"train.run_dir={parent}"]))
    before = {name: gcs.cat_file(f"{BUCKET}/stages/lm/{name}") for name in paths.file_sizes(parent)}
    assert main(["continue", "--from", parent, "--stage", "configs/stages/ul2r.yaml", "budget.steps=2"]) == 0

    lineage = json.loads(paths.read_text(paths.join(child, "lineage.json")))  # the default child name, in the bucket
    assert [entry["run_dir"] for entry in lineage] == [parent, child]
    assert lineage[-1]["parent"] == f"{parent}/checkpoints/2" and lineage[-1]["start_step"] == 2
    after = {name: gcs.cat_file(f"{BUCKET}/stages/lm/{name}") for name in paths.file_sizes(parent)}
    assert after == before  # the parent is only read
    loaded = load_run(child)
    assert loaded.step == 2 and loaded.objective == "ul2" and loaded.run_dir == child
    capsys.readouterr()
    assert main(["info", child]) == 0
    assert "ul2r" in capsys.readouterr().out  # its lineage, read from the bucket
