"""Evaluate checkpoints on tasks: load a run for inference, score tasks, run PassUntil, fit a series,
and write ``results.json``, ``results.md`` and plots (PU vs N on the paper's axes).

A run directory is read through its saved ``config.yaml`` (the model, objective and tokenizer it
was trained with) and ``Checkpointer.restore_partial``, so only parameters are read, never the
optimizer moments.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import jax
import numpy as np

from scaling_jax import paths
from scaling_jax.errors import CheckpointError
from scaling_jax.eval import passuntil as pu_lib
from scaling_jax.eval.scoring import LanguageModel, make_checker, passing_text, score_task, stop_sequences
from scaling_jax.eval.tasks import BIGBENCH_SEED, Task, build_prompts, load_task, task_from_dict
from scaling_jax.run_dir import CONFIG_FILE, EVAL_DIR


@dataclass
class LoadedRun:
    lm: LanguageModel
    run_dir: str
    step: int
    n_params: int  # non-embedding parameters (Kaplan's N), the x-axis of the task law
    total_params: int
    objective: str
    flops: float | None = None  # training compute up to this checkpoint, all stages (None: not recorded)


def check_run_dir(run_dir: str) -> None:
    """A run directory has ``config.yaml`` and ``checkpoints/`` (cheap: checked before any output is written)."""
    from scaling_jax.train.checkpoint import CHECKPOINT_DIR

    if not paths.exists(paths.join(run_dir, CONFIG_FILE)) or not paths.isdir(paths.join(run_dir, CHECKPOINT_DIR)):
        raise CheckpointError(f"--checkpoint '{run_dir}' is not a run directory (needs config.yaml and "
                              f"{CHECKPOINT_DIR}/); pass the train.run_dir of a finished run")


def load_run(run_dir: str, step: int | None = None) -> LoadedRun:
    """The model of a run directory, ready for decoding (latest checkpoint unless ``step`` is given)."""
    from flax import nnx

    from scaling_jax.config import load_config
    from scaling_jax.data.tokenizer import build_tokenizer
    from scaling_jax.model.decode import CachedLM
    from scaling_jax.model.family import param_counts
    from scaling_jax.objectives.base import build_objective
    from scaling_jax.train.checkpoint import Checkpointer
    from scaling_jax.train.state import abstract_model

    check_run_dir(run_dir)
    config = load_config(paths.join(run_dir, CONFIG_FILE), saved_run=True)
    tokenizer = build_tokenizer(config.data.tokenizer)
    objective = build_objective(config.objective, tokenizer)
    graphdef, shapes, _ = abstract_model(config.model, objective.build_model)
    checkpointer = Checkpointer(run_dir, keep=config.train.keep_checkpoints, async_save=False)
    try:
        step = checkpointer.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"run directory '{run_dir}' has no checkpoint yet; train it first")
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = {"params": jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), shapes)}
        params = checkpointer.restore_partial(step, target)["params"]
        flops = _training_flops(checkpointer, run_dir, int(step))
    finally:
        checkpointer.close()
    counts = param_counts(config.model, **objective.size_extras())
    model = nnx.merge(graphdef, params)
    lm = CachedLM(model, tokenizer, max_len=config.data.seq_len)  # prompts cut to what the model trained on
    return LoadedRun(lm, paths.absolute(run_dir), int(step), counts.non_embedding, counts.total, objective.name, flops)


def _training_flops(checkpointer, run_dir: str, step: int) -> float | None:
    """Training FLOPs up to ``step`` (every stage): the checkpoint's meta, else ``summary.json``'s
    ``total_flops`` when the summary is of that step; None when neither says (0 counts as unknown: imports)."""
    from scaling_jax.run_dir import SUMMARY_FILE, CheckpointMeta

    flops = None
    try:
        flops = float(CheckpointMeta.from_json(checkpointer.read_meta(step)).flops)
    except Exception:  # an older or foreign checkpoint without a readable meta: try the summary
        try:
            summary = json.loads(paths.read_text(paths.join(run_dir, SUMMARY_FILE)))
            flops = float(summary["total_flops"]) if summary.get("step") == step else None
        except Exception:
            flops = None
    return flops if flops and flops > 0 else None


def resolve_tasks(specs: list[str], num_examples: int = 100, seed: int = 0, save_dir: str | None = None) -> list[Task]:
    """Task files as given, BIG-bench tasks by name (``bigbench:navigate``, ``bigbench-lite``), generator specs
    (``arithmetic:digits=3``) generated and saved next to the results."""
    from scaling_jax.eval.bigbench import is_bigbench_spec, resolve_bigbench
    from scaling_jax.eval.generators import generate_task, write_task

    tasks = []
    for spec in specs:
        if is_bigbench_spec(spec):
            tasks.extend(resolve_bigbench(spec))
            continue
        if spec.endswith(".json") or os.path.isfile(spec):
            tasks.append(load_task(spec))
            continue
        data = generate_task(spec, num_examples, seed)
        name = spec.replace(":", "_").replace(",", "_").replace("=", "").replace("*", "x")
        path = write_task(data, os.path.join(save_dir, "tasks", f"{name}.json")) if save_dir else f"<{spec}>"
        tasks.append(task_from_dict(data, path, name=name))
    return tasks


# ----------------------------------------------------------------------------- PassUntil on a task


MAX_NEW_TOKENS = 48  # answer budget (tokens) and cut (characters) of generative tasks; BIG-bench's CLI uses 30


@dataclass(frozen=True)
class PassUntilOptions:
    passes: int = 2  # r: samples are drawn until the r-th pass (r >= 2 gives an unbiased estimate)
    max_samples: int = 64  # cap per instance; beyond it the loss-based estimate is used
    batch: int = 32  # samples generated together
    max_new_tokens: int = MAX_NEW_TOKENS
    confidence: float = 0.95


def passuntil_task(task: Task, lm: LanguageModel, options: PassUntilOptions, shots: int = 0, seed: int = 0,
                   max_examples: int = 0) -> tuple[list[pu_lib.InstancePU], pu_lib.TaskPU]:
    """Instance PUs (temperature-1 sampling until ``passes`` passes, loss-based when none) and the task PU."""
    from scaling_jax.model.decode import SamplingConfig

    check = make_checker(task)
    stop = stop_sequences(task)
    prompted = [p for p in build_prompts(task, shots, seed, max_examples) if p.example.targets]
    loss_pus = _loss_based_pus(task, lm, prompted)
    instances = []
    for i, p in enumerate(prompted):
        calls = [0]

        def draw(k: int, p=p, i=i, calls=calls) -> list[bool]:
            calls[0] += 1
            sampling = SamplingConfig(temperature=1.0, max_new_tokens=options.max_new_tokens, stop=stop,
                                      seed=seed * 1_000_003 + i * 1009 + calls[0])
            return [check(p.example, out) for out in lm.generate([p.prompt] * k, sampling)]

        s, t = pu_lib.sample_until(draw, options.passes, options.max_samples, options.batch)
        instances.append(pu_lib.instance_pu(s, t, options.passes, loss_pus[i], options.confidence))
    return instances, pu_lib.task_pu(instances, options.confidence)


def _loss_based_pus(task: Task, lm: LanguageModel, prompted: list) -> list[float | None]:
    """Per example, the probability of the text a passing sample writes (``scoring.passing_text``; with eos
    where the sample must stop there); None where no sample can pass."""
    texts = [passing_text(task, p.example) for p in prompted]
    out: list[float | None] = [None] * len(prompted)
    for ends in (False, True):
        rows = [i for i, t in enumerate(texts) if t is not None and t.ends == ends]
        if rows:
            extra = {"end_of_text": True} if ends else {}
            logprobs = lm.loglikelihood([prompted[i].prompt for i in rows], [texts[i].text for i in rows], **extra)
            for i, lp in zip(rows, logprobs, strict=True):
                out[i] = pu_lib.loss_based_pu(lp)
    return out


# ----------------------------------------------------------------------------- one run, many tasks


def evaluate(run: LoadedRun, tasks: list[Task], shots: int = 0, seed: int = 0, max_examples: int = 0,
             passuntil: PassUntilOptions | None = None, max_new_tokens: int = MAX_NEW_TOKENS) -> dict:
    """Scores (and PassUntil) of one model on every task, as a JSON-ready dict."""
    out: dict = {"run_dir": run.run_dir, "step": run.step, "n_params": run.n_params,
                 "total_params": run.total_params, "flops": run.flops, "objective": run.objective, "shots": shots,
                 "max_new_tokens": max_new_tokens, "tasks": {}}
    for task in tasks:
        score = score_task(task, run.lm, shots, seed, max_examples, max_new_tokens)
        entry = {"source": task.source, "examples": score.num_examples, "metrics": score.metrics,
                 "records": score.records, **score.details()}
        if passuntil is not None and task.generative:
            instances, agg = passuntil_task(task, run.lm, passuntil, shots, seed, max_examples)
            entry["passuntil"] = {**agg.as_dict(), "options": asdict(passuntil),
                                  "instances": [asdict(i) for i in instances]}
        out["tasks"][task.name] = entry
    return out


# ----------------------------------------------------------------------------- a series of runs


def fit_series(results: list[dict], task: str, predict_n: float | None = None, holdout: int = 0) -> dict:
    """Task- and instance-level laws over ``results`` (one per model), fitted on all but the ``holdout``
    largest models; predictions at ``predict_n`` (default: the largest model) with intervals."""
    rows = sorted((r for r in results if "passuntil" in r["tasks"].get(task, {})), key=lambda r: r["n_params"])
    if len(rows) - holdout < 2:
        return {}
    fit_rows = rows[:len(rows) - holdout]
    if len({r["n_params"] for r in fit_rows}) < 2:  # one size (a run given twice, checkpoints of one run): no law
        return {}
    n = np.array([r["n_params"] for r in fit_rows], np.float64)
    pus = [r["tasks"][task]["passuntil"] for r in fit_rows]
    try:
        law = pu_lib.fit_task_law(n, [p["pu"] for p in pus], [p["se"] for p in pus])
    except ValueError:  # fewer than two sizes with 0 < PU < 1 (every instance passes, or none can)
        return {}
    target_n = float(predict_n or rows[-1]["n_params"])
    matrix = np.array([[i["p"] for i in p["instances"]] for p in pus])
    pred, low, high = law.predict(target_n)
    inst, inst_low, inst_high = pu_lib.predict_instance_level(n, matrix, target_n)
    fit = {"fitted_on": [r["run_dir"] for r in fit_rows], "law": law.as_dict(), "predict_n": target_n,
           "task_level": {"pu": pred, "low": low, "high": high},
           "instance_level": {"pu": inst, "low": inst_low, "high": inst_high}}
    measured = [r for r in rows if r["n_params"] == target_n]
    if measured:
        fit["measured"] = {k: measured[0]["tasks"][task]["passuntil"][k] for k in ("pu", "low", "high")}
    return fit


def markdown_table(results: list[dict], fits: dict[str, dict]) -> str:
    lines = ["| run | N (non-emb.) | task | metrics | PassUntil PU [95% CI] |", "| --- | ---: | --- | --- | --- |"]
    for r in sorted(results, key=lambda r: r["n_params"]):
        for name, entry in r["tasks"].items():
            metrics = ", ".join(f"{k} {v:.3f}" for k, v in entry["metrics"].items())
            pu = entry.get("passuntil")
            pu_text = f"{pu['pu']:.3g} [{pu['low']:.3g}, {pu['high']:.3g}]" if pu else "-"
            lines.append(f"| {os.path.basename(r['run_dir'])} | {r['n_params']:,} | {name} | {metrics} | {pu_text} |")
    for name, fit in fits.items():
        if fit:
            law, t, i = fit["law"], fit["task_level"], fit["instance_level"]
            lines.append(f"\n**{name}**: log(-log PU) = {law['a']:.3f}(±{law['a_se']:.3f}) log N + "
                         f"{law['b']:.3f}(±{law['b_se']:.3f}); at N = {fit['predict_n']:,.0f}: task-level PU "
                         f"{t['pu']:.3g} [{t['low']:.3g}, {t['high']:.3g}], instance-level {i['pu']:.3g} "
                         f"[{i['low']:.3g}, {i['high']:.3g}]"
                         + (f"; measured {fit['measured']['pu']:.3g}" if "measured" in fit else ""))
    return "\n".join(lines) + "\n"


def plot_passuntil(results: list[dict], fits: dict[str, dict], out_dir: str) -> list[str]:
    """log(-log PU) against log N with each model's interval and the fitted law (the paper's axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for name in sorted({t for r in results for t in r["tasks"] if "passuntil" in r["tasks"][t]}):
        rows = sorted((r for r in results if "passuntil" in r["tasks"].get(name, {})), key=lambda r: r["n_params"])
        n = np.array([r["n_params"] for r in rows], np.float64)
        pu = [r["tasks"][name]["passuntil"] for r in rows]
        y = pu_lib.log_neg_log([p["pu"] for p in pu])
        lo, hi = pu_lib.log_neg_log([p["high"] for p in pu]), pu_lib.log_neg_log([max(p["low"], 1e-300) for p in pu])
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.errorbar(np.log(n), y, yerr=[y - lo, hi - y], fmt="o", label="measured PU (95% CI)")
        fit = fits.get(name) or {}
        if fit:
            xs = np.linspace(np.log(n.min()), np.log(max(n.max(), fit["predict_n"])), 50)
            ax.plot(xs, fit["law"]["a"] * xs + fit["law"]["b"], "-", label="task-level fit")
            ax.plot(np.log(fit["predict_n"]), pu_lib.log_neg_log(fit["task_level"]["pu"]), "s", label="prediction")
        ax.set_xlabel("log N (non-embedding parameters)")
        ax.set_ylabel("log(-log PU)")
        ax.set_title(name)
        ax.legend()
        fig.tight_layout()
        path = os.path.join(out_dir, "plots", f"passuntil_{name}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(results: list[dict], out_dir: str, predict_n: float | None = None) -> dict:
    """``results.json`` (everything, per instance, and the plots' paths relative to ``out_dir``), ``results.md``
    (the table), PassUntil plots and, for a series of two or more runs, one emergence plot per task."""
    from scaling_jax.eval.emergence import plot_emergence

    os.makedirs(out_dir, exist_ok=True)
    tasks = sorted({t for r in results for t in r["tasks"]})
    fits = {t: fit_series(results, t, predict_n) for t in tasks} if len(results) > 1 else {}
    emergence = plot_emergence(results, out_dir) if len(results) > 1 else {}
    plots = plot_passuntil(results, fits, out_dir) + [e["plot"] for e in emergence.values()]
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"runs": results, "fits": fits, "plots": [os.path.relpath(p, out_dir) for p in plots]}, f,
                  indent=1, default=float)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown_table(results, fits))
    return {"fits": fits, "plots": plots, "emergence": emergence, "markdown": os.path.join(out_dir, "results.md")}


def run_eval(checkpoints: list[str], task_specs: list[str], shots: int = 0, out_dir: str | None = None,
             seed: int = BIGBENCH_SEED, num_examples: int = 100, max_examples: int = 0,
             passuntil: PassUntilOptions | None = None, predict_n: float | None = None,
             max_new_tokens: int = MAX_NEW_TOKENS) -> dict:
    """The ``scaling-jax eval`` command: every checkpoint on every task, then the report. ``max_new_tokens`` is
    BIG-bench's ``max_length``: the answer's token budget and its character cut (its own CLI's default is 30)."""
    out_dir = out_dir or os.path.join(checkpoints[0], EVAL_DIR)
    tasks = resolve_tasks(task_specs, num_examples, seed, out_dir)
    results = []
    for ckpt in checkpoints:
        results.append(evaluate(load_run(ckpt), tasks, shots, seed, max_examples, passuntil, max_new_tokens))
    report = write_report(results, out_dir, predict_n)
    return {"results": results, **report, "out_dir": out_dir}
