"""Ablation sweeps: objectives × model sizes × token budgets, every run with a schedule as long as its budget.

A sweep file (``configs/sweeps/*.yaml``) names a base config, overrides for every run, and the three axes.
Each run's ``train.steps`` comes from its own budget, so a cosine schedule ends where the run ends (comparing
points taken early on one long schedule is the mistake Hoffmann et al. §3 and the "Chinchilla's death"
analysis warn about). Runs live in ``out_dir/RUN_ID``; ``manifest.json`` records every run's config, N,
tokens, FLOPs, wall-clock, final validation loss and status. Re-running the command skips finished runs and
resumes an interrupted one from its latest checkpoint (``train`` does that for a run directory).
``out_dir`` may be a bucket (``gs://bucket/sweeps/NAME``): run directories, their status and ``manifest.json``
are read and written through ``scaling_jax.paths``, as a single run's ``train.run_dir`` is.

Sizes: ``passuntil:1..3`` (a range), ``passuntil:2``, ``kaplan:4x256``, or a mapping of model fields with a
``name``. Budgets: ``{tokens_per_param: 20}`` (N = non-embedding parameters of the size's base model, the same
for every objective), ``{tokens: 2.0e6}``, or ``{flops: 1.0e13}`` (per objective, with its own FLOPs/token,
for equal-compute and IsoFLOP comparisons).

Seeds: ``seeds: [0, 1, 2]`` repeats every grid point once per seed. A sweep seed sets both seeds a run
draws from: ``train.seed`` (model initialisation; also the train state's RNG key, which no objective draws
from today) and ``data.shuffle_seed`` (the order of training documents tokenized at load, the shuffle of
training rows, every source of a ``data.mixture`` included, and an instruction mixture's order and few-shot
exemplars). UL2's denoiser corruption has no seed of its own: each row seeds it with the crc32 of its
tokens, so it changes with the data order. The validation split (a stable hash of document names) and the
validation rows are the same for every seed. Run ids gain ``-s{seed}`` (``causal-m1-k3-s1``) only when the
spec has ``seeds``; without it every run keeps the base config's seeds and the ids of earlier sweeps, so
their finished runs are still recognised and skipped.

Executors (``executors.py``): ``scaling-jax sweep SPEC --executor ray [--address HOST:6379]`` runs every
unfinished run as a Ray task asking for the spec's optional ``ray`` section (``num_cpus``, ``num_gpus``,
``resources: {TPU: 4}``, ``max_retries``); the local executor (the default) ignores that section.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from scaling_jax import paths
from scaling_jax import run_dir as run_dirs
from scaling_jax.config import COMPILATION_CACHE_IN_RUN, Config, load_config, read_yaml, to_dict
from scaling_jax.data.tokenizer import resolved_config
from scaling_jax.errors import ConfigError
from scaling_jax.run_dir import COMPILATION_CACHE_DIR, CONFIG_FILE, METRICS_FILE, REPORT_DIR, SUMMARY_FILE
from scaling_jax.scaling.executors import Executor, LocalExecutor, RayOptions, ray_options

MANIFEST = "manifest.json"
# Fields that change how a run is watched, not what it computes: a rerun may change them freely.
COSMETIC = {"train.progress", "train.tensorboard", "train.plot", "train.async_checkpointing",
            "train.keep_checkpoints", "train.peak_flops_per_device", "train.eval_every", "train.checkpoint_every",
            "train.check_memory", "train.shared_filesystem", "train.profile_steps", "train.profile_skip",
            "train.project_loss", "train.compilation_cache", "train.run_dir", "model.remat",
            "model.attention", "model.cudnn_max_segments"}  # how a run is done, not what it computes
BUDGET_KINDS = ("tokens_per_param", "tokens", "flops")
SPEC_KEYS = ("name", "base", "overrides", "out_dir", "objectives", "sizes", "budgets", "seeds", "warmup_fraction",
             "evals_per_run", "checkpoints_per_run", "ray")
SEED_FIELDS = ("train.seed", "data.shuffle_seed")  # what one sweep seed sets


@dataclass
class SweepSpec:
    name: str
    path: str
    base: str | None
    overrides: dict[str, Any]
    out_dir: str
    objectives: dict[str, dict[str, Any]]  # label -> dotted overrides (objective.name defaults to the label)
    sizes: dict[str, dict[str, Any]]  # label -> model fields
    budgets: list[tuple[str, float]]  # (kind, value)
    warmup_fraction: float = 0.05
    evals_per_run: int = 4
    checkpoints_per_run: int = 2
    seeds: list[int] | None = None  # None: no seeds axis (one run per point, the base config's seeds)
    ray: RayOptions = field(default_factory=RayOptions)  # what each run's task asks for under --executor ray


@dataclass
class PlannedRun:
    run_id: str
    objective: str
    size: str
    budget: str
    config: Config
    n: int  # non-embedding parameters of the trained model (objective extras included)
    n_base: int  # non-embedding parameters of the size's plain decoder (what tokens_per_param multiplies)
    params: int
    tokens: int
    flops: float
    steps: int
    extra: dict = field(default_factory=dict)
    seed: int | None = None  # the sweep seed (train.seed = data.shuffle_seed); None without a seeds axis


def _fail(path: str, message: str) -> ConfigError:
    return ConfigError(f"sweep file '{path}': {message}")


def expand_sizes(entries: list, path: str) -> dict[str, dict[str, Any]]:
    """Size entries -> {label: model overrides}; ``passuntil:A..B`` expands to every member."""
    sizes: dict[str, dict[str, Any]] = {}
    for entry in entries:
        if isinstance(entry, str):
            if m := re.fullmatch(r"(\w+):(\d+)\.\.(\d+)", entry):
                members = [f"{m.group(1)}:{i}" for i in range(int(m.group(2)), int(m.group(3)) + 1)]
            else:
                members = [entry]
            for series in members:
                _add_size(sizes, series.replace(":", ""), {"series": series}, path)
        elif isinstance(entry, dict) and "name" in entry:
            fields = {k: v for k, v in entry.items() if k != "name"}
            _add_size(sizes, str(entry["name"]), {"series": "custom", **fields} if "series" not in fields else fields,
                      path)
        else:
            raise _fail(path, f"size {entry!r} must be a series string (passuntil:1..3, kaplan:4x256) or a "
                              "mapping of model fields with a name")
    if not sizes:
        raise _fail(path, "sizes is empty; list at least one model size")
    for label in sizes:
        _check_label(label, "size", path)
    return sizes


def _check_label(label: str, kind: str, path: str) -> None:
    """Labels name run directories inside out_dir (``OBJECTIVE-SIZE-BUDGET``): no path separators or dots first."""
    if not re.fullmatch(r"[A-Za-z0-9_+][A-Za-z0-9_.+-]*", label):
        raise _fail(path, f"{kind} label '{label}' must be letters, digits and _ + - . (it names run directories "
                          "inside out_dir)")


def _objectives(raw: Any, path: str) -> dict[str, dict[str, Any]]:
    if isinstance(raw, list):
        raw = {str(name): {} for name in raw}
    if not isinstance(raw, dict) or not raw:
        raise _fail(path, "objectives must be a list of names (causal, mtp, ul2) or a mapping label -> overrides")
    out = {}
    for label, overrides in raw.items():
        _check_label(str(label), "objective", path)
        if not isinstance(overrides, (dict, type(None))):
            raise _fail(path, f"objective '{label}' must map to dotted overrides such as {{objective.heads: 4}}, "
                              f"got {overrides!r}")
        overrides = dict(overrides or {})
        if "objective" not in overrides and "objective.name" not in overrides:
            overrides["objective.name"] = label
        out[str(label)] = overrides
    return out


def _add_size(sizes: dict, name: str, fields: dict, path: str) -> None:
    if name in sizes:  # one run directory per name: a second model under it would be dropped or mixed in
        raise _fail(path, f"size {name!r} appears twice; give each size its own name")
    sizes[name] = fields


def _budgets(raw: Any, path: str) -> list[tuple[str, float]]:
    if not isinstance(raw, list) or not raw:
        raise _fail(path, "budgets must be a non-empty list such as [{tokens_per_param: 20}]")
    out = []
    for entry in raw:
        if not isinstance(entry, dict) or len(entry) != 1 or next(iter(entry)) not in BUDGET_KINDS:
            raise _fail(path, f"budget {entry!r} must have exactly one of {', '.join(BUDGET_KINDS)}")
        kind, value = next(iter(entry.items()))
        try:
            value = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            value = math.nan
        if not (value > 0 and math.isfinite(value)):
            raise _fail(path, f"budget {kind}={entry[kind]!r} must be > 0 (a finite number)")
        if budget_label(kind, value) in (budget_label(k, v) for k, v in out):
            raise _fail(path, f"budget {kind}={entry[kind]!r} appears twice (as {budget_label(kind, value)}); list "
                              "each budget once")
        out.append((kind, value))
    return out


def _seeds(raw: Any, path: str) -> list[int] | None:
    """``seeds``: a non-empty list of distinct integers >= 0 (None when the key is absent or null)."""
    if raw is None:
        return None
    what = "seeds must be a non-empty list of distinct integers >= 0 such as [0, 1, 2]"
    if not isinstance(raw, list) or not raw:
        raise _fail(path, f"{what}, got {raw!r}")
    for seed in raw:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise _fail(path, f"{what}; {seed!r} is not")
    repeated = next((s for i, s in enumerate(raw) if s in raw[:i]), None)
    if repeated is not None:
        raise _fail(path, f"{what}; {repeated} is listed twice")
    return list(raw)


def _check_seed_overrides(spec: SweepSpec) -> None:
    """With a seeds axis, no override may set the fields a sweep seed sets (which one would win is a guess)."""
    if spec.seeds is None:
        return
    for where, overrides in (("overrides", spec.overrides),
                             *((f"objective '{k}'", v) for k, v in spec.objectives.items())):
        for key in SEED_FIELDS:
            section, name = key.split(".")
            nested = overrides.get(section)
            if key in overrides or (isinstance(nested, dict) and name in nested):
                raise _fail(spec.path, f"seeds sets {' and '.join(SEED_FIELDS)} of every run, and {where} sets "
                                       f"{key} too; drop that override or the seeds key")


def load_sweep(path: str, overrides: list[str] | None = None) -> SweepSpec:
    """Read and check a sweep file; ``overrides`` (dotted key=value) apply to every run."""
    from scaling_jax.config import parse_overrides

    if not os.path.isfile(path):
        raise ConfigError(f"sweep file '{path}' does not exist; pass one such as configs/sweeps/micro.yaml")
    raw = read_yaml(path, f"sweep file '{path}'")
    if not isinstance(raw, dict):
        raise _fail(path, "must be a mapping with objectives, sizes and budgets")
    unknown = sorted(set(raw) - set(SPEC_KEYS))
    if unknown:
        raise _fail(path, f"unknown key '{unknown[0]}'; valid keys: {', '.join(SPEC_KEYS)}")
    for key in ("objectives", "sizes", "budgets"):
        if key not in raw:
            raise _fail(path, f"missing '{key}'")
    for key, kinds, what in (("name", (str, int, float), "a string"), ("base", str, "a config file path"),
                             ("out_dir", str, "a directory path"), ("overrides", dict, "a mapping of dotted overrides"),
                             ("sizes", list, "a list")):
        if raw.get(key) is not None and (isinstance(raw[key], bool) or not isinstance(raw[key], kinds)):
            raise _fail(path, f"{key} must be {what}, got {raw[key]!r}")
    numbers = {}
    for key, kind, default, low in (("warmup_fraction", float, 0.05, 0.0), ("evals_per_run", int, 4, 1),
                                    ("checkpoints_per_run", int, 2, 1)):
        value = raw.get(key, default)
        try:  # (YAML 1.1 reads 1e-3 as a string)
            number = math.nan if isinstance(value, bool) else float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number) or number < low or (kind is int and number != int(number)):
            raise _fail(path, f"{key}={value!r} must be {'a number in [0, 1)' if kind is float else 'an integer >= 1'}")
        numbers[key] = kind(number)
    name = str(raw.get("name") or os.path.splitext(os.path.basename(path))[0])
    base = raw.get("base") or None
    if base and not os.path.isabs(base) and not os.path.isfile(base):
        candidate = os.path.join(os.path.dirname(path), base)
        base = candidate if os.path.isfile(candidate) else base
    common = dict(raw.get("overrides") or {})
    common.update(parse_overrides(overrides or []))
    spec = SweepSpec(name=name, path=path, base=base, overrides=common,
                     # absolute: the manifest's run paths must not depend on where sweep (or a Ray worker) runs
                     out_dir=paths.absolute(str(raw.get("out_dir") or os.path.join("runs", "sweeps", name))),
                     objectives=_objectives(raw["objectives"], path), sizes=expand_sizes(raw["sizes"] or [], path),
                     budgets=_budgets(raw["budgets"], path), seeds=_seeds(raw.get("seeds"), path),
                     ray=ray_options(raw.get("ray"), path), **numbers)
    _check_seed_overrides(spec)
    if not 0.0 <= spec.warmup_fraction < 1.0:
        raise _fail(path, f"warmup_fraction={spec.warmup_fraction} must be in [0, 1)")
    if spec.evals_per_run < 1 or spec.checkpoints_per_run < 1:
        raise _fail(path, "evals_per_run and checkpoints_per_run must be >= 1")
    return spec


def budget_label(kind: str, value: float) -> str:
    short = {"tokens_per_param": "k", "tokens": "t", "flops": "c"}[kind]
    return f"{short}{value:g}".replace("+", "")


def _size_and_cost(config: Config) -> tuple[Any, Any, float]:
    """(counts of the plain decoder, counts with objective extras, FLOPs/token with extras)."""
    from scaling_jax.data.tokenizer import build_tokenizer
    from scaling_jax.model.family import flops_per_token, param_counts
    from scaling_jax.objectives.base import build_objective

    extras = build_objective(config.objective, build_tokenizer(config.data.tokenizer)).size_extras()
    return (param_counts(config.model), param_counts(config.model, **extras),
            flops_per_token(config.model, config.data.seq_len, **extras))


def plan(spec: SweepSpec, objectives: list[str] | None = None, sizes: list[str] | None = None) -> list[PlannedRun]:
    """The grid, every run's resolved config (steps from its own budget), N, tokens and FLOPs."""
    for wanted, have, what in ((objectives, spec.objectives, "objectives"), (sizes, spec.sizes, "sizes")):
        missing = sorted(set(wanted or []) - set(have))
        if missing:
            raise ConfigError(f"--{what} {missing[0]!r} is not in sweep '{spec.name}'; it has {', '.join(have)}")
    runs = []
    for obj_label, obj_overrides in spec.objectives.items():
        if objectives and obj_label not in objectives:
            continue
        for size_label, model in spec.sizes.items():
            if sizes and size_label not in sizes:
                continue
            dotted = {**spec.overrides, **obj_overrides, **{f"model.{k}": v for k, v in model.items()}}
            probe = resolved_config(load_config(spec.base, {**dotted, "train.steps": 1, "optimizer.warmup_steps": 0}))
            base_counts, counts, fpt = _size_and_cost(probe)
            # one compilation cache for the sweep, so seeds (same programs but for the initialisation) and reruns
            # share compiled steps, unless the sweep's config chose its own
            shared = ({"train.compilation_cache": paths.join(spec.out_dir, COMPILATION_CACHE_DIR)}
                      if probe.train.compilation_cache == COMPILATION_CACHE_IN_RUN else {})
            tokens_per_step = probe.data.batch_size * probe.data.seq_len
            for kind, value in spec.budgets:
                tokens = {"tokens_per_param": value * base_counts.non_embedding, "tokens": value,
                          "flops": value / fpt}[kind]
                steps = max(1, round(tokens / tokens_per_step))
                label = budget_label(kind, value)
                for seed in spec.seeds or [None]:
                    run_id = f"{obj_label}-{size_label}-{label}" + ("" if seed is None else f"-s{seed}")
                    seeded = {} if seed is None else dict.fromkeys(SEED_FIELDS, seed)
                    run = {**dotted, **shared, **seeded, "train.steps": steps,
                           "optimizer.warmup_steps": min(steps, round(spec.warmup_fraction * steps)),
                           "train.eval_every": math.ceil(steps / spec.evals_per_run),  # the last lands on the end
                           "train.checkpoint_every": math.ceil(steps / spec.checkpoints_per_run),
                           "train.run_dir": paths.join(spec.out_dir, run_id)}
                    config = load_config(spec.base, run)
                    config.model.vocab_size = probe.model.vocab_size  # as the trainer will resolve it
                    runs.append(PlannedRun(run_id, obj_label, size_label, label, config, counts.non_embedding,
                                           base_counts.non_embedding, counts.total, steps * tokens_per_step,
                                           steps * tokens_per_step * fpt, steps, seed=seed))
    return runs


# ---------------------------------------------------------------------------------------------- running


def _read_json(path: str) -> dict | None:
    """A JSON file, local or in a bucket; None when it is missing or unreadable as JSON."""
    try:
        return json.loads(paths.read_text(path))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _write_json(path: str, data: Any) -> None:
    """Atomic on both kinds of path: temp file + rename locally, a single upload to a bucket."""
    paths.write_text(path, json.dumps(data, indent=2, default=float))


def _normalised(config_dict: dict) -> dict:
    return yaml.safe_load(yaml.safe_dump(config_dict, sort_keys=True))


def run_status(run: PlannedRun) -> str:
    """done (summary of the full run), interrupted (started, unfinished) or pending; refuses a run directory
    made by a different config, which would otherwise be resumed with another schedule."""
    run_dir = run.config.train.run_dir
    saved_path = paths.join(run_dir, CONFIG_FILE)
    if paths.isfile(saved_path):
        saved = _normalised(to_dict(load_config(saved_path, saved_run=True)))
        current = _normalised(to_dict(run.config))
        diff = sorted(f"{s}.{k}" for s in current for k in current[s]
                      if isinstance(current[s], dict) and f"{s}.{k}" not in COSMETIC
                      and (saved.get(s) or {}).get(k) != current[s][k])
        if diff:
            raise ConfigError(f"run directory {run_dir} was made by a different config ({diff[0]} differs); "
                              "point the sweep's out_dir elsewhere or delete that run")
    summary = _read_json(paths.join(run_dir, SUMMARY_FILE))
    if summary and summary.get("step") == run.steps and not summary.get("preempted"):
        return "done"
    return "interrupted" if paths.listdir(run_dir) else "pending"  # (listdir: [] when there is none)


def final_validation(run_dir: str) -> dict:
    """Final validation loss/bpb from summary.json, else the last validation row of metrics.jsonl."""
    from scaling_jax.train.metrics import read_metrics

    summary = _read_json(paths.join(run_dir, SUMMARY_FILE)) or {}
    if "val_loss" in summary:
        return {k: summary[k] for k in ("val_loss", "val_bpb") if k in summary}
    path = paths.join(run_dir, METRICS_FILE)
    rows = [r for r in read_metrics(path) if "val_loss" in r] if paths.isfile(path) else []
    return {k: rows[-1][k] for k in ("val_loss", "val_bpb") if k in rows[-1]} if rows else {}


def manifest_entry(run: PlannedRun, status: str) -> dict:
    run_dir = run.config.train.run_dir
    summary = _read_json(paths.join(run_dir, SUMMARY_FILE)) or {}
    entry = {"run_id": run.run_id, "objective": run.objective, "size": run.size, "budget": run.budget,
             "run_dir": run_dir, "status": status, "n": run.n, "n_base": run.n_base, "params": run.params,
             "tokens": run.tokens, "flops": run.flops, "steps": run.steps,
             "wall_time": summary.get("wall_time"), "config": to_dict(run.config)}
    if run.seed is not None:  # only with a seeds axis: an old sweep's manifest stays as it was
        entry["seed"] = run.seed
    if status == "done":
        entry.update(final_validation(run_dir))
    return entry


def check_out_dir(spec: SweepSpec) -> None:
    """``out_dir`` is new, or this sweep's own: a manifest.json there must be a manifest of this sweep (not
    another sweep's, a prepared data directory's or a user's file, which the sweep would replace)."""
    path = paths.join(spec.out_dir, MANIFEST)
    if not paths.exists(path):
        names = set(paths.listdir(spec.out_dir) if paths.exists(spec.out_dir) else []) - {COMPILATION_CACHE_DIR,
                                                                                          REPORT_DIR}
        if names:  # the whole grid's run names (only then: planning loads a config per size)
            names -= {paths.basename(r.config.train.run_dir) for r in plan(spec)}
        foreign = sorted(n for n in names if not run_dirs.is_run_dir(paths.join(spec.out_dir, n)))
        if foreign:  # a user's directory: the sweep would write its manifest, runs and report among their files
            raise ConfigError(f"out_dir '{spec.out_dir}' holds {foreign[0]}, which no sweep wrote, and no sweep "
                              "manifest; point the sweep's out_dir at a new or empty directory")
        return
    old = _read_json(path)
    if not isinstance(old, dict) or not isinstance(old.get("runs"), list) or "sweep" not in old:
        raise ConfigError(f"out_dir '{spec.out_dir}' holds a {MANIFEST} that is not a sweep's; point the sweep's "
                          "out_dir at a new directory")
    if old["sweep"] != spec.name:
        raise ConfigError(f"out_dir '{spec.out_dir}' holds sweep '{old['sweep']}', not '{spec.name}'; point the "
                          "sweep's out_dir at a new directory (or give the sweep that name to add to it)")


def write_manifest(spec: SweepSpec, entries: dict[str, dict]) -> str:
    """All runs of the sweep (earlier ones from the existing manifest kept), rewritten atomically."""
    path = paths.join(spec.out_dir, MANIFEST)
    old = _read_json(path) or {}
    runs = {r["run_id"]: r for r in old.get("runs", [])}
    runs.update(entries)
    _write_json(path, {"sweep": spec.name, "spec": os.path.abspath(spec.path), "runs": list(runs.values())})
    return path


def run_order(runs: list[PlannedRun]) -> list[PlannedRun]:
    """Smallest compute first, one pass of the grid per seed (in the spec's order): a sweep stopped part-way
    has every point at its first seed before it has any point at a second. Without seeds: by compute alone."""
    rank = {seed: i for i, seed in enumerate(dict.fromkeys(r.seed for r in runs))}
    return sorted(runs, key=lambda r: (rank[r.seed], r.flops))


def run_sweep(spec: SweepSpec, objectives: list[str] | None = None, sizes: list[str] | None = None,
              train_fn: Callable[[Config], dict] | None = None, say: Callable[[str], None] = print,
              executor: Executor | None = None) -> list[dict]:
    """Run every planned run not yet done, in ``run_order``, on ``executor`` (default: the local one, in this
    process). Returns the manifest entries.

    Locally a run that stops early (SIGTERM) stops the sweep; on Ray it is retried (``executors``). Either
    way rerunning the same command resumes what is unfinished and skips what is done.
    """
    if train_fn is None:
        from scaling_jax.train.loop import train as train_fn
    executor = executor or LocalExecutor()
    runs = run_order(plan(spec, objectives, sizes))
    check_out_dir(spec)
    if paths.is_remote(spec.out_dir):  # a bucket: prove it is reachable and writable before any run starts
        paths.prepare_dir(spec.out_dir, "out_dir")
    else:
        os.makedirs(spec.out_dir, exist_ok=True)
    entries = {r.run_id: manifest_entry(r, run_status(r)) for r in runs}
    write_manifest(spec, entries)
    heads, todo = {}, []
    for i, run in enumerate(runs, 1):
        head = f"[{i}/{len(runs)}] {run.run_id}: N={run.n:,}, {run.tokens:,} tokens, {run.flops:.3g} FLOPs"
        if entries[run.run_id]["status"] == "done":
            say(f"{head}: done, skipped (val loss {entries[run.run_id].get('val_loss', float('nan')):.4f})")
        else:
            heads[run.run_id] = head
            todo.append(run)

    def started(run: PlannedRun) -> None:  # "running": handed to the executor (on Ray, perhaps still queued)
        resuming = " (resuming)" if entries[run.run_id]["status"] == "interrupted" else ""
        say(f"{heads[run.run_id]}, {run.steps} steps{resuming}")
        entries[run.run_id] = manifest_entry(run, "running")
        write_manifest(spec, entries)

    def finished(run: PlannedRun, summary: dict | None, error: BaseException | None) -> None:
        if error is not None:  # (Ray) the run failed: it stays pending or interrupted, and a rerun resumes it
            entries[run.run_id] = manifest_entry(run, run_status(run))
            write_manifest(spec, entries)
            first = (str(error).strip() or type(error).__name__).splitlines()[0]
            say(f"{run.run_id} failed ({type(error).__name__}: {first}); rerun the command to resume it")
            return
        status = "interrupted" if summary.get("preempted") else "done"
        entries[run.run_id] = manifest_entry(run, status)
        write_manifest(spec, entries)
        if status == "interrupted":
            say(f"sweep stopped during {run.run_id} at step {summary.get('step')}; rerun the command to resume"
                if executor.stops_at_preemption else
                f"{run.run_id} stopped at step {summary.get('step')} and its retries are spent; rerun the "
                "command to resume it")
            return
        say(f"{run.run_id}: val loss {entries[run.run_id].get('val_loss', math.nan):.4f} in "
            f"{entries[run.run_id]['wall_time']:.0f} s")

    try:
        executor.run(todo, train_fn, started, finished, say)
    except BaseException:  # locally a run's error ends the sweep: no run is left marked "running"
        for run in todo:
            if entries[run.run_id]["status"] == "running":
                entries[run.run_id] = manifest_entry(run, run_status(run))
        write_manifest(spec, entries)
        raise
    return list(entries.values())


def format_plan(runs: list[PlannedRun]) -> str:
    """A table of the grid for ``--dry-run``."""
    lines = [f"{'run':<32} {'N':>10} {'tokens':>12} {'FLOPs':>10} {'steps':>7}"]
    for r in run_order(runs):
        lines.append(f"{r.run_id:<32} {r.n:>10,} {r.tokens:>12,} {r.flops:>10.3g} {r.steps:>7}")
    lines.append(f"total: {len(runs)} runs, {sum(r.tokens for r in runs):,} tokens, "
                 f"{sum(r.flops for r in runs):.3g} FLOPs")
    return "\n".join(lines)
