"""Logical axis names -> mesh axes, for parameters and activations alike.

One rule table maps T5X-style logical names (``batch, length, embed, mlp, heads, kv, vocab``)
to the mesh axes ``data, fsdp, tensor``. Resolution follows T5X: for each dimension, the
rules for its logical name are tried in order and a mesh axis already taken by an earlier
dimension of the same array is skipped; a ``null`` rule matches (the dimension is replicated,
later rules for the name are not tried). That is what lets one table give FSDP for weights
(``embed -> fsdp``) while activations, whose ``batch`` already took ``fsdp``, keep ``embed``
whole. One difference: when two dimensions' rules ask for the same mesh axis, the earlier
dimension takes it here, the earlier rule in T5X / flax. A mesh axis that does not divide the
dimension is dropped (the dimension is replicated over it) so tiny test models run on any mesh.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from scaling_jax.errors import ConfigError
from scaling_jax.parallel.mesh import MESH_AXES

MeshAxes = str | Sequence[str] | None
Rules = Sequence[tuple[str, MeshAxes]]

DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("activation_embed", "tensor"),  # the residual stream between blocks (what remat saves per layer): split, as
    # MaxText does, so a tensor-parallel mesh does not keep every saved layer input whole on each tensor shard
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("length", None),
    ("layers", None),
)


def rules_from_config(rules: list) -> Rules:
    """``mesh.rules`` from YAML (lists) as rule tuples; empty means the default table. A logical name the model
    does not use or a mesh axis the mesh does not have (a typo would silently never match) is a ConfigError."""
    if not rules:
        return DEFAULT_RULES
    logical_names = [name for name, _ in DEFAULT_RULES]
    for name, axes in rules:
        if name not in logical_names:
            raise ConfigError(f"mesh.rules names logical axis {name!r}, which the model does not use; use one of "
                              f"{', '.join(logical_names)}")
        unknown = [a for a in ([axes] if isinstance(axes, str) else axes or []) if a not in MESH_AXES]
        if unknown:
            raise ConfigError(f"mesh.rules maps {name!r} to mesh axis {unknown[0]!r}; use {', '.join(MESH_AXES)}, a "
                              "list of them or null")
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


def logical_to_spec(axes: Sequence[str | None], rules: Rules, mesh: Mesh, shape: Sequence[int]) -> PartitionSpec:
    """PartitionSpec for an array of ``shape`` whose dimensions carry logical ``axes``."""
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape, strict=True):
        chosen: list[str] = []
        for logical, mesh_axes in rules:
            if logical != name:
                continue
            if mesh_axes is None:  # T5X: a null rule is a match that replicates the dimension
                break
            candidates = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
            free = [a for a in candidates if a not in used and a in mesh.shape]
            while free and dim % math.prod(mesh.shape[a] for a in free):
                free.pop()
            free = [a for a in free if mesh.shape[a] > 1]
            if free:
                chosen = free
                break
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return PartitionSpec(*spec)


def requested_split(name: str, rules: Rules, mesh: Mesh) -> int:
    """How many ways the rules ask to split logical axis ``name`` (before any divisibility fallback)."""
    for logical, mesh_axes in rules:
        if logical == name:
            if mesh_axes is None:
                return 1
            candidates = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
            return math.prod(mesh.shape[a] for a in candidates if a in mesh.shape)
    return 1


def named_sharding(mesh: Mesh, rules: Rules, axes: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, rules, mesh, shape))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


# ----------------------------------------------------------------------------- activations

_ACTIVE: list[tuple[Mesh, Rules]] = []


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """While tracing inside this context, ``constrain`` pins activations to the rules."""
    _ACTIVE.append((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.pop()


def active_layout() -> tuple[Mesh, Rules] | None:
    """``(mesh, rules)`` of the innermost ``activation_sharding`` (what a step is traced for), if any."""
    return _ACTIVE[-1] if _ACTIVE else None


def active_mesh() -> Mesh | None:
    """The mesh of the innermost ``activation_sharding`` (the devices a step is traced for), if any."""
    return _ACTIVE[-1][0] if _ACTIVE else None


def active_split(name: str, size: int) -> int:
    """How many ways the active layout splits a dimension of ``size`` named ``name`` (1 outside one)."""
    if not _ACTIVE:
        return 1
    mesh, rules = _ACTIVE[-1]
    axes = logical_to_spec((name,), rules, mesh, (size,))[0] or ()
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint from logical names; a no-op outside ``activation_sharding``."""
    if not _ACTIVE:
        return x
    mesh, rules = _ACTIVE[-1]
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, rules, axes, x.shape))
