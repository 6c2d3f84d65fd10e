"""What a config costs before it runs: parameter counts, FLOPs, memory per device.

The memory estimate is analytic (sharded weights, grads and AdamW moments by the real rule
table, plus an activation estimate; ``train/memory.py``, which the trainer's pre-flight check uses
too); ``scripts/aot_compile_tpu.py`` asks XLA for the exact numbers of the real train step.
"""

from __future__ import annotations

import json

from scaling_jax import paths
from scaling_jax.config import Config
from scaling_jax.model.family import attention_flops_per_token, flops_per_token, param_counts
from scaling_jax.objectives.base import build_objective
from scaling_jax.parallel.mesh import MESH_AXES, mesh_shape
from scaling_jax.run_dir import LINEAGE_FILE
from scaling_jax.train.memory import activation_bytes, memory_per_device, sharded_param_bytes  # noqa: F401 (re-export)


def describe(config: Config, num_devices: int, platform: str | None = None) -> dict:
    """Sizes, FLOPs and the per-device memory estimate for ``num_devices`` devices of ``platform`` (which
    decides whether ``model.attention=auto`` is a fused kernel; None: count the attention scores)."""
    m, d = config.model, config.data
    objective = build_objective(config.objective)
    extras = objective.size_extras()  # blocks / output heads an objective adds (mtp)
    counts = param_counts(m, **extras)
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
        "memory_per_device_bytes": memory_per_device(config, num_devices, objective, platform),
    }


def _positions(m) -> str:
    """The position scheme where it is not the default RoPE (and T5X's logit scaling)."""
    if getattr(m, "position", "rope") == "rope":
        return ""
    scale = ", logits / sqrt(d_model)" if m.logits_scale == "rsqrt_d_model" else ""
    return f", T5 relative positions ({m.relative_buckets} buckets, max distance {m.relative_max_distance}){scale}"


def format_report(config: Config, info: dict) -> str:
    m = config.model
    mem = info["memory_per_device_bytes"]
    gib = lambda b: f"{b / 2**30:.3f} GiB"  # noqa: E731
    lines = [
        f"model          {m.series}: {m.layers} layers, d_model {m.d_model}, {m.heads} heads"
        f" ({m.kv_heads or m.heads} kv) x {m.head_dim}, d_ff {m.d_ff}, {m.mlp}, vocab {m.vocab_size},"
        f" {'tied' if m.tie_embeddings else 'untied'} embeddings" + _positions(m),
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
    path = paths.join(run_dir, LINEAGE_FILE)
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
