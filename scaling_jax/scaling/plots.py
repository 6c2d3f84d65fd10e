"""Reports over runs and sweeps: loss vs tokens / FLOPs / wall-clock, fitted laws with CIs, extrapolation.

``write_report(paths, out_dir)`` reads sweep directories (``manifest.json``) or single run directories
(``metrics.jsonl`` + ``summary.json`` + ``config.yaml``), draws one PNG per x-axis with every run's validation
curve (colour = objective, shade = size), fits per objective L(N) and Kaplan's L(C) on final losses (with
bootstrap bands and an extrapolation to a target compute), Chinchilla approach 3 / IsoFLOP when the grid
supports them, the gradient noise scale when it was logged, and writes ``report.md`` and ``report.json``.
Runs of a sweep with ``seeds`` that differ only by seed form one point: the report gives its mean final loss
± the Student-t 95% interval of that mean and the number of seeds (``seed_points``), the fit plots draw it
with error bars, and the fits take every seed's run as a row of its own.
Matplotlib is driven through Figure + Agg (no pyplot state), as in ``train.metrics``.
Sweep and run directories may be in a bucket (``gs://``): everything is read through ``scaling_jax.paths``.
A bucket ``out_dir`` is drawn in a local temporary directory and its files uploaded when done.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field

import numpy as np
import yaml

from scaling_jax import paths as storage  # (not `paths`: the functions below take a list of paths by that name)
from scaling_jax.errors import DataError
from scaling_jax.run_dir import CONFIG_FILE, SUMMARY_FILE
from scaling_jax.scaling import laws
from scaling_jax.scaling import noise_scale as ns
from scaling_jax.scaling.sweep import MANIFEST
from scaling_jax.train.metrics import METRICS_FILE, read_metrics

AXES = {"tokens": ("tokens", "tokens"), "flops": ("flops", "training FLOPs"),
        "wallclock": ("wall_time", "wall-clock (s)")}
# every file a report writes (an --out directory holding one of them that a report did not write is refused)
REPORT_FILES = ("report.md", "report.json", *(f"loss_vs_{axis}.png" for axis in AXES), "fit_loss_vs_params.png",
                "fit_loss_vs_compute.png")


@dataclass
class RunRecord:
    run_id: str
    objective: str
    size: str
    n: float  # non-embedding parameters
    tokens: float
    flops: float
    wall_time: float | None
    val_loss: float | None
    val_bpb: float | None
    status: str
    curve: list[dict] = field(default_factory=list)  # validation rows with tokens, flops, wall_time, val_loss
    rows: list[dict] = field(default_factory=list)  # every metrics row (for the noise scale)
    seed: int | None = None  # the sweep seed (manifests of sweeps with a seeds axis); None otherwise
    point: str = ""  # the grid point: run_id without its -s{seed} suffix (runs differing only by seed share it)
    source: str = ""  # the sweep or run directory the record was read from


def _read_json(path: str) -> dict:
    try:
        with storage.open_file(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        where = f"line {e.lineno}" if isinstance(e, json.JSONDecodeError) else f"byte {e.start}: not UTF-8"
        raise DataError(f"'{path}' is not valid JSON ({where}); restore it or rerun the command that wrote "
                        "it") from None
    if not isinstance(data, dict):
        raise DataError(f"'{path}' holds a JSON {type(data).__name__}, not an object; restore it or rerun the "
                        "command that wrote it")
    return data


MANIFEST_FIELDS = ("run_id", "objective", "size", "status", "run_dir", "n", "tokens", "flops")


def _manifest_runs(path: str) -> list[dict]:
    """The ``runs`` of a sweep manifest, each with the fields a report reads (else one line naming the file)."""
    runs = _read_json(path).get("runs")
    if not isinstance(runs, list):
        raise DataError(f"'{path}' has no list of runs; rerun the sweep to rewrite it")
    for i, e in enumerate(runs):
        missing = [k for k in MANIFEST_FIELDS if not isinstance(e, dict) or k not in e]
        if missing:
            raise DataError(f"'{path}' run {i} lacks {', '.join(missing)}; rerun the sweep to rewrite it")
        try:
            float(e["n"]), float(e["tokens"]), float(e["flops"])
        except (TypeError, ValueError):
            raise DataError(f"'{path}' run {i} ({e['run_id']}) has a non-numeric n, tokens or flops; rerun the "
                            "sweep to rewrite it") from None
        seed = e.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise DataError(f"'{path}' run {i} ({e['run_id']}) has seed {seed!r}, not an integer >= 0; rerun the "
                            "sweep to rewrite it")
    return runs


def run_curve(rows: list[dict]) -> list[dict]:
    """Validation rows with the wall-clock of the training row of the same step (validation rows carry none)."""
    wall = {r["step"]: r["wall_time"] for r in rows if "wall_time" in r}
    return [{**r, "wall_time": wall.get(r["step"])} for r in rows if "val_loss" in r]


def _load_run_dir(run_dir: str, run_id: str, objective: str, size: str, status: str) -> RunRecord:
    path = storage.join(run_dir, METRICS_FILE)
    try:
        rows = read_metrics(path) if storage.isfile(path) else []
    except ValueError as e:  # a damaged line other than a torn last one
        raise DataError(f"{str(e).splitlines()[0]}; repair or delete that line to report the run") from None
    summary_path = storage.join(run_dir, SUMMARY_FILE)
    summary = _read_json(summary_path) if storage.isfile(summary_path) else {}
    curve = run_curve(rows)
    last = curve[-1] if curve else {}
    # a stage's compute is counted over every stage, as its curve is (``total_*``; older summaries: its own)
    return RunRecord(run_id, objective, size, float(summary.get("non_embedding_params", 0)),
                     float(summary.get("total_tokens", summary.get("tokens", last.get("tokens", 0)))),
                     float(summary.get("total_flops", summary.get("flops", last.get("flops", 0)))),
                     summary.get("wall_time"), summary.get("val_loss", last.get("val_loss")),
                     summary.get("val_bpb", last.get("val_bpb")), status, curve, rows)


def check_report_paths(paths: list[str]) -> None:
    """Every path is a sweep directory or a run directory (cheap: checked before any output is written)."""
    for path in paths:
        if not (storage.isfile(storage.join(path, MANIFEST)) or storage.isfile(storage.join(path, METRICS_FILE))):
            raise DataError(f"'{path}' is neither a sweep directory ({MANIFEST}) nor a run directory "
                            f"({METRICS_FILE}); pass the directories `sweep` or `train` wrote")


def load_runs(paths: list[str]) -> list[RunRecord]:
    """Runs of every sweep directory (manifest order) and every single run directory given (each once, however
    it is spelled: ``dir`` and ``dir/``)."""
    records = []
    for path in dict.fromkeys(storage.absolute(p) for p in paths):
        if storage.isfile(storage.join(path, MANIFEST)):
            for e in _manifest_runs(storage.join(path, MANIFEST)):
                # the run beside the manifest (a copied or moved sweep, a report run from elsewhere); the recorded
                # path only for runs kept outside it
                here = storage.join(path, e["run_id"])
                run_dir = here if storage.isdir(here) else e["run_dir"]
                rec = _load_run_dir(run_dir, e["run_id"], e["objective"], e["size"], e["status"])
                rec.n, rec.tokens, rec.flops = float(e["n"]), float(e["tokens"]), float(e["flops"])
                rec.seed, rec.source = e.get("seed"), path
                # an unseeded run is its own point (it would otherwise pool with the seeded runs of its grid point,
                # often as a duplicate of seed 0, which shares its default seeds)
                rec.point = f"{e['run_id']} (unseeded)" if rec.seed is None else e["run_id"].removesuffix(
                    f"-s{rec.seed}")
                if e["status"] != "done":  # an unfinished run's last eval is not its final loss
                    rec.val_loss = rec.val_bpb = None
                records.append(rec)
        elif storage.isfile(storage.join(path, METRICS_FILE)):
            config = {}
            config_path = storage.join(path, CONFIG_FILE)
            if storage.isfile(config_path):
                try:
                    with storage.open_file(config_path, "rb") as f:
                        config = yaml.safe_load(f.read().decode("utf-8")) or {}
                except (UnicodeDecodeError, yaml.YAMLError):
                    raise DataError(f"'{config_path}' is not valid YAML; restore the run's config") from None
                config = config if isinstance(config, dict) else {}
            summary_path = storage.join(path, SUMMARY_FILE)
            done = storage.isfile(summary_path) and not _read_json(summary_path).get("preempted", False)
            objective = config.get("objective") or {}
            objective = objective.get("name", "?") if isinstance(objective, dict) else str(objective)
            model = config.get("model")
            size = model.get("series", "custom") if isinstance(model, dict) else "custom"
            rec = _load_run_dir(path, _name(path), objective, size,
                                "done" if done else "interrupted")
            rec.point, rec.source = rec.run_id, path
            records.append(rec)
        else:
            check_report_paths([path])  # raises: names what a path must hold
    if not records:
        raise DataError("no runs found in " + ", ".join(paths))
    return records


def _name(path: str) -> str:
    """The last component of a run or sweep directory (``gs://b/sweeps/x/`` -> ``x``)."""
    return storage.basename(path) if storage.is_remote(path) else os.path.basename(os.path.normpath(path))


# ---------------------------------------------------------------------------------------------- fits


def _finished(records: list[RunRecord]) -> list[RunRecord]:
    return [r for r in records if r.status == "done" and r.val_loss and math.isfinite(r.val_loss) and r.n > 0
            and r.flops > 0]


def point_key(r: RunRecord) -> str:
    """Runs with one key differ only by seed: the same grid point of the same sweep directory."""
    return f"{r.source}\0{r.point or r.run_id}"


@dataclass(frozen=True)
class SeedPoint:
    """One grid point over its seeds: the finished runs' final validation losses summarised by ``stats``
    (mean, and mean ± the Student-t interval of the mean; see ``laws.seed_stats``)."""

    label: str  # the run id without its -s{seed} suffix
    objective: str
    size: str
    n: float
    tokens: float
    flops: float
    seeds: tuple  # seeds of the finished runs (None for a run of a sweep without seeds)
    run_ids: tuple
    planned: int  # runs of this point in the manifest, finished or not
    stats: laws.SeedStats


def seed_points(records: list[RunRecord], level: float = 0.95) -> list[SeedPoint]:
    """Runs grouped by grid point (``point_key``), in first-seen order; points with no finished run are left out."""
    groups: dict[str, list[RunRecord]] = {}
    for r in records:
        groups.setdefault(point_key(r), []).append(r)
    out = []
    for members in groups.values():
        done = _finished(members)
        if done:
            first = done[0]
            out.append(SeedPoint(first.point or first.run_id, first.objective, first.size, first.n, first.tokens,
                                 first.flops, tuple(r.seed for r in done), tuple(r.run_id for r in done),
                                 len(members), laws.seed_stats([r.val_loss for r in done], level)))
    return out


def _seeded_points(records: list[RunRecord]) -> list[SeedPoint]:
    """The points of sweeps with a seeds axis (a sweep without one has a single run per point, no seed)."""
    return [p for p in seed_points(records) if any(s is not None for s in p.seeds)]


def _try(fn, *args, **kwargs):
    """A fit that the data cannot support is left out of the report rather than failing it."""
    try:
        return fn(*args, **kwargs)
    except DataError:
        return None


def fit_objective(runs: list[RunRecord], target_flops: float, n_boot: int = 200) -> dict:
    """Per-objective fits on final validation losses: L(N), L(C) on the frontier, and the extrapolation.

    Every run is a row, so a point with several seeds enters once per seed (the bootstrap resamples runs and
    the seed scatter widens the intervals); L(C)'s frontier is chosen on the points' mean losses and keeps
    all seeds of a frontier point. Law choices count distinct sizes / (N, D) pairs, not rows."""
    n = np.array([r.n for r in runs])
    c = np.array([r.flops for r in runs])
    loss = np.array([r.val_loss for r in runs])
    keys = [point_key(r) for r in runs]
    groups = keys if len(set(keys)) < len(keys) else None  # None: one run per point, the row-wise frontier
    out: dict = {}
    if len(np.unique(n)) >= 4:
        out["loss_vs_n"] = _try(laws.fit_power_offset, n, loss, n_boot=n_boot)
    elif len(np.unique(n)) >= 2:
        out["loss_vs_n"] = _try(laws.fit_power_law, n, loss, n_boot=n_boot)
    if len(np.unique(c)) >= 2:
        fit = _try(laws.fit_compute_law, c, loss, n_boot=n_boot, groups=groups)
        if fit is not None:
            lo, hi = fit.predict_interval(target_flops)
            out["loss_vs_compute"] = fit
            out["extrapolation"] = {"flops": target_flops, "loss": float(fit.predict(target_flops)),
                                    "ci": [float(lo), float(hi)]}
    d = np.array([r.tokens for r in runs])
    # approach 3 needs D to vary independently of N (not a fixed token count, not a fixed ratio D/N)
    if len(set(zip(n, d, strict=True))) >= 5 and laws.nd_vary_independently(n, d):
        fit = _try(laws.fit_chinchilla, n, d, loss, n_boot=min(n_boot, 50))
        if fit is not None:
            out["chinchilla"] = fit
            out["compute_optimal"] = compute_optimal(fit.params, target_flops, n, d, c)
        iso = _try(laws.fit_isoflop, n, d, loss, compute=c, n_boot=n_boot)
        if iso is not None:
            out["isoflop"] = iso
    return {k: v for k, v in out.items() if v is not None}


def compute_optimal(params: dict[str, float], target_flops: float, n: np.ndarray, tokens: np.ndarray,
                    flops: np.ndarray) -> dict:
    """Approach 3's (N, D) at ``target_flops`` counted as the runs count compute (their measured FLOPs per token,
    extended beyond the grid by ``laws.fit_flops_per_token``), not Hoffmann's C = 6ND: a tiny model spends most of
    its FLOPs outside its non-embedding parameters, so a 6ND allocation would cost 2-3x the budget. N is searched
    from 1/100 of the smallest run's to 100x the largest's times the budget's multiple of the largest run's compute
    (N_opt grows about as C^0.5)."""
    per_token = laws.fit_flops_per_token(n, flops / tokens)
    high = float(n.max()) * 100 * max(1.0, target_flops / float(flops.max()))
    alloc, inside = laws.optimal_allocation(params, target_flops, per_token, float(n.min()) / 100, high, points=4001)
    return {"flops": target_flops, "n": float(alloc.n), "tokens": float(alloc.d),
            "tokens_per_param": float(alloc.tokens_per_param), "bracketed": inside,
            "flops_per_token": {"k": per_token.k, "g": per_token.g, "q": per_token.q}}


def noise_scale_points(runs: list[RunRecord], window: int = 50) -> list[tuple[str, ns.NoiseScalePoint]]:
    """B_simple per window of ``window`` logged steps (at least 4 windows per run for short runs)."""
    out = []
    for r in runs:
        measured = sum(all(k in row for k in ns.KEYS) for row in r.rows)
        if measured:
            out += [(r.run_id, p) for p in ns.noise_scale_series(r.rows, max(1, min(window, measured // 4)))]
    return out


# ---------------------------------------------------------------------------------------------- plots


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def _save(fig, path: str) -> str:
    tmp = f"{path}.{os.getpid()}.tmp"
    fig.savefig(tmp, format="png", dpi=110)
    os.replace(tmp, path)
    return path


def _log_log(ax) -> None:
    """Log-log axes with plain loss numbers (2.5, not 2.5×10⁰) on the y-axis."""
    from matplotlib.ticker import FuncFormatter

    ax.set_xscale("log")
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:.3g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.tick_params(axis="y", which="minor", labelsize=7)


def _styles(records: list[RunRecord]) -> dict[str, tuple]:
    """Colour by objective, lighter for smaller models, so objectives stay separable on one axis."""
    from matplotlib import colormaps

    objectives = list(dict.fromkeys(r.objective for r in records))
    sizes = sorted({r.n for r in records})
    cmaps = ["Blues", "Oranges", "Greens", "Purples", "Reds", "Greys"]
    style = {}
    for r in records:
        shade = 0.45 + 0.55 * (sizes.index(r.n) / max(1, len(sizes) - 1))
        style[r.run_id] = colormaps[cmaps[objectives.index(r.objective) % len(cmaps)]](shade)
    return style


def plot_curves(records: list[RunRecord], axis: str, path: str) -> str:
    """Validation loss of every run against one x-axis (tokens, FLOPs or wall-clock), log-log."""
    key, label = AXES[axis]
    fig, ax = _figure()
    style = _styles(records)
    labelled = set()  # one legend entry per grid point, however many seeds it has
    for r in records:
        pts = [(p[key], p["val_loss"]) for p in r.curve if p.get(key)]
        if pts:
            x, y = zip(*pts, strict=True)
            legend = "_nolegend_" if point_key(r) in labelled else f"{r.objective} {r.size}"
            labelled.add(point_key(r))
            ax.plot(x, y, "o-", color=style[r.run_id], markersize=3, label=legend)
    _log_log(ax)
    ax.set_xlabel(label)
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"validation loss vs {label}")
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def plot_fit(records: list[RunRecord], fits: dict[str, dict], x_key: str, fit_key: str, path: str,
             x_max: float | None = None) -> str:
    """Final losses per objective with the fitted law and its bootstrap band, extended to ``x_max``."""
    return _save(fit_figure(records, fits, x_key, fit_key, x_max), path)


def fit_figure(records: list[RunRecord], fits: dict[str, dict], x_key: str, fit_key: str,
               x_max: float | None = None):
    """The figure of ``plot_fit``. Points with several seeds: every seed's run as a small dot, and the mean
    with an error bar of the Student-t 95% interval of the mean (what ``seed_points`` gives)."""
    fig, ax = _figure()
    style = _styles(records)
    measured = [r.val_loss for r in _finished(records)]
    seeded = False
    for objective, f in fits.items():
        runs = [r for r in _finished(records) if r.objective == objective]
        xs = np.array([getattr(r, x_key) for r in runs])
        color = style[runs[-1].run_id]
        points = seed_points(runs)
        if any(p.stats.n > 1 for p in points):
            seeded = True
            ax.scatter(xs, [r.val_loss for r in runs], color=color, s=10, alpha=0.4, zorder=2,
                       label=f"{objective} runs (every seed)")
            mean = np.array([p.stats.mean for p in points])
            half = np.nan_to_num(np.array([p.stats.half_width for p in points]), nan=0.0)
            ax.errorbar([getattr(p, x_key) for p in points], mean, yerr=[np.minimum(half, 0.99 * mean), half],
                        fmt="o", color=color, capsize=3, zorder=3, label=f"{objective} mean over seeds")
        else:
            ax.scatter(xs, [r.val_loss for r in runs], color=color, zorder=3, label=f"{objective} runs")
        fit = f.get(fit_key)
        if fit is None:
            continue
        grid = np.geomspace(xs.min() / 1.5, max(xs.max() * 1.5, x_max or 0), 100)
        lo, hi = fit.predict_interval(grid)
        ax.plot(grid, fit.predict(grid), color=color, label=f"{objective} fit")
        ax.fill_between(grid, lo, hi, color=color, alpha=0.2)
        if fit_key == "loss_vs_compute" and "extrapolation" in f:
            e = f["extrapolation"]
            measured.append(e["loss"])
            # a percentile interval need not hold the point estimate (a skewed bootstrap): no negative bar
            below, above = max(e["loss"] - e["ci"][0], 0.0), max(e["ci"][1] - e["loss"], 0.0)
            ax.errorbar([e["flops"]], [e["loss"]], yerr=[[below], [above]],
                        fmt="*", color=color, markersize=10, capsize=3)
    _log_log(ax)
    if measured:  # wild bootstrap refits far from the data must not squash the picture
        ax.set_ylim(min(measured) / 1.25, max(measured) * 1.25)
    ax.set_xlabel({"n": "non-embedding parameters N", "flops": "training FLOPs C"}[x_key])
    ax.set_ylabel("final validation loss (nats/token)")
    ax.set_title("final loss with fitted law (95% bootstrap band)"
                 + ("; seed mean ± 95% t-interval" if seeded else ""))
    ax.grid(True, which="both", alpha=0.3)
    if ax.collections:
        ax.legend(fontsize=8)
    return fig


# ---------------------------------------------------------------------------------------------- report


def _interval(lo: float, hi: float, fmt: str = ".4g") -> str:
    """'[lo, hi]', or why there is none (as many points as parameters: the fit is exact, its error unknown)."""
    if math.isnan(lo) or math.isnan(hi):
        return "(no interval: too few points)"
    return f"[{lo:{fmt}}, {hi:{fmt}}]"


def _fmt_fit(fit: laws.Fit) -> str:
    return ", ".join(f"{k} = {v:.4g} {_interval(*fit.ci[k])}" for k, v in fit.params.items())


def _runs_table(records: list[RunRecord]) -> list[str]:
    lines = ["| run | objective | size | N | tokens | FLOPs | wall-clock (s) | val loss | val bits/byte | status |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    num = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
    for r in sorted(records, key=lambda r: (r.objective, r.n)):
        lines.append(f"| {r.run_id} | {r.objective} | {r.size} | {r.n:,.0f} | {r.tokens:,.0f} | {r.flops:.3g} | "
                     f"{num(r.wall_time, '.0f')} | {num(r.val_loss, '.4f')} | {num(r.val_bpb, '.4f')} | {r.status} |")
    return lines


def _seeds_section(records: list[RunRecord]) -> list[str]:
    """Grid points of seeded sweeps: mean final loss ± the t-interval of the mean, and how many seeds."""
    points = _seeded_points(records)
    if not points:
        return []
    lines = ["## Seeds (mean final validation loss over seeds, ± the 95% Student-t interval of the mean)", "",
             "Interval: mean ± t(0.975, n−1) · s/√n, s the standard deviation over the n finished seeds; none "
             "for one seed. The fits below take every seed's run as a point of its own.", "",
             "| point | objective | size | N | FLOPs | val loss | 95% interval | seeds |",
             "| --- | --- | --- | ---: | ---: | ---: | --- | --- |"]
    for p in sorted(points, key=lambda p: (p.objective, p.n, p.flops)):
        st = p.stats
        loss = f"{st.mean:.4f} (n=1)" if st.n == 1 else f"{st.mean:.4f} ± {st.half_width:.4f} (n={st.n})"
        seeds = ", ".join(str(s) for s in p.seeds) + (f" ({st.n} of {p.planned} finished)" if p.planned > st.n
                                                      else "")
        lines.append(f"| {p.label} | {p.objective} | {p.size} | {p.n:,.0f} | {p.flops:.3g} | {loss} | "
                     f"{_interval(*st.interval, '.4f')} | {seeds} |")
    return lines + [""]


def _seed_point_dict(p: SeedPoint) -> dict:
    st = p.stats
    known = lambda v: None if math.isnan(v) else v  # noqa: E731  (one seed: no spread, no interval)
    return {"point": p.label, "objective": p.objective, "size": p.size, "n": p.n, "tokens": p.tokens,
            "flops": p.flops, "seeds": list(p.seeds), "run_ids": list(p.run_ids), "planned": p.planned,
            "mean": st.mean, "half_width": known(st.half_width), "interval": [known(v) for v in st.interval],
            "std": known(st.std), "min": st.min, "max": st.max, "n_seeds": st.n, "level": st.level,
            "interval_kind": "mean ± Student-t half-width"}


def _fits_section(fits: dict[str, dict]) -> list[str]:
    lines = ["## Fits (95% bootstrap intervals)", ""]
    names = {"loss_vs_n": "L(N)", "loss_vs_compute": "Kaplan L(C_min) = (C_c/C)^α on the compute frontier",
             "chinchilla": "Chinchilla approach 3 L = E + A/N^α + B/D^β"}
    for objective, f in fits.items():
        lines.append(f"### {objective}")
        for key, title in names.items():
            if key in f:
                form = {"power_offset": " = E + (N_c/N)^α", "power": " = (N_c/N)^α"}.get(f[key].law, "") \
                    if key == "loss_vs_n" else ""
                lines.append(f"- {title}{form}: {_fmt_fit(f[key])}")
        if "extrapolation" in f:
            e = f["extrapolation"]
            lines.append(f"- extrapolated loss at C = {e['flops']:.3g} FLOPs: **{e['loss']:.4f}** "
                         f"{_interval(*e['ci'], '.4f')}")
        if "compute_optimal" in f:
            a = f["compute_optimal"]
            per_token = a["flops_per_token"]
            edge = "" if a["bracketed"] else " (at the edge of the searched sizes: not bracketed)"
            lines.append(f"- compute-optimal at C = {a['flops']:.3g} FLOPs: N = {a['n']:.3g}, D = {a['tokens']:.3g} "
                         f"({a['tokens_per_param']:.1f} tokens/parameter){edge}; FLOPs/token = "
                         f"{per_token['k']:.3g}·N + {per_token['g']:.3g}·N^{per_token['q']:.3f} fitted on the runs")
        if "isoflop" in f:
            iso = f["isoflop"]
            lines.append(f"- IsoFLOP (approach 2): N_opt ∝ C^{iso.a:.3f}, D_opt ∝ C^{iso.b:.3f} "
                         f"from {len(iso.budgets)} budgets")
        if len(f) == 0:
            lines.append("- not enough finished runs to fit (need >= 2 sizes)")
        lines.append("")
    return lines


def _equal_compute_section(fits: dict[str, dict], compute: float) -> list[str]:
    """Every objective's fitted L(C) read at one compute: the comparison the sweep exists for."""
    rows = [(o, f["loss_vs_compute"]) for o, f in fits.items() if "loss_vs_compute" in f]
    if len(rows) < 2:
        return []
    lines = [f"## Objectives at equal compute (C = {compute:.3g} FLOPs, the largest all reached; from each "
             "objective's L(C))", "",
             "| objective | loss | 95% interval |", "| --- | ---: | --- |"]
    for objective, fit in sorted(rows, key=lambda t: float(t[1].predict(compute))):
        lo, hi = fit.predict_interval(compute)
        lines.append(f"| {objective} | {float(fit.predict(compute)):.4f} | {_interval(float(lo), float(hi), '.4f')} |")
    return lines + [""]


def _noise_section(records: list[RunRecord]) -> list[str]:
    points = noise_scale_points(records)
    if not points:
        return []
    lines = ["## Gradient noise scale (B_simple, tokens; McCandlish et al.)", "",
             "| run | step | loss | B_simple |", "| --- | ---: | ---: | ---: |"]
    last = {}
    for run_id, p in points:
        last[run_id] = p
    for run_id, p in last.items():
        lines.append(f"| {run_id} | {p.step:.0f} | {p.loss:.4f} | {p.b_simple:,.0f} |")
    if len(points) >= 3:
        fit = _try(ns.fit_critical_batch, [p.loss for _, p in points], [p.b_simple for _, p in points])
        if fit is not None:
            ci = fit.ci
            lines.append(f"\nB_crit(L) = B*/L^(1/α_B): B* = {fit.b_star:.3g} [{ci['b_star'][0]:.3g}, "
                         f"{ci['b_star'][1]:.3g}], α_B = {fit.alpha_b:.3f} [{ci['alpha_b'][0]:.3f}, "
                         f"{ci['alpha_b'][1]:.3f}] (Kaplan: B* ≈ 2e8, α_B ≈ 0.21)")
    return lines + [""]


def write_report(paths: list[str], out_dir: str, target_flops: float | None = None, n_boot: int = 200) -> str:
    """Plots, fits and ``report.md`` / ``report.json`` for the runs under ``paths``; returns report.md's path.

    A bucket ``out_dir``: the report is written to a local temporary directory, then each file uploaded (every
    upload is a whole object, so a reader sees each file old or new, never half)."""
    if storage.is_remote(out_dir):  # the run directories' uploader: a local mirror, then one object per file
        with tempfile.TemporaryDirectory(prefix="scaling_jax-report-") as cache:
            mirror = storage.RunMirror(out_dir, skip=(), cache_root=cache)
            write_report(paths, mirror.local, target_flops, n_boot)
            mirror.push()
        return storage.join(out_dir, "report.md")
    records = load_runs(paths)
    finished = _finished(records)
    os.makedirs(out_dir, exist_ok=True)
    max_flops = max((r.flops for r in finished), default=0.0)
    target = target_flops or (10 * max_flops if max_flops else 0.0)
    fits = {o: fit_objective([r for r in finished if r.objective == o], target, n_boot)
            for o in dict.fromkeys(r.objective for r in finished)}
    images = [os.path.basename(plot_curves(records, axis, os.path.join(out_dir, f"loss_vs_{axis}.png")))
              for axis in AXES]
    if finished:
        images.append(os.path.basename(plot_fit(records, fits, "n", "loss_vs_n",
                                                os.path.join(out_dir, "fit_loss_vs_params.png"))))
        images.append(os.path.basename(plot_fit(records, fits, "flops", "loss_vs_compute",
                                                os.path.join(out_dir, "fit_loss_vs_compute.png"), target)))
    lines = [f"# Scaling report: {', '.join(_name(p) for p in paths)}", "",
             f"{len(records)} runs ({len(finished)} finished) from {', '.join(paths)}. Loss is next-token "
             "validation loss for every objective, so objectives share one axis.", "", "## Runs", "",
             *_runs_table(records), "", *_diverged_note(records), *_seeds_section(records), "## Curves", ""]
    lines += [f"![{name}]({name})" for name in images] + [""]
    lines += _fits_section(fits)
    fitted = [o for o, f in fits.items() if "loss_vs_compute" in f]  # the objectives the comparison reads
    if max_flops and fitted:  # the largest compute every compared objective reached: inside each fit's data
        shared = min(max(r.flops for r in finished if r.objective == o) for o in fitted)
        lines += _equal_compute_section(fits, shared)
    lines += _noise_section(records)
    report = os.path.join(out_dir, "report.md")
    with open(report, "w") as f:
        f.write("\n".join(lines))
    payload = {"target_flops": target, "runs": [{k: v for k, v in vars(r).items() if k not in ("curve", "rows")}
                                                for r in records],
               "seed_points": [_seed_point_dict(p) for p in _seeded_points(records)],
               "fits": {o: {k: (v.to_dict() if isinstance(v, laws.Fit) else _iso_dict(v) if k == "isoflop" else v)
                            for k, v in f.items()} for o, f in fits.items()}}
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(payload, f, indent=2, default=lambda v: None if isinstance(v, float) and math.isnan(v) else str(v))
    return report


def _diverged_note(records: list[RunRecord]) -> list[str]:
    """Finished runs whose final validation loss is not a number: named, since the fits leave them out."""
    bad = [r.run_id for r in records if r.status == "done" and r.val_loss is not None and not math.isfinite(r.val_loss)]
    return [f"Left out of every fit and seed statistic: {', '.join(bad)} (final validation loss not finite: the run "
            "diverged).", ""] if bad else []


def _iso_dict(iso: laws.IsoFlopFit) -> dict:
    return {"budgets": iso.budgets.tolist(), "n_opt": iso.n_opt.tolist(), "a": iso.a, "b": iso.b}
