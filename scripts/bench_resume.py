"""How long a preempted run takes to come back: resumed with its compilation cache against without one.

One run is trained for ``--steps`` steps (``scaling-jax train``, a fresh process, which writes its compiled
programs to ``<run_dir>/compilation_cache``), with checkpoints at its last two steps. Each repeat copies it
twice, deletes the newest checkpoint of each copy (a preemption after the one before) and resumes both copies
with the same config in fresh processes, one with the cache (``train.compilation_cache=run``, the default) and
one with ``train.compilation_cache=none``, in alternating order so load from other processes hits both alike.
Printed: each resume's process wall time, programs read back from and written to the cache, and the median
ratio with/without.

    python scripts/bench_resume.py [--steps 3] [--repeats 3] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from scaling_jax.run_dir import CHECKPOINT_DIR, SUMMARY_FILE

QUICKSTART = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "quickstart.yaml")
SHAPE = ["model.series=custom", "model.layers=8", "model.d_model=256", "model.heads=4", "model.head_dim=64",
         "model.d_ff=1024", "data.seq_len=256", "data.batch_size=8", "data.max_docs=200",
         "optimizer.warmup_steps=1", "train.eval_every=0", "train.eval_batches=1", "train.progress=false",
         "train.plot=false", "train.tensorboard=false", "train.async_checkpointing=false"]


def train(run_dir: str, steps: int, overrides: list[str]) -> tuple[float, dict]:
    """(process wall seconds, the summary's compilation-cache counts) of one ``scaling-jax train``."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # the run decides
    command = [sys.executable, "-m", "scaling_jax.cli", "train", QUICKSTART, *SHAPE, *overrides, f"train.steps={steps}",
               f"train.checkpoint_every={steps - 1}", f"train.run_dir={run_dir}"]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"error: {' '.join(command)} failed:\n{done.stderr[-2000:]}")
    with open(os.path.join(run_dir, SUMMARY_FILE)) as f:
        return wall, json.load(f)["compilation_cache"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="steps of the run (>= 2); it resumes at steps - 1")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="config overrides (key=value) for the run's shape")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_resume_") as work:
        original = os.path.join(work, "run")
        wall, cache = train(original, args.steps, args.overrides)
        print(f"fresh start, {args.steps} steps: {wall:.1f} s, {cache['programs_written']} programs compiled "
              "and written to the run's cache")
        walls: dict[str, list[float]] = {"run": [], "none": []}
        for repeat in range(args.repeats):
            order = ["run", "none"] if repeat % 2 == 0 else ["none", "run"]
            for setting in order:
                copy = os.path.join(work, f"{setting}-{repeat}")
                shutil.copytree(original, copy)
                shutil.rmtree(os.path.join(copy, CHECKPOINT_DIR, str(args.steps)))
                wall, cache = train(copy, args.steps, [*args.overrides, f"train.compilation_cache={setting}"])
                walls[setting].append(wall)
                print(f"resume, train.compilation_cache={setting}: {wall:.1f} s, {cache['programs_read']} programs "
                      f"read back, {cache['programs_written']} written to the cache")
                shutil.rmtree(copy)
    with_cache, without = statistics.median(walls["run"]), statistics.median(walls["none"])
    print(f"median resume: {with_cache:.1f} s with the cache, {without:.1f} s without; "
          f"ratio {with_cache / without:.2f}")


if __name__ == "__main__":
    main()
