"""Rematerialisation policies (``model.remat``), named after MaxText's ``remat_policy``.

At scale the activations saved for the backward pass, not the weights, fill device memory; a policy
says which intermediate tensors a block keeps and which it recomputes (or, ``offload``, parks in host
memory). Every policy computes the same numbers: only memory and time differ.

- ``none``: save everything (fastest, most memory).
- ``full``: save only each block's input; recompute the block in the backward pass.
- ``minimal``: save the weight matmuls' outputs (dots without batch dimensions), recompute the rest
  (norms, RoPE, attention scores and softmax, activations).
- ``save_dots``: save every matmul output, the attention scores (``QK^T``) and their product with ``V`` too.
- ``save_qkv_proj``: save only the query/key/value projections (tagged with ``checkpoint_name``).
- ``offload``: like ``minimal`` over the tagged projections, but kept in pinned host memory.
- ``full_offload``: like ``full``, but each block's input (the one tensor ``full`` keeps per layer, tagged
  ``block_input``) waits in pinned host memory: device memory holds no per-layer activation at all
  (MaxText's ``remat_policy=custom decoder_layer_input=offload``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from scaling_jax.errors import ConfigError

REMAT_POLICIES = ("none", "full", "minimal", "save_dots", "save_qkv_proj", "offload", "full_offload")
# Policies that save nothing inside a block (only its input, on device or host): layers may then slice their
# work and rematerialise each slice on its own at no extra FLOPs (layers.GatedMLP)
RECOMPUTE_BLOCK = ("full", "full_offload")
BLOCK_INPUT = "block_input"  # the name a block gives its input (layers.Block), for full_offload
QKV_NAMES = ("query_proj", "key_proj", "value_proj")
PROJ_NAMES = QKV_NAMES + ("out_proj", "mlpwi_0", "mlpwi_1", "mlpwo")  # every weight matmul of a block
LEGACY = {True: "full", False: "none"}  # model.remat was a bool


def policy_name(value: str | bool) -> str:
    """The policy for a config value (old configs' booleans included); unknown names are a ConfigError."""
    name = LEGACY[value] if isinstance(value, bool) else value
    if name not in REMAT_POLICIES:
        raise ConfigError(f"model.remat={value!r} is not one of {', '.join(REMAT_POLICIES)}")
    return name


def supports_offload(device: jax.Device) -> bool:
    """Host offload needs a pinned host memory space next to the device's own memory."""
    try:
        return any(m.kind == "pinned_host" for m in device.addressable_memories())
    except Exception:  # noqa: BLE001 (AOT topology devices answer nothing here): trust the platforms that have it
        return device.platform in ("tpu", "gpu", "cuda", "rocm")


def checkpoint_policy(name: str, device: jax.Device | None = None) -> Callable | None:
    """The ``jax.checkpoint`` policy for a remat name other than ``none`` (``None``: save nothing)."""
    policies = jax.checkpoint_policies
    if name == "full":
        return policies.nothing_saveable
    if name == "minimal":
        return policies.dots_with_no_batch_dims_saveable
    if name == "save_dots":
        return policies.dots_saveable
    if name == "save_qkv_proj":
        return policies.save_only_these_names(*QKV_NAMES)
    if name in ("offload", "full_offload"):
        device = device or jax.devices()[0]
        if not supports_offload(device):
            raise ConfigError(f"model.remat={name} needs host memory offload, which the {device.platform} platform "
                              f"({device.device_kind}) does not offer; use model.remat=minimal or full")
        offloaded = list(PROJ_NAMES) if name == "offload" else [BLOCK_INPUT]
        return policies.save_and_offload_only_these_names(
            names_which_can_be_saved=[], names_which_can_be_offloaded=offloaded,
            offload_src="device", offload_dst="pinned_host")
    raise ConfigError(f"model.remat={name!r} is not one of {', '.join(REMAT_POLICIES)}")


def remat(fn: Callable, name: str, device: jax.Device | None = None, prevent_cse: bool = True) -> Callable:
    """``fn`` under the named policy (unchanged for ``none``). Inside a scan, ``prevent_cse=False`` is safe
    and faster (the loop already stops XLA from merging the recomputation into the forward pass)."""
    if name == "none":
        return fn
    return jax.checkpoint(fn, policy=checkpoint_policy(name, device), prevent_cse=prevent_cse)
