"""Attention kernels behind ``model.attention`` (issue 17): the Pallas splash kernel, run in interpret mode on
CPU, gives the xla path's outputs and gradients for causal, packed, GQA and prefix-LM rows, on one device and
inside ``shard_map`` on a mesh; ``auto`` picks xla on CPU; a whole model gives the same loss either way."""

import functools
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scaling_jax.config import load_config
from scaling_jax.errors import ConfigError
from scaling_jax.model import attention_kernels as ak
from scaling_jax.model.transformer import Decoder
from scaling_jax.parallel.mesh import build_mesh
from scaling_jax.parallel.sharding import DEFAULT_RULES, activation_sharding

B, T, H, D = 2, 256, 4, 64
BLOCK = 128  # the kernel's smallest tile: 2 x 2 blocks per head, the one above the diagonal skipped when causal
TOL = {"rtol": 1e-4, "atol": 2e-5}
# Interpret-mode kernels are large XLA programs; unoptimised CPU code compiles in ~2/3 of the time and runs
# these shapes in milliseconds either way.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _rows(kind: str) -> tuple[jax.Array, jax.Array | None]:
    """segment_ids [B, T] and prefix flags. Row 0: one causal document filling the row ("packed") or one all-prefix
    document and padding ("prefix"); row 1: three packed documents and padding."""
    seg = np.ones((B, T), np.int32)
    seg[1, :60], seg[1, 60:150], seg[1, 150:230], seg[1, 230:] = 1, 2, 3, 0
    bi = None
    if kind == "prefix":
        seg[0, 180:] = 0
        bi = np.zeros((B, T), bool)
        bi[0, :180] = True  # a document that is all prefix, across both blocks
        bi[1, :20], bi[1, 60:140] = True, True  # documents 1 and 2 have a prefix (2's crosses a block), 3 has none
    return jnp.asarray(seg), None if bi is None else jnp.asarray(bi)


def _qkv(kv_heads: int, seed: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
    r = np.random.default_rng(seed)
    q = r.normal(size=(B, T, H, D))
    k, v = r.normal(size=(2, B, T, kv_heads, D))
    return tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v))


def _loss_and_grads(fn, q, k, v, seg, bi):
    """Output and d(weighted sum)/d(q, k, v): the weights make every output element's cotangent distinct."""
    w = jnp.cos(jnp.arange(q.size, dtype=jnp.float32)).reshape(q.shape)
    out_and_grads = jax.value_and_grad(lambda q, k, v: (fn(q, k, v, seg, bi) * w).sum(), argnums=(0, 1, 2))
    return jax.jit(lambda q, k, v: (fn(q, k, v, seg, bi), out_and_grads(q, k, v)[1]),
                   compiler_options=FAST_COMPILE)(q, k, v)


@functools.cache
def _xla_reference(kind: str, kv_heads: int):
    """The xla path's outputs and gradients on ``_rows(kind)`` and ``_qkv(kv_heads)``: computed once, shared by the
    single-device and the shard_map comparisons of the same rows."""
    return _loss_and_grads(ak.xla_attention, *_qkv(kv_heads), *_rows(kind))


def _assert_matches_xla(splash, kind: str, kv_heads: int) -> list[float]:
    out_x, grads_x = _xla_reference(kind, kv_heads)
    out_s, grads_s = _loss_and_grads(splash, *_qkv(kv_heads), *_rows(kind))
    diffs = []
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out_x, *grads_x), (out_s, *grads_s), strict=True):
        assert bool(jnp.isfinite(b).all()), f"{name} has non-finite entries"
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), err_msg=name, **TOL)
        diffs.append(float(jnp.abs(a - b).max()))
    return diffs


@pytest.mark.parametrize("kind, kv_heads", [("packed", H), ("prefix", 2)],
                         ids=["causal-and-packed-mha", "prefix-lm-packed-gqa"])
def test_splash_in_interpret_mode_matches_xla_outputs_and_gradients(kind, kv_heads):
    """Causal, packed with padding (a padding query sees only itself in both paths), GQA (2 query heads per kv
    head), and prefix-LM rows with packing: an all-prefix document, one without a prefix, prefix + targets."""
    splash = lambda q, k, v, s, b: ak.splash_attention(q, k, v, s, b, interpret=True, max_block=BLOCK)
    diffs = _assert_matches_xla(splash, kind, kv_heads)
    assert max(diffs) < 2e-5, diffs


def test_prefix_rows_never_see_an_empty_row_in_the_bidirectional_pass():
    """The non-causal pass of a prefix-LM row gives every non-prefix token one shared id, so no query row of it
    is empty (each sees at least itself): its discarded outputs are finite, so `where` passes finite zeros back."""
    seg, bi = _rows("prefix")

    @jax.jit
    def checks(seg, bi):
        prefix_ids = jnp.where(bi, ak._kernel_ids(seg), ak.NOT_PREFIX)
        visible = prefix_ids[:, :, None] == prefix_ids[:, None, :]
        prefix_sees_target = (visible & bi[:, :, None] & ~bi[:, None, :]).any()
        return jnp.diagonal(visible, axis1=1, axis2=2).all(), prefix_sees_target

    sees_itself, prefix_sees_target = checks(seg, bi)
    assert bool(sees_itself) and not bool(prefix_sees_target)


def test_splash_runs_in_shard_map_over_batch_and_heads():
    """On a data 2 x tensor 2 mesh the kernel runs per shard (batch split over data, whole GQA groups over
    tensor) and still equals the unsharded xla path."""
    mesh = build_mesh(load_config(None, ["mesh.data=2", "mesh.fsdp=1", "mesh.tensor=2"]).mesh, jax.devices()[:4])
    q, k, _ = _qkv(2)

    def sharded(q, k, v, s, b):
        with activation_sharding(mesh, DEFAULT_RULES):
            return ak.splash_attention(q, k, v, s, b, interpret=True, max_block=BLOCK)

    assert ak.shard_spec(mesh, DEFAULT_RULES, q.shape, k.shape) == jax.sharding.PartitionSpec("data", None, "tensor",
                                                                                              None)
    _assert_matches_xla(sharded, "prefix", 2)


def _has_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


@pytest.mark.skipif(not _has_gpu(), reason="cuDNN flash attention needs an NVIDIA GPU")
@pytest.mark.parametrize("kind, kv_heads, max_runs", [("packed", H, None), ("packed", 2, 2), ("prefix", 2, None)],
                         ids=["causal-and-packed-mha", "dense-mask-fallback-gqa", "prefix-lm-packed-gqa"])
def test_cudnn_on_gpu_matches_xla_outputs_and_gradients(kind, kv_heads, max_runs):
    """The cuDNN kernel on bf16 inputs against the xla path in float32 on the same (upcast) values: relative
    error of outputs and gradients at bf16 precision (the kernel accumulates in float32, rounds to bf16). Causal
    rows take the packed layout on Hopper (row 1's 4 runs fit the default bound); ``max_runs=2`` sends the same
    rows down the dense-mask branch of the ``lax.cond``; prefix-LM rows always take the dense mask."""
    gpu = jax.devices("gpu")[0]
    q, k, v = (jax.device_put(x.astype(jnp.bfloat16), gpu) for x in _qkv(kv_heads))
    seg, bi = (None if x is None else jax.device_put(x, gpu) for x in _rows(kind))
    assert ak.resolve("cudnn", gpu.platform, q.dtype, D, gpu) == "cudnn"
    max_runs = max_runs or load_config(None, []).model.cudnn_max_segments
    if kind == "packed":
        assert bool(ak.segment_runs(seg, max_runs)[2]) == (max_runs > 2)
    cudnn = functools.partial(ak.cudnn_attention, max_runs=max_runs)
    out_c, grads_c = _loss_and_grads(cudnn, q, k, v, seg, bi)
    up = lambda x: x.astype(jnp.float32)
    out_x, grads_x = _loss_and_grads(ak.xla_attention, up(q), up(k), up(v), seg, bi)
    for name, ref, got in zip(("out", "dq", "dk", "dv"), (out_x, *grads_x), (out_c, *grads_c), strict=True):
        got = up(got)
        assert bool(jnp.isfinite(got).all()), f"{name} has non-finite entries"
        relative = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
        assert relative < 1.5e-2, f"{name}: relative error {relative:.2e}"


def _runs_by_scan(row: np.ndarray, max_runs: int) -> tuple[list[int], list[int], bool]:
    """The reference: walk the row, closing a run wherever the id changes."""
    starts = [i for i in range(len(row)) if i == 0 or row[i] != row[i - 1]]
    lengths = [b - a for a, b in zip(starts, [*starts[1:], len(row)], strict=True)]
    ids = [int(row[i]) for i in starts if row[i] != 0]
    exact = len(starts) <= max_runs and len(ids) == len(set(ids)) and ids == sorted(ids)
    pad = lambda xs, n: (xs + [-1] * n)[:n]
    return pad(lengths, max_runs), pad(starts, max_runs + 1), exact


def test_segment_runs_match_a_scan_of_each_row():
    """cuDNN's packed layout from segment ids: run lengths and starts (-1 past the last run) and the ``exact``
    flag that picks the packed branch, against a plain walk along each row. Rows: packed documents with a
    padding tail, one document, padding in the middle, an id split in two runs, more runs than allowed."""
    r = np.random.default_rng(0)
    t = 64
    segment_runs = jax.jit(ak.segment_runs, static_argnums=1)
    documents = np.cumsum(r.random(t) < 0.08) + 1
    tail = documents.copy()
    tail[r.integers(t // 2, t):] = 0
    middle = np.repeat([1, 0, 2, 3], t // 4)
    split = np.repeat([1, 0, 1, 2], t // 4)
    many = np.arange(t) // 4 + 1  # 16 runs
    outcomes = []
    for max_runs in (12, 16, 20):
        for batch in ([documents, tail, np.ones(t), middle], [np.ones(t), split], [tail, many]):
            seg = np.stack(batch).astype(np.int32)
            lengths, offsets, exact = (np.asarray(x) for x in segment_runs(jnp.asarray(seg), max_runs))
            expected = [_runs_by_scan(row, max_runs) for row in seg]
            assert bool(exact) == all(e[2] for e in expected)
            if bool(exact):
                assert lengths.tolist() == [e[0] for e in expected]
                assert offsets.tolist() == [e[1] for e in expected]
            outcomes.append(bool(exact))
    assert outcomes.count(True) >= 3 and outcomes.count(False) >= 3  # the split id row is never exact


def test_auto_resolves_to_xla_on_cpu_and_by_platform_elsewhere():
    assert jax.default_backend() == "cpu" and ak.current_platform() == "cpu"
    assert load_config(None, []).model.attention == "auto"
    assert ak.resolve("auto", "cpu", jnp.float32, 64) == "xla"
    assert ak.resolve("auto", "tpu", jnp.float32, 64) == "splash"
    assert ak.resolve("auto", "gpu", jnp.bfloat16, 128) == "cudnn"
    assert ak.resolve("auto", "gpu", jnp.float32, 128) == "xla"  # cuDNN flash attention takes fp16/bf16 only
    assert ak.resolve("cudnn", "gpu", jnp.bfloat16, 72 * 4) == "xla"  # head dim beyond cuDNN's bound
    assert ak.resolve("cudnn", "cpu", jnp.bfloat16, 64) == "xla"  # no cuDNN off GPU: the same config runs on CPU
    assert ak.resolve("splash", "cpu", jnp.float32, 64) == "splash"  # interpret mode
    # cudnn with a dtype cuDNN cannot take is the xla path's very program
    args = (*_qkv(2), *_rows("prefix"))
    assert str(jax.make_jaxpr(ak.cudnn_attention)(*args)) == str(jax.make_jaxpr(ak.xla_attention)(*args))
    with pytest.raises(ConfigError, match="model.attention='flash' is not one of auto, xla, splash, cudnn"):
        load_config(None, ["model.attention=flash"])


def test_whole_model_loss_is_the_same_with_splash(tiny_config):
    """A 2-layer GQA decoder (scanned) on packed prefix-LM rows of 32 tokens (splash pads them to one 128-token
    block). Forward only: the kernel's gradients are checked above, and a model backward in interpret mode costs
    ~15 s here. Random weights from numpy: eager NNX init alone compiles for ~5 s on this CPU."""
    seg = np.ones((2, 32), np.int32)
    seg[1, 10:25], seg[1, 25:] = 2, 0
    bi = jnp.asarray((np.arange(32) < 6)[None] & (seg > 0))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 32)), jnp.int32)
    positions = jnp.asarray(np.arange(32)[None].repeat(2, 0), jnp.int32)
    r = np.random.default_rng(2)
    params, losses = None, []
    for kind in ("xla", "splash"):
        graphdef, shapes = nnx.split(nnx.eval_shape(lambda k=kind: Decoder(tiny_config(f"model.attention={k}").model,
                                                                           nnx.Rngs(0))))
        params = params or jax.tree.map(lambda x: jnp.asarray(0.2 * r.normal(size=x.shape), x.dtype), shapes)

        @partial(jax.jit, compiler_options=FAST_COMPILE)
        def loss(p, graphdef=graphdef):
            model = nnx.merge(graphdef, p)
            logp = jax.nn.log_softmax(model.logits(model(tokens, positions, jnp.asarray(seg), bidirectional=bi)))
            nll = -jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1)[..., 0]
            return jnp.sum(nll * (seg[:, 1:] > 0)) / np.sum(seg[:, 1:] > 0)

        losses.append(float(loss(params)))
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
