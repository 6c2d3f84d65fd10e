"""Continuation stages: start a new run from a parent checkpoint (UL2R, instruction finetuning).

``scaling-jax continue --from PARENT --stage STAGE.yaml [key=value ...]`` builds the child's config
as *parent's resolved config* + *stage YAML* + *overrides* (the parent's own ``stage``/``budget``
and run dir are not inherited), converts the stage budget into ``train.steps``, and trains in a new
run directory. The parent is only read.

Where the child's state comes from (``start_from_parent``, called by the loop when the child's run
dir has no checkpoint yet; an interrupted child resumes from its own latest checkpoint):

* parameters: the parent's, restored onto the child's mesh (``Checkpointer.restore*`` reshards);
* optimizer: ``stage.optimizer_state=reset`` gives a fresh AdamW state (new warmup);
  ``continue`` keeps the parent's Adam moments and bias-correction count, while every other piece
  of optimizer state (the schedule position) starts over for the child's new schedule;
* vocabulary: every special id the child's objective emits must be a row of the parent's embedding.
  If not, ``stage.extend_vocab=true`` grows the embedding (and untied unembedding) to the
  tokenizer's vocabulary with new rows set to the mean of the old ones (their Adam moments start at
  zero); without it the stage is refused, never silently clamped;
* offsets: the parent's total step, tokens and FLOPs, so the child's curves continue its parent's
  on one compute axis; the parent's lineage, to which the child appends its own record;
* data: a child that reads the parent's row stream (same ``data.*`` up to batch size and loader
  threads) starts past every row the parent trained on, so a UL2R stage sees new text rather
  than the parent's first batches again; a child with other data (finetuning) reads from its start.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import optax

from scaling_jax import paths
from scaling_jax.config import Config, load_config, parse_overrides, read_yaml, to_dict
from scaling_jax.data import pipeline
from scaling_jax.data.tokenizer import Tokenizer, build_tokenizer, resolve_vocab
from scaling_jax.errors import CheckpointError, ConfigError
from scaling_jax.model.family import flops_per_token
from scaling_jax.objectives.base import Objective, build_objective, ids_past
from scaling_jax.run_dir import CONFIG_FILE, CheckpointMeta, is_run_dir
from scaling_jax.train.checkpoint import CHECKPOINT_DIR, Checkpointer, model_signature
from scaling_jax.train.session import Session
from scaling_jax.train.start import StageStart, StartSpec
from scaling_jax.train.state import TrainState, make_optimizer, make_schedule, state_layout

INHERITED_NOT = ("stage.", "budget.", "train.run_dir")  # a child never inherits these from its parent


# ----------------------------------------------------------------------------- the parent


def resolve_parent(path: str) -> tuple[str, int]:
    """``RUN_DIR`` (latest checkpoint), ``RUN_DIR/checkpoints`` or ``RUN_DIR/checkpoints/STEP`` -> (run dir, step);
    local or in a bucket."""
    path = paths.absolute(path if paths.is_remote(path) else os.path.expanduser(path))
    if not paths.isdir(path):
        raise CheckpointError(f"--from '{path}' is not a directory; pass a run directory or one of its "
                              f"{CHECKPOINT_DIR}/STEP directories")
    if paths.basename(path).isdigit() and paths.basename(paths.dirname(path)) == CHECKPOINT_DIR:
        return split_checkpoint_path(path)
    run_dir = paths.dirname(path) if paths.basename(path) == CHECKPOINT_DIR else path
    if not paths.isdir(paths.join(run_dir, CHECKPOINT_DIR)):
        raise CheckpointError(f"--from '{path}' has no {CHECKPOINT_DIR}/ directory; pass the run directory of a "
                              "finished training run")
    checkpointer = Checkpointer(run_dir, keep=1, async_save=False)
    try:
        step = checkpointer.latest_step()
    finally:
        checkpointer.close()
    if step is None:
        raise CheckpointError(f"--from '{path}' holds no finished checkpoint; train the parent first")
    return run_dir, step


def parent_meta(run_dir: str, step: int) -> CheckpointMeta:
    """The parent checkpoint's meta item: resolved config, tokenizer fingerprint, totals, lineage."""
    checkpointer = Checkpointer(run_dir, keep=1, async_save=False)
    try:
        if step not in checkpointer.manager.all_steps():
            raise CheckpointError(f"run {run_dir} has no checkpoint at step {step}; "
                                  f"choose one of {sorted(checkpointer.manager.all_steps())}")
        return CheckpointMeta.from_json(checkpointer.read_meta(step))
    finally:
        checkpointer.close()


def checkpoint_path(run_dir: str, step: int) -> str:
    return paths.join(run_dir, CHECKPOINT_DIR, str(step))


def split_checkpoint_path(path: str) -> tuple[str, int]:
    """Inverse of ``checkpoint_path``."""
    return paths.dirname(paths.dirname(path)), int(paths.basename(path))


# data fields that do not change the row stream
STREAM_FREE_FIELDS = ("batch_size", "num_threads", "prefetch", "worker_processes")


def parent_data_index(run_dir: str, step: int, meta: CheckpointMeta) -> int:
    """The global batch the parent would have read next: recorded in its meta, or (checkpoints written before
    that) read from its saved grain state, or else its step count."""
    if meta.data_index is not None:
        return meta.data_index
    data_dir = paths.join(checkpoint_path(run_dir, step), "data")
    saved = [n for n in paths.listdir(data_dir) if n.startswith("process_0-of-") and n.endswith(".json")]
    state = json.loads(paths.read_text(paths.join(data_dir, saved[0]))) if saved else None
    return pipeline.next_index(state, int(meta.step))


def parent_data_config(saved_config: dict) -> dict:
    """The parent's ``data`` section with today's defaults for fields its (older) config did not have."""
    return to_dict(load_config(None, flatten({"data": saved_config["data"]})))["data"]


def continued_stream_index(parent_data: dict, child_data: dict, parent_index: int) -> int:
    """Where the child's data stream starts: past every row the parent read when both read the same row
    stream (same sources, tokenizer, packing and shuffle), rounded up to the child's batch; else 0."""
    same = all(parent_data.get(k) == v for k, v in child_data.items() if k not in STREAM_FREE_FIELDS)
    if not same:
        return 0
    rows = parent_index * int(parent_data["batch_size"])
    return -(-rows // int(child_data["batch_size"]))


def child_stream_index(config: Config, run_dir: str, step: int, meta: CheckpointMeta) -> int:
    """``continued_stream_index`` for a child config and its parent checkpoint."""
    return continued_stream_index(parent_data_config(meta.config), to_dict(config)["data"],
                                  parent_data_index(run_dir, step, meta))


def _stream_note(index: int) -> str:
    return (f"data: reads on from global batch {index}, past the rows the parent trained on" if index else
            "data: another data stream than the parent's (data.* differs), read from its start")


def totals(meta: CheckpointMeta) -> dict:
    """The parent's cumulative step, tokens and FLOPs (older checkpoints count only their own run)."""
    return {"step": int(meta.total_step), "tokens": int(meta.tokens), "flops": float(meta.flops)}


def _parent_config(parent_config: dict) -> Config:
    return load_config(None, flatten(parent_config, skip=INHERITED_NOT))


def final_lr(parent_config: dict, step: int) -> float:
    """The learning rate the parent's schedule gives at ``step`` (its next update) — its final LR when done."""
    cfg = _parent_config(parent_config)
    return float(make_schedule(cfg.optimizer, cfg.train.steps)(step))


# ----------------------------------------------------------------------------- the child's config


def flatten(tree: dict, prefix: str = "", skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Nested sections -> dotted keys (lists stay values), dropping keys that start with ``skip``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if any(dotted == s or dotted.startswith(s) for s in skip):
            continue
        if isinstance(value, dict):
            out.update(flatten(value, f"{dotted}.", skip))
        else:
            out[dotted] = value
    return out


def read_stage(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"--stage '{path}' does not exist; pass a stage YAML such as configs/stages/ul2r.yaml")
    raw = read_yaml(path, f"--stage '{path}'")
    if not isinstance(raw, dict):
        raise ConfigError(f"--stage '{path}' must hold a mapping of sections (stage:, budget:, objective:, ...)")
    return raw


def check_tokens(config: Config, meta: CheckpointMeta, tokenizer: Tokenizer, objective: Objective,
                 where: str) -> None:
    """Same tokenizer as the parent, and every special id the objective needs is one of the model's rows."""
    if tokenizer.fingerprint() != meta.tokenizer:
        raise CheckpointError(f"the stage's data.tokenizer='{config.data.tokenizer}' is not the tokenizer parent "
                              f"{where} was trained with (ids would change meaning); keep the parent's data.tokenizer")
    rows = config.model.vocab_size
    missing = ids_past(objective, tokenizer, rows)
    if missing:
        first = min(missing, key=missing.get)
        raise CheckpointError(
            f"objective {objective.name} needs {len(missing)} ids the parent's embedding has no rows for "
            f"({first} = id {missing[first]}; parent model.vocab_size={rows}); add stage.extend_vocab=true to grow "
            f"the embedding to {tokenizer.vocab_size} rows (new rows start at the embedding mean)")


def _same_directory(a: str, b: str) -> bool:
    """One directory, however it is spelled (a symlink to the parent is the parent)."""
    if paths.is_remote(a) or paths.is_remote(b):
        return paths.absolute(a) == paths.absolute(b)
    return os.path.realpath(a) == os.path.realpath(b)


def _stage_parent_of(run_dir: str) -> str | None:
    """The ``stage.parent`` an existing run directory was started from (None: not a run, or no parent)."""
    saved = paths.join(run_dir, CONFIG_FILE)
    if not is_run_dir(run_dir) or not paths.exists(saved):
        return None
    return (read_yaml(saved, f"'{saved}'").get("stage") or {}).get("parent") or None


def check_model(config: Config, meta: CheckpointMeta, where: str) -> None:
    """A stage keeps the parent's architecture; only the vocabulary may grow (``stage.extend_vocab``)."""
    saved, child = model_signature(meta.config["model"]), model_signature(to_dict(config)["model"])
    for key, value in saved.items():
        if key == "vocab_size" and config.stage.extend_vocab and child[key] >= value:
            continue
        if child[key] != value:
            raise CheckpointError(f"parent {where} has model.{key}={value!r} but the stage asks for {child[key]!r}; "
                                  "a continuation keeps the parent's architecture (drop that override)")
    parent_objective = meta.config["objective"]["name"]
    if parent_objective == "mtp" or config.objective.name == "mtp":
        if parent_objective != config.objective.name:
            raise CheckpointError(f"parent {where} was trained with objective {parent_objective} and the stage uses "
                                  f"{config.objective.name}; multi-token heads change the parameter tree, so "
                                  "continue an mtp parent only with objective=mtp")


def step_budget(config: Config, parent_flops: float, objective: Objective) -> tuple[int, str]:
    """``budget.*`` (or an explicit ``train.steps``) -> the child's steps, and a sentence saying how."""
    b, d = config.budget, config.data
    tokens_per_step = d.batch_size * d.seq_len
    flops_per_step = flops_per_token(config.model, d.seq_len, **objective.size_extras()) * tokens_per_step
    if b.fraction:
        steps = max(1, round(b.fraction * parent_flops / flops_per_step))
        how = (f"budget.fraction={b.fraction:g} of the parent's {parent_flops:.4g} FLOPs at "
               f"{flops_per_step:.4g} FLOPs/step")
    elif b.tokens:
        steps = max(1, math.ceil(b.tokens / tokens_per_step))
        how = f"budget.tokens={b.tokens:,} at {tokens_per_step:,} tokens/step"
    elif b.steps:
        steps, how = b.steps, "budget.steps"
    else:
        steps, how = config.train.steps, "train.steps"
    how = f"{steps} steps ({steps * tokens_per_step:,} tokens, {steps * flops_per_step:.4g} FLOPs) from {how}"
    if parent_flops:
        how += f" = {steps * flops_per_step / parent_flops:.3%} of the parent's compute"
    return steps, how


def child_config(source: str, stage_path: str, overrides: list[str] | dict | None = None) -> tuple[Config, list[str]]:
    """The child's resolved config and the decisions made (budget -> steps, LR, vocabulary), to log."""
    run_dir, step = resolve_parent(source)
    where = checkpoint_path(run_dir, step)
    meta = parent_meta(run_dir, step)
    stage = read_stage(stage_path)
    user = overrides if isinstance(overrides, dict) else parse_overrides(overrides or [])
    stage_items = flatten(stage)
    if any(k.startswith("budget.") or k == "train.steps" for k in user):  # the user's length replaces the stage's
        stage_items = {k: v for k, v in stage_items.items() if not k.startswith("budget.")}
    chosen = {**stage_items, **user}
    if not any(k in chosen for k in ("budget.fraction", "budget.tokens", "budget.steps", "train.steps")):
        raise ConfigError(f"stage {stage_path} gives no length; set budget.fraction=0.001, budget.tokens=N, "
                          "budget.steps=N or train.steps=N")
    items = {**flatten(meta.config, skip=INHERITED_NOT), **chosen, "stage.parent": where}
    items.setdefault("stage.name", os.path.splitext(os.path.basename(stage_path))[0])
    near = run_dir if paths.is_remote(run_dir) else os.path.relpath(run_dir)  # runs/lm -> runs/lm-ul2r
    items.setdefault("train.run_dir", f"{run_dir if near.startswith('..') else near}-{items['stage.name']}")
    notes = [f"parent {where} (step {step}, {totals(meta)['tokens']:,} tokens, {totals(meta)['flops']:.4g} FLOPs "
             f"so far)"]

    config = load_config(None, items)
    tokenizer = build_tokenizer(config.data.tokenizer)
    resolve_vocab(config.model, tokenizer, config.data.tokenizer)
    grows = config.model.vocab_size < tokenizer.vocab_size and "model.vocab_size" not in chosen
    if config.stage.extend_vocab and grows:
        notes.append(f"vocabulary {config.model.vocab_size} -> {tokenizer.vocab_size} rows (new rows = embedding mean)")
        items["model.vocab_size"] = tokenizer.vocab_size
    if config.stage.lr_from_parent and "optimizer.lr" in user:  # the command line's value is the user's choice
        notes.append(f"optimizer.lr={user['optimizer.lr']} as given (stage.lr_from_parent not applied)")
    elif config.stage.lr_from_parent:
        items["optimizer.lr"] = final_lr(meta.config, step)
        notes.append(f"optimizer.lr={items['optimizer.lr']:.4g}, the parent's final learning rate")
    config = load_config(None, items)
    objective = build_objective(config.objective, tokenizer)
    check_model(config, meta, where)
    check_tokens(config, meta, tokenizer, objective, where)
    if _same_directory(config.train.run_dir, run_dir):
        raise CheckpointError(f"train.run_dir is the parent's run dir {run_dir}; a stage writes a new directory "
                              "(the parent is never modified)")
    earlier = _stage_parent_of(config.train.run_dir)
    if earlier is not None and earlier != where:
        raise CheckpointError(f"train.run_dir '{config.train.run_dir}' is already a stage of parent {earlier}, not "
                              f"{where}; choose another train.run_dir (or resume that stage: scaling-jax train "
                              f"{config.train.run_dir})")

    notes.append(_stream_note(child_stream_index(config, run_dir, step, meta)))
    steps, how = step_budget(config, totals(meta)["flops"], objective)
    if config.optimizer.warmup_steps > steps:
        raise ConfigError(f"the stage runs {steps} steps, fewer than optimizer.warmup_steps="
                          f"{config.optimizer.warmup_steps}; raise the budget or lower optimizer.warmup_steps")
    items["train.steps"] = steps
    notes.append(how)
    return load_config(None, items), notes


# ----------------------------------------------------------------------------- the child's state


def grow(leaf: jax.Array, shape: tuple[int, ...], fill: str) -> jax.Array:
    """Pad ``leaf`` up to ``shape`` along the axes that differ, with its mean along that axis or zeros."""
    for axis, (have, want) in enumerate(zip(leaf.shape, shape, strict=True)):
        if have != want:
            pad_shape = leaf.shape[:axis] + (want - have,) + leaf.shape[axis + 1:]
            if fill == "mean":
                extra = jnp.broadcast_to(leaf.mean(axis=axis, keepdims=True), pad_shape)
            else:
                extra = jnp.zeros(pad_shape, leaf.dtype)
            leaf = jnp.concatenate([leaf, extra.astype(leaf.dtype)], axis=axis)
    return leaf


def grow_tree(tree: Any, like: Any, fill: str) -> Any:
    return jax.tree.map(lambda x, ref: grow(x, ref.shape, fill), tree, like)


def graft_adam(fresh: Any, parent: Any, like: dict) -> Any:
    """``fresh`` optimizer state with the parent's Adam count and moments (grown to ``like``) put in.

    Everything else (the schedule's step count, masks, clipping) stays fresh, so the child's new schedule
    starts at its beginning while the moments carry over; the two trees may differ around the Adam state
    (a stage that turns gradient clipping on or off).
    """
    is_adam = lambda node: isinstance(node, optax.ScaleByAdamState)
    adam = [node for node in jax.tree.leaves(parent, is_leaf=is_adam) if is_adam(node)]
    if len(adam) != 1:
        raise CheckpointError(f"the parent's optimizer state holds {len(adam)} Adam states, not one; continue it "
                              "with stage.optimizer_state=reset")
    grafted = adam[0]._replace(mu=grow_tree(adam[0].mu, like, "zeros"), nu=grow_tree(adam[0].nu, like, "zeros"))
    return jax.tree.map(lambda node: grafted if is_adam(node) else node, fresh, is_leaf=is_adam)


def start_from_parent(session: Session, spec: StartSpec | None = None) -> StageStart:
    """The child's initial state from ``spec.parent`` (default: the config's ``stage``; see the module
    docstring), on the child's mesh."""
    config, objective = session.config, session.objective
    spec = spec or StartSpec.from_config(config)
    run_dir, step = split_checkpoint_path(spec.parent)
    meta = parent_meta(run_dir, step)
    parent_model = dataclasses.replace(config.model, vocab_size=meta.config["model"]["vocab_size"])
    # the parent's optimizer tree is the parent's (e.g. gradient clipping adds a state); only Adam's moments and
    # count are carried over (graft_adam), so the stage may change the rest of the optimizer
    parent_cfg = _parent_config(meta.config)
    parent_tx, _ = make_optimizer(parent_cfg.optimizer, parent_cfg.train.steps)
    layout = state_layout(parent_model, parent_tx, config.train.seed, objective.build_model, session.mesh,
                          session.rules)
    checkpointer = Checkpointer(run_dir, keep=1, async_save=False)
    try:
        if spec.optimizer_state == "continue":
            parent, _ = checkpointer.restore(step, layout.abstract, layout.state_sharding, None)
            if int(jax.device_get(parent.step)) != meta.step:  # restore fell back to an older checkpoint
                raise CheckpointError(f"parent checkpoint {spec.parent} is unreadable; pass an intact "
                                      f"one as --from {run_dir}/{CHECKPOINT_DIR}/STEP")
            params, parent_opt = parent.params, parent.opt_state
        else:
            target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                  layout.shapes, layout.params_sharding)
            params, parent_opt = checkpointer.restore_partial(step, {"params": target})["params"], None
    finally:
        checkpointer.close()
    like, seed, tx = session.abstract.params, config.train.seed, session.tx

    def assemble(params: dict, parent_opt: Any) -> TrainState:
        params = grow_tree(params, like, "mean")
        opt_state = tx.init(params)
        if parent_opt is not None:
            opt_state = graft_adam(opt_state, parent_opt, like)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                          rng=jax.random.key_data(jax.random.key(seed)))

    state = jax.jit(assemble, out_shardings=session.state_sharding)(params, parent_opt)
    return StageStart(state, offset=totals(meta), history=parent_lineage(meta), parent=spec.parent,
                      parent_step=step, data_index=child_stream_index(config, run_dir, step, meta))


def parent_lineage(meta: CheckpointMeta) -> list[dict]:
    """The parent's lineage; a record from before per-stage totals were kept gets them from the meta."""
    history = [dict(r) for r in meta.lineage]
    if history and "steps" not in history[-1] and len(history) == 1:
        history[-1].update(steps=meta.step, tokens=meta.tokens, flops=meta.flops,
                           total_tokens=meta.tokens, total_flops=meta.flops)
    return history
