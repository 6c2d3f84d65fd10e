"""UL2R ablation: the same extra compute spent on (a) more causal training or (b) UL2R.

Pretrains a small causal model on the embedded corpus, then continues the same checkpoint twice
with the same stage settings and budget (``configs/stages/ul2r.yaml``: Adam moments kept, cosine
from the parent's final LR), once with the causal objective and once with the UL2R mixture.
Reports for the parent and both children:

* causal validation loss (nats/token) and bits/byte on the held-out files;
* span-infilling exact match on held-out files: validation rows corrupted with T5 span
  corruption (rate 0.15, mean span 3, sentinels, the ``[NLU]`` mode token); a span counts as
  matched when every token of it is the model's greedy (argmax) prediction given the gold text
  before it (teacher-forced greedy decoding). Scored with the prompt attended bidirectionally
  (the prefix-LM format UL2R trains) and fully causally.

    python scripts/ul2r_ablation.py                      # ~0.8M params; sized for ~15 min on 2 CPU cores
    python scripts/ul2r_ablation.py --pretrain-steps 40 --fraction 0.25 --run-root /tmp/abl   # smoke run
    python scripts/ul2r_ablation.py --seeds 0,1,2 model.series=custom model.layers=2 ...   # repeated per seed

``--seeds``: the whole ablation (parent and both continuations) once per seed, in ``RUN_ROOT/seed{S}``; a
seed sets ``train.seed`` (initialisation) and ``data.shuffle_seed`` (document and row order), as a sweep's
``seeds`` do. The table then gives every row's mean with the Student-t 95% interval of the mean over the
seeds, and the per-seed difference (b) - (a), whose interval says whether the seeds agree on its sign.
Trailing ``key=value`` arguments override the parent's config (a smaller model for repeated runs).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scaling_jax.config import Config, ObjectiveConfig, load_config
from scaling_jax.data import pipeline
from scaling_jax.data.tokenizer import build_tokenizer
from scaling_jax.objectives.denoisers import MixtureOfDenoisers
from scaling_jax.scaling.laws import seed_stats
from scaling_jax.train.checkpoint import Checkpointer
from scaling_jax.train.continuation import child_config
from scaling_jax.train.loop import train
from scaling_jax.train.session import DataBundle
from scaling_jax.train.state import abstract_model

INFILL = [{"kind": "R", "rate": 0.15, "mean_span": 3.0}]  # T5 span corruption, UL2's R denoiser


def pretrain(args: argparse.Namespace, root: str, seed: int | None) -> Config:
    seeded = [] if seed is None else [f"train.seed={seed}", f"data.shuffle_seed={seed}"]
    config = load_config("configs/quickstart.yaml", [
        *args.overrides, *seeded, f"train.steps={args.pretrain_steps}", f"train.run_dir={root}/pretrain",
        f"train.eval_every={args.pretrain_steps}", f"train.checkpoint_every={args.pretrain_steps}",
        f"optimizer.warmup_steps={min(50, args.pretrain_steps // 4)}", "train.progress=false", "train.plot=false",
        f"train.eval_batches={args.eval_batches}"])
    train(config)
    return config


def continue_with(args: argparse.Namespace, root: str, objective: list[str], name: str) -> Config:
    config, notes = child_config(f"{root}/pretrain", "configs/stages/ul2r.yaml", [
        *objective, f"stage.name={name}", f"budget.fraction={args.fraction}", f"train.run_dir={root}/{name}",
        "train.progress=false", "train.plot=false"])
    print(f"{name}: " + "; ".join(notes[1:]), flush=True)
    train(config)
    return config


def restore_params(config: Config, objective) -> tuple[nnx.GraphDef, dict]:
    """The run's latest parameters on one device (no optimizer state)."""
    graphdef, shapes, _ = abstract_model(config.model, objective.build_model)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), shapes)
    checkpointer = Checkpointer(config.train.run_dir, keep=1, async_save=False)
    try:
        return graphdef, checkpointer.restore_partial(checkpointer.latest_step(), {"params": target})["params"]
    finally:
        checkpointer.close()


def span_exact_match(batch: dict, predicted: np.ndarray, sentinel_ids: set[int], eos: int) -> tuple[int, int]:
    """(matched spans, spans): a span is the target tokens between a sentinel and the next sentinel / eos."""
    matched = total = 0
    for r in range(batch["targets"].shape[0]):
        on = np.flatnonzero(batch["loss_mask"][r])
        current: list[bool] = []
        for i in on:
            token = int(batch["targets"][r, i])
            if token in sentinel_ids or token == eos:
                if current:
                    matched, total = matched + all(current), total + 1
                current = []
            else:
                current.append(bool(predicted[r, i] == token))
    return matched, total


def infilling(config: Config, batches: list[dict], ids) -> dict[str, float]:
    objective = MixtureOfDenoisers(ObjectiveConfig(name="ul2", denoisers=INFILL))
    graphdef, params = restore_params(config, objective)

    @jax.jit
    def argmax(params, batch, bidirectional):
        model = nnx.merge(graphdef, params)
        hidden = model(batch["inputs"], batch["positions"], batch["segment_ids"],
                       bidirectional=batch["bidirectional"].astype(bool) & bidirectional)
        return jnp.argmax(model.logits(hidden), axis=-1)

    out = {}
    for mode, bidirectional in (("prefix-LM", True), ("causal", False)):
        matched = total = 0
        for batch in batches:
            predicted = np.asarray(argmax(params, {k: jnp.asarray(v) for k, v in batch.items()}, bidirectional))
            m, t = span_exact_match(batch, predicted, set(int(s) for s in ids.sentinels), ids.eos)
            matched, total = matched + m, total + t
        out[mode] = matched / max(total, 1)
        out["spans"] = total
    return out


def _summary(config: Config) -> dict:
    with open(os.path.join(config.train.run_dir, "summary.json")) as f:
        return json.load(f)


def ablate(args: argparse.Namespace, root: str, seed: int | None) -> dict[str, dict[str, float]]:
    """Parent, (a) and (b) for one seed: each run's summary numbers and infilling exact match."""
    parent = pretrain(args, root, seed)
    runs = {"pretrained parent": parent,
            "(a) + causal": continue_with(args, root, ["objective.name=causal"], "more_causal"),
            "(b) + UL2R": continue_with(args, root, [], "ul2r")}
    tokenizer = build_tokenizer(parent.data.tokenizer)
    infill_objective = MixtureOfDenoisers(ObjectiveConfig(name="ul2", denoisers=INFILL), tokenizer)
    data = DataBundle(parent, tokenizer)
    batches = pipeline.eval_batches(data.val_rows, parent.data, args.eval_batches, 0, 1, infill_objective.prepare)
    rows = {}
    for name, config in runs.items():
        summary = _summary(config)
        em = infilling(config, batches, infill_objective.ids)
        rows[name] = {"steps": summary["total_step"], "tokens": summary["total_tokens"],
                      "val_loss": summary["val_loss"], "val_bpb": summary["val_bpb"],
                      "em_prefix": em["prefix-LM"], "em_causal": em["causal"],
                      "spans": em["spans"], "val_docs": data.num_val_docs, "series": parent.model.series}
    return rows


def _cell(values: list[float], fmt: str) -> str:
    """One value, or the seeds' mean ± the half-width of its 95% t-interval."""
    if len(values) == 1:
        return format(values[0], fmt)
    stats = seed_stats(values)
    return f"{format(stats.mean, fmt)} ± {format(stats.half_width, fmt)}"


def report(per_seed: list[dict[str, dict[str, float]]], args: argparse.Namespace) -> list[str]:
    first = per_seed[0]["pretrained parent"]
    seeds = f"; {len(per_seed)} seeds, mean ± 95% t-interval" if len(per_seed) > 1 else ""
    lines = [f"UL2R ablation: {first['series']} on the embedded corpus ({first['val_docs']} held-out files); parent "
             f"{args.pretrain_steps} steps, each continuation +{args.fraction:.0%} of its compute{seeds}",
             f"{'run':<20} {'steps':>6} {'total tokens':>13} {'val loss':>17} {'val bpb':>15} "
             f"{'infill EM prefix-LM':>20} {'infill EM causal':>17}"]
    for name, row in per_seed[0].items():
        cells = {key: _cell([runs[name][key] for runs in per_seed], fmt)
                 for key, fmt in (("val_loss", ".4f"), ("val_bpb", ".3f"), ("em_prefix", ".3%"), ("em_causal", ".3%"))}
        lines.append(f"{name:<20} {row['steps']:>6} {row['tokens']:>13,} {cells['val_loss']:>17} "
                     f"{cells['val_bpb']:>15} {cells['em_prefix']:>20} {cells['em_causal']:>17}")
    if len(per_seed) > 1:
        for key, label in (("val_loss", "val loss"), ("em_prefix", "infill EM prefix-LM")):
            diff = [runs["(b) + UL2R"][key] - runs["(a) + causal"][key] for runs in per_seed]
            lines.append(f"(b) - (a), {label}: {_cell(diff, '.4f')} (per seed: {', '.join(f'{d:+.4f}' for d in diff)})")
    lines.append(f"({first['spans']} corrupted spans scored per model)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--fraction", type=float, default=0.25, help="extra compute, share of the pretraining FLOPs")
    parser.add_argument("--eval-batches", type=int, default=8, help="validation batches (16 x 256 tokens each)")
    parser.add_argument("--run-root", default="runs/ul2r_ablation")
    parser.add_argument("--seeds", default="", help="comma-separated seeds: the ablation once per seed")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the parent's config")
    args = parser.parse_args()
    started = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()] or [None]
    per_seed = [ablate(args, args.run_root if seed is None else f"{args.run_root}/seed{seed}", seed) for seed in seeds]
    print("\n" + "\n".join(report(per_seed, args)))
    print(f"(wall time {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
