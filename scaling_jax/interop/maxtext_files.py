"""MaxText's files: its orbax parameter checkpoints and its YAML config keys.

A MaxText checkpoint step directory (``.../checkpoints/STEP`` or a conversion script's ``OUT/0``) holds one
orbax item, ``items/``, which is what ``load_parameters_path`` names. MaxText reads two layouts there: the
Linen one every trainer and conversion script writes (``params/params/{token_embedder, decoder}``, beside
``step`` and, in a training checkpoint, ``opt_state``) and the NNX one ``generate_param_only_checkpoint``
writes (``{token_embedder, decoder}`` with every array under a ``value`` key). Both are read here, only the
weights (a partial restore: an optimizer state is never loaded); ours is written in the Linen layout, with
the step's ``scan_layers`` custom metadata that MaxText checks on load.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import yaml

from scaling_jax import paths
from scaling_jax.errors import CheckpointError, ConfigError

ITEMS = "items"
NOT_A_CHECKPOINT = ("is not a MaxText checkpoint; pass the directory load_parameters_path names "
                    "(CHECKPOINTS/STEP/items), its step directory, or the checkpoints directory (latest step)")


class _ItemMetadataNotice(logging.Filter):
    """orbax's PyTree reader warns that an item directory lacks step-level metadata; a MaxText item never has
    it (it sits in the step directory above), so the notice would only add a line to every import."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Metadata file does not exist" not in record.getMessage()


_ITEM_NOTICE = _ItemMetadataNotice()


# ----------------------------------------------------------------------------- config keys


def read_maxtext_keys(config_files: Sequence[str], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """MaxText config keys from YAML files (later files win; ``base_config`` is not followed: keys a file
    lacks take MaxText base.yml's defaults) and then ``key=value`` overrides."""
    keys: dict[str, Any] = {}
    for path in config_files:
        if not os.path.isfile(path):
            raise ConfigError(f"--maxtext-config '{path}' is not a file; pass the YAML of MaxText keys the model "
                              "was trained with")
        try:
            with open(path) as f:
                loaded = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            first = str(e).splitlines()[0]
            raise ConfigError(f"--maxtext-config '{path}' is not valid YAML ({first}); fix it") from None
        except UnicodeDecodeError:
            raise ConfigError(f"--maxtext-config '{path}' is not UTF-8 text; save it as UTF-8") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"--maxtext-config '{path}' is not a mapping of MaxText keys; write key: value lines")
        keys |= loaded
    return keys | dict(overrides)


def resolve_tokenizer_path(value: str, config_files: Sequence[str]) -> str:
    """MaxText's ``tokenizer_path`` as a local file: as given, else relative to a config file's directory."""
    if paths.is_remote(value):
        raise ConfigError(f"tokenizer_path='{value}' is remote; copy the tokenizer file locally and pass "
                          "--tokenizer FILE")
    candidates = [value] + [os.path.join(os.path.dirname(os.path.abspath(p)), value) for p in config_files]
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise ConfigError(f"tokenizer_path='{value}' is not a file here; pass --tokenizer FILE (the model's "
                      "SentencePiece .model or tokenizer.json) or --tokenizer byte")


# ----------------------------------------------------------------------------- checkpoints


def _is_item(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "_METADATA")) or os.path.isfile(os.path.join(path, "manifest.ocdbt"))


def find_items(ckpt_dir: str) -> str:
    """The orbax item directory of a MaxText checkpoint given as the item, its step or its checkpoints root."""
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"--from-maxtext '{ckpt_dir}' is not a directory; {NOT_A_CHECKPOINT.split('; ')[1]}")
    if _is_item(ckpt_dir):
        return ckpt_dir
    if _is_item(os.path.join(ckpt_dir, ITEMS)):
        return os.path.join(ckpt_dir, ITEMS)
    steps = sorted((int(n) for n in os.listdir(ckpt_dir)
                    if n.isdigit() and _is_item(os.path.join(ckpt_dir, n, ITEMS))), reverse=True)
    if steps:
        return os.path.join(ckpt_dir, str(steps[0]), ITEMS)
    raise CheckpointError(f"--from-maxtext '{ckpt_dir}' {NOT_A_CHECKPOINT}")


def saved_scan_layers(items_dir: str) -> bool | None:
    """The ``scan_layers`` MaxText recorded in the step's custom metadata (None when it did not)."""
    import json

    path = os.path.join(os.path.dirname(os.path.abspath(items_dir)), "_CHECKPOINT_METADATA")
    try:
        with open(path) as f:
            value = (json.load(f).get("custom_metadata") or {}).get("scan_layers")
    except (OSError, ValueError):
        return None
    return value if isinstance(value, bool) else None


def _weights_path(tree: Mapping) -> tuple[str, ...] | None:
    """Where the model weights sit in an item's tree: Linen ``params/params``, NNX top level, or NNX ``base``."""
    params = tree.get("params")
    if isinstance(params, Mapping) and isinstance(params.get("params"), Mapping):
        return ("params", "params")
    if "decoder" in tree:
        return ()
    if isinstance(tree.get("base"), Mapping) and "decoder" in tree["base"]:
        return ("base",)
    return None


def _strip_values(tree: Any) -> Any:
    """NNX checkpoints keep each array as ``{"value": array}``; return the bare arrays."""
    if isinstance(tree, Mapping):
        if set(tree) == {"value"} and not isinstance(tree["value"], Mapping):
            return tree["value"]
        return {k: _strip_values(v) for k, v in tree.items()}
    return tree


def read_maxtext_weights(items_dir: str) -> dict:
    """The model weights ``{"token_embedder": ..., "decoder": ...}`` of a MaxText item, as numpy arrays."""
    import jax
    import orbax.checkpoint as ocp

    logging.getLogger("absl").addFilter(_ITEM_NOTICE)
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        meta = checkpointer.metadata(items_dir)
        tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
    except Exception:  # orbax raises FileNotFoundError / ValueError / its own errors for a non-checkpoint
        raise CheckpointError(f"--from-maxtext '{items_dir}' {NOT_A_CHECKPOINT}") from None
    where = _weights_path(tree) if isinstance(tree, Mapping) else None
    if where is None:
        top = ", ".join(sorted(tree)) if isinstance(tree, Mapping) else type(tree).__name__
        raise CheckpointError(f"--from-maxtext '{items_dir}' holds no MaxText model weights (top-level keys: {top}); "
                              "pass a MaxText training or parameter checkpoint")
    item: Any = tree
    for key in where:
        item = item[key]
    for key in reversed(where):  # only the weights' subtree: a training checkpoint's opt_state stays on disk
        item = {key: item}
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    try:
        restored = checkpointer.restore(items_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=args,
                                                                              partial_restore=True))
    except Exception as e:  # a damaged or half-written checkpoint
        raise CheckpointError(f"--from-maxtext '{items_dir}' could not be read ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); is the checkpoint complete?") from None
    for key in where:
        restored = restored[key]
    return _strip_values(restored)


def write_maxtext_checkpoint(step_dir: str, weights: Mapping, scan_layers: bool) -> str:
    """Write ``weights`` as MaxText's parameter checkpoint at ``step_dir`` (``step_dir/items``, Linen layout,
    OCDBT + zarr3 as MaxText writes them); returns the ``load_parameters_path`` to give MaxText."""
    from orbax.checkpoint import v1 as ocp_v1

    ocp_v1.save(step_dir, {"params": {"params": dict(weights)}}, checkpointable_name=ITEMS,
                custom_metadata={"scan_layers": scan_layers})
    return os.path.join(os.path.abspath(step_dir), ITEMS)
