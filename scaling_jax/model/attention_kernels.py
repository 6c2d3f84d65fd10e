"""Attention kernels behind ``model.attention``: ``xla | splash | cudnn | auto``.

Training attention is described by what the rows hold, not by a materialised mask: ``MaskSpec`` carries
``segment_ids`` ``[batch, length]`` (packed documents; 0 is padding) and optionally ``bidirectional``
``[batch, length]`` (a UL2 / prefix-LM input prefix). Each kernel turns that into its own mask form:

- ``xla``: the explicit boolean ``[batch, 1, q, k]`` mask of ``attention_mask`` and
  ``jax.nn.dot_product_attention`` (materialises the ``[batch, heads, q, k]`` logits; runs anywhere).
- ``splash``: the Pallas TPU splash-attention kernel shipped with jax (blockwise online softmax, blocks
  above the causal diagonal skipped). Packing is its ``SegmentIds``; prefix-LM rows take two kernel calls
  (``splash_attention``). Off TPU it runs in Pallas interpret mode: a slow emulation for correctness tests.
- ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (cuDNN flash attention on NVIDIA GPUs).
- ``auto``: splash on TPU, cudnn on GPU when cuDNN can run the shape and dtype, xla elsewhere (CPU).

KV-cache decoding keeps the xla path with its explicit slot mask (``Attention.cached`` / ``model/decode.py``).
A ``MaskSpec`` carrying an additive ``bias`` (``model.position=t5_relative``) always runs xla.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from scaling_jax.config import ModelConfig
from scaling_jax.parallel import sharding

IMPLEMENTATIONS = ("auto", "xla", "splash", "cudnn")
LANES = 128  # splash's kv blocks are whole multiples of the TPU lane width
MAX_BLOCK = 512  # MaxText's default splash block for q and kv
# Segment id of every non-prefix token in the bidirectional splash call: no prefix token has it (real ids are
# > 0, padding gets -1 - position), so prefix queries never see such keys and non-prefix queries see each other.
NOT_PREFIX = np.iinfo(np.int32).min


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """What a training attention call needs to know about its rows (a pytree, so it crosses scan / remat).

    ``bidirectional`` must mark a prefix of each segment (the first tokens of a document or example), which
    is what UL2 and instruction finetuning produce; the xla path accepts any marking."""

    segment_ids: jax.Array
    bidirectional: jax.Array | None = None
    # Additive attention logits ``[batch, heads, q, k]`` (T5 relative-position biases, ``position_bias.py``): only
    # the xla kernel takes it (splash has no bias input), so ``resolve`` picks xla when it is present.
    bias: jax.Array | None = None


def attention_mask(segment_ids: jax.Array, bidirectional: jax.Array | None = None) -> jax.Array:
    """Boolean mask ``[batch, 1, query, key]``.

    A query sees a key in the same segment (packed documents never see each other) that is
    not in its future, except that tokens both marked ``bidirectional`` (a prefix-LM input)
    see each other fully. Segment 0 is padding. The diagonal is always visible so that no
    row is empty (padding rows then stay finite; their loss is masked anyway).
    """
    t = segment_ids.shape[-1]
    same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] != 0)
    visible = jnp.tril(jnp.ones((t, t), dtype=bool))[None]
    if bidirectional is not None:
        visible = visible | (bidirectional[:, :, None] & bidirectional[:, None, :])
    mask = (same & visible) | jnp.eye(t, dtype=bool)[None]
    return mask[:, None]


# ----------------------------------------------------------------------------- choosing a kernel


def current_device() -> jax.Device:
    """A device of the platform a step is traced for: the active mesh's (an AOT TPU topology from a CPU host
    counts as TPU), else JAX's default device."""
    mesh = sharding.active_mesh()
    return mesh.devices.flat[0] if mesh is not None else jax.devices()[0]


def current_platform() -> str:
    return current_device().platform


def _cuda_capability(device: jax.Device) -> tuple[int, ...]:
    """``(major, minor)`` of an NVIDIA device, ``()`` for anything else (ROCm names like gfx90a included)."""
    try:
        return tuple(int(x) for x in str(device.compute_capability).split("."))
    except (AttributeError, ValueError):
        return ()


def cudnn_supports(dtype: jnp.dtype, head_dim: int, device: jax.Device | None = None) -> bool:
    """cuDNN flash attention takes fp16/bf16 only, head dims that are multiples of 8 up to 128 (256 on Hopper;
    128 is the portable bound) and, when ``device`` is given, an Ampere or newer NVIDIA GPU. float32 models
    therefore stay on xla."""
    if device is not None and _cuda_capability(device) < (8, 0):
        return False
    return jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and head_dim % 8 == 0 \
        and head_dim <= 128


def resolve(implementation: str, platform: str, dtype: jnp.dtype, head_dim: int,
            device: jax.Device | None = None, bias: bool = False) -> str:
    """The kernel that runs: ``auto`` picks by platform; ``cudnn`` falls back to ``xla`` off GPU and where cuDNN
    cannot run the dtype / head dim (/ ``device``), so one config also runs on a CPU box. ``splash`` is honoured
    anywhere: off TPU it is the interpret-mode emulation (exact, very slow). With an attention ``bias`` (T5
    relative positions) every choice runs ``xla``: splash takes no bias, and the cuDNN path (which could take
    one) is not exercised on GPU here."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"model.attention={implementation!r} is not one of {', '.join(IMPLEMENTATIONS)}")
    if bias:
        return "xla"
    if implementation == "auto":
        if platform == "tpu":
            return "splash"
        implementation = "cudnn" if platform == "gpu" else "xla"
    if implementation == "cudnn" and (platform != "gpu" or not cudnn_supports(dtype, head_dim, device)):
        return "xla"
    return implementation


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, spec: MaskSpec,
                          implementation: str = "auto",
                          cudnn_max_segments: int = ModelConfig.cudnn_max_segments) -> jax.Array:
    """Attention of ``q [b, t, heads, d]`` over ``k, v [b, t, kv_heads, d]`` (GQA when kv_heads < heads),
    softmax scale ``1/sqrt(d)``, with the kernel ``implementation`` resolves to on this platform."""
    device = current_device()
    kind = resolve(implementation, device.platform, q.dtype, q.shape[-1], device, bias=spec.bias is not None)
    if kind == "splash":
        return splash_attention(q, k, v, spec.segment_ids, spec.bidirectional)
    if kind == "cudnn":
        return cudnn_attention(q, k, v, spec.segment_ids, spec.bidirectional, cudnn_max_segments)
    return xla_attention(q, k, v, spec.segment_ids, spec.bidirectional, spec.bias)


# ----------------------------------------------------------------------------- xla and cudnn


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                  bidirectional: jax.Array | None = None, bias: jax.Array | None = None) -> jax.Array:
    """The reference path: explicit mask, ``jax.nn.dot_product_attention`` (XLA's einsum-softmax-einsum); an
    additive ``bias`` ``[batch, heads, q, k]`` joins the scaled logits before the mask."""
    return jax.nn.dot_product_attention(q, k, v, bias=None if bias is None else bias.astype(q.dtype),
                                        mask=attention_mask(segment_ids, bidirectional))


def segment_runs(segment_ids: jax.Array, max_runs: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """cuDNN's packed ("ragged") layout of each row: the contiguous runs of equal ids, padding runs included, so
    every token lies in one run. Returns ``lengths [b, max_runs]`` and ``offsets [b, max_runs + 1]`` (run starts),
    both -1 past a row's last run, and ``exact``: True when every row has at most ``max_runs`` runs and no
    non-padding id occurs in two runs (then attention within runs is attention within segments)."""
    b, t = segment_ids.shape
    ids = segment_ids.astype(jnp.int32)
    starts = jnp.concatenate([jnp.ones((b, 1), bool), ids[:, 1:] != ids[:, :-1]], axis=1)
    run = jnp.cumsum(starts, axis=1) - 1  # run index of each token
    count = run[:, -1] + 1
    position = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    slot = jnp.where(starts & (run < max_runs), run, max_runs + 1)  # out of range: dropped by the scatter
    rows = jnp.arange(b)[:, None]
    offsets = jnp.full((b, max_runs + 1), -1, jnp.int32).at[rows, slot].set(position, mode="drop")
    ends = jnp.where(offsets[:, 1:] < 0, t, offsets[:, 1:])  # a run ends where the next begins, the last at t
    lengths = jnp.where(offsets[:, :-1] >= 0, ends - offsets[:, :-1], -1)
    seen_before = jax.lax.cummax(jnp.pad(ids, ((0, 0), (1, 0)))[:, :-1], axis=1)  # largest id left of each token
    in_order = (ids == 0) | (ids > seen_before) | ((ids == seen_before) & ~starts)
    exact = (count <= max_runs).all() & in_order.all()
    return lengths, offsets, exact


def _supports_packed_layout(device: jax.Device) -> bool:
    """cuDNN's packed layout (per-row segment offsets) runs on Hopper or newer only."""
    return _cuda_capability(device) >= (9, 0)


def _cudnn_packed(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, lengths: jax.Array,
                  offsets: jax.Array) -> jax.Array:
    """Causal attention within each run (cuDNN's packed layout: no mask or bias tensor at all). A padding query
    sees only itself, as in ``attention_mask``: its output is its own value row (of its GQA group's kv head)."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn  # the packed layout is not in jax.nn's wrapper

    out = cudnn.dot_product_attention(q, k, v, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets,
                                      kv_offsets=offsets, scale=q.shape[-1] ** -0.5,
                                      mask_type=cudnn.MaskType.PADDING_CAUSAL, qkv_layout="BTNH")
    own_value = jnp.repeat(v, q.shape[2] // v.shape[2], axis=2)
    return jnp.where((segment_ids == 0)[:, :, None, None], own_value, out)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                    bidirectional: jax.Array | None = None,
                    max_runs: int = ModelConfig.cudnn_max_segments) -> jax.Array:
    """cuDNN flash attention on NVIDIA GPUs.

    Causal rows on Hopper or newer use cuDNN's packed layout: each row's segments become per-row offsets and
    lengths (``segment_runs``), so packed documents cost no mask at all. A batch where some row has more than
    ``max_runs`` runs (``model.cudnn_max_segments``; 0 turns the packed layout off) or a segment id split in two
    runs takes the dense-mask path instead, chosen on device by ``lax.cond`` (both are compiled). jax's packed
    layout sizes its buffers by ``batch x max_runs`` sequences, so memory and time grow with the bound (measured
    in docs/benchmarks.md): keep it near the most documents a row really holds.

    The dense-mask path (prefix-LM rows, older GPUs, the fallback) goes through ``jax.nn.dot_product_attention``,
    whose wrapper has no segment ids: the boolean mask of the xla path becomes an additive ``[batch, 1, q, k]``
    bias (still one fused kernel with no ``[b, h, q, k]`` logits, but the bias is materialised); causal rows add
    ``is_causal`` so cuDNN skips the tiles above the diagonal. Dtypes or head dims cuDNN cannot take run the xla
    path instead."""
    if not cudnn_supports(q.dtype, q.shape[-1]):
        return xla_attention(q, k, v, segment_ids, bidirectional)

    def dense(q, k, v, segment_ids):
        return jax.nn.dot_product_attention(q, k, v, mask=attention_mask(segment_ids, bidirectional),
                                            is_causal=bidirectional is None, implementation="cudnn")

    if bidirectional is not None or max_runs <= 0 or not _supports_packed_layout(current_device()):
        return dense(q, k, v, segment_ids)
    lengths, offsets, exact = segment_runs(segment_ids, max_runs)
    packed = lambda q, k, v, s: _cudnn_packed(q, k, v, s, lengths, offsets)
    return jax.lax.cond(exact, packed, dense, q, k, v, segment_ids)


# ----------------------------------------------------------------------------- splash


def _block_size(length: int, largest: int = MAX_BLOCK) -> int:
    """The largest of 512 / 256 / 128 (at most ``largest``) dividing ``length`` (a multiple of 128)."""
    return next(b for b in (MAX_BLOCK, 256, LANES) if b <= largest and length % b == 0)


def _splash_kernel(heads: int, length: int, causal: bool, interpret: bool, max_block: int = MAX_BLOCK):
    """A splash kernel for one example ``q [heads, length, d]``. Built at every trace (it holds jax arrays, so it
    cannot outlive one); the host-side numpy work on the mask is cached inside jax (``_process_mask``)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    one = sm.CausalMask((length, length)) if causal else sm.FullMask((length, length))
    b = _block_size(length, max_block)
    blocks = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                           block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    return sk.make_splash_mha(sm.MultiHeadMask([one] * heads), block_sizes=blocks, head_shards=1,
                              q_seq_shards=1, interpret=interpret)


def _kernel_ids(segment_ids: jax.Array) -> jax.Array:
    """Segment ids for the kernel: padding (0) gets ``-1 - position``, an id of its own, so a padding token
    sees only itself, exactly like the xla mask's diagonal (shared 0s would let padding see padding)."""
    own = -1 - jnp.arange(segment_ids.shape[-1], dtype=jnp.int32)
    return jnp.where(segment_ids == 0, own, segment_ids.astype(jnp.int32))


def _splash_call(q: jax.Array, k: jax.Array, v: jax.Array, ids: jax.Array, causal: bool, interpret: bool,
                 max_block: int) -> jax.Array:
    """One splash pass over a (local) batch: ``q [b, t, h, d]``, ``ids [b, t]``, ``t`` a multiple of 128."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    kernel = _splash_kernel(q.shape[2], q.shape[1], causal, interpret, max_block)
    heads_major = lambda x: jnp.transpose(x, (0, 2, 1, 3))  # the kernel wants [heads, t, d] per example
    out = jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=sk.SegmentIds(s1, s1)))(
        heads_major(q), heads_major(k), heads_major(v), ids)
    return heads_major(out)


def _splash_local(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                  bidirectional: jax.Array | None, interpret: bool, max_block: int) -> jax.Array:
    """Splash attention on one device's shard (whole sequences, a slice of batch and heads)."""
    t = q.shape[1]
    padded = -(-t // LANES) * LANES
    if padded != t:  # the kernel tiles the sequence: pad it (padding tokens attend only to themselves), cut after
        pad = lambda x: jnp.pad(x, [(0, 0), (0, padded - t)] + [(0, 0)] * (x.ndim - 2))
        q, k, v, segment_ids = pad(q), pad(k), pad(v), pad(segment_ids)
        bidirectional = None if bidirectional is None else pad(bidirectional)
    q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)  # splash applies no softmax scale of its own
    ids = _kernel_ids(segment_ids)
    out = _splash_call(q, k, v, ids, causal=True, interpret=interpret, max_block=max_block)
    if bidirectional is not None:
        # Prefix queries: every prefix key of their own segment, causal or not. Non-prefix tokens share
        # NOT_PREFIX, so their rows here are never empty (each sees at least itself): softmax stays finite
        # forward and backward, and `where` then gives those rows (and their gradients) the causal pass.
        prefix_ids = jnp.where(bidirectional, ids, NOT_PREFIX)
        full = _splash_call(q, k, v, prefix_ids, causal=False, interpret=interpret, max_block=max_block)
        out = jnp.where(bidirectional[:, :, None, None], full, out)
    return out[:, :t]


def shard_spec(mesh: jax.sharding.Mesh, rules, q_shape, k_shape) -> PartitionSpec:
    """The shard_map spec of q, k and v ``[b, t, heads, d]`` from the logical-axis rules: batch and heads as the
    model shards them; the sequence and head dim whole (the kernel needs entire rows). Heads are split only when
    q heads and kv heads split the same way (each shard then holds whole GQA groups), else every shard computes
    all heads."""
    q_spec = sharding.logical_to_spec(("batch", "length", "heads", "kv"), rules, mesh, q_shape)
    k_spec = sharding.logical_to_spec(("batch", "length", "kv_heads", "kv"), rules, mesh, k_shape)
    return PartitionSpec(q_spec[0], None, q_spec[2] if q_spec[2] == k_spec[2] else None, None)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                     bidirectional: jax.Array | None = None, interpret: bool | None = None,
                     max_block: int = MAX_BLOCK) -> jax.Array:
    """Splash attention with causal masking, packed segments (``segment_ids``, 0 = padding) and GQA.

    Prefix-LM rows (``bidirectional``) take two kernel calls, selected per query: (a) causal with the document
    segment ids, (b) non-causal with ids that keep a token's segment only where it is bidirectional. A prefix
    query's keys are exactly its segment's prefix keys (b); any other query's are its segment's causal keys (a).
    Cost: (a) computes only the blocks on and below the diagonal (~t^2/2 scores) but (b) every block (~t^2,
    the prefix extent is data, so no block can be skipped statically): ~3x the scores of a causal-only call,
    twice the kernel launches, outputs and softmax residuals; still never the ``[b, h, t, t]`` logits.
    Exact against ``attention_mask`` when ``bidirectional`` marks a prefix of each segment (see ``MaskSpec``).

    Inside a step traced under ``activation_sharding`` on several devices the kernel runs in ``shard_map``
    over the batch (and head) mesh axes, as MaxText wraps it, with the sequence unsharded.
    ``interpret`` defaults to True off TPU (Pallas interpret mode: exact but slow, for tests). Blocks are the
    largest of 512 / 256 / 128 tokens dividing the (128-padded) length, at most ``max_block``."""
    if interpret is None:
        interpret = current_platform() != "tpu"
    run = functools.partial(_splash_local, interpret=interpret, max_block=max_block)
    layout = sharding.active_layout()
    if layout is None or layout[0].size == 1:
        return run(q, k, v, segment_ids, bidirectional)
    mesh, rules = layout
    spec = shard_spec(mesh, rules, q.shape, k.shape)
    rows = PartitionSpec(spec[0], None)
    mapped = jax.shard_map(run, mesh=mesh, in_specs=(spec, spec, spec, rows, None if bidirectional is None else rows),
                           out_specs=spec, check_vma=False)
    return mapped(q, k, v, segment_ids, bidirectional)
