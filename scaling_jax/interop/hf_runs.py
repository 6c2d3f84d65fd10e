"""Hugging Face Llama checkpoints as run directories: ``convert --from-hf`` writes one, ``--to-hf`` reads one.

A converted run directory starts at step 0 with fresh AdamW moments, the HF tokenizer copied into
``tokenizer/``, and lineage naming the source (``runs.py`` writes it the same way for every framework), so
``scaling-jax train RUN_DIR`` continues pretraining from it. The tensor mapping is ``hf_weights.py``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

from scaling_jax.config import Config, ModelConfig, parse_overrides
from scaling_jax.data.tokenizer import build_tokenizer
from scaling_jax.errors import CheckpointError, ConfigError
from scaling_jax.interop import runs
from scaling_jax.interop.hf_weights import (
    DEFAULT_SHARD_BYTES,
    FIXED_FIELDS,
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


def _export_tokenizer(config: Config, out_dir: str) -> tuple[dict[str, int], str]:
    """Copy a file-backed tokenizer next to the weights under its HF file name; returns special ids and spec."""

    tok = build_tokenizer(config.data.tokenizer)
    path = getattr(tok, "path", None)
    if path and getattr(tok, "file_name", None):
        shutil.copyfile(path, os.path.join(out_dir, tok.file_name))
    spec = config.data.tokenizer if tok.kind == "byte" else tok.kind
    return {"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id}, spec


def import_hf(hf_dir: str, run_dir: str, overrides: list[str] | None = None, tokenizer: str | None = None) -> Config:
    """Write a run directory (config.yaml, tokenizer/, a step-0 orbax checkpoint) from an HF Llama directory.

    ``overrides`` are dotted config overrides for everything the weights do not fix (data, optimizer,
    train, mesh, dtypes; ``model.vocab_size`` may only grow); a shape field that disagrees with
    config.json is an error. On any error a run directory this call created is removed again.
    """
    runs.check_out(run_dir)
    if not os.path.isdir(hf_dir):
        raise CheckpointError(f"--from-hf '{hf_dir}' is not a directory; pass a Hugging Face model directory")
    hf = read_hf_config(hf_dir)
    fields = model_fields_from_hf(hf, os.path.join(hf_dir, "config.json"))
    user = parse_overrides(overrides or [])
    runs.check_model_overrides(user, fields, FIXED_FIELDS, "the checkpoint's config.json",
                               "drop the override: the weights fix the model's shape")
    source_tok = build_tokenizer(find_tokenizer(hf_dir, hf, runs.tokenizer_choice(tokenizer, user)))
    fields["vocab_size"] = runs.grown_vocab_size(fields["vocab_size"], source_tok, user)

    def make_params(config: Config) -> dict:
        params = params_from_hf(load_hf_tensors(hf_dir), _hf_shape(config.model, hf), config.model.param_dtype,
                                where=hf_dir)
        return resize_vocab(params, config.model.vocab_size, runs.tokenizer_rows(source_tok))

    settings = {f"model.{k}": v for k, v in fields.items()} | user
    return runs.import_run(run_dir, runs.Source("hf", "hf-llama", hf_dir), source_tok, settings, make_params)


def export_hf(run_dir: str, out_dir: str, step: int | None = None, dtype: str | None = None,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> str:
    """Write an HF Llama directory (config.json, safetensors, tokenizer file) from a run's checkpoint.

    The directory appears complete or not at all (written beside it, then renamed).
    """
    runs.check_new_dir(out_dir, "--to-hf")
    config, step, params = runs.read_run_params(run_dir, step)
    m = config.model
    dtype = dtype or m.param_dtype
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"--dtype {dtype} is not one of float32, bfloat16, float16")

    def write(tmp: str) -> None:
        ids, tok_spec = _export_tokenizer(config, tmp)
        extra = {"tokenizer": tok_spec, "run_dir": os.path.abspath(run_dir), "step": step,
                 "objective": config.objective.name}
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config_from_model(m, dtype, ids, extra), f, indent=2)
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"]}, f,
                      indent=2)
        save_hf_tensors(hf_from_params(params, m, dtype), tmp, max_shard_bytes)

    return runs.write_new_dir(out_dir, "--to-hf", write)


def _hf_shape(m: ModelConfig, hf: dict) -> ModelConfig:
    """The model config with the checkpoint's own vocabulary (before any resize for our specials)."""

    return dataclasses.replace(m, vocab_size=int(hf["vocab_size"]))
