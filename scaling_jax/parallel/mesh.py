"""Build the (data, fsdp, tensor) device mesh from the config."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh

from scaling_jax.config import MeshConfig
from scaling_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """Resolve the one ``-1`` axis (if any) and check the product equals the device count."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    fill = [i for i, s in enumerate(sizes) if s == -1]
    if len(fill) > 1:
        raise ConfigError("only one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
    fixed = math.prod(s for s in sizes if s != -1)
    if fill:
        if num_devices % fixed:
            raise ConfigError(f"mesh fixed axes multiply to {fixed}, which does not divide the {num_devices} "
                              "available devices; change mesh.fsdp / mesh.tensor")
        sizes[fill[0]] = num_devices // fixed
    if math.prod(sizes) != num_devices:
        raise ConfigError(f"mesh data x fsdp x tensor = {'x'.join(map(str, sizes))} = {math.prod(sizes)} but "
                          f"{num_devices} devices are available; set one axis to -1 to fill the rest")
    return tuple(sizes)  # type: ignore[return-value]


def build_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Auto axis types: sharding is steered by constraints, not by explicit-typed arrays."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = mesh_shape(cfg, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
