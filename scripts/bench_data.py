"""Data pipeline throughput from prepared shards vs the trainer's consumption (goal: >= 10x).

Prepares the embedded corpus (or ``--source``) into ArrayRecord shards once, then measures in this
process, on one config:

- **pipeline**: batches drawn from the grain iterator the trainer uses — ArrayRecord reads, packing
  into rows with segment ids, per-epoch shuffle, batching and the causal transform — in model
  tokens per second;
- **trainer**: the jitted train step of a ~100M-parameter model (``kaplan:14x768``) on this
  machine's devices, tokens per second, on one prepared batch.

If the first is not well above the second, the device would wait for data.

    python scripts/bench_data.py [--model kaplan:14x768] [--seq-len 512] [--batch 2] [--source stdlib]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import numpy as np

from scaling_jax.config import load_config
from scaling_jax.data import pipeline
from scaling_jax.data.prepare import prepare
from scaling_jax.data.tokenizer import build_tokenizer
from scaling_jax.model.family import param_counts
from scaling_jax.train.session import build_session
from scaling_jax.train.step import to_global


def pipeline_tokens_per_s(session, seconds: float) -> tuple[float, int]:
    """Model-batch tokens per second drawn from the trainer's own grain iterator (after its first batch)."""
    it = pipeline.make_iterator(session.train_ds, session.config.data)
    first = next(it)
    batches, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        next(it)
        batches += 1
    return batches * first["inputs"].size / elapsed, batches


def step_tokens_per_s(session, steps: int) -> float:
    """Tokens per second of the median step; the first call (compilation) is not counted."""
    batch = to_global(session.train_ds[0], session.batch_sharding)
    state = session.init_state()
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        state, metrics = session.step_fn(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return batch["inputs"].size / float(np.median(times[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="kaplan:14x768", help="model.series of the trainer (~100M params)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2, help="global batch in rows")
    parser.add_argument("--source", default="stdlib", help="data.source to prepare")
    parser.add_argument("--tokenizer", default="byte", help="data.tokenizer to prepare with")
    parser.add_argument("--max-docs", type=int, default=800, help="training documents to prepare")
    parser.add_argument("--seconds", type=float, default=5.0, help="minimum time the pipeline is measured")
    parser.add_argument("--steps", type=int, default=3, help="timed train steps (after one compiling step)")
    parser.add_argument("--workdir", default="", help="where to write shards (default: a temporary directory)")
    args = parser.parse_args()

    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_data_")
    shards = os.path.join(workdir, "shards")
    tokenizer = build_tokenizer(args.tokenizer)
    base = load_config(None, [f"data.source={args.source}", f"data.max_docs={args.max_docs}"]).data
    started = time.perf_counter()
    manifest = prepare(base, tokenizer, shards, overwrite=True, log=None)
    prep_s = time.perf_counter() - started
    train_split = manifest["splits"]["train"]
    tokens = sum(s["tokens"] for s in manifest["splits"].values())

    config = load_config(None, [f"model.series={args.model}", f"data.source={shards}",
                                f"data.tokenizer={os.path.join(shards, 'tokenizer')}", f"data.seq_len={args.seq_len}",
                                f"data.batch_size={args.batch}", "train.eval_batches=1", "optimizer.warmup_steps=1"])
    session = build_session(config)
    data_rate, batches = pipeline_tokens_per_s(session, args.seconds)
    step_rate = step_tokens_per_s(session, args.steps)
    params = param_counts(config.model).total
    print(f"device: {jax.device_count()} x {jax.devices()[0].device_kind}; rows {args.batch} x {args.seq_len}; "
          f"threads {config.data.num_threads}, prefetch {config.data.prefetch}")
    print(f"prepare          : {train_split['documents']:,} train documents, {tokens:,} train + validation tokens "
          f"({tokenizer.kind} tokenizer) in {prep_s:.1f} s = {tokens / prep_s:,.0f} tokens/s (one-off)")
    print(f"shards -> batches: {data_rate:12,.0f} tokens/s (ArrayRecord read, pack, shuffle, batch, causal "
          f"transform; {batches} batches)")
    print(f"trainer step     : {step_rate:12,.0f} tokens/s ({args.model}, {params / 1e6:.0f}M params, jitted step)")
    print(f"ratio            : {data_rate / step_rate:12.1f}x  (goal >= 10x)")


if __name__ == "__main__":
    main()
