"""Predict each finished run's final loss of a sweep from the first part of its learning curve.

    python scripts/learning_curves.py SWEEP_DIR [--prefix 0.25] [--s-min] [--boot 200]

For every finished run: Kaplan et al. 2020 eq. 1.6, L(N, S) = (N_c/N)^α_N + (S_c/S)^α_S, fitted on the other
runs' full training curves plus this run's first ``--prefix`` of steps (leave one out), and the one-run
projection L_inf + (S_c/S)^α_S from that prefix alone; each with its 95% bootstrap interval, the relative
error against the measured final loss (mean training loss over the last 5% of steps) and whether the interval
covers it. ``--s-min`` puts S_min (eq. 5.4, Kaplan's B_crit law) in place of S.
"""

from __future__ import annotations

import argparse
import os
import sys

from scaling_jax.errors import DataError, UserError
from scaling_jax.scaling import learning_curves as lc


def _cell(value: tuple[float, float, float] | None, p: lc.PrefixPrediction) -> list[str]:
    """'loss [lo, hi]', signed relative error, covered?: three cells (dashes when the fit failed)."""
    if value is None:
        return ["-", "-", "-"]
    loss, low, high = value
    return [f"{loss:.4f} [{low:.4f}, {high:.4f}]", f"{100 * p.relative_error(loss):+.1f}%",
            "yes" if p.covers(low, high) else "no"]


def table(predictions: list[lc.PrefixPrediction], prefix: float) -> list[str]:
    """One row per run, columns padded to the widest cell."""
    head = ["run", "N", "steps", "measured", f"eq1.6 LOO from {prefix:.0%}", "err", "cov",
            f"single-run from {prefix:.0%}", "err", "cov"]
    rows = [head]
    for p in predictions:
        single = None if p.single is None else (p.single.loss, p.single.low, p.single.high)
        rows.append([p.run_id, f"{p.n:,.0f}", str(p.steps), f"{p.measured:.4f}", *_cell(p.law, p), *_cell(single, p)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
            for r in rows]


def _law_loss(p: lc.PrefixPrediction) -> float | None:
    return None if p.law is None else p.law[0]


def _single_loss(p: lc.PrefixPrediction) -> float | None:
    return None if p.single is None else p.single.loss


def _mean_error(predictions: list[lc.PrefixPrediction], name: str, get) -> str:
    """'NAME +1.2% (n runs)': the mean signed relative error where that prediction exists."""
    errors = [p.relative_error(v) for p in predictions if (v := get(p)) is not None]
    return f"{name} {100 * sum(errors) / len(errors):+.1f}% ({len(errors)} runs)" if errors else f"{name} -"


def notes(fit: lc.CurveFit | None, predictions: list[lc.PrefixPrediction]) -> list[str]:
    """The joint fit on every run, and the known bias of decaying schedules."""
    out = []
    if fit is not None:
        out.append("eq. 1.6 on all runs: " + ", ".join(
            f"{k}={v:.4g} [{fit.ci[k][0]:.3g}, {fit.ci[k][1]:.3g}]" for k, v in fit.params.items()))
    decayed = [p for p in predictions if p.lr_end_ratio < 0.5]
    if decayed:
        out.append(f"note: {len(decayed)} of {len(predictions)} runs decay the learning rate (to "
                   f"{min(p.lr_end_ratio for p in decayed):.2g} of its peak at the lowest); Kaplan's law has no decay "
                   "in it, so predictions from an early prefix are expected to overestimate their final loss. Mean "
                   "signed error on these runs: " + ", ".join(_mean_error(decayed, name, get) for name, get in
                                                              (("eq. 1.6", _law_loss), ("single-run", _single_loss))))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir")
    parser.add_argument("--prefix", type=float, default=0.25, help="share of each run's steps a prediction sees")
    parser.add_argument("--s-min", action="store_true", help="fit on S_min (eq. 5.4) instead of steps")
    parser.add_argument("--boot", type=int, default=200, help="bootstrap refits per interval")
    parser.add_argument("--objective", help="the objective whose runs to fit (needed when the sweep has several)")
    args = parser.parse_args(argv)
    try:
        if not 0 < args.prefix < 1:
            raise UserError(f"--prefix {args.prefix} must be in (0, 1)")
        if not os.path.isdir(args.sweep_dir):
            raise DataError(f"sweep directory '{args.sweep_dir}' does not exist")
        curves = lc.load_curves(args.sweep_dir, args.objective)
        predictions = lc.predict_from_prefix(curves, args.prefix, args.s_min, args.boot)
        try:
            fit = lc.fit_curves(curves, args.s_min, args.boot)
        except DataError:
            fit = None
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(curves)} finished runs in {args.sweep_dir}; measured = mean training loss over the last "
          f"{lc.FINAL_SHARE:.0%} of steps; x = {'S_min' if args.s_min else 'steps'}")
    print("\n".join(table(predictions, args.prefix) + notes(fit, predictions)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
