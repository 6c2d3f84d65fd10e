"""Chinchilla's approaches 2 and 3 on one IsoFLOP grid: the compute-optimal N each gives, with intervals.

    python scripts/isoflop_compare.py [--sweep configs/sweeps/isoflop_cpu.yaml] [--boot 100]

Runs (or reuses) the sweep's runs, then fits both ways on the same finished runs:

* approach 2: per compute budget a parabola in log N through that budget's final losses; its minimum is the
  budget's N_opt, and N_opt(C) = (C/C_c)^a is fitted over the budgets (bootstrap interval of that law);
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
    iso = laws.fit_isoflop(n, d, loss, compute=c, n_boot=n_boot)
    chinchilla = laws.fit_chinchilla(n, d, loss, n_boot=n_boot)
    sizes = np.unique(n)
    flops_per_token = np.array([np.median(c[n == s] / d[n == s]) for s in sizes])
    params = ", ".join(f"{k}={v:.4g} [{lo:.3g}, {hi:.3g}]" for (k, v), (lo, hi) in
                       zip(chinchilla.params.items(), chinchilla.ci.values(), strict=True))
    lines = [f"{len(done)} runs, {len(sizes)} sizes (N {sizes.min():,.0f}-{sizes.max():,.0f}), "
             f"{len(iso.budgets)} budgets with a bracketed minimum",
             f"approach 3: {params}",
             f"approach 2: N_opt ∝ C^{iso.a:.3f} [{-iso.n_law.ci['alpha'][1]:.3f}, {-iso.n_law.ci['alpha'][0]:.3f}]",
             f"{'budget C':>10} {'approach 2 N_opt (parabola; law [95%])':>42} {'approach 3 N_opt [95%]':>30} overlap"]
    for budget, parabola in zip(iso.budgets, iso.n_opt, strict=True):
        law_n = float(iso.n_law.predict(budget))
        lo2, hi2 = (float(v) for v in iso.n_law.predict_interval(budget))
        (n3, lo3, hi3), inside = (laws.optimal_n_interval(chinchilla, budget, sizes, flops_per_token),
                                  laws.optimal_n_at_compute(chinchilla.params, budget, sizes, flops_per_token)[1])
        overlap = "yes" if max(lo2, lo3) <= min(hi2, hi3) else "no"
        edge = "" if inside else " (at the grid's edge)"
        lines.append(f"{budget:>10.3g} {parabola:>12,.0f}; {law_n:>9,.0f} [{lo2:,.0f}, {hi2:,.0f}] "
                     f"{n3:>10,.0f} [{lo3:,.0f}, {hi3:,.0f}]{edge} {overlap:>5}")
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
