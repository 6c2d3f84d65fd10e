"""T5's bucketed relative-position attention biases (``model.position=t5_relative``).

Instead of rotating queries and keys, T5 (and T5X's decoder-only models) add a learned scalar per head to
every attention logit, looked up by the bucket of the query-key distance. One ``[heads, buckets]`` table is
shared by all layers. A decoder-only model uses the causal ("unidirectional") bucketing: only the distance
``n = query position - key position`` clipped at 0 counts, so keys at or after the query (visible only in a
prefix-LM prefix) all share bucket 0. Half of the buckets hold the exact distances 0 .. buckets/2 - 1, the
rest grow logarithmically up to ``max_distance``; farther keys share the last bucket.

Distances come from per-document positions, so packed documents each see their own distances (within a
document they equal T5X's index distances).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=16)
def causal_bucket_table(num_buckets: int, max_distance: int) -> np.ndarray:
    """Bucket of every distance ``0 .. max_distance + 1`` (int32); larger distances take the last entry.

    Computed with numpy float32 arithmetic in T5X's order of operations, so bucket edges (which fall where the
    log-spaced formula crosses an integer) land on exactly the same distances as in T5X."""
    n = np.arange(max_distance + 2, dtype=np.int32)
    exact = num_buckets // 2
    scaled = np.log(n.astype(np.float32) / exact + np.finfo(np.float32).eps) / np.log(max_distance / exact)
    large = exact + (scaled * (num_buckets - exact)).astype(np.int32)
    return np.where(n < exact, n, np.minimum(large, num_buckets - 1)).astype(np.int32)


def relative_bias(table: jax.Array, distance: jax.Array, max_distance: int, dtype) -> jax.Array:
    """Attention biases ``[batch, heads, query, key]`` from ``table [heads, buckets]`` and ``distance
    [batch, query, key]`` (query position minus key position; negative: a key after the query)."""
    buckets = causal_bucket_table(table.shape[1], max_distance)
    n = jnp.clip(distance, 0, buckets.shape[0] - 1)
    bucket = jnp.asarray(buckets)[n]  # [b, q, k]
    bias = jnp.take(table.astype(jnp.float32), bucket, axis=1)  # [heads, b, q, k]
    return jnp.moveaxis(bias, 0, 1).astype(dtype)


def position_distance(positions: jax.Array) -> jax.Array:
    """``[batch, q, k]`` query position minus key position of every pair in rows of ``positions [batch, t]``."""
    return positions[:, :, None] - positions[:, None, :]
