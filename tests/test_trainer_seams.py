"""The trainer's seams: synthetic rows, hooks every N steps, a profiler trace, the compute built once."""

import glob

import numpy as np
import pytest

from scaling_jax.config import load_config
from scaling_jax.data.synthetic import SyntheticRows, example_batch, text_ids, uniform_bits_per_byte
from scaling_jax.data.tokenizer import build_tokenizer
from scaling_jax.errors import ConfigError
from scaling_jax.run_dir import METRICS_FILE, TENSORBOARD_DIR
from scaling_jax.train.loop import Trainer, begin_from
from scaling_jax.train.metrics import read_metrics
from scaling_jax.train.start import StartSpec

TINY = ["model.series=custom", "model.layers=1", "model.d_model=32", "model.heads=2", "model.head_dim=16",
        "model.d_ff=64", "data.seq_len=32", "data.batch_size=8", "train.eval_batches=1", "optimizer.warmup_steps=1",
        "train.progress=false", "train.plot=false", "data.source=synthetic"]


def test_synthetic_rows_are_a_pure_function_of_seed_and_index():
    ids = np.arange(10, 20)
    rows, again, other = SyntheticRows(63, ids, seed=1), SyntheticRows(63, ids, seed=1), SyntheticRows(63, ids, seed=2)
    for i in (0, 7, 2**30):
        assert all(np.array_equal(rows[i][k], again[i][k]) for k in ("tokens", "segment_ids"))
    assert not np.array_equal(rows[5]["tokens"], other[5]["tokens"])
    row = rows[3]
    assert row["tokens"].shape == row["segment_ids"].shape == (64,)
    assert set(row["tokens"].tolist()) <= set(ids.tolist())
    seg = row["segment_ids"]
    assert seg[0] == 1 and np.all(np.diff(seg) >= 0) and np.all(np.diff(seg) <= 1)  # packed documents from 1


def test_synthetic_documents_have_the_requested_mean_length():
    rows = SyntheticRows(255, np.arange(3, 259), mean_doc_len=32)
    starts = sum(int(rows[i]["segment_ids"][-1]) - 1 for i in range(400))  # boundaries after each row's first
    assert starts / (400 * 255) == pytest.approx(1 / 32, rel=0.1)


def test_uniform_text_tokens_cost_log2_of_their_count_per_byte():
    byte = build_tokenizer("byte")
    assert len(text_ids(byte.token_byte_lengths())) == 256
    assert uniform_bits_per_byte(byte.token_byte_lengths()) == pytest.approx(8.0)  # log2(256) bits, 1 byte each
    lengths = np.array([0, 0, 1, 2, 2, 3])  # four text ids of 1, 2, 2, 3 bytes: 2 bits over 2 bytes per token
    assert uniform_bits_per_byte(lengths) == pytest.approx(1.0)
    batch = example_batch(3, 15, 50)
    assert batch["tokens"].shape == (3, 16) and batch["tokens"].min() >= 3 and batch["tokens"].max() < 50


def test_hooks_run_every_n_steps_in_order_after_the_metrics_they_wait_for(tmp_path):
    """A caller's hooks run on schedule; an ``after_log`` hook finds its step already in metrics.jsonl, and the
    profiler hook leaves a trace of the requested steps for TensorBoard."""
    run = tmp_path / "run"
    config = load_config(None, [*TINY, "train.steps=4", "train.eval_every=0", "train.checkpoint_every=0",
                                "train.profile_steps=1", "train.profile_skip=2", f"train.run_dir={run}"])
    trainer = Trainer(config)
    calls = []
    trainer.add_hook(lambda step: calls.append(("every2", step)), every=2, at_end=False)
    trainer.add_hook(lambda step: calls.append(("logged", step, max(r["step"] for r in
                                                                   read_metrics(str(run / METRICS_FILE))))),
                     every=3, after_log=True)
    summary = trainer.run()
    assert summary["step"] == 4 and summary["baseline_bpb"] == pytest.approx(8.0)  # synthetic: uniform bytes
    assert calls == [("every2", 2), ("logged", 3, 3), ("every2", 4), ("logged", 4, 4)]
    assert glob.glob(str(run / TENSORBOARD_DIR / "plugins" / "profile" / "*" / "*.xplane.pb"))


def test_a_checkpoint_is_never_ahead_of_the_metrics_log(tmp_path):
    """When a step's checkpoint is saved its row is already in metrics.jsonl: a run killed just after the save
    resumes after that step, so a row written later would be lost for good."""
    from scaling_jax.train.checkpoint import Checkpointer

    run = tmp_path / "run"
    config = load_config(None, [*TINY, "train.steps=4", "train.eval_every=0", "train.checkpoint_every=2",
                                "train.async_checkpointing=false", f"train.run_dir={run}"])
    trainer, seen = Trainer(config), []
    trainer.add_hook(lambda step: seen.append((step, Checkpointer(str(run), 3).latest_step(),
                                               max(r["step"] for r in read_metrics(str(run / METRICS_FILE))))),
                     every=2)
    trainer.run()
    assert seen == [(2, 2, 2), (4, 4, 4)]


def test_step_time_leaves_out_the_time_hooks_take(tmp_path):
    """An eval-like hook (logs first) and a save-like one each take 0.5 s; no step's time, and so no tokens/s or
    MFU, counts them (they were added to the step after the hook, and the step a hook logged got ~0 s)."""
    import time

    config = load_config(None, [*TINY, "train.steps=7", "train.eval_every=0", "train.checkpoint_every=0",
                                f"train.run_dir={tmp_path / 'run'}"])
    trainer = Trainer(config)
    trainer.add_hook(lambda step: time.sleep(0.5), every=2, at_end=False, after_log=True)
    trainer.add_hook(lambda step: time.sleep(0.5), every=3, at_end=False)
    trainer.run()
    rows = [r for r in read_metrics(str(tmp_path / "run" / METRICS_FILE)) if "step_time" in r]
    assert [r["step"] for r in rows] == list(range(1, 8))
    later = [r["step_time"] for r in rows[2:]]  # steps 1 and 2 also compile and warm up (4.3 and 0.6 s alone)
    assert max(later) < 0.35 and min(later) > 0, later  # a hook's 0.5 s would show


def test_each_step_time_is_its_device_time_when_dispatch_runs_ahead(tmp_path):
    """As on a GPU: the host queues a step and goes on; the device's work (here a 0.2 s callback after each step)
    is waited for only when the step's metrics are fetched. Every logged time past the two warm-up steps is that
    step's 0.2 s (timing loop rounds gave the first queued step ~0 s and the last one two steps' wait)."""
    import time

    import jax

    config = load_config(None, [*TINY, "train.steps=6", "train.eval_every=0", "train.checkpoint_every=0",
                                f"train.run_dir={tmp_path / 'run'}"])
    trainer = Trainer(config)
    compute = trainer.session.compute
    real_step = compute.step_fn

    def device_work(x):
        time.sleep(0.2)
        return x

    after_step = jax.jit(lambda x: jax.pure_callback(device_work, jax.ShapeDtypeStruct(x.shape, x.dtype), x))

    def queued_step(state, batch):
        state, metrics = real_step(state, batch)
        return state, {**metrics, "loss": after_step(metrics["loss"])}

    compute.step_fn = queued_step
    trainer.run()
    rows = [r for r in read_metrics(str(tmp_path / "run" / METRICS_FILE)) if "step_time" in r]
    assert [r["step"] for r in rows] == list(range(1, 7))
    later = [r["step_time"] for r in rows[2:]]
    assert all(0.15 < t < 0.35 for t in later), later
    assert rows[1]["step_time"] > 0.15  # the second step too (it recompiles on CPU, so no upper bound)


def test_the_start_spec_is_the_stage_section_and_decides_between_fresh_and_parent_weights():
    fresh = load_config(None, TINY)
    assert StartSpec.from_config(fresh) == StartSpec() and StartSpec().kind == "scratch"
    child = load_config(None, [*TINY, "stage.parent=/runs/a/checkpoints/40", "stage.optimizer_state=continue",
                               "stage.extend_vocab=true"])
    spec = StartSpec.from_config(child)
    assert (spec.kind, spec.parent, spec.optimizer_state, spec.extend_vocab) == \
        ("parent", "/runs/a/checkpoints/40", "continue", True)
    made = []
    start = begin_from(lambda session: made.append(session) or "state", "a session")  # a start function wins
    assert start == "state" and made == ["a session"]


def test_profile_settings_are_checked():
    with pytest.raises(ConfigError, match="train.profile_skip"):
        load_config(None, [*TINY, "train.profile_steps=2", "train.profile_skip=0"])
