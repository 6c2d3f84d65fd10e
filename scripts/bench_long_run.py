"""Long-run health: does the training process's memory grow over 2,000 tiny steps?

Runs the real loop in-process (periodic evaluation, async checkpoints, metrics JSONL and TensorBoard
all on) and samples the resident set size every time a metrics row is written. Reports RSS after
warm-up (compilation, the first evaluations and checkpoints are done, and the data set's temporaries
freed, by then) and at the end, the drift between the median RSS of the first and last post-warm-up
windows, and a least-squares slope over all post-warm-up samples.

    python scripts/bench_long_run.py            # ~1-2 min on a free 2-core CPU
    python scripts/bench_long_run.py --steps 5000
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np

from scaling_jax.config import load_config
from scaling_jax.train import metrics as metrics_lib
from scaling_jax.train.loop import train

TINY = ["model.series=custom", "model.layers=2", "model.d_model=64", "model.heads=2", "model.head_dim=32",
        "model.d_ff=128", "data.seq_len=64", "data.batch_size=8", "data.max_docs=200", "optimizer.warmup_steps=10",
        "train.eval_batches=2", "train.progress=false", "train.plot=false", "train.keep_checkpoints=2"]
MIB = 1 << 20


def rss_bytes() -> int:
    """Resident set size now (not the peak): /proc/self/statm's second field, in pages."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--every", type=int, default=250, help="eval and checkpoint interval")
    parser.add_argument("--warmup", type=int, default=500,
                        help="steps excluded from the drift (RSS settles after the data set's temporaries are freed)")
    parser.add_argument("--window", type=int, default=100, help="steps whose median RSS is one end of the drift")
    args = parser.parse_args()

    samples: dict[int, int] = {}
    write = metrics_lib.MetricsWriter.write

    def sampling_write(self, row: dict) -> None:
        write(self, row)
        samples[int(row["step"])] = rss_bytes()

    metrics_lib.MetricsWriter.write = sampling_write
    with tempfile.TemporaryDirectory() as run_dir:
        config = load_config("configs/quickstart.yaml", TINY + [
            f"train.steps={args.steps}", f"train.eval_every={args.every}", f"train.checkpoint_every={args.every}",
            f"train.run_dir={run_dir}"])
        summary = train(config)

    steps = np.array(sorted(s for s in samples if s >= args.warmup))
    rss = np.array([samples[s] for s in steps], dtype=np.float64)
    slope = np.polyfit(steps, rss, 1)[0] * 1000 / MIB
    print(f"{summary['step']} steps of a {summary['params']:,}-param model in {summary['wall_time']:.1f} s "
          f"(eval + async checkpoint every {args.every} steps, metrics JSONL + TensorBoard)")
    marks = [1] + list(range(args.every, args.steps + 1, args.every))
    print("RSS (MiB) at steps " + ", ".join(f"{m}: {samples[m] / MIB:.0f}" for m in marks if m in samples))
    first, last = np.median(rss[steps < steps[0] + args.window]), np.median(rss[steps > steps[-1] - args.window])
    drift = (last - first) / MIB
    print(f"RSS drift from steps {steps[0]}-{steps[0] + args.window} to {steps[-1] - args.window}-{steps[-1]} "
          f"(medians): {drift:+.1f} MiB ({100 * drift * MIB / first:+.2f}%); least-squares slope "
          f"{slope:+.2f} MiB per 1,000 steps")


if __name__ == "__main__":
    main()
