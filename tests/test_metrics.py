"""Metrics log, TensorBoard mirror, progress output, loss plot and peak FLOP/s lookup."""

import glob
import io
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scaling_jax.train.metrics import (
    METRICS_FILE,
    ROLLBACK_WINDOW,
    MetricsWriter,
    ProgressBar,
    peak_flops_per_device,
    plot_loss,
    read_metrics,
)


def _log(tmp_path, rows, **kwargs):
    """A run dir whose metrics.jsonl holds ``rows``, written through the real writer."""
    writer = MetricsWriter(str(tmp_path), tensorboard=False, **kwargs)
    for row in rows:
        writer.write(row)
    writer.close()
    return tmp_path / METRICS_FILE


def _tb_events(run_dir):
    """Decode TFRecord-framed Event protos from every events file under run_dir/tensorboard."""
    from tensorboardX.proto import event_pb2

    events = []
    for path in sorted(glob.glob(os.path.join(run_dir, "tensorboard", "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[pos + 12:pos + 12 + length])  # skip length + its crc; data crc follows
            events.append(event)
            pos += 12 + length + 4
    return events


def test_write_roundtrips_numpy_scalars_and_nonfinite_values(tmp_path):
    path = _log(tmp_path, [{"step": np.int64(1), "loss": np.float32(2.5), "gn": float("nan"), "lr": np.array(1e-3),
                            "peak": float("inf"), "note": "warmup", "x": None}])
    text = path.read_text()
    assert text.endswith("\n") and text.count("\n") == 1
    (row,) = read_metrics(str(path))
    assert row["step"] == 1 and type(row["step"]) is int and row["loss"] == 2.5 and row["lr"] == pytest.approx(1e-3)
    assert math.isnan(row["gn"]) and row["peak"] == math.inf and row["note"] == "warmup" and row["x"] is None


def test_reader_ignores_torn_last_line(tmp_path):
    path = _log(tmp_path, [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.9}])
    with open(path, "a") as f:
        f.write('{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(str(path))] == [1, 2]


def test_reader_rejects_corrupt_middle_line(tmp_path):
    path = tmp_path / METRICS_FILE
    path.write_text('{"step": 1}\n{"step": 2, oops\n{"step": 3}\n')
    with pytest.raises(ValueError, match=rf"{METRICS_FILE}:2: corrupt metrics line"):
        read_metrics(str(path))


def test_appending_after_torn_line_does_not_glue_rows(tmp_path):
    path = _log(tmp_path, [{"step": 1}])
    with open(path, "a") as f:
        f.write('{"step": 2, "lo')
    _log(tmp_path, [{"step": 2, "loss": 1.0}])
    assert read_metrics(str(path)) == [{"step": 1}, {"step": 2, "loss": 1.0}]
    assert path.read_text().count("\n") == 2


def test_truncate_after_keeps_only_earlier_steps_atomically(tmp_path, monkeypatch):
    path = _log(tmp_path, [{"step": s, "loss": 1.0 / s} for s in range(1, 6)] + [{"step": 4, "val_loss": 0.3}])
    writer = MetricsWriter(str(tmp_path), tensorboard=False)
    writer.write({"step": 99})  # an open append handle must not survive the truncation
    with open(path, "a") as f:
        f.write('{"step": 6')  # torn tail from the kill
    before = path.read_bytes()
    seen = {}
    real_replace = os.replace

    def spy_replace(src, dst):
        seen.update(src=src, dst=dst, dst_during=Path(dst).read_bytes(), src_rows=Path(src).read_text().count("\n"))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy_replace)
    writer.truncate_after(3)
    writer.write({"step": 4, "loss": 0.2})
    writer.close()
    assert seen["dst"] == str(path) and seen["src"] != seen["dst"] and seen["src_rows"] == 3
    assert seen["dst_during"] == before  # old file untouched until the rename
    assert [(r["step"], r.get("loss")) for r in read_metrics(str(path))] == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.2)]
    assert os.listdir(tmp_path) == [METRICS_FILE]  # no temp file left behind


def test_a_rollback_the_resumed_run_will_replay_is_dropped_and_the_dropped_updates_are_counted_on(tmp_path):
    """Rolled back to step 3 (skipping batches 3-4), then killed before the next save: the resume restores step 3
    at data batch 3, replays the window and logs the rollback again (it was in the log twice, and the summary's
    skipped_updates restarted at 0 on every resume)."""
    from scaling_jax.train.health import NonFinitePolicy

    rows = [{"step": s, "loss": 1.0, "skipped": 0.0} for s in (1, 2, 3)] + [
        {"step": 2, "loss": 1.0, "skipped": 1.0},  # a skipped update kept in the log
        {"step": 3, "rollback_from_step": 5, ROLLBACK_WINDOW: [3, 4]}, {"step": 4, "loss": 1.0, "skipped": 0.0}]
    _log(tmp_path, rows)
    writer = MetricsWriter(str(tmp_path), tensorboard=False)
    assert ROLLBACK_WINDOW in str(writer.truncate_after(3, data_index=5))  # restored past the window: kept
    kept = writer.truncate_after(3, data_index=3)  # ...but here the window lies ahead again
    assert [r["step"] for r in kept] == [1, 2, 3, 2] and ROLLBACK_WINDOW not in str(kept)
    _log(tmp_path / "bigger", [{"step": 3, "rollback_from_step": 5, ROLLBACK_WINDOW: [3, 4], "batch_size": 8}])
    bigger = MetricsWriter(str(tmp_path / "bigger"), tensorboard=False)  # resumed at batch 32: compared in rows
    assert len(bigger.truncate_after(3, data_index=2, batch_size=32)) == 1  # rows 0-63 are past batch 4 of 8
    assert bigger.truncate_after(3, data_index=1, batch_size=32) == []  # rows 0-31 are not
    policy = NonFinitePolicy("rollback", ["w"], max_rollbacks=3)
    policy.count_logged(rows[:5])
    assert policy.skipped == 2


def test_truncate_after_missing_file_is_fine(tmp_path):
    MetricsWriter(str(tmp_path / "run")).truncate_after(10)
    assert not (tmp_path / "run" / METRICS_FILE).exists()


def test_disabled_writer_writes_nothing(tmp_path):
    run = tmp_path / "run"
    writer = MetricsWriter(str(run), tensorboard=True, enabled=False)
    writer.truncate_after(0)
    writer.write({"step": 1, "loss": 1.0})
    writer.close()
    assert not run.exists()


def test_tensorboard_events_written(tmp_path):
    writer = MetricsWriter(str(tmp_path))
    writer.write({"step": 1, "loss": 2.0, "note": "skip me", "mfu": None, "ok": True})
    writer.write({"step": 2, "loss": np.float32(1.5)})
    writer.close()
    files = glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
    assert files and all(os.path.getsize(f) > 0 for f in files)
    scalars = [(e.step, v.tag, v.simple_value) for e in _tb_events(tmp_path) for v in e.summary.value]
    assert scalars == [(1, "loss", 2.0), (2, "loss", 1.5)]


def test_truncate_after_tells_tensorboard_to_purge_later_steps(tmp_path):
    writer = MetricsWriter(str(tmp_path))
    writer.truncate_after(7)
    writer.write({"step": 8, "loss": 1.0})
    writer.close()
    starts = [e.step for e in _tb_events(tmp_path) if e.HasField("session_log")]
    assert starts == [8]


def test_tensorboard_off_writes_no_event_files(tmp_path):
    _log(tmp_path, [{"step": 1, "loss": 1.0}])
    assert not (tmp_path / "tensorboard").exists()


def test_plot_loss_writes_png(tmp_path):
    rows = [{"step": s, "loss": 4.0 / s, "tokens": 256 * s} for s in range(1, 9)]
    rows += [{"step": 4, "tokens": 1024, "val_loss": 1.2, "val_bpb": 1.9}, {"step": 8, "tokens": 2048, "val_loss": 1.0,
             "val_bpb": 1.6}, {"step": 9, "loss": float("nan")}, {"step": 10, "note": "no numbers here"}]
    _log(tmp_path, rows)
    path = plot_loss(str(tmp_path), baseline_bpb=2.5)
    assert path == str(tmp_path / "plots" / "loss.png")
    assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(tmp_path / "plots") == ["loss.png"]


def test_plot_loss_without_validation_rows_still_writes_png(tmp_path):
    _log(tmp_path, [{"step": 1, "loss": 3.0}])
    assert Path(plot_loss(str(tmp_path))).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("kind, peak", [
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("tpu v5e", 197e12), ("TPU v5p", 459e12), ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12), ("TPU v6e", 918e12), ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-40GB", 312e12), ("cpu", None), ("", None),
])
def test_peak_flops_lookup(kind, peak):
    assert peak_flops_per_device(kind) == peak


def test_progress_bar_runs_without_tty(capsys):
    bar = ProgressBar(total_steps=100, initial_step=10)
    for step in range(11, 51):
        bar.update(step, loss=2.0 + 1 / step, tokens_per_s=12345.6, mfu=0.41234)
    bar.write("step 50: val loss 1.9")
    bar.close()
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    # sparse: the first update, the message, and the final state; not one line per step
    assert lines[0].startswith("step 11/100 (11%) loss=2.0909 tok/s=12346 mfu=0.4123 | elapsed")
    assert lines[1] == "step 50: val loss 1.9"
    assert lines[2].startswith("step 50/100 (50%)") and "eta" in lines[2] and len(lines) == 3


def test_progress_eta_leaves_out_the_first_steps_compilation(capsys, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr("scaling_jax.train.metrics.time.monotonic", lambda: clock[0])
    bar = ProgressBar(total_steps=101)
    clock[0] = 300.0  # the first step compiles for 5 minutes
    bar.update(1, loss=2.0, tokens_per_s=1.0)
    for step in range(2, 52):  # then 1 s per step
        clock[0] += 1.0
        bar.update(step, loss=2.0, tokens_per_s=1.0)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("step 1/101") and lines[0].endswith("eta ?")  # no rate from one step
    # 50 steps left at 1 s each, not 50 * 350 / 51 s (05:43) as counted from the start
    assert lines[-1].startswith("step 51/101") and "elapsed 05:50" in lines[-1] and lines[-1].endswith("eta 00:50")


def test_progress_bar_on_tty_draws_live_bar(monkeypatch):
    class FakeTTY(io.StringIO):
        def isatty(self):
            return True

    fake = FakeTTY()
    monkeypatch.setattr(sys, "stderr", fake)
    bar = ProgressBar(total_steps=20)
    for step in range(1, 21):
        bar.update(step, loss=1.5, tokens_per_s=1000.0)
    bar.write("hello")
    bar.close()
    out = fake.getvalue()
    assert "20/20" in out and "loss=1.5000" in out and "hello\n" in out and "step" in out


def test_disabled_progress_bar_prints_nothing(capsys):
    bar = ProgressBar(total_steps=5, enabled=False)
    bar.update(1, loss=1.0, tokens_per_s=1.0)
    bar.write("x")
    bar.close()
    assert capsys.readouterr() == ("", "")


def test_module_does_not_import_jax():
    code = "import sys, scaling_jax.train.metrics; assert 'jax' not in sys.modules, 'jax imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_written_lines_are_plain_json_objects(tmp_path):
    path = _log(tmp_path, [{"loss": 1.0, "step": 3}])
    assert json.loads(path.read_text()) == {"step": 3, "loss": 1.0}
    assert path.read_text().startswith('{"step": 3')  # step first: greppable logs
    assert read_metrics(str(path)) == [{"step": 3, "loss": 1.0}]
