"""UL2 Mixture-of-Denoisers transform throughput vs the trainer's consumption (goal: >= 10x).

The transform runs on the host inside grain; if it were slower than the jitted step the
device would wait for data. Both are measured in this process on the same config: the
transform on real packed rows of the embedded corpus, the step on one prepared batch. With
``--workers 0,4,8`` the whole training stream (shuffle, batch, transform; what the trainer
iterates) is also timed with that many grain worker processes (``data.worker_processes``; 0:
threads in this process), first batch excluded.

    python scripts/bench_denoise.py [CONFIG] [key=value ...] [--seconds S] [--workers 0,4,8]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import numpy as np

from scaling_jax.config import load_config
from scaling_jax.data.pipeline import make_iterator
from scaling_jax.train.session import build_session
from scaling_jax.train.step import to_global

WARMUP, STEPS = 3, 10


def row_batches(rows, batch_size: int, count: int) -> list[dict]:
    """``count`` distinct batches of consecutive packed rows, stacked as grain hands them over."""
    out = []
    for b in range(count):
        items = [rows[(b * batch_size + j) % len(rows)] for j in range(batch_size)]
        out.append({k: np.stack([it[k] for it in items]) for k in items[0]})
    return out


def transform_tokens_per_s(prepare, batches: list[dict], seconds: float) -> tuple[float, dict]:
    """Model-batch tokens (batch x seq_len slots) produced per second, over at least ``seconds``."""
    prepare(batches[0])  # warm caches (per-length budgets)
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        last = prepare(batches[calls % len(batches)])
        calls += 1
    return calls * last["inputs"].size / elapsed, last


def step_tokens_per_s(session, batch: dict) -> float:
    state = session.init_state()
    device_batch = to_global(batch, session.batch_sharding)
    for _ in range(WARMUP):
        state, metrics = session.step_fn(state, device_batch)
    jax.block_until_ready((state, metrics))
    start = time.perf_counter()
    for _ in range(STEPS):
        state, metrics = session.step_fn(state, device_batch)
    jax.block_until_ready((state, metrics))
    return batch["inputs"].size * STEPS / (time.perf_counter() - start)


def stream_tokens_per_s(session, workers: int, seconds: float) -> float:
    """The trainer's batch stream with ``workers`` worker processes: model-batch tokens per second."""
    cfg = dataclasses.replace(session.config.data, worker_processes=workers)
    stream = make_iterator(session.train_ds, cfg)
    try:
        next(stream)  # start-up (worker processes import the pipeline) is not throughput
        batches, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            last = next(stream)
            batches += 1
        return batches * last["inputs"].size / elapsed
    finally:
        stream.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="configs/quickstart.yaml")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum time the transform is measured")
    parser.add_argument("--workers", default="", help="comma-separated worker-process counts for the stream")
    args = parser.parse_args()
    config = load_config(args.config, ["objective=ul2", *args.overrides])
    session = build_session(config)
    d = config.data
    batches = row_batches(session.data.train_rows, d.batch_size, 64)
    transform, sample = transform_tokens_per_s(session.objective.prepare, batches, args.seconds)
    trainer = step_tokens_per_s(session, session.objective.prepare(batches[0]))
    shape = batches[0]["tokens"].shape
    print(f"device: {jax.device_count()} x {jax.devices()[0].device_kind}; rows {shape[0]} x {shape[1]} "
          f"(mixture {config.objective.mixture}, {config.objective.examples_per_row} example(s)/row)")
    print(f"MoD transform    : {transform:12,.0f} tokens/s (host, one thread)")
    print(f"trainer step     : {trainer:12,.0f} tokens/s ({config.model.series}, jitted step)")
    print(f"ratio            : {transform / trainer:12.1f}x  (goal >= 10x)")
    for workers in [int(w) for w in args.workers.split(",") if w]:
        stream = stream_tokens_per_s(session, workers, args.seconds)
        print(f"stream, {workers:2d} worker processes: {stream:12,.0f} tokens/s = {stream / trainer:8.1f}x the trainer")
    print(f"last batch       : {sample['loss_mask'].mean():.1%} of slots are loss targets, "
          f"{(sample['segment_ids'] == 0).mean():.1%} padding")


if __name__ == "__main__":
    main()
