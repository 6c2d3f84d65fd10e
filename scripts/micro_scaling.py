"""Reproduce a scaling law on a laptop CPU: train a micro-series, fit the smaller sizes, predict the larger.

    python scripts/micro_scaling.py [--sweep configs/sweeps/micro.yaml] [--objective causal] [key=value ...]
    python scripts/micro_scaling.py --sweep configs/sweeps/micro_seeds.yaml --fit-sizes 4

Runs (or resumes, or reuses) the sweep's runs for one objective through ``scaling_jax.scaling.sweep``, fits
L(N) = E + (N_c/N)^α (N = non-embedding parameters; at a fixed tokens-per-parameter ratio Chinchilla's
E + A/N^α + B/D^β is of this form) on every run (every seed) of the ``--fit-sizes`` smallest sizes (default:
all but the largest), and prints, for each larger size, the prediction with its 95% bootstrap interval against
the measured final validation loss (the mean of its seeds with their t-interval), the relative error, and
whether the interval covers the measured mean. Kaplan's pure power law (N_c/N)^α is a second prediction.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from scaling_jax.errors import UserError
from scaling_jax.scaling import laws
from scaling_jax.scaling.sweep import load_sweep, run_sweep


def _seed_note(losses: np.ndarray) -> str:
    if losses.size == 1:
        return f"{losses[0]:.4f}"
    stats = laws.seed_stats(losses)
    return f"{stats.mean:.4f} ± {stats.half_width:.4f} (n={stats.n}, seeds {', '.join(f'{v:.4f}' for v in losses)})"


def predict_held_out(entries: list[dict], fit_sizes: int | None = None) -> list[str]:
    """Fit on every finished run (every seed) of the ``fit_sizes`` smallest sizes (default: all but the largest)
    and predict each larger size, against the mean of its seeds."""
    done = sorted((e for e in entries if e["status"] == "done" and "val_loss" in e), key=lambda e: e["n"])
    sizes = sorted({e["n"] for e in done})
    k = len(sizes) - 1 if fit_sizes is None else fit_sizes
    if k < 4 or len(sizes) <= k:
        raise UserError(f"need >= 4 finished sizes to fit 3 parameters and >= 1 larger size to test; have "
                        f"{len(sizes)} sizes and --fit-sizes {k}")
    n = np.array([e["n"] for e in done], float)
    loss = np.array([e["val_loss"] for e in done], float)
    lines = [f"{e['run_id']}: N={e['n']:,} tokens={e['tokens']:,} wall={e['wall_time']:.0f}s "
             f"val_loss={e['val_loss']:.4f} val_bpb={e.get('val_bpb', float('nan')):.4f}" for e in done]
    fitted = n <= sizes[k - 1]
    for name, fitter in (("L(N) = E + (N_c/N)^alpha", laws.fit_power_offset),
                         ("Kaplan L(N) = (N_c/N)^alpha", laws.fit_power_law)):
        fit = fitter(n[fitted], loss[fitted], n_boot=500)
        params = ", ".join(f"{k}={v:.4g} [{fit.ci[k][0]:.3g}, {fit.ci[k][1]:.3g}]" for k, v in fit.params.items())
        lines.append(f"{name} fitted on {int(fitted.sum())} runs of the {k} smallest sizes: {params}")
        for target in sizes[k:]:
            measured = loss[n == target]
            predicted = float(fit.predict(target))
            lo, hi = (float(v) for v in fit.predict_interval(target))
            mean = float(measured.mean())
            covered = "covers" if lo <= mean <= hi else "MISSES"
            lines.append(f"  N={int(target):,} ({target / sizes[k - 1]:.1f}x the largest fitted): predicted "
                         f"{predicted:.4f} [95% CI {lo:.4f}, {hi:.4f}]; measured {_seed_note(measured)}; relative "
                         f"error of the mean {100 * abs(predicted - mean) / mean:.2f}%; the interval {covered} it")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", default="configs/sweeps/micro.yaml")
    parser.add_argument("--objective", default="causal")
    parser.add_argument("--fit-sizes", type=int, default=None,
                        help="fit on this many smallest sizes, predict the rest (default: all but the largest)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for every run (e.g. train.eval_batches=8)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        spec = load_sweep(args.sweep, args.overrides)
        entries = run_sweep(spec, objectives=[args.objective])
        lines = predict_held_out(entries, args.fit_sizes)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    print(f"micro-scaling total wall-clock {time.perf_counter() - started:.0f} s (runs in {spec.out_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
