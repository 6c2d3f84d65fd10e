"""Emergence report: each task's preferred score (BIG-bench's ``preferred_score``, from greedy generations
or choice log-likelihoods) and, where measured, PassUntil PU, against model size N (non-embedding
parameters) and against training compute C (FLOPs), both on log axes.

A task whose greedy score sits at zero across a series while PU climbs by orders of magnitude (Hu et al.
2023) shows it at a glance: the score on the left axis (linear, over the metric's range), PU on the right
(log, with its 95% interval). ``scaling-jax eval`` with two or more ``--checkpoint`` runs writes one
``plots/emergence_TASK.png`` per task into its output directory.
"""

from __future__ import annotations

import math
import os
import re


def _positive(value) -> float | None:
    return float(value) if value is not None and math.isfinite(float(value)) and float(value) > 0 else None


def task_series(results: list[dict], task: str) -> dict:
    """The numbers behind one task's plot, one entry per run that scored the task, smallest N first.

    ``score`` is the task's preferred score (the first metric when a task names none it reports); ``flops``
    is each run's training compute at the evaluated checkpoint (None where unknown); the ``pu`` lists are
    None throughout when no run has PassUntil for the task, else None only for the runs without it."""
    rows = sorted((r for r in results if task in r["tasks"]), key=lambda r: (r["n_params"], r.get("flops") or 0))
    entries = [r["tasks"][task] for r in rows]
    preferred = next((e.get("preferred_score") for e in entries if e.get("preferred_score") in e["metrics"]), None)
    name = preferred or next((m for e in entries for m in e["metrics"]), None)
    pus = [e.get("passuntil") for e in entries]
    has_pu = any(p is not None for p in pus)
    return {
        "task": task,
        "score_name": name,
        "low_score": next((e.get("low_score") for e in entries if e.get("low_score") is not None), None),
        "high_score": next((e.get("high_score") for e in entries if e.get("high_score") is not None), None),
        "runs": [r["run_dir"] for r in rows],
        "steps": [r.get("step") for r in rows],
        "n_params": [r["n_params"] for r in rows],
        "flops": [_positive(r.get("flops")) for r in rows],
        "score": [e["metrics"].get(name) for e in entries],
        "pu": [p["pu"] if p else None for p in pus] if has_pu else None,
        "pu_low": [p["low"] if p else None for p in pus] if has_pu else None,
        "pu_high": [p["high"] if p else None for p in pus] if has_pu else None,
    }


def plot_file(task: str) -> str:
    """``plots/emergence_TASK.png`` (characters other than letters, digits, ``.``, ``_``, ``-`` become ``_``)."""
    return os.path.join("plots", f"emergence_{re.sub(r'[^A-Za-z0-9._-]', '_', task)}.png")


def _panel(ax, series: dict, x_key: str, x_label: str) -> None:
    import numpy as np

    x = np.array([v if v is not None else np.nan for v in series[x_key]], np.float64)
    score = np.array([v if v is not None else np.nan for v in series["score"]], np.float64)
    ax.set_xlabel(x_label)
    if not np.isfinite(x).any():
        ax.text(0.5, 0.5, f"no {x_label.split(' (')[0]} recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        return
    ax.set_xscale("log")
    if not np.isfinite(x).all():
        ax.set_title(f"left out: {int((~np.isfinite(x)).sum())} run(s) with no recorded {x_label.split(' (')[0]}",
                     fontsize=9)
    ok = np.isfinite(x) & np.isfinite(score)
    handles = ax.plot(x[ok], score[ok], "o-", color="C0", label=f"{series['score_name']} (preferred score)")
    ax.set_ylabel(series["score_name"] or "score", color="C0")
    low, high = series["low_score"], series["high_score"]
    if low is not None and high is not None and high > low:
        values = score[ok]
        bottom, top = min(low, *values) if values.size else low, max(high, *values) if values.size else high
        pad = 0.05 * (top - bottom)
        ax.set_ylim(bottom - pad, top + pad)
        handles.append(ax.axhline(low, color="C0", linestyle=":", linewidth=1, label=f"low score ({low:.3g})"))
    if series["pu"] is not None:
        pu = np.array([v if v is not None else np.nan for v in series["pu"]], np.float64)
        keep = np.isfinite(x) & np.isfinite(pu) & (pu > 0)
        if keep.any():
            lo = np.array([v if v is not None else np.nan for v in series["pu_low"]], np.float64)[keep]
            hi = np.array([v if v is not None else np.nan for v in series["pu_high"]], np.float64)[keep]
            p = pu[keep]
            lo = np.clip(np.nan_to_num(lo, nan=p), np.min(p) * 1e-3, p)  # a zero lower bound cannot sit on log
            hi = np.maximum(np.nan_to_num(hi, nan=p), p)
            twin = ax.twinx()
            twin.set_yscale("log")
            handles += [twin.errorbar(x[keep], p, yerr=[p - lo, hi - p], fmt="s--", color="C1", capsize=3,
                                      label="PassUntil PU (95% CI)")]
            twin.set_ylabel("PassUntil PU", color="C1")
            twin.set_ylim(lo.min() / 1.25, hi.max() * 1.25)  # the whole interval in view (autoscale cut it)
    ax.legend(handles=handles, loc="upper left", fontsize=8)


def plot_emergence(results: list[dict], out_dir: str) -> dict[str, dict]:
    """One two-panel PNG per task (score and PU vs N; vs training FLOPs), ``out_dir/plots/emergence_TASK.png``.

    Returns ``{task: series}``: ``task_series`` of what each plot shows, with ``plot`` (its path)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    for task in sorted({t for r in results for t in r["tasks"]}):
        series = task_series(results, task)
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        _panel(axes[0], series, "n_params", "N (non-embedding parameters)")
        _panel(axes[1], series, "flops", "training compute C (FLOPs)")
        what = (series["score_name"] or "score") + (" and PassUntil PU" if series["pu"] is not None else "")
        fig.suptitle(f"{task}: {what} across {len(series['runs'])} runs")
        fig.tight_layout()
        path = os.path.join(out_dir, plot_file(task))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        out[task] = {**series, "plot": path}
    return out
