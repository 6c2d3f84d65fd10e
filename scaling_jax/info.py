"""What a config costs before it runs: parameter counts, FLOPs, memory per device.

The memory estimate is analytic (sharded weights, grads and AdamW moments by the real rule
table, plus an activation estimate); ``compiled_memory`` asks XLA for the exact numbers of
the real train step on the current devices.
"""

from __future__ import annotations

import json
import math

import jax
import numpy as np
from jax.sharding import AbstractMesh

from scaling_jax import paths
from scaling_jax.config import Config
from scaling_jax.model.family import attention_flops_per_token, flops_per_token, param_counts
from scaling_jax.objectives.base import Objective, build_objective
from scaling_jax.parallel.mesh import MESH_AXES, mesh_shape
from scaling_jax.parallel.sharding import logical_to_spec, rules_from_config
from scaling_jax.train.state import abstract_model


def sharded_param_bytes(config: Config, num_devices: int, objective: Objective | None = None) -> float:
    """Bytes of one device's parameter shards under the configured mesh and rules (objective's heads included)."""
    objective = objective or build_objective(config.objective)
    _, shapes, axes = abstract_model(config.model, objective.build_model)
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


def activation_bytes(config: Config, num_devices: int) -> float:
    """Rough saved-activation bytes per device (Korthikanti et al. 2022, no sequence parallelism):
    per layer S*B*d*(34 + 5*heads*S/d) bytes at 16-bit, scaled to the compute dtype, plus logits."""
    m, d = config.model, config.data
    data, fsdp, tensor = mesh_shape(config.mesh, num_devices)
    local_batch = d.batch_size / (data * fsdp)
    width = np.dtype(m.dtype).itemsize / 2
    if m.remat:
        per_layer = d.seq_len * local_batch * m.d_model * 2 * width
    else:
        per_layer = d.seq_len * local_batch * m.d_model * (34 + 5 * m.heads * d.seq_len / m.d_model) * width / tensor
    logits = 2 * 4 * local_batch * d.seq_len * m.vocab_size / tensor
    return m.layers * per_layer + logits


def describe(config: Config, num_devices: int) -> dict:
    m, d = config.model, config.data
    objective = build_objective(config.objective)
    extras = objective.size_extras()  # blocks / output heads an objective adds (mtp)
    counts = param_counts(m, **extras)
    params = sharded_param_bytes(config, num_devices, objective)
    state_per_param = 4 + 8  # fp32 gradients and two fp32 AdamW moments per parameter
    weights_and_state = params * (1 + state_per_param / np.dtype(m.param_dtype).itemsize)
    acts = activation_bytes(config, num_devices)
    return {
        "params_total": counts.total,
        "params_non_embedding": counts.non_embedding,
        "params_embedding": counts.embedding,
        "flops_per_token": flops_per_token(m, d.seq_len, **extras),
        "flops_per_token_6N": 6.0 * counts.matmul,
        "attention_flops_per_token": attention_flops_per_token(m, d.seq_len,
                                                               extra_layers=extras.get("extra_layers", 0)),
        "tokens_per_step": d.batch_size * d.seq_len,
        "mesh": dict(zip(MESH_AXES, mesh_shape(config.mesh, num_devices), strict=True)),
        "memory_per_device_bytes": {"params": params, "params_grads_optimizer": weights_and_state,
                                    "activations_estimate": acts, "total_estimate": weights_and_state + acts},
    }


def format_report(config: Config, info: dict) -> str:
    m = config.model
    mem = info["memory_per_device_bytes"]
    gib = lambda b: f"{b / 2**30:.3f} GiB"  # noqa: E731
    lines = [
        f"model          {m.series}: {m.layers} layers, d_model {m.d_model}, {m.heads} heads"
        f" ({m.kv_heads or m.heads} kv) x {m.head_dim}, d_ff {m.d_ff}, {m.mlp}, vocab {m.vocab_size},"
        f" {'tied' if m.tie_embeddings else 'untied'} embeddings",
        f"parameters     {info['params_total']:,} total, {info['params_non_embedding']:,} non-embedding (N)",
        f"FLOPs/token    {info['flops_per_token']:.4g} = 6N_matmul {info['flops_per_token_6N']:.4g}"
        f" + attention {info['attention_flops_per_token']:.4g} (seq_len {config.data.seq_len})",
        f"tokens/step    {info['tokens_per_step']:,}",
        f"mesh           {info['mesh']}",
        f"memory/device  params {gib(mem['params'])}, +grads+AdamW {gib(mem['params_grads_optimizer'])},"
        f" activations ~{gib(mem['activations_estimate'])}, total ~{gib(mem['total_estimate'])}",
    ]
    return "\n".join(lines)


def read_lineage(run_dir: str) -> list[dict] | None:
    """The stages a run descends from (``lineage.json``, written with every checkpoint), or None."""
    path = paths.join(run_dir, "lineage.json")
    if not paths.exists(path):
        return None
    return json.loads(paths.read_text(path))


def format_lineage(lineage: list[dict]) -> str:
    """One line per stage, oldest first: stage, objective, steps, tokens and FLOPs, and where it started."""
    lines = ["lineage"]
    for i, r in enumerate(lineage):
        start = f"from {r['parent']} (step {r['parent_step']})" if r.get("parent") else "from scratch"
        lines.append(f"  {i}. {r.get('stage', '?')}: {r.get('objective', '?')}, {r.get('steps', 0)} steps, "
                     f"{r.get('tokens', 0):,} tokens, {r.get('flops', 0.0):.4g} FLOPs "
                     f"(totals {r.get('total_tokens', 0):,} tokens, {r.get('total_flops', 0.0):.4g} FLOPs); "
                     f"{start}; run dir {r.get('run_dir', '?')}")
    return "\n".join(lines)
