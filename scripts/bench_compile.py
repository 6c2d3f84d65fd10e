"""Compile time of the train step vs depth, scanned layers against a block list (issue 17).

The trainer's real jitted step (``compute.build_compute``, as the trainer builds it) is lowered on
ShapeDtypeStructs and compiled for d_model 256 at 4 / 8 / 16 / 32 layers, ``model.scan_layers`` on and
off, side by side in one process; each shape is measured ``--repeats`` times (interleaved, best kept, so
load from other processes hits both layouts alike). Goal: scanned 32 layers <= 1.2 x scanned 4 layers.

    python scripts/bench_compile.py [--layers 4 8 16 32] [--repeats 2] [key=value ...]
"""

from __future__ import annotations

import argparse
import os
import time

import jax

from scaling_jax.config import Config, load_config
from scaling_jax.data.synthetic import example_batch
from scaling_jax.objectives.base import build_objective
from scaling_jax.train.compute import build_compute

SHAPE = ["model.series=custom", "model.d_model=256", "model.heads=4", "model.head_dim=64", "model.d_ff=1024",
         "data.seq_len=256", "data.batch_size=8", "optimizer.warmup_steps=1"]


def compile_seconds(config: Config) -> tuple[float, float]:
    """(trace + lower, XLA compile) seconds of a freshly built train step (nothing cached between calls)."""
    objective = build_objective(config.objective)
    d = config.data
    batch = objective.prepare(example_batch(d.batch_size, d.seq_len, config.model.vocab_size))
    compute = build_compute(config, objective, batch, devices=jax.devices()[:1])
    start = time.perf_counter()
    lowered = compute.lower(batch)
    traced = time.perf_counter()
    lowered.compile()
    return traced - start, time.perf_counter() - traced


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="extra config overrides, e.g. model.remat=full")
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(f"train step compile, d_model 256, 4x64 heads, d_ff 1024, seq 256, batch 8, fp32, "
          f"{' '.join(args.overrides) or 'no overrides'}; {jax.devices()[0].device_kind} x1, "
          f"{os.cpu_count()} cores; best of {args.repeats}; before: {load()}", flush=True)
    compile_seconds(load_config(None, SHAPE + ["model.layers=2", *args.overrides]))  # warm-up: JAX/XLA start-up
    best: dict[tuple[bool, int], tuple[float, float]] = {}
    for _ in range(args.repeats):
        for layers in args.layers:
            for scan in (True, False):
                config = load_config(None, SHAPE + [f"model.layers={layers}",
                                                    f"model.scan_layers={str(scan).lower()}", *args.overrides])
                got = compile_seconds(config)
                if (scan, layers) not in best or sum(got) < sum(best[scan, layers]):
                    best[scan, layers] = got
    print(f"{'layers':>6} {'scan: lower s':>14} {'compile s':>10} {'total s':>8} | "
          f"{'list: lower s':>14} {'compile s':>10} {'total s':>8}")
    for layers in args.layers:
        row = [f"{best[scan, layers][0]:14.2f} {best[scan, layers][1]:10.2f} {sum(best[scan, layers]):8.2f}"
               for scan in (True, False)]
        print(f"{layers:>6} {row[0]} | {row[1]}")
    lo, hi = min(args.layers), max(args.layers)
    for scan in (True, False):
        ratio = sum(best[scan, hi]) / sum(best[scan, lo])
        goal = " (goal <= 1.2)" if scan else ""
        print(f"{'scanned' if scan else 'block list'}: {hi}/{lo}-layer total compile ratio {ratio:.2f}{goal}")
    print(f"after: {load()}")


if __name__ == "__main__":
    main()
