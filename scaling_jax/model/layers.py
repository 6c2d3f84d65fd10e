"""Llama-style building blocks as Flax NNX modules.

Every parameter carries logical axis names in its ``out_sharding`` metadata (with eager
sharding off: the trainer places parameters itself with ``jax.jit(out_shardings=...)``).
Activations are pinned with ``constrain`` so the compiler sees the intended layout.
Norms, softmax and logits run in float32 whatever the compute dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from scaling_jax.config import ModelConfig
from scaling_jax.model.attention_kernels import MaskSpec, dot_product_attention
from scaling_jax.model.attention_kernels import attention_mask as attention_mask  # re-exported: callers import it here
from scaling_jax.model.remat import BLOCK_INPUT, RECOMPUTE_BLOCK, policy_name
from scaling_jax.parallel.sharding import active_split, constrain

ACT = ("batch", "length", "activation_embed")
# Where the remat policy recomputes whole blocks the gated MLP runs in slices (``GatedMLP.residual``): of its
# hidden units, this many per chip at a time (d_ff 8192 on one chip: 16 slices, each a full-width matmul), or of
# the sequence, this many positions at a time (4 slices of a 2048-token row).
MLP_UNITS = 512
MLP_POSITIONS = 512
# What a block's attention is told about its rows: a MaskSpec (segment ids and prefix flags; the kernel that
# model.attention picks builds its own mask form) or an explicit boolean mask [batch, 1, q, k] (always xla).
Mask = MaskSpec | jax.Array


def make_param(rngs: nnx.Rngs, init, shape: Sequence[int], axes: Sequence[str | None],
               dtype) -> nnx.Param:
    value = init(rngs.params(), tuple(shape), jnp.dtype(dtype))
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


def gathered(param: nnx.Param, dtype) -> jax.Array:
    """``param`` in the compute dtype, gathered whole over the FSDP axis (``embed``) for one use.

    Cast first, then gather (bf16 copies, half the bytes of the float32 master weights), and the matmuls that
    follow are local. Left to itself XLA fuses gather and matmul into a windowed (collective) matmul that holds
    several output-sized buffers at once ([rows, length, d_ff] each in the MLP), the largest temporaries of a
    step (v5e-16.yaml, remat full: 4.20 GiB per chip with them, 3.52 without). The gradient comes back
    through the constraint's transpose: an all-reduce of the layer's bf16 gradient, then each chip's slice,
    cast to the parameter's dtype. A custom backward that asks for a reduce-scatter instead brings the
    windowed matmuls back in the backward pass, and the peak with them (4.19 GiB)."""
    value = param[...]
    axes = tuple(param.get_metadata().get("out_sharding") or ())
    axes = axes[len(axes) - value.ndim:]  # a stacked block's slice keeps the leading "layers" name
    if len(axes) != value.ndim:
        return value.astype(dtype)
    return gather_embed(value, axes, dtype)


def gather_embed(value: jax.Array, axes: Sequence[str | None], dtype) -> jax.Array:
    """``value`` (logical ``axes``) cast to ``dtype``, then whole over the FSDP axis (``embed``); other axes
    stay as the rules shard them."""
    return constrain(value.astype(dtype), tuple(None if a == "embed" else a for a in axes))


class Rotary(NamedTuple):
    """Sine and cosine of every token's RoPE angles, each ``[batch, length, 1, head_dim // 2]`` float32.

    A decoder computes them once per forward pass, outside its layer scan and remat (``Decoder.rotary``), and
    its blocks take them in place of positions. Computed inside the blocks, XLA hoists them out of the scan
    twice (the forward and the backward's recompute) and on TPU emits the sine/cosine code for each: the
    largest units of the v5e preset's program, ~10% of its code (``docs/benchmarks.md``)."""

    sin: jax.Array
    cos: jax.Array


def rotary_angles(positions: jax.Array, head_dim: int, theta: float) -> Rotary:
    """``positions`` ``[batch, length]`` (per-document positions) -> their rotation tables."""
    half = head_dim // 2
    freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = positions.astype(jnp.float32)[..., None] * freq  # [b, t, half]
    return Rotary(jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :])


def as_rotary(positions: jax.Array | Rotary, head_dim: int, theta: float) -> Rotary:
    """The rotation tables of ``positions``, or the tables themselves when the caller computed them already."""
    return positions if isinstance(positions, Rotary) else rotary_angles(positions, head_dim, theta)


def rope(x: jax.Array, rotary: Rotary) -> jax.Array:
    """Rotary embedding, half-split layout (as in Llama/HF): pairs (i, i + d/2) rotate together.

    x: [batch, length, heads, head_dim]; rotary: ``rotary_angles`` of the tokens' positions. The angles are
    float32; the rotation runs in ``x``'s dtype, as HF's Llama and MaxText do (a float32 rotation of bf16
    activations made XLA:TPU emit a float32 sine/cosine unit of ~84k instructions, the program's largest).
    """
    sin, cos = (table.astype(x.dtype) for table in rotary)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, cfg: ModelConfig, rngs: nnx.Rngs):
        self.eps = cfg.norm_eps
        self.scale = make_param(rngs, nnx.initializers.ones, (dim,), ("embed",), cfg.param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class Attention(nnx.Module):
    """Multi-head or grouped-query attention with RoPE (or, ``model.position=t5_relative``, no rotation: the
    decoder's relative-position biases reach the logits through the mask); the kernel is ``model.attention``
    (see ``attention_kernels``) for a ``MaskSpec``, xla for an explicit mask (KV-cache decoding)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, h, kv, hd = cfg.d_model, cfg.heads, cfg.kv_heads or cfg.heads, cfg.head_dim
        init = nnx.initializers.normal(cfg.init_std)
        out_init = nnx.initializers.normal(cfg.init_std / (2 * cfg.layers) ** 0.5)
        self.rope_theta = cfg.rope_theta
        self.rotary = cfg.position == "rope"
        self.implementation = cfg.attention
        self.cudnn_max_segments = cfg.cudnn_max_segments
        self.wq = make_param(rngs, init, (d, h, hd), ("embed", "heads", "kv"), cfg.param_dtype)
        self.wk = make_param(rngs, init, (d, kv, hd), ("embed", "kv_heads", "kv"), cfg.param_dtype)
        self.wv = make_param(rngs, init, (d, kv, hd), ("embed", "kv_heads", "kv"), cfg.param_dtype)
        self.wo = make_param(rngs, out_init, (h, hd, d), ("heads", "kv", "embed"), cfg.param_dtype)

    def __call__(self, x: jax.Array, positions: jax.Array | Rotary, mask: Mask) -> jax.Array:
        q, k, v = self.qkv(x, positions)
        return self.attend(q, k, v, mask)

    def qkv(self, x: jax.Array, positions: jax.Array | Rotary) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Rotated queries and keys and the values of ``x`` (``positions``: the tokens' positions, or their
        ``Rotary`` tables when the decoder computed them once for all its blocks)."""
        dtype = x.dtype
        # Named for the remat policies that save or offload projections (model.remat, see model/remat.py)
        q = checkpoint_name(jnp.einsum("btd,dhk->bthk", x, gathered(self.wq, dtype)), "query_proj")
        k = checkpoint_name(jnp.einsum("btd,dhk->bthk", x, gathered(self.wk, dtype)), "key_proj")
        v = checkpoint_name(jnp.einsum("btd,dhk->bthk", x, gathered(self.wv, dtype)), "value_proj")
        if self.rotary:
            rotary = as_rotary(positions, q.shape[-1], self.rope_theta)
            q, k = rope(q, rotary), rope(k, rotary)
        q = constrain(q, ("batch", "length", "heads", "kv"))
        k = constrain(k, ("batch", "length", "kv_heads", "kv"))
        return q, k, constrain(v, ("batch", "length", "kv_heads", "kv"))

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask, bias: jax.Array | None = None) -> jax.Array:
        """``bias``: additive logits ``[batch, heads, q, k]`` for an explicit mask (a ``MaskSpec`` carries its own)."""
        if isinstance(mask, MaskSpec):
            out = dot_product_attention(q, k, v, mask, self.implementation, self.cudnn_max_segments)
        else:
            out = jax.nn.dot_product_attention(q, k, v, bias=None if bias is None else bias.astype(q.dtype), mask=mask)
        out = constrain(out, ("batch", "length", "heads", "kv"))
        return checkpoint_name(jnp.einsum("bthk,hkd->btd", out, gathered(self.wo, q.dtype)), "out_proj")

    def cached(self, x: jax.Array, positions: jax.Array, mask: jax.Array, cache: tuple[jax.Array, jax.Array],
               index: jax.Array, bias: jax.Array | None = None) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Inference: write this chunk's keys/values into ``cache`` (``[batch, max_len, kv_heads, head_dim]``
        each) at slot ``index`` and attend over the whole cache (``mask``: ``[batch, 1, chunk, max_len]``;
        ``bias``: relative-position biases of the same query and key slots, per head)."""
        q, k, v = self.qkv(x, positions)
        start = (0, index, 0, 0)
        cache_k = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), start)
        cache_v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), start)
        return self.attend(q, cache_k.astype(q.dtype), cache_v.astype(q.dtype), mask, bias), (cache_k, cache_v)


class GatedMLP(nnx.Module):
    """Gated GeLU (PassUntil / T5.1.1 default, tanh GeLU) or SwiGLU (Llama)."""

    IN, OUT = ("embed", "mlp"), ("mlp", "embed")  # logical axes of the gate and up weights, of the down weight

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.d_ff
        init = nnx.initializers.normal(cfg.init_std)
        out_init = nnx.initializers.normal(cfg.init_std / (2 * cfg.layers) ** 0.5)
        self.activation = jax.nn.gelu if cfg.mlp == "geglu" else jax.nn.silu
        self.w_gate = make_param(rngs, init, (d, f), self.IN, cfg.param_dtype)
        self.w_up = make_param(rngs, init, (d, f), self.IN, cfg.param_dtype)
        self.w_down = make_param(rngs, out_init, (f, d), self.OUT, cfg.param_dtype)
        # Slice only where nothing inside a block is saved anyway (see ``residual``)
        self.sliced = policy_name(cfg.remat) in RECOMPUTE_BLOCK

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.apply(x, *self.weights(x.dtype))

    def weights(self, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Gate, up and down projections in ``dtype``, gathered whole for one use (``gathered``)."""
        return tuple(gathered(w, dtype) for w in (self.w_gate, self.w_up, self.w_down))

    def residual(self, x: jax.Array, norm: RMSNorm) -> jax.Array:
        """``x + mlp(norm(x))``; under remat full / full_offload, in slices of the hidden units or of the sequence.

        The block's backward recomputes its MLP anyway. Run as a loop over slices, each rematerialised on its
        own, a chip holds one slice's share of the MLP's working set at a time. Which slices: a chip's MLP
        working set is its gathered weights and their gradients (``3 d_model x d_ff / tensor`` each) plus its
        rows gathered whole (``rows x length x d_model``), and the loop cuts whichever is larger. With FSDP
        alone the weights are (v6e-64.yaml with fsdp 64: 144 MiB of gathered bf16 weights against 48 MiB of
        rows), with tensor parallelism the rows are (fsdp 8 x tensor 8: 384 MiB of rows, 18 MiB of weights).
        Same FLOPs: the block's recomputation drops the MLP's forward (its output is unused there), and each
        slice's backward recomputes it."""
        f = self.w_gate.shape[-1]
        units = f // active_split("mlp", f)
        rows = x.shape[0] // active_split("batch", x.shape[0]) * x.shape[1]
        if self.sliced and 3 * units > rows and units % MLP_UNITS == 0 and units > MLP_UNITS:
            return self._in_unit_slices(x, norm, units // MLP_UNITS)
        if self.sliced and x.shape[1] % MLP_POSITIONS == 0 and x.shape[1] > MLP_POSITIONS:
            return self._in_sequence_slices(x, norm, x.shape[1] // MLP_POSITIONS)
        return x + self.apply(norm(x), *self.weights(x.dtype))

    def _in_unit_slices(self, x: jax.Array, norm: RMSNorm, n: int) -> jax.Array:
        """``n`` slices of the hidden units: slice ``j`` is the ``j``-th block of ``MLP_UNITS`` units of each
        chip's share of the ``mlp`` axis, so it splits over the mesh as the whole MLP does. One slice's weights
        are gathered at a time (each weight is still gathered once per step); the slices' weight gradients are
        disjoint, and their outputs add up in float32. The gradient of the normed rows adds up over the slices
        in the compute dtype (the scan's transpose accumulates it in its input's): bf16 gradients of a small
        model were as close to float32 ones with 16 slices as whole (median relative error 0.76% both)."""
        f, d, dtype = self.w_gate.shape[-1], x.shape[-1], x.dtype
        shards = active_split("mlp", f)
        # [n, d, f / n], [n, d, f / n], [n, f / n, d]
        gate, up = (jnp.moveaxis(w[...].reshape(d, shards, n, MLP_UNITS), 2, 0).reshape(n, d, f // n)
                    for w in (self.w_gate, self.w_up))
        down = jnp.moveaxis(self.w_down[...].reshape(shards, n, MLP_UNITS, d), 1, 0).reshape(n, f // n, d)
        normed = norm(x)

        def add_slice(total: jax.Array, weights: tuple[jax.Array, ...]) -> tuple[jax.Array, None]:
            g, u, dn = (gather_embed(w, axes, dtype) for w, axes in zip(weights, (self.IN, self.IN, self.OUT),
                                                                          strict=True))
            return constrain(total + self.apply(normed, g, u, dn).astype(jnp.float32), ACT), None

        add_slice = jax.checkpoint(add_slice, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False)
        total, _ = jax.lax.scan(add_slice, constrain(jnp.zeros(x.shape, jnp.float32), ACT), (gate, up, down))
        return constrain(x + total.astype(dtype), ACT)

    def _in_sequence_slices(self, x: jax.Array, norm: RMSNorm, n: int) -> jax.Array:
        """``n`` slices of the sequence: the norm and the residual add are per position, so they run inside the
        slice too (no whole-row normed copy, and the norm's float32 cotangents stay one slice big). The slices'
        weight gradients add up in the compute dtype, as the chips' partial gradients already do."""
        weights = self.weights(x.dtype)
        b, t, d = x.shape
        slices = constrain(x.reshape(b, n, t // n, d).swapaxes(0, 1), (None, *ACT))
        body = jax.checkpoint(lambda xs: xs + self.apply(norm(xs), *weights),
                              policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False)
        return constrain(jax.lax.map(body, slices).swapaxes(0, 1).reshape(b, t, d), ACT)

    def apply(self, x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
        """The gated MLP on compute-dtype weights that are already gathered."""
        gate = self.activation(checkpoint_name(x @ w_gate, "mlpwi_0"))
        up = checkpoint_name(x @ w_up, "mlpwi_1")
        hidden = constrain(gate * up, ("batch", "length", "mlp"))
        return checkpoint_name(hidden @ w_down, "mlpwo")


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model, cfg, rngs)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg, rngs)
        self.mlp = GatedMLP(cfg, rngs)

    def __call__(self, x: jax.Array, positions: jax.Array | Rotary, mask: Mask) -> jax.Array:
        x = checkpoint_name(x, BLOCK_INPUT)  # what remat=full_offload parks on the host
        x = constrain(x + self.attn(self.attn_norm(x), positions, mask), ACT)
        return constrain(self.mlp.residual(x, self.mlp_norm), ACT)

    def cached(self, x: jax.Array, positions: jax.Array, mask: jax.Array, cache: tuple[jax.Array, jax.Array],
               index: jax.Array, bias: jax.Array | None = None) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """The same block at inference, reading and extending a KV cache (see ``Attention.cached``)."""
        attn, cache = self.attn.cached(self.attn_norm(x), positions, mask, cache, index, bias)
        x = x + attn
        return x + self.mlp(self.mlp_norm(x)), cache
