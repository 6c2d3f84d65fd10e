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
from scaling_jax.train.checkpoint import Checkpointer
from scaling_jax.train.continuation import child_config
from scaling_jax.train.loop import train
from scaling_jax.train.session import DataBundle
from scaling_jax.train.state import abstract_model

INFILL = [{"kind": "R", "rate": 0.15, "mean_span": 3.0}]  # T5 span corruption, UL2's R denoiser


def pretrain(args: argparse.Namespace) -> Config:
    config = load_config("configs/quickstart.yaml", [
        f"train.steps={args.pretrain_steps}", f"train.run_dir={args.run_root}/pretrain",
        f"train.eval_every={args.pretrain_steps}", f"train.checkpoint_every={args.pretrain_steps}",
        f"optimizer.warmup_steps={min(50, args.pretrain_steps // 4)}", "train.progress=false", "train.plot=false",
        f"train.eval_batches={args.eval_batches}"])
    train(config)
    return config


def continue_with(args: argparse.Namespace, objective: list[str], name: str) -> Config:
    config, notes = child_config(f"{args.run_root}/pretrain", "configs/stages/ul2r.yaml", [
        *objective, f"stage.name={name}", f"budget.fraction={args.fraction}", f"train.run_dir={args.run_root}/{name}",
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--fraction", type=float, default=0.25, help="extra compute, share of the pretraining FLOPs")
    parser.add_argument("--eval-batches", type=int, default=8, help="validation batches (16 x 256 tokens each)")
    parser.add_argument("--run-root", default="runs/ul2r_ablation")
    args = parser.parse_args()
    started = time.perf_counter()

    parent = pretrain(args)
    runs = {"pretrained parent": parent,
            "(a) + causal": continue_with(args, ["objective.name=causal"], "more_causal"),
            "(b) + UL2R": continue_with(args, [], "ul2r")}

    tokenizer = build_tokenizer(parent.data.tokenizer)
    infill_objective = MixtureOfDenoisers(ObjectiveConfig(name="ul2", denoisers=INFILL), tokenizer)
    data = DataBundle(parent, tokenizer)
    batches = pipeline.eval_batches(data.val_rows, parent.data, args.eval_batches, 0, 1, infill_objective.prepare)

    print(f"\nUL2R ablation: {parent.model.series} on the embedded corpus ({data.num_val_docs} held-out files); "
          f"parent {args.pretrain_steps} steps, each continuation +{args.fraction:.0%} of its compute")
    print(f"{'run':<20} {'steps':>6} {'total tokens':>13} {'val loss':>9} {'val bpb':>8} "
          f"{'infill EM prefix-LM':>20} {'infill EM causal':>17}")
    for name, config in runs.items():
        summary = _summary(config)
        em = infilling(config, batches, infill_objective.ids)
        print(f"{name:<20} {summary['total_step']:>6} {summary['total_tokens']:>13,} {summary['val_loss']:>9.4f} "
              f"{summary['val_bpb']:>8.3f} {em['prefix-LM']:>20.3%} {em['causal']:>17.3%}")
    print(f"({em['spans']} corrupted spans scored per model; wall time {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
