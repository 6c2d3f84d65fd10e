"""Build the (data, fsdp, tensor) device mesh from the config.

One slice: ``jax.make_mesh`` lays the axes onto the chips' ICI. Several slices (multislice): each mesh axis
is dcn x ici, the slice factor outermost, so ``data`` and ``fsdp`` collectives cross the data-center network
(DCN) only between slices (``mesh_utils.create_hybrid_device_mesh``); ``tensor`` stays within a slice.
TPU devices are grouped by ``slice_index``; CPU and GPU devices by process (each process is a slice), so
two processes on one machine exercise the DCN path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from scaling_jax.config import MeshConfig
from scaling_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
# jax.make_mesh splits physical axes on these chips (their slices are 2-D tori): do the same within a slice
_SPLIT_PHYSICAL_AXES = ("TPU v5 lite", "TPU v5e")


def dcn_shape(cfg: MeshConfig) -> tuple[int, int, int]:
    """Slices each mesh axis spans over DCN (tensor never does); (1, 1, 1) on one slice."""
    return getattr(cfg, "dcn_data", 1), getattr(cfg, "dcn_fsdp", 1), 1


def _ici_shape(cfg: MeshConfig, num_devices: int, slices: int = 1) -> tuple[int, int, int]:
    """Resolve the one ``-1`` axis (if any) within a slice of ``num_devices`` and check the product."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    fill = [i for i, s in enumerate(sizes) if s == -1]
    if len(fill) > 1:
        raise ConfigError("only one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
    where = "available" if slices == 1 else f"in each of the {slices} slices (mesh.data/fsdp/tensor are per slice)"
    fixed = math.prod(s for s in sizes if s != -1)
    if fill:
        if num_devices % fixed:
            raise ConfigError(f"mesh fixed axes multiply to {fixed}, which does not divide the {num_devices} "
                              f"devices {where}; change mesh.fsdp / mesh.tensor")
        sizes[fill[0]] = num_devices // fixed
    if math.prod(sizes) != num_devices:
        raise ConfigError(f"mesh data x fsdp x tensor = {'x'.join(map(str, sizes))} = {math.prod(sizes)} but "
                          f"{num_devices} devices are {where}; set one axis to -1 to fill the rest")
    return tuple(sizes)  # type: ignore[return-value]


def ici_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """The mesh within one slice, for ``num_devices`` devices in all."""
    slices = math.prod(dcn_shape(cfg))
    if num_devices % slices:
        raise ConfigError(f"mesh.dcn_data x mesh.dcn_fsdp = {slices} slices do not split the {num_devices} devices "
                          "evenly; set their product to the number of slices")
    return _ici_shape(cfg, num_devices // slices, slices)


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """The whole mesh for ``num_devices`` devices: each axis dcn x ici (the ICI sizes alone on one slice)."""
    return tuple(d * i for d, i in zip(dcn_shape(cfg), ici_shape(cfg, num_devices), strict=True))  # type: ignore


def slice_groups(devices: Sequence) -> tuple[str, list[list]]:
    """Devices grouped by slice (``slice_index``: TPU) or else by process, in index order. CPU devices of a
    ``jax.distributed`` run carry ``slice_index`` 0 on every process, so off TPU a ``slice_index`` counts only
    where it tells slices apart; otherwise each process is a slice (``process_is_granule``)."""
    indices = {getattr(d, "slice_index", 0) for d in devices}
    tpu = getattr(devices[0], "platform", "") == "tpu"
    # TPU chips of one slice (an AOT topology's carry no slice_index) are one slice however many hosts hold them
    attr = "slice_index" if tpu or (hasattr(devices[0], "slice_index") and len(indices) > 1) else "process_index"
    groups: dict[int, list] = {}
    for d in devices:
        groups.setdefault(getattr(d, attr, 0), []).append(d)
    return attr, [groups[k] for k in sorted(groups)]


def device_grid(cfg: MeshConfig, devices: Sequence) -> np.ndarray:
    """The (data, fsdp, tensor) array of devices for several slices: ``create_hybrid_device_mesh`` with ICI
    sizes per slice and DCN sizes across them (slice-major on every axis)."""
    dcn = dcn_shape(cfg)
    slices = math.prod(dcn)
    attr, groups = slice_groups(devices)
    unit = "slice(s)" if attr == "slice_index" else "slice(s) (on CPU / GPU each process is one)"
    if len(groups) != slices:
        raise ConfigError(f"mesh.dcn_data x mesh.dcn_fsdp = {dcn[0]}x{dcn[1]} = {slices} but the devices form "
                          f"{len(groups)} {unit}; set mesh.dcn_data (and mesh.dcn_fsdp) so that their product "
                          f"is {len(groups)}")
    if len({len(g) for g in groups}) > 1:
        raise ConfigError(f"the {len(groups)} {unit} hold unequal device counts {[len(g) for g in groups]}; "
                          "a multislice mesh needs the same devices in every slice")
    ici = _ici_shape(cfg, len(groups[0]), slices)
    split = getattr(devices[0], "device_kind", "") in _SPLIT_PHYSICAL_AXES
    return mesh_utils.create_hybrid_device_mesh(ici, dcn, list(devices), process_is_granule=attr == "process_index",
                                                allow_split_physical_axes=split)


def build_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Auto axis types: sharding is steered by constraints, not by explicit-typed arrays."""
    devices = list(devices) if devices is not None else jax.devices()
    auto = (AxisType.Auto,) * 3
    if math.prod(dcn_shape(cfg)) > 1:
        return Mesh(device_grid(cfg, devices), MESH_AXES, axis_types=auto)
    if hasattr(devices[0], "slice_index") and len({d.slice_index for d in devices}) > 1:
        slices = len({d.slice_index for d in devices})
        raise ConfigError(f"the devices span {slices} slices but mesh.dcn_data x mesh.dcn_fsdp = 1; set "
                          f"mesh.dcn_data={slices} (or split {slices} between mesh.dcn_data and mesh.dcn_fsdp)")
    shape = mesh_shape(cfg, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
