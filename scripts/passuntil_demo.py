"""PassUntil demo: train a small model series, measure PassUntil PU on a generated task where greedy
accuracy is low for the small models, fit log(-log PU) = a log N + b on all but the largest model,
and print the predicted vs measured PU of the largest.

Task (default): 2-digit addition, "Q: What is 37 plus 45?\nA: 82". A byte-level model trained on Python
source alone has nothing to learn addition from, so ``--drill-rate`` of the training stream are
addition drills in the same format (the embedded corpus is the rest). The 40 evaluated problems are
held out of the drills, so a pass needs addition, not recall. Measured in session 3 (README,
"Evaluation"): PU 0.034 -> 0.056 over N = 0.09M -> 1.8M, the fit on the smaller three predicted
0.065 (instance level) against a measured 0.056 for the largest.

Difficulty levels (``--levels``): the series is trained once on ``--drill-task`` drills (repeat the option
to mix generators in equal shares, e.g. 1-, 2- and 3-digit addition), then every level (a generator spec,
easiest first, e.g. ``arithmetic:digits=2,carries=1,choices=0``: 2-digit sums with exactly one column carry)
is scored greedily. PassUntil and the fit run on the first level where every model but the largest has
greedy accuracy 0 and the largest does not (else the first where all but the largest have 0; the script
says which); ``--pu-levels all`` adds every other level where all but the largest have 0. The evaluated
problems of every level are held out of the drills. docs/eval.md ("Predicting an ability before greedy
decoding shows any") has the measured run:

    nice -n 10 python scripts/passuntil_demo.py --out runs/passuntil_zero --steps 800 \
        --drill-task arithmetic:digits=1,op=+,choices=0 --drill-task arithmetic:digits=2,op=+,choices=0 \
        --drill-task arithmetic:digits=3,op=+,choices=0 --levels arithmetic:digits=1,carries=0,choices=0 \
        arithmetic:digits=1,carries=1,choices=0 arithmetic:digits=2,carries=0,choices=0 \
        arithmetic:digits=2,carries=1,choices=0 arithmetic:digits=2,carries=2,choices=0 \
        arithmetic:digits=3,carries=0,choices=0 arithmetic:digits=3,carries=1,choices=0 \
        arithmetic:digits=3,carries=2,choices=0 arithmetic:digits=3,carries=3,choices=0

Other settings: ``--task arithmetic:digits=3,op=+,choices=0 --drill-rate 0.25`` stayed at chance
(PU ~1e-3 for all four models at 2M tokens); ``--task code_completion:lines=1,max_target_chars=20
--drill-rate 0`` evaluates the corpus-only skill, but its task PU is the mean of a few easy lines and
jumps between models.

    nice -n 10 python scripts/passuntil_demo.py            # ~35 min on a free 2-core CPU
    python scripts/passuntil_demo.py --steps 40 --examples 8 --out /tmp/pu_smoke   # a quick smoke run

Runs that already finished in ``--out`` are reused (training resumes/ends at its checkpoint).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

SERIES = [  # (name, layers, d_model, heads, d_ff): ~0.1M to ~1.8M non-embedding parameters
    ("s1", 2, 64, 2, 160),
    ("s2", 3, 96, 3, 256),
    ("s3", 4, 128, 4, 320),
    ("s4", 4, 192, 6, 512),
]


def write_drills(path: str, specs: list[str], held_out: set[str], problems: int, per_document: int = 16) -> str:
    """Training documents of solved task problems (a different seed than the evaluated ones, and never one
    of their inputs), formatted exactly like the zero-shot prompt plus its answer. Several specs share
    ``problems`` equally and are shuffled together."""
    from scaling_jax.eval.generators import generate_task
    from scaling_jax.eval.tasks import format_example, task_from_dict

    rng = np.random.default_rng(1)
    lines = []
    for spec in specs:
        task = task_from_dict(generate_task(spec, n=problems // len(specs), seed=1), name="drills")
        lines += [format_example(task, ex, rng)[0] + ex.targets[0] for ex in task.examples
                  if ex.input not in held_out]
    if len(specs) > 1:
        lines = [lines[i] for i in rng.permutation(len(lines))]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(0, len(lines), per_document):
            f.write(json.dumps({"text": "".join(lines[i:i + per_document]) + "\n"}) + "\n")
    return path


def train_series(out: str, steps: int, drills: str | None, drill_rate: float, models: list[str]) -> list[str]:
    from scaling_jax.config import load_config
    from scaling_jax.train.loop import train

    mixture = []
    if drills:
        rates = f"[{{source: stdlib, rate: {1 - drill_rate:g}}}, {{source: {drills}, rate: {drill_rate:g}}}]"
        mixture = [f"data.mixture={rates}"]
    dirs = []
    for name, layers, d_model, heads, d_ff in SERIES:
        if name not in models:
            continue
        run_dir = os.path.join(out, name)
        config = load_config(None, [
            f"model.layers={layers}", f"model.d_model={d_model}", f"model.heads={heads}", "model.head_dim=32",
            f"model.d_ff={d_ff}", "data.seq_len=128", "data.batch_size=16", f"train.steps={steps}",
            "optimizer.lr=3e-3", f"optimizer.warmup_steps={max(steps // 10, 1)}", f"train.eval_every={steps}",
            f"train.checkpoint_every={steps}", f"train.run_dir={run_dir}", "train.progress=false",
            "train.tensorboard=false", "train.plot=false", *mixture])
        started = time.perf_counter()
        summary = train(config)
        val = f"val {summary['val_bpb']:.3f} bits/byte" if "val_bpb" in summary else "reused the finished run"
        print(f"{name}: {summary['non_embedding_params']:,} non-embedding params, {val} after {summary['tokens']:,} "
              f"tokens ({time.perf_counter() - started:.0f} s)", flush=True)
        dirs.append(run_dir)
    return dirs


def choose_level(greedy: list[list[float]]) -> tuple[int, bool]:
    """``greedy[level][model]``, levels easiest first and models smallest first: the first level where every
    model but the largest has greedy accuracy 0 and the largest passes (True); else the first level where
    every model but the largest has 0 (False); else the hardest level (False)."""
    zero = [i for i, row in enumerate(greedy) if all(g == 0 for g in row[:-1])]
    passing = [i for i in zero if greedy[i][-1] > 0]
    if passing:
        return passing[0], True
    return (zero[0] if zero else len(greedy) - 1), False


def print_passuntil(names: list[str], results: list[dict], task, args) -> None:
    name = task.name
    print(f"\ntask {name}: {len(task.examples)} held-out problems; PassUntil r={args.passes} passes, "
          f"cap {args.max_samples} samples/instance")
    print(f"{'model':>6} {'N':>10} {'greedy acc':>10} {'PU':>10} {'95% CI':>22} {'sampled/loss':>13}")
    for name_r, r in zip(names, results, strict=True):
        entry = r["tasks"][name]
        p = entry["passuntil"]
        interval = f"[{p['low']:.3g}, {p['high']:.3g}]"
        greedy = entry["metrics"][task.metrics[0]]  # exact match; code: execution where a doctest exists
        print(f"{name_r:>6} {r['n_params']:>10,} {greedy:>10.3f} {p['pu']:>10.3g} "
              f"{interval:>22} {p['sampled']:>6}/{p['loss_based']:<6}")


def print_fit(results: list[dict], name: str, path: str) -> None:
    from scaling_jax.eval import harness
    from scaling_jax.eval.passuntil import fit_task_law

    fit = harness.fit_series(results, name, holdout=1)
    law, t, i, m = fit["law"], fit["task_level"], fit["instance_level"], fit["measured"]
    print(f"\nfit on the {len(results) - 1} smaller models: log(-log PU) = {law['a']:.3f} (±{law['a_se']:.3f}) log N "
          f"+ {law['b']:.3f} (±{law['b_se']:.3f})")
    print(f"largest model (N = {fit['predict_n']:,.0f}):")
    print(f"  predicted PU, task-level fit:     {t['pu']:.4g}  [95% {t['low']:.4g}, {t['high']:.4g}]")
    print(f"  predicted PU, instance-level fit: {i['pu']:.4g}  [95% {i['low']:.4g}, {i['high']:.4g}]")
    print(f"  measured PU:                      {m['pu']:.4g}  [95% {m['low']:.4g}, {m['high']:.4g}]")
    for label, p in (("task-level", t), ("instance-level", i)):
        covers = "covers" if p["low"] <= m["pu"] <= p["high"] else "does NOT cover"
        overlap = "overlaps" if p["low"] <= m["high"] and m["low"] <= p["high"] else "does not overlap"
        print(f"  the {label} interval {covers} the measured PU and {overlap} its interval; "
              f"predicted/measured = {p['pu'] / m['pu']:.2f}")
    full = fit_task_law([r["n_params"] for r in results], [r["tasks"][name]["passuntil"]["pu"] for r in results])
    print(f"(all {len(results)} models: a = {full.a:.3f}, b = {full.b:.3f})")
    with open(path, "w") as f:
        json.dump(fit, f, indent=1, default=float)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/passuntil_demo")
    parser.add_argument("--task", default="arithmetic:digits=2,op=+,choices=0",
                        help="the evaluated generator spec or task file (without --levels)")
    parser.add_argument("--levels", nargs="+", metavar="SPEC",
                        help="difficulty levels to evaluate instead of --task, easiest first: greedy accuracy on "
                             "each; PassUntil and the fit on the first level where every model but the largest "
                             "has greedy accuracy 0 and the largest does not (else the first where all but the "
                             "largest have 0)")
    parser.add_argument("--pu-levels", choices=["chosen", "all"], default="chosen",
                        help="with --levels: PassUntil on the chosen level, or on every level where all but the "
                             "largest have greedy accuracy 0")
    parser.add_argument("--drill-task", action="append", metavar="SPEC",
                        help="generator spec of the drills (repeat to mix them in equal shares); default: the "
                             "evaluated task or levels")
    parser.add_argument("--drill-rate", type=float, default=0.5,
                        help="share of the training stream that is solved task problems (0: the corpus alone)")
    parser.add_argument("--drill-problems", type=int, default=60_000)
    parser.add_argument("--steps", type=int, default=1000, help="training steps per model (16 x 128 tokens each)")
    parser.add_argument("--models", default=",".join(s[0] for s in SERIES), help="a subset of the series to run")
    parser.add_argument("--examples", type=int, default=40, help="task instances (per level)")
    parser.add_argument("--max-samples", type=int, default=64, help="PassUntil cap per instance")
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()

    from scaling_jax.eval import harness

    started = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    specs = args.levels or [args.task]
    tasks = harness.resolve_tasks(specs, args.examples, 0, args.out)
    drills = None
    if args.drill_rate > 0:
        held_out = {ex.input for task in tasks for ex in task.examples}
        drills = write_drills(os.path.join(args.out, "drills.jsonl"), args.drill_task or specs, held_out,
                              args.drill_problems)
    models = args.models.split(",")
    names = [m for m in (s[0] for s in SERIES) if m in models]
    run_dirs = train_series(args.out, args.steps, drills, args.drill_rate, models)
    print(f"trained in {time.perf_counter() - started:.0f} s", flush=True)
    options = harness.PassUntilOptions(passes=args.passes, max_samples=args.max_samples,
                                       max_new_tokens=args.max_new_tokens)
    runs = [harness.load_run(run_dir) for run_dir in run_dirs]
    pu_tasks = tasks
    if args.levels:
        t0 = time.perf_counter()
        greedy_results = [harness.evaluate(run, tasks, max_new_tokens=args.max_new_tokens) for run in runs]
        greedy = [[r["tasks"][task.name]["metrics"][task.metrics[0]] for r in greedy_results] for task in tasks]
        with open(os.path.join(args.out, "greedy.json"), "w") as f:
            json.dump({"models": names, "n_params": [r["n_params"] for r in greedy_results],
                       "levels": specs, "greedy": greedy}, f, indent=1)
        width = max(len(t.name) for t in tasks)
        print(f"\ngreedy accuracy on each level's held-out problems ({time.perf_counter() - t0:.0f} s; a level with "
              f"fewer distinct problems than --examples has fewer):")
        print(f"{'level':<{width}} {'problems':>8} " + " ".join(f"{n:>6}" for n in names))
        for task, row in zip(tasks, greedy, strict=True):
            print(f"{task.name:<{width}} {len(task.examples):>8} " + " ".join(f"{g:>6.3f}" for g in row))
        if len(runs) < 2:
            print("one model: no level to choose")
            return
        level, largest_passes = choose_level(greedy)
        chosen = tasks[level]
        if largest_passes:
            print(f"chosen level: {chosen.name} (the easiest where every fitting model has greedy accuracy 0 "
                  f"and the largest {greedy[level][-1]:.3f})")
        else:
            print(f"chosen level: {chosen.name} (no level has greedy 0 for every fitting model and > 0 for the "
                  f"largest; this is the easiest where the fitting models have 0; the largest has "
                  f"{greedy[level][-1]:.3f})")
        pu_tasks = [chosen]
        if args.pu_levels == "all":
            pu_tasks += [t for t, row in zip(tasks, greedy, strict=True)
                         if t is not chosen and all(g == 0 for g in row[:-1])]
    results = []
    for run in runs:
        t0 = time.perf_counter()
        results.append(harness.evaluate(run, pu_tasks, passuntil=options, max_new_tokens=args.max_new_tokens))
        print(f"PassUntil on {run.run_dir} in {time.perf_counter() - t0:.0f} s", flush=True)
    report = harness.write_report(results, args.out)
    for k, task in enumerate(pu_tasks):
        print_passuntil(names, results, task, args)
        if len(results) < 3:
            print(f"\n{len(results)} model(s): too few to fit on all but the largest and predict it")
            continue
        fit_file = "demo_fit.json" if k == 0 else f"demo_fit_{task.name}.json"
        print_fit(results, task.name, os.path.join(args.out, fit_file))
    print(f"\nwrote {report['markdown']}, {', '.join(report['plots'])}; total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
