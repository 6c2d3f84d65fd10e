"""Loop overhead: the full training loop's time per step vs a bare jitted step (goal <= 1.05).

Both run in this process on the same model, batch size and devices. The loop includes
everything a real run pays per step: grain data, host->device transfer, metrics fetch,
JSONL + TensorBoard writes, progress. The bare step reuses one device batch.

    python scripts/bench_step.py [CONFIG] [key=value ...] [--steps N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import jax

from scaling_jax.config import load_config
from scaling_jax.data.pipeline import make_iterator
from scaling_jax.model.family import flops_per_token, param_counts
from scaling_jax.train.loop import train
from scaling_jax.train.metrics import peak_flops_per_device, read_metrics
from scaling_jax.train.session import build_session
from scaling_jax.train.step import to_global

WARMUP = 5  # steps excluded from timing (compilation, first transfers)


def bare_seconds_per_step(config, steps: int) -> float:
    session = build_session(config)
    state = session.init_state()
    batch = to_global(next(make_iterator(session.train_ds, config.data)), session.batch_sharding)
    for _ in range(WARMUP):
        state, metrics = session.step_fn(state, batch)
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = session.step_fn(state, batch)
    jax.block_until_ready((state, metrics))
    return (time.perf_counter() - start) / steps


def loop_seconds_per_step(config, steps: int) -> float:
    with tempfile.TemporaryDirectory() as run_dir:
        config.train.run_dir = run_dir
        train(config)
        rows = {r["step"]: r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if "loss" in r}
    last = max(rows)
    return (rows[last]["wall_time"] - rows[WARMUP]["wall_time"]) / (last - WARMUP)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="configs/quickstart.yaml")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    overrides = [f"train.steps={args.steps + WARMUP}", "train.eval_every=0", "train.checkpoint_every=0",
                 "train.plot=false", "train.progress=false", "optimizer.warmup_steps=1", *args.overrides]
    config = load_config(args.config, overrides)
    bare_before = bare_seconds_per_step(config, args.steps)
    loop = loop_seconds_per_step(config, args.steps)
    bare_after = bare_seconds_per_step(config, args.steps)
    bare = statistics.mean([bare_before, bare_after])
    print(f"device: {jax.device_count()} x {jax.devices()[0].device_kind}; {args.steps} timed steps; "
          f"batch {config.data.batch_size} x {config.data.seq_len}")
    print(f"bare jitted step : {bare * 1e3:8.2f} ms/step "
          f"(before {bare_before * 1e3:.2f}, after {bare_after * 1e3:.2f})")
    print(f"full train loop  : {loop * 1e3:8.2f} ms/step")
    print(f"ratio loop/bare  : {loop / bare:8.3f}  (goal <= 1.05)")
    tokens = config.data.batch_size * config.data.seq_len
    flops = flops_per_token(config.model, config.data.seq_len) * tokens
    peak = config.train.peak_flops_per_device or peak_flops_per_device(jax.devices()[0].device_kind)
    print(f"model            : {param_counts(config.model).total:,} params, {flops:.3g} FLOPs/step, "
          f"{tokens / loop:,.0f} tokens/s in the loop")
    if peak:
        n = jax.device_count()
        print(f"MFU              : bare {flops / bare / (peak * n):.1%}, loop {flops / loop / (peak * n):.1%} "
              f"(peak {peak:.3g} FLOP/s per device)")


if __name__ == "__main__":
    main()
