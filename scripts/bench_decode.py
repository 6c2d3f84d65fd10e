"""Decoding throughput of a small multi-token-prediction model: plain KV-cache greedy vs self-speculative greedy.

Trains quickstart-size MTP models on the embedded corpus (``configs/quickstart.yaml objective=mtp
objective.heads=H``), or reuses them from ``--dir`` (``DIR/mtpH`` with a checkpoint), then decodes prefixes of
standard-library functions from the documents training holds out (``eval/generators.corpus_functions``). For
each batch size, plain greedy and speculative greedy run side by side (alternating, ``--repeats`` rounds, the
median round reported; compilation is excluded by a warm-up round) and every output is checked to be identical.

Per (heads, batch, drafts): tokens/s, speedup, model calls, tokens per row-call, ms per call, each draft head's
acceptance rate (the fraction of row-calls in which its draft was accepted), and the break-even tokens/call
(speculative ms/call over plain ms/call: below it drafting loses). Then eval throughput: a generated
``arithmetic`` task of ``--eval-examples`` examples (greedy generation and 4-way multiple choice) scored as
``scaling-jax eval`` scores it.

    python scripts/bench_decode.py [--dir runs/bench_decode] [--heads 2] [--steps 480] [--batches 1,8]
        [--prompts 8] [--new-tokens 128] [--repeats 3] [--eval-examples 1000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# Speculative greedy equals plain greedy only under the same arithmetic: a verifying call scores a chunk of
# positions at once, and at a GPU's default float32 matmul precision (TF32) its rounding differs from one-token
# calls enough to flip near-tied argmaxes (seen on an H200). Full float32 keeps the outputs comparable.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")


def ensure_run(run_dir: str, heads: int, steps: int) -> None:
    """Train ``run_dir`` (quickstart config, MTP with ``heads`` heads, ``steps`` steps) unless it has a checkpoint."""
    from scaling_jax import cli
    from scaling_jax.config import load_config

    if os.path.isdir(os.path.join(run_dir, "checkpoints")) and os.listdir(os.path.join(run_dir, "checkpoints")):
        saved = load_config(os.path.join(run_dir, "config.yaml"), saved_run=True)
        if saved.objective.name != "mtp" or saved.objective.heads != heads:
            raise SystemExit(f"{run_dir} holds a {saved.objective.name} run with {saved.objective.heads} heads, "
                             f"not mtp with {heads}; pass another --dir")
        print(f"reusing {run_dir}", flush=True)
        return
    print(f"training {run_dir}: quickstart, objective=mtp, heads={heads}, {steps} steps", flush=True)
    code = cli.main(["train", str(REPO / "configs" / "quickstart.yaml"), "objective=mtp",
                     f"objective.heads={heads}", f"train.steps={steps}", f"train.run_dir={run_dir}",
                     "train.eval_every=0", "train.checkpoint_every=0"])
    if code:
        raise SystemExit(f"training {run_dir} failed ({code})")


def code_prompts(n: int, max_chars: int = 120, seed: int = 0) -> list[str]:
    """Prefixes of held-out stdlib functions: the signature and following whole lines, up to ``max_chars``
    (prompt + generation stay inside the 256-token context the model was trained on)."""
    from scaling_jax.eval.generators import corpus_functions

    functions = corpus_functions("validation", max_lines=40)
    out = []
    for i in np.random.default_rng(seed).permutation(len(functions)):
        lines = functions[i][2].split("\n")
        prefix = ""
        for line in lines[:-1]:
            if len(prefix) + len(line) + 1 > max_chars:
                break
            prefix += line + "\n"
        if prefix.count("\n") >= 2:
            out.append(prefix)
        if len(out) == n:
            return out
    raise SystemExit(f"only {len(out)} held-out functions give a prompt; ask for fewer --prompts")


def measure(lm, prompts: list[list[int]], batch: int, new_tokens: int, repeats: int, drafts: list[int]) -> dict:
    """Plain and speculative greedy (one run per draft count) over ``prompts`` in batches, side by side."""
    from scaling_jax.model.decode import SamplingConfig

    groups = [prompts[i:i + batch] for i in range(0, len(prompts), batch)]
    sampling = SamplingConfig(max_new_tokens=new_tokens)
    runs = {"plain": lambda g: lm.generate_ids(g, sampling)}
    for c in drafts:
        runs[f"spec{c}"] = lambda g, c=c: lm.speculative_greedy_ids(g, new_tokens, heads=c)
    for g in groups[:1]:  # warm-up: compile every shape (all groups share them)
        for run in runs.values():
            run(g)
    times = {k: [] for k in runs}
    stats: dict[str, dict] = {}
    for r in range(repeats):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        elapsed = dict.fromkeys(runs, 0.0)
        outputs = {k: [] for k in runs}
        calls = dict.fromkeys(runs, 0)
        hits = {k: np.zeros(int(k[4:]) - 1) for k in runs if k != "plain"}
        row_calls = dict.fromkeys(runs, 0)
        for g in groups:
            for k in order:
                start = time.perf_counter()
                out = runs[k](g)
                elapsed[k] += time.perf_counter() - start
                outputs[k] += out.tokens
                calls[k] += out.forward_calls
                if k != "plain":
                    hits[k] += np.asarray(out.draft_acceptance) * out.row_calls
                    row_calls[k] += out.row_calls
        for k in runs:
            if outputs[k] != outputs["plain"]:
                bad = next(i for i, (a, b) in enumerate(zip(outputs[k], outputs["plain"], strict=True)) if a != b)
                raise AssertionError(f"{k} output differs from plain greedy (batch {batch}, prompt {bad})")
            times[k].append(elapsed[k])
            stats[k] = {"tokens": sum(len(t) for t in outputs[k]), "calls": calls[k],
                        "acceptance": (hits[k] / max(row_calls[k], 1)).tolist() if k != "plain" else []}
    return {k: {**stats[k], "seconds": statistics.median(times[k])} for k in runs}


def print_table(name: str, batch: int, res: dict) -> None:
    plain = res["plain"]
    ms_plain = 1e3 * plain["seconds"] / plain["calls"]
    for k, r in res.items():
        tok_s = r["tokens"] / r["seconds"]
        ms_call = 1e3 * r["seconds"] / r["calls"]
        if k == "plain":
            extra = f"{'-':>8} {'-':>9} {'-':>22}"
        else:
            row_tok = 1 + sum(r["acceptance"])
            accept = " ".join(f"{a:.2f}" for a in r["acceptance"])
            extra = f"{row_tok:8.2f} {ms_call / ms_plain:9.2f} {accept:>22}"
        label = "plain greedy" if k == "plain" else f"speculative, {k[4:]} heads"
        print(f"{name:6s} {batch:5d}  {label:24s} {tok_s:8.1f} {tok_s / (plain['tokens'] / plain['seconds']):7.2f}x "
              f"{r['calls']:6d} {plain['calls'] / r['calls']:8.2f} {ms_call:8.2f} {extra}", flush=True)


def eval_throughput(lm, n: int, seed: int = 0) -> None:
    """Examples/s of a generated arithmetic task (greedy answer + 4 choices) scored as ``scaling-jax eval`` does."""
    from scaling_jax.eval.generators import generate_task
    from scaling_jax.eval.scoring import score_task
    from scaling_jax.eval.tasks import task_from_dict

    class Timed:  # the LanguageModel protocol, timing each half
        def __init__(self):
            self.seconds = {"generate": 0.0, "loglikelihood": 0.0}

        def generate(self, prompts, sampling):
            start = time.perf_counter()
            out = lm.generate(prompts, sampling)
            self.seconds["generate"] += time.perf_counter() - start
            return out

        def loglikelihood(self, contexts, continuations):
            start = time.perf_counter()
            out = lm.loglikelihood(contexts, continuations)
            self.seconds["loglikelihood"] += time.perf_counter() - start
            return out

    task = task_from_dict(generate_task("arithmetic:digits=3", n, seed), "<arithmetic>", name="arithmetic")
    score_task(task, lm, max_examples=16, max_new_tokens=48)  # warm-up: compile
    timed = Timed()
    start = time.perf_counter()
    score = score_task(task, timed, max_new_tokens=48)
    total = time.perf_counter() - start
    gen, mc = timed.seconds["generate"], timed.seconds["loglikelihood"]
    print(f"eval: arithmetic:digits=3, {score.num_examples} examples (greedy answer of up to 48 tokens + 4-way "
          f"multiple choice), {total:.1f} s = {score.num_examples / total:.1f} examples/s "
          f"(generation {gen:.1f} s = {score.num_examples / gen:.1f} ex/s, multiple choice {mc:.1f} s = "
          f"{score.num_examples / mc:.1f} ex/s); exact_str_match {score.metrics.get('exact_str_match', 0):.3f}, "
          f"multiple_choice_grade {score.metrics.get('multiple_choice_grade', 0):.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="runs/bench_decode", help="where the MTP runs are trained or reused")
    parser.add_argument("--heads", default="2", help="MTP head counts, one model each (e.g. 2,4)")
    parser.add_argument("--steps", type=int, default=480, help="training steps of a model that is not there yet")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eval-examples", type=int, default=1000, help="0 skips the eval throughput")
    args = parser.parse_args()

    import jax

    from scaling_jax.eval.harness import load_run

    heads = [int(h) for h in args.heads.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    for h in heads:
        ensure_run(os.path.join(args.dir, f"mtp{h}"), h, args.steps)
    texts = code_prompts(args.prompts)
    print(f"\n{len(texts)} prompts (held-out stdlib function prefixes, {min(map(len, texts))}-"
          f"{max(map(len, texts))} chars), {args.new_tokens} new tokens, median of {args.repeats} rounds, "
          f"{jax.devices()[0].platform} ({os.cpu_count()} cores); outputs of every decoder asserted identical")
    print(f"{'model':6s} {'batch':>5s}  {'decoder':24s} {'tok/s':>8s} {'speedup':>8s} {'calls':>6s} "
          f"{'calls÷':>8s} {'ms/call':>8s} {'row tok':>8s} {'break-even':>9s} {'acceptance per head':>22s}")
    lms = {}
    for h in heads:
        run = load_run(os.path.join(args.dir, f"mtp{h}"))
        lms[h] = run.lm
        prompts = [run.lm.encode_prompt(t) for t in texts]
        for batch in batches:
            res = measure(run.lm, prompts, batch, args.new_tokens, args.repeats, list(range(2, h + 1)))
            print_table(f"mtp{h}", batch, res)
    print("calls÷ = plain calls / calls; row tok = tokens a row emitted per call in which it was active "
          "(1 + the acceptance rates); break-even = ms/call / plain ms/call: speedup = calls÷ / break-even, and at "
          "batch 1 calls÷ = row tok")
    if args.eval_examples:
        eval_throughput(lms[heads[0]], args.eval_examples)


if __name__ == "__main__":
    main()
