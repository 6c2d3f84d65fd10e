"""Read T5X's own checkpoint format: a msgpack ``checkpoint`` file plus tensorstore (zarr) arrays.

What T5X's ``Checkpointer.save`` leaves in ``MODEL_DIR/checkpoint_STEP/`` (read off ``t5x/checkpoints.py``):

- ``checkpoint``: flax msgpack of ``{"version": N, "optimizer": {"target": params, "state": {"step",
  "param_states"}}}``. Arrays small or unpartitioned enough are stored inline (flax's msgpack ndarray
  extension); every other leaf is a tensorstore spec dict (``driver: zarr``, a ``kvstore`` whose ``path`` is
  relative to the checkpoint directory, e.g. ``target.decoder.layers_0.self_attention.query.kernel/``; older
  tensorstore wrote the path at the spec's top level).
- one zarr directory per such array (``.zarray`` + gzip chunks), named after the parameter path with dots.

Only ``target`` (the model's parameters) is read; optimizer state is ignored. T5X's parameter names are the
"/"-joined flax module path, e.g. ``decoder/layers_0/self_attention/query/kernel`` (``target/`` in front in
messages, as T5X's own logs name them).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import numpy as np

from scaling_jax.errors import CheckpointError

MSGPACK_FILE = "checkpoint"
STEP_DIR = re.compile(r"^checkpoint_(\d+)$")


def find_checkpoint(path: str) -> str:
    """The checkpoint directory to read: ``path`` itself when it holds T5X's msgpack ``checkpoint`` file, else
    the newest ``checkpoint_STEP`` inside ``path`` (a T5X model directory); a one-line error otherwise."""
    if not os.path.isdir(path):
        raise CheckpointError(f"--from-t5x '{path}' is not a directory; pass a T5X checkpoint_STEP directory or "
                              "the model directory holding them")
    if os.path.isfile(os.path.join(path, MSGPACK_FILE)):
        return path
    steps = sorted((int(m.group(1)), name) for name in os.listdir(path) if (m := STEP_DIR.match(name))
                   and os.path.isfile(os.path.join(path, name, MSGPACK_FILE)))
    if steps:
        return os.path.join(path, steps[-1][1])
    raise CheckpointError(f"--from-t5x '{path}' is not a T5X checkpoint: it has no msgpack '{MSGPACK_FILE}' file "
                          "and no checkpoint_STEP/ directory holding one")


def _restore_msgpack(path: str) -> dict:
    from flax import serialization  # flax's msgpack codec: T5X writes the file with it (inline ndarrays)

    with open(path, "rb") as f:
        raw = f.read()
    try:
        contents = serialization.msgpack_restore(raw)
    except Exception as e:  # msgpack raises several unrelated types for damaged bytes
        raise CheckpointError(f"{path} is not a T5X msgpack checkpoint ({type(e).__name__}); "
                              "pass a checkpoint written by T5X's Checkpointer") from None
    if not isinstance(contents, dict) or not isinstance(contents.get("optimizer"), dict) \
            or not isinstance(contents["optimizer"].get("target"), dict):
        found = sorted(contents) if isinstance(contents, dict) else type(contents).__name__
        raise CheckpointError(f"{path} holds no T5X train state (expected optimizer/target, found {found}); "
                              "pass a checkpoint written by T5X's Checkpointer")
    return contents


def _flatten(tree: Mapping, prefix: str = "") -> dict:
    """``{"decoder/layers_0/.../kernel": leaf}``; a tensorstore spec dict (it has a ``driver``) is a leaf."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and "driver" not in value:
            out.update(_flatten(value, f"{name}/"))
        else:
            out[name] = value
    return out


def _absolute_spec(spec: Mapping, ckpt_dir: str, name: str) -> dict:
    """The spec with its relative path joined to ``ckpt_dir`` (both tensorstore spec layouts); local files only."""
    spec = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in spec.items()}
    kvstore = spec.get("kvstore")
    driver = kvstore.get("driver") if isinstance(kvstore, dict) else None
    if driver == "gcs":  # written to a bucket, read from a local copy: the path is relative to the checkpoint,
        kvstore = spec["kvstore"] = {"driver": "file", "path": kvstore.get("path", "")}  # as T5X's own restore
        driver = "file"
    if driver not in (None, "file", "gfile"):
        raise CheckpointError(f"target/{name} is stored with tensorstore driver '{driver}'; copy the checkpoint to "
                              "a local directory (e.g. gcloud storage cp -r) and import from there")
    if isinstance(kvstore, dict) and "path" in kvstore:
        kvstore["driver"] = "file"
        kvstore["path"] = os.path.join(ckpt_dir, kvstore["path"])
    elif "path" in spec:
        spec["path"] = os.path.join(ckpt_dir, spec["path"])
        spec["kvstore"] = {"driver": "file"} if kvstore is None else {**kvstore, "driver": "file"}
    else:
        raise CheckpointError(f"target/{name}: its tensorstore spec names no path; is the checkpoint complete?")
    return spec


def _read_array(leaf, ckpt_dir: str, name: str) -> np.ndarray:
    if not isinstance(leaf, Mapping):
        return np.asarray(leaf)
    import tensorstore as ts

    spec = _absolute_spec(leaf, ckpt_dir, name)
    try:
        return np.asarray(ts.open(spec, open=True, read=True).result().read().result())
    except Exception as e:  # tensorstore raises ValueError / its own errors for missing or damaged arrays
        why = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise CheckpointError(f"target/{name}: cannot read its tensorstore array in '{ckpt_dir}' ({why}); "
                              "is the checkpoint directory complete?") from None


def read_leaves(ckpt_dir: str) -> dict:
    """The model parameters of a T5X checkpoint directory by "/"-joined name (without ``target/``), each an
    inline array or a tensorstore spec: cheap, so names and shapes are checked before any array is read."""
    return _flatten(_restore_msgpack(os.path.join(ckpt_dir, MSGPACK_FILE))["optimizer"]["target"])


def leaf_shape(leaf) -> tuple[int, ...] | None:
    """A leaf's shape without reading it (a spec's zarr metadata; None where the spec does not say)."""
    if isinstance(leaf, Mapping):
        shape = (leaf.get("metadata") or {}).get("shape")
        return None if shape is None else tuple(int(n) for n in shape)
    return tuple(np.shape(leaf))


def read_array(leaf, ckpt_dir: str, name: str) -> np.ndarray:
    """One parameter's values (float32 numpy), read from the msgpack file or its tensorstore array."""
    return _read_array(leaf, ckpt_dir, name).astype(np.float32)


def checkpoint_step(ckpt_dir: str) -> int | None:
    """The training step a ``checkpoint_STEP`` directory is named after (None for another name)."""
    m = STEP_DIR.match(os.path.basename(os.path.normpath(ckpt_dir)))
    return int(m.group(1)) if m else None
