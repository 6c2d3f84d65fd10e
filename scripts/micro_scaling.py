"""Reproduce a scaling law on a laptop CPU: train the micro-series, fit on the 4 smallest sizes, predict the 5th.

    python scripts/micro_scaling.py [--sweep configs/sweeps/micro.yaml] [--objective causal] [key=value ...]

Runs (or resumes, or reuses) the sweep's runs for one objective through ``scaling_jax.scaling.sweep``, fits
L(N) = E + (N_c/N)^α (N = non-embedding parameters; at a fixed tokens-per-parameter ratio Chinchilla's
E + A/N^α + B/D^β is of this form) on all sizes but the largest, and prints the predicted and measured final
validation loss of the largest, with the relative error (goal: <= 2%). Kaplan's pure power law (N_c/N)^α is
printed as a second, simpler prediction.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from scaling_jax.errors import UserError
from scaling_jax.scaling import laws
from scaling_jax.scaling.sweep import load_sweep, run_sweep


def predict_largest(entries: list[dict]) -> list[str]:
    """Fit on every finished run but the largest and report the prediction for the largest."""
    done = sorted((e for e in entries if e["status"] == "done" and "val_loss" in e), key=lambda e: e["n"])
    if len(done) < 4:
        raise UserError(f"need >= 4 finished sizes to fit 3 parameters and test on one more, have {len(done)}")
    n = np.array([e["n"] for e in done], float)
    loss = np.array([e["val_loss"] for e in done], float)
    lines = [f"{e['run_id']}: N={e['n']:,} tokens={e['tokens']:,} wall={e['wall_time']:.0f}s "
             f"val_loss={e['val_loss']:.4f} val_bpb={e.get('val_bpb', float('nan')):.4f}" for e in done]
    target, measured = n[-1], loss[-1]
    for name, fitter in (("L(N) = E + (N_c/N)^alpha", laws.fit_power_offset),
                         ("Kaplan L(N) = (N_c/N)^alpha", laws.fit_power_law)):
        fit = fitter(n[:-1], loss[:-1], n_boot=500)
        params = ", ".join(f"{k}={v:.4g} [{fit.ci[k][0]:.3g}, {fit.ci[k][1]:.3g}]" for k, v in fit.params.items())
        predicted = float(fit.predict(target))
        lo, hi = fit.predict_interval(target)
        lines += [f"{name} fitted on the {len(n) - 1} smallest: {params}",
                  f"  predicted {done[-1]['run_id']} (N={int(target):,}): {predicted:.4f} "
                  f"[95% CI {float(lo):.4f}, {float(hi):.4f}]; measured {measured:.4f}; relative error "
                  f"{100 * abs(predicted - measured) / measured:.2f}% (goal <= 2%)"]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", default="configs/sweeps/micro.yaml")
    parser.add_argument("--objective", default="causal")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for every run (e.g. train.eval_batches=8)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        spec = load_sweep(args.sweep, args.overrides)
        entries = run_sweep(spec, objectives=[args.objective])
        lines = predict_largest(entries)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    print(f"micro-scaling total wall-clock {time.perf_counter() - started:.0f} s (runs in {spec.out_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
