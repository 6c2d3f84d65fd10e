"""Multi-token prediction cost: compiled peak memory and step time vs the number of heads.

(a) Compile only (no data, no allocation): the real jitted train step, as ``compute.build_compute`` builds it
    for training but lowered on ShapeDtypeStructs, at a realistic shape; prints XLA's memory analysis
    for n = 1, 2, 4, 8 heads with the memory-efficient (head-by-head) and the naive backward.
    Goal: memory-efficient n=4 <= 1.15 x n=1.
(b) Measured step time of n = 2, 4 vs n = 1 on a small shape that runs quickly on CPU, next to the
    analytic FLOPs ratio (n heads add n-1 blocks and n-1 unembeddings). Goal: n=4 <= 1.3 x n=1.

    python scripts/bench_mtp.py [--layers 8] [--small-layers 12] [--skip-compile] [--skip-time]
"""

from __future__ import annotations

import argparse
import time

import jax

from scaling_jax.config import Config, load_config
from scaling_jax.data.synthetic import example_batch
from scaling_jax.model.family import flops_per_token
from scaling_jax.objectives.multi_token import MultiTokenPrediction
from scaling_jax.train.compute import build_compute
from scaling_jax.train.step import to_global

GIB = 2**30


def big_overrides(layers: int, heads: int) -> list[str]:
    return ["model.series=custom", f"model.layers={layers}", "model.d_model=1024", "model.heads=16",
            "model.head_dim=64", "model.d_ff=2816", "model.dtype=bfloat16", "data.tokenizer=byte:32768",
            "data.seq_len=2048", "data.batch_size=4", "objective=mtp", f"objective.heads={heads}"]


def small_overrides(layers: int, heads: int) -> list[str]:
    return ["model.series=custom", f"model.layers={layers}", "model.d_model=128", "model.heads=2",
            "model.head_dim=64", "model.d_ff=320", "data.seq_len=256", "data.batch_size=4",
            "optimizer.warmup_steps=1", "objective=mtp", f"objective.heads={heads}"]


def build_step(config: Config, memory_efficient: bool):
    """The trainer's jitted step (``compute.build_compute``) on synthetic rows, and its example batch."""
    objective = MultiTokenPrediction(config.objective, memory_efficient=memory_efficient)
    d = config.data
    batch = objective.prepare(example_batch(d.batch_size, d.seq_len, config.model.vocab_size))
    return build_compute(config, objective, batch), batch


def compiled_memory(config: Config, memory_efficient: bool) -> dict[str, float]:
    """XLA's per-device memory analysis of the compiled train step (bytes) and the compile time."""
    compute, batch = build_step(config, memory_efficient)
    start = time.perf_counter()
    mem = compute.lower(batch).compile().memory_analysis()
    out = {k: float(getattr(mem, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")}
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    out["compile_s"] = time.perf_counter() - start
    return out


def seconds_per_step(step, state, batch, steps: int):
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    return state, (time.perf_counter() - start) / steps


def part_a(layers: int, head_counts: tuple[int, ...]) -> None:
    print(f"(a) compiled train step, per-device memory: custom {layers} layers, d_model 1024, 16x64 heads, "
          f"d_ff 2816, vocab 32768, seq 2048, batch 4, bf16 compute, fp32 params + AdamW; "
          f"{jax.device_count()} x {jax.devices()[0].device_kind}")
    print(f"{'backward':>17} {'n':>2} {'args GiB':>9} {'out GiB':>8} {'alias GiB':>9} {'temp GiB':>9} "
          f"{'peak GiB':>9} {'vs n=1':>7} {'compile s':>9}")
    for memory_efficient in (True, False):
        base = None
        for n in head_counts:
            m = compiled_memory(load_config(None, big_overrides(layers, n)), memory_efficient)
            base = base or m["peak"]
            print(f"{'memory-efficient' if memory_efficient else 'naive':>17} {n:>2} {m['argument'] / GIB:9.3f} "
                  f"{m['output'] / GIB:8.3f} {m['alias'] / GIB:9.3f} {m['temp'] / GIB:9.3f} {m['peak'] / GIB:9.3f} "
                  f"{m['peak'] / base:7.3f} {m['compile_s']:9.1f}", flush=True)


def part_b(layers: int, head_counts: tuple[int, ...], steps: int, rounds: int) -> None:
    print(f"\n(b) measured step time: custom {layers} layers, d_model 128, 2x64 heads, d_ff 320, byte vocab, "
          f"seq 256, batch 4, fp32; best of {rounds} interleaved rounds of {steps} steps", flush=True)
    runs = {}
    for memory_efficient in (True, False):
        for n in head_counts:
            config = load_config(None, small_overrides(layers, n))
            compute, batch = build_step(config, memory_efficient)
            step, state, device_batch = compute.step_fn, compute.init_state(), to_global(batch, compute.batch_sharding)
            state, _ = seconds_per_step(step, state, device_batch, 2)  # compile + warm up
            extras = MultiTokenPrediction(config.objective).size_extras()
            runs[memory_efficient, n] = {"step": step, "state": state, "batch": device_batch, "best": float("inf"),
                                         "flops": flops_per_token(config.model, config.data.seq_len, **extras)}
    for _ in range(rounds):  # all variants interleaved, so drift in machine load hits each alike
        for run in runs.values():
            run["state"], dt = seconds_per_step(run["step"], run["state"], run["batch"], steps)
            run["best"] = min(run["best"], dt)
    for (memory_efficient, n), run in runs.items():
        base = runs[memory_efficient, head_counts[0]]
        print(f"{'memory-efficient' if memory_efficient else 'naive':>17} n={n}: {run['best'] * 1e3:8.1f} ms/step, "
              f"ratio {run['best'] / base['best']:.3f} (analytic FLOPs ratio {run['flops'] / base['flops']:.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8, help="model.layers of the compile-only shape")
    parser.add_argument("--small-layers", type=int, default=12, help="model.layers of the timed shape")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--skip-time", action="store_true")
    args = parser.parse_args()
    if not args.skip_compile:
        part_a(args.layers, (1, 2, 4, 8))
    if not args.skip_time:
        part_b(args.small_layers, (1, 2, 4), args.steps, args.rounds)


if __name__ == "__main__":
    main()
