"""Model FLOPs utilisation of the trainer's own jitted step, per attention kernel and remat policy.

Each variant builds the step exactly as training does (``compute.build_compute``) on synthetic packed rows
(``data/synthetic.py``: documents of random length, so the attention mask carries segment ids), runs warm-up
steps, then times ``--steps`` steps and reports ms/step, tokens/s, MFU against the device's dense bf16 peak
(FLOPs per token = 6 N_matmul + causal attention, as ``scaling-jax info`` prints them: recomputation is not
counted, so remat shows up as lost MFU) and the compiled step's per-device peak memory and temporaries. A variant
that does not fit prints its error and the next one runs. ``--json FILE`` appends one line per variant as
soon as it is measured, so a run cut short keeps what it measured.

``--max-segments 16,0`` compares cuDNN's packed layout (``model.cudnn_max_segments``: segment offsets, used when
no row holds more documents) with the dense-mask path (0); ``--doc-len 0`` gives every row one document instead
of packed ones (mean 256 tokens).

    python scripts/bench_mfu.py [CONFIG] [key=value ...] [--attention cudnn,xla] [--remat none,full]
                                [--batch 16,32] [--max-segments 16,0] [--doc-len 256] [--steps 10] [--json out.jsonl]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import jax
import numpy as np

from scaling_jax.config import Config, load_config
from scaling_jax.data.synthetic import example_batch
from scaling_jax.model.attention_kernels import resolve, segment_runs
from scaling_jax.model.family import flops_per_token, param_counts
from scaling_jax.objectives.base import Objective, build_objective
from scaling_jax.parallel.device_memory import claim_device_memory
from scaling_jax.train.compute import build_compute
from scaling_jax.train.metrics import peak_flops_per_device
from scaling_jax.train.step import to_global

GIB = 2**30
WARMUP = 3


def compiled_peak_bytes(mem) -> float:
    """Per-device peak of one compiled step from XLA's own buffer assignment: arguments + outputs - donated
    aliases + temporaries (what ``scripts/aot_compile_tpu.py`` reports), independent of earlier variants."""
    return (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
            + mem.temp_size_in_bytes)


def synthetic_batch(config: Config, objective: Objective, whole_rows: bool) -> dict:
    """One prepared batch of synthetic rows: packed documents, or one document per row."""
    d, m = config.data, config.model
    rows = example_batch(d.batch_size, d.seq_len, m.vocab_size)
    if whole_rows:
        rows["segment_ids"] = np.ones_like(rows["segment_ids"])
    return objective.prepare(rows)


def measure(config: Config, objective: Objective, batch: dict, steps: int) -> dict:
    """Compile, warm up and time the trainer's step for ``config`` on one synthetic batch."""
    d, m = config.data, config.model
    start = time.perf_counter()
    compute = build_compute(config, objective, batch)
    step = compute.lower(batch).compile()
    compile_s = time.perf_counter() - start
    mem = step.memory_analysis()
    state = compute.init_state()
    device_batch = to_global(batch, compute.batch_sharding)
    for _ in range(WARMUP):
        state, metrics = step(state, device_batch)
    jax.block_until_ready((state, metrics))
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, device_batch)
    jax.block_until_ready((state, metrics))
    seconds = (time.perf_counter() - start) / steps
    device = jax.devices()[0]
    tokens = d.batch_size * d.seq_len
    flops = flops_per_token(m, d.seq_len) * tokens
    peak = config.train.peak_flops_per_device or peak_flops_per_device(device.device_kind)
    return {"ms_per_step": seconds * 1e3, "tokens_per_s": tokens / seconds,
            "mfu": flops / seconds / (peak * jax.device_count()) if peak else None,
            "tflops_per_device": flops / seconds / jax.device_count() / 1e12,
            "peak_memory_gib": compiled_peak_bytes(mem) / GIB, "temp_gib": mem.temp_size_in_bytes / GIB,
            "compile_s": compile_s,
            "loss": float(metrics["loss"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="configs/tpu/v5e-16.yaml")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--attention", default="auto", help="comma-separated model.attention values")
    parser.add_argument("--remat", default="none,full", help="comma-separated model.remat policies")
    parser.add_argument("--batch", default="16", help="comma-separated global batch sizes (rows)")
    parser.add_argument("--max-segments", default=None,
                        help="comma-separated model.cudnn_max_segments values (0: dense mask; default: the config's)")
    parser.add_argument("--doc-len", type=int, choices=(0, 256), default=256,
                        help="256: packed documents of mean length 256 (synthetic rows); 0: one document per row")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", default=None, help="append one JSON line per measured variant")
    args = parser.parse_args()
    claim_device_memory()  # 95% of the GPU, as training takes it (before jax starts its client)
    n = jax.device_count()
    device = jax.devices()[0]
    rows = []
    segments = [None] if args.max_segments is None else [f"model.cudnn_max_segments={s}"
                                                         for s in args.max_segments.split(",")]
    variants = itertools.product(args.batch.split(","), args.attention.split(","), args.remat.split(","), segments)
    for batch_size, attention, remat, segment_override in variants:
        config = load_config(args.config, [
            "data.source=synthetic", f"data.batch_size={batch_size}", "mesh.data=1", f"mesh.fsdp={n}",
            "mesh.tensor=1", "train.run_dir=", *args.overrides, f"model.attention={attention}", f"model.remat={remat}",
            *([segment_override] if segment_override else [])])
        m = config.model
        runs = m.cudnn_max_segments
        kernel = resolve(attention, device.platform, m.dtype, m.head_dim, device)
        objective = build_objective(config.objective, None)
        batch = synthetic_batch(config, objective, whole_rows=args.doc_len == 0)
        packed = kernel == "cudnn" and runs > 0 and bool(segment_runs(batch["segment_ids"], runs)[2])
        row = {"attention": attention, "kernel": kernel, "remat": remat, "batch": int(batch_size),
               "seq_len": config.data.seq_len, "documents": "one per row" if args.doc_len == 0 else "packed",
               "max_segments": runs, "packed_layout": packed, "params": param_counts(m).total, "devices": n,
               "device_kind": device.device_kind, "jax": jax.__version__}
        try:
            row.update(measure(config, objective, batch, args.steps))
        except Exception as e:  # noqa: BLE001 - an out-of-memory variant is a result, not a crash
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
    print(f"\n{n} x {device.device_kind}, jax {jax.__version__}; {rows[0]['params']:,} params, rows of "
          f"{rows[0]['seq_len']} tokens (documents: {rows[0]['documents']}), {args.steps} timed steps after {WARMUP} "
          f"warm-up; layout: packed = cuDNN segment offsets, mask = dense mask")
    print(f"{'attention':>9} {'kernel':>6} {'layout':>6} {'remat':>9} {'batch':>5} {'ms/step':>9} {'tokens/s':>10} "
          f"{'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>8} {'temp GiB':>8} {'compile s':>9}")
    for r in rows:
        layout = "packed" if r["packed_layout"] else "mask" if r["kernel"] == "cudnn" else "-"
        head = f"{r['attention']:>9} {r['kernel']:>6} {layout:>6} {r['remat']:>9} {r['batch']:>5}"
        if "error" in r:
            print(f"{head}  {r['error']}")
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        print(f"{head} {r['ms_per_step']:9.1f} "
              f"{r['tokens_per_s']:10,.0f} {r['tflops_per_device']:8.1f} {mfu:>6} "
              f"{r['peak_memory_gib']:8.1f} {r['temp_gib']:8.1f} {r['compile_s']:9.1f}")


if __name__ == "__main__":
    main()
