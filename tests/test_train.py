"""End to end on user files: JSONL and Parquet sources train, log, evaluate and learn."""

import json
import os

import jax
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scaling_jax.config import load_config
from scaling_jax.train.loop import train
from scaling_jax.train.metrics import read_metrics
from scaling_jax.train.session import build_session
from scaling_jax.train.step import to_global

TINY = ["model.series=custom", "model.layers=1", "model.d_model=64", "model.heads=2", "model.head_dim=32",
        "model.d_ff=128", "data.seq_len=32", "data.batch_size=8", "data.val_fraction=0.2", "train.eval_batches=2",
        "optimizer.lr=1e-2", "optimizer.warmup_steps=2", "train.progress=false", "train.tensorboard=false"]
TEXTS = [f"record {i}: the quick brown fox jumps over the lazy dog " * 3 for i in range(60)]


def _run(tmp_path, source, *extra):
    config = load_config(None, [*TINY, f"data.source={source}", f"train.run_dir={tmp_path / 'run'}", *extra])
    summary = train(config)
    rows = read_metrics(os.path.join(tmp_path, "run", "metrics.jsonl"))
    return summary, rows


@pytest.mark.slow
def test_trains_on_a_jsonl_source_and_beats_the_unigram_baseline(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(TEXTS)))
    summary, rows = _run(tmp_path, path, "data.format=jsonl", "data.text_field=body", "train.steps=40",
                         "train.eval_every=20")
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 40 and losses[-1] < losses[0]
    assert summary["val_bpb"] < summary["baseline_bpb"]  # repetitive text: context must help
    assert [r["step"] for r in rows if "val_bpb" in r] == [20, 40]
    assert os.path.exists(tmp_path / "run" / "plots" / "loss.png")
    assert os.path.exists(tmp_path / "run" / "config.yaml") and os.path.exists(tmp_path / "run" / "summary.json")


@pytest.mark.slow
def test_trains_on_a_parquet_source(tmp_path):
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"text": TEXTS}), path)
    summary, rows = _run(tmp_path, path, "train.steps=3", "train.plot=false")
    assert summary["step"] == 3 and summary["tokens"] == 3 * 8 * 32
    assert rows[-1]["flops"] == 3 * rows[0]["flops"]


def test_validation_is_next_token_loss_whatever_the_objective(tmp_path):
    """UL2's own loss covers only its targets; validation must still be comparable with causal runs."""
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    sessions = {name: build_session(load_config(None, [*TINY, f"data.source={path}", f"objective={name}"]))
                for name in ("causal", "ul2")}
    params = sessions["causal"].init_state().params
    nll = {}
    for name, session in sessions.items():
        batch = session.val_batches[0]
        assert "bidirectional" not in batch
        nll[name] = jax.device_get(session.eval_fn(params, to_global(batch, session.eval_sharding)))["nll_sum"]
    assert nll["ul2"] == nll["causal"]
    assert "bidirectional" in sessions["ul2"].batch_sharding  # training batches are UL2's
