"""Per-device memory: the analytic estimate (``scaling-jax info`` prints it) and the pre-flight checks that
refuse a run which cannot fit before it loads data or spends minutes compiling.

Headroom rule (kept simple on purpose): the analytic estimate is approximate, so a run is refused only
when it exceeds the device's memory, and warned about above ``WARN_FRACTION`` of it. The memory is
``bytes_limit`` of ``device.memory_stats()`` on an accelerator (the smallest over this process's
devices) and host RAM on CPU, where all simulated devices share it (each gets RAM / local devices).
On an accelerator the compiled step is checked too, with XLA's own numbers, before the first step.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.sharding import AbstractMesh, Mesh

from scaling_jax import log
from scaling_jax.config import Config
from scaling_jax.errors import ConfigError
from scaling_jax.model.attention_kernels import resolve as resolve_attention
from scaling_jax.model.remat import policy_name
from scaling_jax.objectives.base import Objective, build_objective
from scaling_jax.parallel.mesh import MESH_AXES, mesh_shape
from scaling_jax.parallel.sharding import logical_to_spec, rules_from_config
from scaling_jax.train.state import abstract_model

GIB = 2**30
WARN_FRACTION = 0.9
FIXES = ("use a smaller model.series, more devices / mesh.fsdp, model.remat=full (or minimal), or a smaller "
         "data.batch_size")


def _gib(b: float) -> str:
    return f"{b / GIB:.1f} GiB"


class _ShapeOnlyRngs:
    """Stands in for ``nnx.Rngs`` when only shapes matter: every draw is one fixed key, so the trace records
    no RNG-counter updates (nnx walks the whole trace at each one: 15 s for 96 layers instead of 0.7 s)."""

    def __init__(self):
        self.key = jax.random.key(0)

    def params(self) -> jax.Array:
        return self.key


def _param_shapes(config: Config, build: Callable) -> tuple[dict, dict]:
    """Parameter ShapeDtypeStructs and logical axes of ``build``'s model (an objective's heads included)."""
    try:
        _, shapes, axes = abstract_model(config.model, lambda cfg, _: build(cfg, _ShapeOnlyRngs()))
    except AttributeError:  # a module that asks its rngs for more than params(): trace with real ones
        _, shapes, axes = abstract_model(config.model, build)
    return shapes, axes


def sharded_param_bytes(config: Config, num_devices: int, objective: Objective | None = None) -> float:
    """Bytes of one device's parameter shards under the configured mesh and rules (objective's heads included)."""
    objective = objective or build_objective(config.objective)
    shapes, axes = _param_shapes(config, objective.build_model)
    sizes = mesh_shape(config.mesh, num_devices)
    mesh = AbstractMesh(sizes, MESH_AXES)
    rules = rules_from_config(config.mesh.rules)
    total = 0.0
    for shape, ax in zip(jax.tree.leaves(shapes), jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple)),
                         strict=True):
        spec = logical_to_spec(ax, rules, mesh, shape.shape)
        split = 1
        for entry in spec:
            for name in (entry,) if isinstance(entry, str) else (entry or ()):
                split *= mesh.shape[name]
        total += math.prod(shape.shape) * np.dtype(shape.dtype).itemsize / split
    return total


def remat_saved_per_token(m, seq_len: int, tensor: int) -> float:
    """Elements per token one layer keeps for the backward pass under remat policy ``m.remat`` (not ``none``):
    its input (the scan carry; on the host under ``full_offload``), plus what the policy saves on the device
    (``offload`` keeps its on the host)."""
    kv = m.kv_heads or m.heads
    qkv = (m.heads + 2 * kv) * m.head_dim / tensor
    projections = qkv + 2 * m.d_model + 2 * m.d_ff / tensor  # + attention out and MLP down (d), gate and up (d_ff)
    saved = {"full": 0.0, "offload": 0.0, "save_qkv_proj": qkv, "minimal": projections,
             "save_dots": projections + m.heads * (seq_len + m.head_dim) / tensor,  # + QK^T scores and PV
             "full_offload": -m.d_model / tensor}
    return m.d_model / tensor + saved[policy_name(m.remat)]


def activation_bytes(config: Config, num_devices: int, platform: str | None = None) -> float:
    """Rough saved-activation bytes per device. Without remat, Korthikanti et al. 2022 (no sequence
    parallelism): per layer S*B*d*(34 + 5*heads*S/d) bytes at 16-bit, scaled to the compute dtype; a fused
    attention kernel on ``platform`` (splash, cuDNN: ``model.attention``) never materialises the S*S scores,
    which drops the second term. With a remat policy each layer keeps what ``remat_saved_per_token`` says,
    and the backward pass holds one layer's full set while it recomputes that layer. Plus float32 logits and
    their gradient."""
    m, d = config.model, config.data
    data, fsdp, tensor = mesh_shape(config.mesh, num_devices)
    local_batch = d.batch_size / (data * fsdp)
    width = np.dtype(m.dtype).itemsize / 2
    relative = m.position == "t5_relative"
    fused = platform is not None and resolve_attention(m.attention, platform, m.dtype, m.head_dim,
                                                       bias=relative) != "xla"
    scores = 0.0 if fused else 5 * m.heads * d.seq_len / m.d_model
    full_layer = d.seq_len * local_batch * m.d_model * (34 + scores) * width / tensor
    # t5_relative: one [batch, heads, S, S] bias shared by all layers, and its gradient
    bias = 2 * local_batch * m.heads * d.seq_len ** 2 * np.dtype(m.dtype).itemsize / tensor if relative else 0.0
    if policy_name(m.remat) == "none":
        layers = m.layers * full_layer
    else:
        saved = d.seq_len * local_batch * remat_saved_per_token(m, d.seq_len, tensor) * 2 * width
        layers = m.layers * saved + full_layer
    logits = 2 * 4 * local_batch * d.seq_len * m.vocab_size / tensor
    return layers + logits + bias


def memory_per_device(config: Config, num_devices: int, objective: Objective | None = None,
                      platform: str | None = None) -> dict:
    """Estimated bytes per device: parameter shards; with fp32 gradients and two fp32 AdamW moments; saved
    activations (on ``platform``: whether attention is fused); total (``info.describe``'s
    ``memory_per_device_bytes``)."""
    params = sharded_param_bytes(config, num_devices, objective)
    state_per_param = 4 + 8  # fp32 gradients and two fp32 AdamW moments per parameter
    weights_and_state = params * (1 + state_per_param / np.dtype(config.model.param_dtype).itemsize)
    acts = activation_bytes(config, num_devices, platform)
    return {"params": params, "params_grads_optimizer": weights_and_state,
            "activations_estimate": acts, "total_estimate": weights_and_state + acts}


def host_ram_bytes() -> float:
    return float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def device_budget(devices: Sequence[jax.Device]) -> tuple[float, str] | None:
    """(bytes one device may use, how to say it), or None when the backend does not tell.

    CPU devices (simulated ones included) share host RAM, so each gets RAM / number of local devices."""
    platform = devices[0].platform
    if platform == "cpu":
        ram, n = host_ram_bytes(), len(devices)
        if n == 1:
            return ram, f"a cpu device has {_gib(ram)} (host RAM)"
        return ram / n, f"the {n} cpu devices share {_gib(ram)} of host RAM ({_gib(ram / n)} each)"
    limits = [(d.memory_stats() or {}).get("bytes_limit") for d in devices]
    if not all(limits):
        return None
    return float(min(limits)), f"a {platform} device ({devices[0].device_kind}) has {_gib(min(limits))}"


def check_estimate(estimate: dict, budget: float, where: str) -> str | None:
    """Refuse (``ConfigError``) an estimate above ``budget``; a warning line above ``WARN_FRACTION`` of it."""
    need = estimate["total_estimate"]
    detail = (f"~{_gib(need)} per device (params+grads+AdamW {_gib(estimate['params_grads_optimizer'])}, "
              f"activations ~{_gib(estimate['activations_estimate'])})")
    if need > budget:
        raise ConfigError(f"model needs {detail} but {where}; {FIXES} (the estimate is analytic: "
                          "train.check_memory=false skips it if you know the step fits)")
    if need > WARN_FRACTION * budget:
        return f"model needs {detail}, {need / budget:.0%} of what {where}; it may not fit"
    return None


def local_devices(mesh: Mesh) -> list[jax.Device]:
    return [d for d in mesh.devices.flat if d.process_index == jax.process_index()]


def preflight(config: Config, mesh: Mesh, objective: Objective | None = None) -> None:
    """Refuse a config whose estimate exceeds this process's device memory (before data and compilation)."""
    budget = device_budget(local_devices(mesh))
    if budget is None or not config.train.check_memory:
        return
    platform = mesh.devices.flat[0].platform
    warning = check_estimate(memory_per_device(config, mesh.devices.size, objective, platform), *budget)
    if warning:
        log.warning(warning)


def compiled_peak_bytes(analysis) -> float:
    """Per-device peak of a compiled program (XLA ``memory_analysis()``): arguments + outputs - donated + temps."""
    return float(analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                 - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes)


def check_compiled(analysis, budget: float, where: str) -> None:
    """Refuse a compiled train step whose XLA peak exceeds ``budget``."""
    peak = compiled_peak_bytes(analysis)
    if peak > budget:
        raise ConfigError(f"the compiled train step needs {_gib(peak)} per device (XLA: arguments "
                          f"{_gib(analysis.argument_size_in_bytes)}, outputs {_gib(analysis.output_size_in_bytes)}, "
                          f"temporaries {_gib(analysis.temp_size_in_bytes)}, donated "
                          f"{_gib(analysis.alias_size_in_bytes)}) but {where}; {FIXES}")


def check_compiled_step(step_fn, args: tuple, budget: tuple[float, str] | None) -> None:
    """Compile ``step_fn`` for ``args`` (ShapeDtypeStructs with shardings) and check XLA's peak against ``budget``.

    The compiled executable lands in jit's cache, so the first real step reuses it: nothing compiles twice
    (tests/test_memory.py checks this). XLA refusing the program outright (RESOURCE_EXHAUSTED, as TPU
    compilers do) becomes the same one-line error."""
    if budget is None:
        return
    try:
        compiled = step_fn.lower(*args).compile()
    except Exception as e:  # XLA reports an oversized program as a runtime error
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        said = next((ln.strip() for ln in str(e).splitlines() if "RESOURCE_EXHAUSTED" in ln), "")[:300]
        raise ConfigError(f"the train step does not fit: {budget[1]} and XLA says '{said}'; {FIXES}") from None
    analysis = compiled.memory_analysis()
    if analysis is not None:  # a backend without XLA's buffer statistics: the estimate's check has to do
        check_compiled(analysis, *budget)
