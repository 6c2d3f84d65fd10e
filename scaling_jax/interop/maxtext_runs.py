"""MaxText Llama checkpoints as run directories: ``convert --from-maxtext`` writes one, ``--to-maxtext`` reads one.

MaxText's checkpoints carry weights only: the model's shape is in the config MaxText ran with, so an import
takes that YAML (``--maxtext-config``, repeatable, later files win) plus MaxText-style ``key=value``
overrides, and a tokenizer (``--tokenizer``, else the config's ``tokenizer_path``). Overrides whose key is one
of our config sections (``model.*``, ``data.*``, ``objective=...``) are ours; every other ``key=value`` is a
MaxText key. The tensor mapping is ``maxtext_weights.py``, the files ``maxtext_files.py``; ``runs.py`` writes
the run directory as it does for every framework.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Sequence

import yaml

from scaling_jax.config import Config, ModelConfig, parse_overrides
from scaling_jax.data.tokenizer import build_tokenizer
from scaling_jax.errors import ConfigError
from scaling_jax.interop import runs
from scaling_jax.interop.hf_weights import resize_vocab
from scaling_jax.interop.maxtext_files import (
    find_items,
    read_maxtext_keys,
    read_maxtext_weights,
    resolve_tokenizer_path,
    saved_scan_layers,
    write_maxtext_checkpoint,
)
from scaling_jax.interop.maxtext_weights import (
    DEFAULTS,
    FIXED_FIELDS,
    maxtext_from_params,
    maxtext_keys_from_model,
    model_fields_from_maxtext,
    params_from_maxtext,
)

CONFIG_FILE = "maxtext_config.yml"  # written next to an export: MaxText runs it (base_config: base.yml)
EXPORT_RECORD = "scaling_jax_export.json"  # provenance of an export (MaxText's config refuses unknown keys)
OUR_SECTIONS = tuple(f.name for f in dataclasses.fields(Config))
TOKENIZER_TYPES = {"sentencepiece": "sentencepiece", "hf": "huggingface"}


def split_overrides(items: Sequence[str]) -> tuple[list[str], dict]:
    """Our dotted overrides (keys starting with one of our config sections) and MaxText ``key=value`` keys."""
    ours, theirs = [], []
    for item in items:
        key = item.partition("=")[0].strip()
        (ours if key.split(".")[0] in OUR_SECTIONS else theirs).append(item)
    for item in theirs:
        if "." in item.partition("=")[0]:
            raise ConfigError(f"override '{item}' is neither one of our config sections ({', '.join(OUR_SECTIONS)}) "
                              "nor a MaxText key (MaxText keys have no dots)")
    return ours, parse_overrides(theirs)


def checkpoint_scan_layers(keys: dict, items: str) -> bool:
    """The checkpoint's layer layout as MaxText decides it: an explicit ``scan_layers`` must agree with the one
    the checkpoint recorded; without one, the recorded value, else MaxText's default (scanned)."""
    saved = saved_scan_layers(items)
    if "scan_layers" in keys:
        explicit = bool(keys["scan_layers"])
        if saved is not None and saved != explicit:
            raise ConfigError(f"scan_layers={str(explicit).lower()} contradicts the checkpoint, saved with "
                              f"scan_layers={str(saved).lower()}; drop the key or fix it")
        return explicit
    return DEFAULTS["scan_layers"] if saved is None else saved


def _scan_axis(keys: dict) -> int:
    """MaxText's ``param_scan_axis`` (where a scanned checkpoint stacks its layers), 1 unless set."""
    value = keys.get("param_scan_axis", 1)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"param_scan_axis={value!r} is not an integer; give the axis the checkpoint stacks its "
                          "layers on (MaxText's default is 1)") from None


def _export_record(ckpt_dir: str, items: str) -> dict:
    """Our own export's record, if the checkpoint is one (it names the tokenizer a byte-level run used)."""
    for directory in (ckpt_dir, os.path.dirname(items), os.path.dirname(os.path.dirname(items))):
        path = os.path.join(directory, EXPORT_RECORD)
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
    return {}


def find_tokenizer(ckpt_dir: str, items: str, keys: dict, config_files: Sequence[str], explicit: str | None) -> str:
    """``--tokenizer`` (or ``data.tokenizer=``), else the config's ``tokenizer_path``, else the tokenizer our own
    export recorded; MaxText checkpoints carry none, so otherwise a one-line error."""
    if explicit:
        return explicit
    if keys.get("tokenizer_path"):
        return resolve_tokenizer_path(str(keys["tokenizer_path"]), config_files)
    recorded = _export_record(ckpt_dir, items).get("tokenizer")
    if recorded and recorded.split(":")[0] == "byte":
        return recorded
    raise ConfigError("a MaxText checkpoint carries no tokenizer and the MaxText config sets no tokenizer_path; "
                      "pass --tokenizer FILE (the model's SentencePiece .model or tokenizer.json) or --tokenizer byte")


def import_maxtext(ckpt_dir: str, run_dir: str, overrides: list[str] | None = None, tokenizer: str | None = None,
                   config_files: Sequence[str] = ()) -> Config:
    """Write a run directory (config.yaml, tokenizer/, a step-0 orbax checkpoint) from a MaxText checkpoint.

    ``config_files`` and the MaxText ``key=value`` overrides give the model's shape; our dotted overrides set
    everything the weights do not fix (data, optimizer, train, mesh; ``model.vocab_size`` may only grow). A
    shape that disagrees with the tensors is an error, and a failed import leaves no run directory.
    """
    runs.check_out(run_dir)
    items = find_items(ckpt_dir)
    ours, theirs = split_overrides(overrides or [])
    keys = read_maxtext_keys(config_files, theirs)
    fields = model_fields_from_maxtext(keys, "MaxText config")
    scan_layers, scan_axis = checkpoint_scan_layers(keys, items), _scan_axis(keys)
    user = parse_overrides(ours)
    runs.check_model_overrides(user, fields, FIXED_FIELDS, "the MaxText config",
                               "set the MaxText key instead (e.g. base_emb_dim=...), or drop the override")
    spec = find_tokenizer(ckpt_dir, items, keys, config_files, runs.tokenizer_choice(tokenizer, user))
    source_tok = build_tokenizer(spec)
    fields["vocab_size"] = runs.grown_vocab_size(fields["vocab_size"], source_tok, user)
    checkpoint_vocab = int(keys.get("vocab_size", DEFAULTS["vocab_size"]))

    def make_params(config: Config) -> dict:
        shape = dataclasses.replace(config.model, vocab_size=checkpoint_vocab)
        params = params_from_maxtext(read_maxtext_weights(items), shape, scan_layers, scan_axis,
                                     config.model.param_dtype, where=items)
        return resize_vocab(params, config.model.vocab_size, runs.tokenizer_rows(source_tok))

    settings = {f"model.{k}": v for k, v in fields.items()} | user
    source = runs.Source("maxtext", "maxtext-llama", ckpt_dir)
    return runs.import_run(run_dir, source, source_tok, settings, make_params)


def export_layout(overrides: Sequence[str]) -> bool | None:
    """``--to-maxtext`` takes one MaxText key, ``scan_layers=true|false`` (the written layer layout)."""
    keys = parse_overrides(list(overrides))
    if set(keys) - {"scan_layers"} or not isinstance(keys.get("scan_layers", True), bool):
        raise ConfigError(f"convert --to-maxtext takes only scan_layers=true|false (got {' '.join(overrides)})")
    return keys.get("scan_layers")


def export_maxtext(run_dir: str, out_dir: str, step: int | None = None, scan_layers: bool | None = None) -> str:
    """Write a MaxText parameter checkpoint (``OUT/0/items``) and ``OUT/maxtext_config.yml`` from a run's checkpoint.

    MaxText loads it with ``load_parameters_path=OUT/0/items`` and the YAML's model keys (the YAML itself runs:
    it inherits MaxText's base.yml). Layers are stacked (``scan_layers``) as the run's ``model.scan_layers``
    unless ``scan_layers`` says otherwise. The directory appears complete or not at all.
    """
    runs.check_new_dir(out_dir, "--to-maxtext")
    config, step, params = runs.read_run_params(run_dir, step)
    m: ModelConfig = config.model
    scan = m.scan_layers if scan_layers is None else scan_layers
    keys = maxtext_keys_from_model(m, scan)  # refuses what MaxText cannot represent before anything is written
    final = os.path.abspath(out_dir)

    def write(tmp: str) -> None:
        items = write_maxtext_checkpoint(os.path.join(tmp, "0"), maxtext_from_params(params, m, scan), scan)
        tok = build_tokenizer(config.data.tokenizer)
        path = getattr(tok, "path", None)
        out_keys = dict(keys)
        if path and getattr(tok, "file_name", None):
            shutil.copyfile(path, os.path.join(tmp, tok.file_name))
            out_keys |= {"tokenizer_path": os.path.join(final, tok.file_name),
                         "tokenizer_type": TOKENIZER_TYPES[tok.kind]}
        out_keys["load_parameters_path"] = os.path.join(final, os.path.relpath(items, tmp))
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            yaml.safe_dump({"base_config": "base.yml", **out_keys}, f, sort_keys=False)
        record = {"tokenizer": config.data.tokenizer if tok.kind == "byte" else tok.kind,
                  "run_dir": os.path.abspath(run_dir), "step": step, "objective": config.objective.name}
        with open(os.path.join(tmp, EXPORT_RECORD), "w") as f:
            json.dump(record, f, indent=2)

    return runs.write_new_dir(out_dir, "--to-maxtext", write)
