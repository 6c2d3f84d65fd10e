"""Training metrics: a crash-tolerant JSONL log, TensorBoard mirror, progress bar, loss plot, peak FLOP/s.

``metrics.jsonl`` is the source of truth (one JSON object per line, appended and flushed per step) so a
killed run loses at most a torn last line, and an exact resume can cut the log back to its checkpoint.
TensorBoard, the progress bar and the plot are views of it. Pure Python/numpy/matplotlib on purpose (no
JAX) so it stays cheap to import from scripts and tests; TensorBoard and matplotlib are imported lazily.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, BinaryIO

import numpy as np
from tqdm import tqdm

from scaling_jax import paths
from scaling_jax.errors import CheckpointError
from scaling_jax.run_dir import METRICS_FILE, PLOTS_DIR, TENSORBOARD_DIR

ROLLBACK_WINDOW = "skipped_data_batches"  # a rollback row's [first, last] data batch it skipped
ROLLBACK_BATCH = "batch_size"  # ...in batches of this many rows (a resume may change the batch size)
PLAIN_PROGRESS_INTERVAL_S = 10.0  # non-TTY progress: one line at most this often, so CI logs stay readable

# Published vendor dense bf16 peaks, FLOP/s per device. Ordered most specific first: matching is by substring,
# so 'tpu v5 lite' / 'tpu v5e' must be tried before the bare 'tpu v5' (which is v5p).
_PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("tpu v5 lite", 197e12),
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),
    ("tpu v6 lite", 918e12),
    ("tpu v6e", 918e12),
    ("tpu v4", 275e12),
    ("h100 pcie", 756e12),  # the PCIe card's lower clocks and power (the SXM part is 989)
    ("h100", 989e12),
    ("h200", 989e12),
    ("a100", 312e12),
)


# ---------------------------------------------------------------------------------------------- reading


def _parse_line(line: bytes) -> dict:
    """One JSON object; anything else is a ValueError so the caller can tell torn from corrupt."""
    row = json.loads(line)
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    return row


def read_metrics(path: str) -> list[dict]:
    """All rows of a metrics.jsonl (local or in a bucket). A bad last line is a torn write from a kill and is
    dropped; a bad line anywhere else means the file was damaged, which must not pass silently."""
    with paths.open_file(path, "rb") as f:
        lines = [(n, line) for n, line in enumerate(f.read().split(b"\n"), start=1) if line.strip()]
    rows = []
    for i, (lineno, line) in enumerate(lines):
        try:
            rows.append(_parse_line(line))
        except ValueError as e:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{lineno}: corrupt metrics line ({e}); only the last line may be torn") from e
    return rows


# ---------------------------------------------------------------------------------------------- writing


def _to_python(value: Any) -> Any:
    """numpy scalars / 0-d arrays -> python scalars, so json and TensorBoard see plain numbers."""
    if isinstance(value, np.generic) or (isinstance(value, np.ndarray) and value.ndim == 0):
        return value.item()
    return value


def _is_number(value: Any) -> bool:
    """Numbers TensorBoard can plot; bools and strings are row annotations, not curves."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _encode_row(row: dict) -> bytes:
    """One complete line; NaN/inf kept (as JSON extensions) because a diverging loss is worth recording."""
    return (json.dumps(row, allow_nan=True) + "\n").encode("utf-8")


def _tail_start(f: BinaryIO, size: int, chunk: int = 1 << 16) -> int:
    """Offset just past the last newline (0 if none), scanning backwards so huge logs stay cheap."""
    end = size
    while end > 0:
        start = max(0, end - chunk)
        f.seek(start)
        idx = f.read(end - start).rfind(b"\n")
        if idx >= 0:
            return start + idx + 1
        end = start
    return 0


def _repair_tail(path: str) -> None:
    """Before appending, end the file with a newline: otherwise our next row would be glued onto a torn one.
    A complete-but-unterminated last row is kept; an unparsable fragment is cut off."""
    try:
        f = open(path, "rb+")
    except FileNotFoundError:
        return
    with f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        start = _tail_start(f, size)
        f.seek(start)
        try:
            _parse_line(f.read())
        except ValueError:
            f.truncate(start)
            return
        f.seek(0, os.SEEK_END)
        f.write(b"\n")


def _atomic_write_bytes(path: str, data: bytes) -> None:
    """Temp file in the same directory + fsync + os.replace: readers see the old or the new file, never half."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class MetricsWriter:
    """Appends one JSON row per call to run_dir/metrics.jsonl and mirrors numeric values to TensorBoard.

    ``enabled=False`` (non-zero JAX processes) turns every method into a no-op so callers need no ``if``.
    Files are opened lazily, so a writer that never writes creates nothing.
    """

    def __init__(self, run_dir: str, tensorboard: bool = True, enabled: bool = True) -> None:
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, METRICS_FILE)
        self._use_tensorboard = tensorboard
        self._enabled = enabled
        self._file: BinaryIO | None = None
        self._tb: Any = None
        self._purge_step: int | None = None

    def _open(self) -> BinaryIO:
        """Unbuffered append handle: each row reaches the kernel in one write, O_APPEND keeps rows whole."""
        if self._file is None:
            os.makedirs(self.run_dir, exist_ok=True)
            _repair_tail(self.path)
            self._file = open(self.path, "ab", buffering=0)
        return self._file

    def _tensorboard(self) -> Any:
        """Created on first use; after truncate_after, purge_step makes TensorBoard hide the abandoned steps."""
        if self._tb is None:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(self.run_dir, TENSORBOARD_DIR), purge_step=self._purge_step,
                                     flush_secs=30)
        return self._tb

    def write(self, row: dict) -> None:
        """Log one row (must contain 'step'); numeric values other than 'step' also become TB scalars."""
        if not self._enabled:
            return
        step = int(_to_python(row["step"]))
        clean = {"step": step, **{k: _to_python(v) for k, v in row.items() if k != "step"}}
        data = _encode_row(clean)
        f = self._open()
        written = f.write(data)
        while written is not None and written < len(data):  # partial raw writes are legal, if rare on files
            written += f.write(data[written:])
        f.flush()
        if self._use_tensorboard:
            tb = self._tensorboard()
            for key, value in clean.items():
                if key != "step" and _is_number(value):
                    tb.add_scalar(key, value, step)

    def truncate_after(self, step: int, data_index: int | None = None, batch_size: int = 1) -> list[dict]:
        """Exact resume from a checkpoint at ``step``: drop logged rows past it (and any torn line) so the
        log matches what the resumed run will re-log. A rollback's row sits at its checkpoint's step: it goes too
        when the resumed data position (batch ``data_index`` of ``batch_size`` rows) has not passed the batches
        it skipped, as the run will read them, roll back and log it again. The rewrite is atomic; a missing file
        is fine.
        Returns the rows kept (none where this process does not write the log)."""
        if not self._enabled:
            return []
        self._close_handles()
        self._purge_step = step + 1
        try:
            rows = read_metrics(self.path)
        except FileNotFoundError:
            return []
        except ValueError as e:  # a damaged line other than a torn last one
            raise CheckpointError(f"{str(e).splitlines()[0]}; repair or delete that line, then resume") from None
        def replayed(r: dict) -> bool:  # the window's last batch, in rows, not yet behind the resumed position
            window = r.get(ROLLBACK_WINDOW)
            return (data_index is not None and window is not None
                    and window[1] * r.get(ROLLBACK_BATCH, batch_size) >= data_index * batch_size)

        kept = [r for r in rows if r["step"] <= step and not replayed(r)]
        _atomic_write_bytes(self.path, b"".join(_encode_row(r) for r in kept))
        return kept

    def _close_handles(self) -> None:
        """Close the JSONL handle and the TB writer; both reopen lazily on the next write."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def close(self) -> None:
        """Flush and close; safe to call twice."""
        self._close_handles()


# ---------------------------------------------------------------------------------------------- progress


def _format_postfix(loss: float, tokens_per_s: float, extra: dict[str, float], note: str = "") -> str:
    """Compact 'loss=2.3456 tok/s=12345 mfu=0.412' so the bar fits a terminal line; ``note`` (preformatted,
    e.g. the projected final loss 'final≈2.345[2.30,2.40]') goes last, as given."""
    parts = [f"loss={loss:.4f}", f"tok/s={tokens_per_s:.0f}"]
    parts += [f"{k}={v:.4g}" if _is_number(v) else f"{k}={v}" for k, v in extra.items()]
    return " ".join(parts + ([note] if note else []))


def _isatty(stream: Any) -> bool:
    """True for an interactive terminal; captured or redirected streams (CI, pytest) are not."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class ProgressBar:
    """Live tqdm bar on a terminal; on a non-TTY (CI logs, files) plain newline-terminated lines at most every
    PLAIN_PROGRESS_INTERVAL_S seconds, since tqdm's carriage-return redraws turn into one endless log line.

    Steps are absolute: ``initial_step`` is where a resumed run starts. The first step includes compilation,
    so ETA is the rate from the first completed step on (the live bar appears at that step).
    ``enabled=False`` makes every method, ``write`` included, a no-op.
    """

    def __init__(self, total_steps: int, initial_step: int = 0, enabled: bool = True) -> None:
        self._enabled = enabled
        self._total = total_steps
        self._step = initial_step
        self._postfix = ""
        self._stream = sys.stderr
        self._start = time.monotonic()
        self._last_line_time: float | None = None
        self._last_line_step: int | None = None
        self._rate_from: tuple[float, int] | None = None  # (time, step) of the first completed step
        self._tty = enabled and _isatty(self._stream)
        self._bar: tqdm | None = None
        self._closed = not enabled

    def update(self, step: int, loss: float, tokens_per_s: float, note: str = "", **extra: float) -> None:
        """Move to absolute ``step`` and show loss and throughput (and ``note``, a preformatted postfix entry)."""
        if self._closed:
            return
        self._step = step
        self._postfix = _format_postfix(loss, tokens_per_s, extra, note)
        if self._tty:
            if self._bar is None:  # made at the first completed step, so tqdm's rate leaves compilation out
                self._bar = tqdm(total=self._total, initial=step, unit="step", mininterval=0.5, dynamic_ncols=True,
                                 file=self._stream, smoothing=0.1, postfix=self._postfix)
            self._bar.set_postfix_str(self._postfix, refresh=False)
            self._bar.update(step - self._bar.n)  # tqdm throttles redraws to mininterval
            return
        now = time.monotonic()
        self._rate_from = self._rate_from or (now, step)
        if self._last_line_time is None or now - self._last_line_time >= PLAIN_PROGRESS_INTERVAL_S:
            self._print_line(now)

    def _print_line(self, now: float) -> None:
        """One self-contained progress line: step/total, percent, postfix, elapsed and ETA."""
        elapsed = now - self._start
        since, first = self._rate_from or (now, self._step)
        done = self._step - first
        eta = tqdm.format_interval((self._total - self._step) * (now - since) / done) if done > 0 else "?"
        pct = 100.0 * self._step / self._total if self._total else 100.0
        print(f"step {self._step}/{self._total} ({pct:.0f}%) {self._postfix} | "
              f"elapsed {tqdm.format_interval(elapsed)} | eta {eta}", file=self._stream, flush=True)
        self._last_line_time, self._last_line_step = now, self._step

    def write(self, message: str) -> None:
        """Print a message line without garbling the live bar."""
        if not self._enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=self._stream)
        else:
            print(message, file=self._stream, flush=True)

    def close(self) -> None:
        """Final state stays visible: the bar is closed, or a last plain line is printed if one is owed."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif not self._tty and self._last_line_step != self._step:
            self._print_line(time.monotonic())


# ---------------------------------------------------------------------------------------------- plotting


def _series(rows: list[dict], x: str, y: str) -> tuple[list[float], list[float]]:
    """(x, y) pairs from rows that have both as finite numbers; NaN/inf would wreck autoscaling."""
    pairs = [(r[x], r[y]) for r in rows
             if _is_number(r.get(x)) and _is_number(r.get(y)) and math.isfinite(r[x]) and math.isfinite(r[y])]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _finish_axes(ax: Any, xlabel: str, ylabel: str, title: str) -> None:
    """Labels and a legend, or a visible 'no data' note instead of a silently empty panel."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    if not ax.lines and not ax.collections:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")


def _plot_loss_panel(ax: Any, rows: list[dict]) -> None:
    """Training loss as a line, validation loss as markers (evaluated only every eval_every steps)."""
    steps, loss = _series(rows, "step", "loss")
    if steps:
        ax.plot(steps, loss, label="train loss", linewidth=1.0)
    steps, val = _series(rows, "step", "val_loss")
    if steps:
        ax.plot(steps, val, "o-", label="val loss", markersize=4)
    _finish_axes(ax, "step", "loss (nats/token)", "Loss")


def _plot_bpb_panel(ax: Any, rows: list[dict], baseline_bpb: float | None) -> None:
    """Validation bits/byte against tokens seen: tokenizer-independent, comparable across runs."""
    tokens, bpb = _series(rows, "tokens", "val_bpb")
    if tokens:
        ax.plot(tokens, bpb, "o-", label="val bpb", markersize=4, color="tab:green")
    if baseline_bpb is not None:
        ax.axhline(baseline_bpb, linestyle="--", color="gray", label="unigram baseline")
    _finish_axes(ax, "tokens", "bits per byte", "Validation bits/byte")


def plot_loss(run_dir: str, baseline_bpb: float | None = None) -> str:
    """Write run_dir/plots/loss.png from metrics.jsonl and return its path.

    Uses a Figure with the Agg canvas directly instead of pyplot: no global backend switch, no GUI, no
    figure registry to leak, so it is safe on headless hosts and inside other programs.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = read_metrics(os.path.join(run_dir, METRICS_FILE))
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    _plot_loss_panel(left, rows)
    _plot_bpb_panel(right, rows, baseline_bpb)
    fig.suptitle(f"run {os.path.basename(os.path.abspath(run_dir))}")
    out_dir = os.path.join(run_dir, PLOTS_DIR)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "loss.png")
    tmp = f"{path}.{os.getpid()}.tmp"
    fig.savefig(tmp, format="png", dpi=120)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------- hardware


def peak_flops_per_device(device_kind: str) -> float | None:
    """Dense bf16 peak FLOP/s for a JAX ``device_kind`` (published vendor dense bf16 peaks, no sparsity), used
    as the MFU denominator. Case-insensitive substring match, most specific first; unknown (e.g. 'cpu') -> None
    so callers report no MFU rather than a made-up one."""
    kind = device_kind.lower()
    for key, flops in _PEAK_BF16_FLOPS:
        if key in kind:
            return flops
    return None
