"""Chinchilla's approaches 2 and 3 on one IsoFLOP grid: the compute-optimal N each gives, with intervals.

    python scripts/isoflop_compare.py [--sweep configs/sweeps/isoflop_cpu.yaml] [--boot 100]

Runs (or reuses) the sweep's runs, then fits both ways on the same finished runs:

* approach 2: per compute budget a parabola in log N through the five sizes around that budget's lowest final
  loss; its minimum is the budget's N_opt, with a residual-bootstrap interval (``laws.profile_minimum``), and
  the slope of log N_opt against log C over the budgets is the exponent a;
* approach 3: L(N, D) = E + A/N^α + B/D^β over every run (Huber loss, Hoffmann's initialisation grid,
  bootstrap refits); its N_opt at a budget is the loss minimum along that budget's FLOPs, using the sizes'
  measured FLOPs per token (not 6N: in models this small the vocabulary projection dominates).

For each budget it prints both N_opt with their 95% intervals and whether the intervals overlap.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from scaling_jax.errors import UserError
from scaling_jax.scaling import laws
from scaling_jax.scaling.sweep import load_sweep, run_sweep


def compare(entries: list[dict], n_boot: int) -> list[str]:
    done = [e for e in entries if e["status"] == "done" and "val_loss" in e]
    if len(done) < 6:
        raise UserError(f"need >= 6 finished runs (>= 2 budgets x 3 sizes), have {len(done)}")
    n, d, c, loss = (np.array([e[k] for e in done], float) for k in ("n", "tokens", "flops", "val_loss"))
    chinchilla = laws.fit_chinchilla(n, d, loss, n_boot=n_boot)
    sizes = np.unique(n)
    flops_per_token = np.array([np.median(c[n == s] / d[n == s]) for s in sizes])
    params = ", ".join(f"{k}={v:.4g} [{lo:.3g}, {hi:.3g}]" for (k, v), (lo, hi) in
                       zip(chinchilla.params.items(), chinchilla.ci.values(), strict=True))
    lines = [f"{len(done)} runs, {len(sizes)} sizes (N {sizes.min():,.0f}-{sizes.max():,.0f})",
             f"approach 3: {params}",
             f"{'budget C':>10} {'best run N':>11} {'approach 2 N_opt [95%]':>28} {'approach 3 N_opt [95%]':>28} "
             "overlap"]
    optima = []
    for idx in laws.isoflop_groups(c):
        budget = float(np.exp(np.log(c[idx]).mean()))
        best = n[idx][np.argmin(loss[idx])]
        n3, lo3, hi3 = laws.optimal_n_interval(chinchilla, budget, sizes, flops_per_token)
        edge = "" if laws.optimal_n_at_compute(chinchilla.params, budget, sizes, flops_per_token)[1] else " (edge)"
        found = laws.profile_minimum(n[idx], loss[idx], n_boot=max(n_boot, 200))
        cell, overlap = "no minimum inside", "-"
        if found is not None:
            optima.append((budget, found[0]))
            cell = f"{found[0]:,.0f} [{found[1]:,.0f}, {found[2]:,.0f}]"
            overlap = "yes" if max(found[1], lo3) <= min(found[2], hi3) else "no"
        lines.append(f"{budget:>10.3g} {best:>11,.0f} {cell:>28} {f'{n3:,.0f} [{lo3:,.0f}, {hi3:,.0f}]{edge}':>28} "
                     f"{overlap:>7}")
    if len(optima) >= 2:
        budgets, n_opt = np.array(optima).T
        slope = np.polyfit(np.log(budgets), np.log(n_opt), 1)[0]
        lines.append(f"approach 2: N_opt ∝ C^{slope:.3f} through {len(optima)} budgets' minima (no interval: "
                     f"{len(optima)} points); approach 3's closed form at 6ND gives C^"
                     f"{chinchilla.params['beta'] / (chinchilla.params['alpha'] + chinchilla.params['beta']):.3f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", default="configs/sweeps/isoflop_cpu.yaml")
    parser.add_argument("--boot", type=int, default=100, help="bootstrap refits per approach")
    args = parser.parse_args(argv)
    try:
        entries = run_sweep(load_sweep(args.sweep))
        lines = compare(entries, args.boot)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
