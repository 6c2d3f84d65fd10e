"""Hugging Face Llama checkpoints as run directories: ``convert --from-hf`` writes one, ``--to-hf`` reads one.

A converted run directory starts at step 0 with fresh AdamW moments, the HF tokenizer copied into
``tokenizer/``, and lineage naming the source, so ``scaling-jax train RUN_DIR`` continues pretraining
from it and every command that reads checkpoints can load it. The tensor mapping is ``hf_weights.py``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np

from scaling_jax import paths
from scaling_jax import run_dir as run_dirs
from scaling_jax.config import Config, ModelConfig, load_config, parse_overrides, save_config, to_dict
from scaling_jax.data.tokenizer import build_tokenizer
from scaling_jax.errors import CheckpointError, ConfigError
from scaling_jax.interop.hf_weights import (
    DEFAULT_SHARD_BYTES,
    SHAPE_FIELDS,
    decoder_params,
    find_tokenizer,
    hf_config_from_model,
    hf_from_params,
    load_hf_tensors,
    model_fields_from_hf,
    params_from_hf,
    read_hf_config,
    resize_vocab,
    save_hf_tensors,
)
from scaling_jax.objectives.base import build_objective
from scaling_jax.parallel.mesh import build_mesh
from scaling_jax.parallel.sharding import replicated, rules_from_config
from scaling_jax.run_dir import CONFIG_FILE, LINEAGE_FILE, CheckpointMeta
from scaling_jax.train.checkpoint import Checkpointer
from scaling_jax.train.loop import write_json
from scaling_jax.train.state import TrainState, abstract_model, make_optimizer, state_layout


def _export_tokenizer(config: Config, out_dir: str) -> tuple[dict[str, int], str]:
    """Copy a file-backed tokenizer next to the weights under its HF file name; returns special ids and spec."""

    tok = build_tokenizer(config.data.tokenizer)
    path = getattr(tok, "path", None)
    if path and getattr(tok, "file_name", None):
        shutil.copyfile(path, os.path.join(out_dir, tok.file_name))
    spec = config.data.tokenizer if tok.kind == "byte" else tok.kind
    return {"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id}, spec


# ----------------------------------------------------------------------------- run directories


def import_hf(hf_dir: str, run_dir: str, overrides: list[str] | None = None, tokenizer: str | None = None) -> Config:
    """Write a run directory (config.yaml, tokenizer/, a step-0 orbax checkpoint) from an HF Llama directory.

    ``overrides`` are dotted config overrides for everything the weights do not fix (data, optimizer,
    train, mesh, dtypes; ``model.vocab_size`` may only grow); a shape field that disagrees with
    config.json is an error. On any error a run directory this call created is removed again.
    """
    if paths.is_remote(run_dir):
        raise CheckpointError(f"--out '{run_dir}' must be a local directory (an imported run's config points at "
                              "its tokenizer file on local disk); import to a local --out and train from there")
    if not os.path.isdir(hf_dir):
        raise CheckpointError(f"--from-hf '{hf_dir}' is not a directory; pass a Hugging Face model directory")
    hf = read_hf_config(hf_dir)
    fields = model_fields_from_hf(hf, os.path.join(hf_dir, "config.json"))
    user = parse_overrides(overrides or [])
    for key, value in user.items():
        name = key.removeprefix("model.")
        if key.startswith("model.") and name in SHAPE_FIELDS and name != "vocab_size" and value != fields[name]:
            raise ConfigError(f"{key}={value!r} contradicts the checkpoint's config.json ({fields[name]!r}); "
                              "drop the override: the weights fix the model's shape")
    if tokenizer and "data.tokenizer" in user:
        raise ConfigError("give the tokenizer once: --tokenizer or data.tokenizer=, not both")
    source_tok = build_tokenizer(find_tokenizer(hf_dir, hf, tokenizer or user.pop("data.tokenizer", None)))
    needed = max(fields["vocab_size"], source_tok.vocab_size)  # our pad / mode / sentinel ids may lie above HF's
    fields["vocab_size"] = user.pop("model.vocab_size", needed)
    if not isinstance(fields["vocab_size"], int) or fields["vocab_size"] < needed:
        raise ConfigError(f"model.vocab_size={fields['vocab_size']!r} must be an integer >= {needed} (the checkpoint's "
                          "and the tokenizer's vocabulary); the embedding can grow, never shrink")
    if not run_dirs.check_claimable(run_dir, "--out"):
        raise CheckpointError(f"--out '{run_dir}' already holds a run; choose a new or empty run directory")
    claimed = run_dirs.claim(run_dir, "--out")
    run_dirs.mark(run_dir)
    try:
        return _write_imported_run(hf_dir, hf, run_dir, fields, user, source_tok)
    except BaseException:
        run_dirs.discard_fresh(run_dir, claimed)
        raise


def _write_imported_run(hf_dir: str, hf: dict, run_dir: str, fields: dict, user: dict, source_tok) -> Config:
    spec = source_tok.save(os.path.abspath(os.path.join(run_dir, run_dirs.TOKENIZER_DIR)))  # the run carries it
    settings = {f"model.{k}": v for k, v in fields.items()} | {"data.tokenizer": spec, "train.run_dir": run_dir}
    config = load_config(None, settings | user)
    params = params_from_hf(load_hf_tensors(hf_dir), _hf_shape(config.model, hf), config.model.param_dtype,
                            where=hf_dir)
    params = resize_vocab(params, config.model.vocab_size)
    lineage = _import_lineage(config, hf_dir, run_dir)
    state = _train_state(config, params)
    meta = CheckpointMeta(config=to_dict(config), tokenizer=source_tok.fingerprint(), step=0, total_step=0,
                          tokens=0, flops=0.0, lineage=lineage, data_index=0)
    checkpointer = Checkpointer(run_dir, config.train.keep_checkpoints, async_save=False)
    try:
        checkpointer.save(0, state, _start_of_stream(), meta.to_json())
        checkpointer.wait()
    finally:
        checkpointer.close()
    save_config(config, os.path.join(run_dir, CONFIG_FILE))  # last: a run dir with config.yaml is complete
    write_json(os.path.join(run_dir, LINEAGE_FILE), lineage)
    return config


def export_hf(run_dir: str, out_dir: str, step: int | None = None, dtype: str | None = None,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> str:
    """Write an HF Llama directory (config.json, safetensors, tokenizer file) from a run's checkpoint.

    The directory appears complete or not at all (written beside it, then renamed).
    """

    saved = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(saved):
        raise CheckpointError(f"--checkpoint '{run_dir}' has no config.yaml; pass a run directory")
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise CheckpointError(f"--to-hf '{out_dir}' exists and is not an empty directory; choose a new one")
    config = load_config(saved, saved_run=True)
    m = config.model
    dtype = dtype or m.param_dtype
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"--dtype {dtype} is not one of float32, bfloat16, float16")
    checkpointer = Checkpointer(run_dir, config.train.keep_checkpoints, async_save=False)
    try:
        step = checkpointer.latest_step() if step is None else step
        if step is None or step not in checkpointer.manager.all_steps():
            raise CheckpointError(f"'{run_dir}' has no checkpoint{'' if step is None else f' at step {step}'}; "
                                  "train first or pick a saved step")
        _, shapes, _ = abstract_model(m, build_objective(config.objective).build_model)
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), shapes)
        restored = checkpointer.restore_partial(step, {"params": target})["params"]
    finally:
        checkpointer.close()
    params = jax.tree.map(np.asarray, decoder_params(restored, m))

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(out_dir))}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        ids, tok_spec = _export_tokenizer(config, tmp)
        extra = {"tokenizer": tok_spec, "run_dir": os.path.abspath(run_dir), "step": int(step),
                 "objective": config.objective.name}
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config_from_model(m, dtype, ids, extra), f, indent=2)
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"]}, f,
                      indent=2)
        save_hf_tensors(hf_from_params(params, m, dtype), tmp, max_shard_bytes)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty, checked above
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _import_lineage(config: Config, hf_dir: str, run_dir: str) -> list[dict]:
    """Lineage records in the loop's format: the HF checkpoint as a finished earlier stage, then this
    run's own (empty so far) record, which ``train`` takes over when it resumes the step-0 checkpoint."""
    zero = {"steps": 0, "tokens": 0, "flops": 0.0, "total_tokens": 0, "total_flops": 0.0}
    source = os.path.abspath(hf_dir)
    return [{"stage": "hf-import", "objective": "hf-llama", "run_dir": source, "parent": None, "parent_step": None,
             "start_step": 0, **zero},
            {"stage": config.stage.name, "objective": config.objective.name, "run_dir": os.path.abspath(run_dir),
             "parent": source, "parent_step": 0, "start_step": 0, **zero}]


def _hf_shape(m: ModelConfig, hf: dict) -> ModelConfig:
    """The model config with the checkpoint's own vocabulary (before any resize for our specials)."""

    return dataclasses.replace(m, vocab_size=int(hf["vocab_size"]))


def _train_state(config: Config, params: dict):
    """A step-0 TrainState holding ``params``, sharded as training would shard it, with fresh AdamW moments."""


    mesh = build_mesh(config.mesh)
    tx, _ = make_optimizer(config.optimizer, config.train.steps)
    layout = state_layout(config.model, tx, config.train.seed, build_objective(config.objective).build_model,
                          mesh, rules_from_config(config.mesh.rules))
    got = jax.tree.map(lambda a: (a.shape, str(a.dtype)), params)
    want = jax.tree.map(lambda s: (tuple(s.shape), str(s.dtype)), layout.shapes)
    if got != want:
        raise ConfigError(f"objective={config.objective.name} trains another parameter tree than a Llama decoder; "
                          "import with the default objective and switch objectives in a continuation stage")
    params_sharding, sharding = layout.params_sharding, layout.state_sharding
    placed = jax.tree.map(lambda a, s: jax.make_array_from_callback(a.shape, s, lambda idx: a[idx]),
                          params, params_sharding)  # every process holds the file; each places its shards
    opt_state = jax.jit(tx.init, out_shardings=sharding.opt_state)(placed)
    rep = replicated(mesh)
    return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), rep), params=placed, opt_state=opt_state,
                      rng=jax.device_put(jax.random.key_data(jax.random.key(config.train.seed)), rep))


def _start_of_stream():
    """A data-iterator position at the start of the stream, for the checkpoint's ``data`` item.

    Our training pipeline is a random-access grain ``MapDataset`` whose iterator state is only
    the next index, so a fresh iterator's state is the start of any such stream; ``train``
    resuming a converted run then reads its data from the first batch (a test holds this).
    """
    return iter(grain.MapDataset.range(1).to_iter_dataset())
