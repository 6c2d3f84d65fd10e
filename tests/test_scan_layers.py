"""Scanned layers and remat policies (issue 17): the same weights give the same loss and gradients whatever the
layout (stacked + ``lax.scan`` or a block list) and whatever ``model.remat`` saves; the scanned program does not
grow with depth; old configs' values still read; the memory estimate follows the policy."""

import dataclasses
import functools
import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY
from flax import nnx
from test_multi_token import _rows

from scaling_jax.config import load_config, to_dict
from scaling_jax.errors import ConfigError
from scaling_jax.model import layers, remat
from scaling_jax.model.transformer import Decoder, to_layout
from scaling_jax.objectives.base import masked_cross_entropy
from scaling_jax.objectives.causal import CausalLM
from scaling_jax.objectives.multi_token import MultiTokenPrediction
from scaling_jax.parallel.mesh import build_mesh
from scaling_jax.parallel.sharding import rules_from_config
from scaling_jax.train.checkpoint import model_signature
from scaling_jax.train.memory import activation_bytes
from scaling_jax.train.state import abstract_model, decay_mask, init_state, make_optimizer, state_layout
from scaling_jax.train.step import batch_shardings, jit_train_step, make_train_step, to_global

SMALL = ["model.layers=2", "model.d_model=32", "model.heads=4", "model.kv_heads=2", "model.head_dim=8",
         "model.d_ff=64", "data.seq_len=16", "data.batch_size=4", "optimizer.warmup_steps=0",
         "optimizer.schedule=constant"]


def _prefix_lm_loss(model, batch):
    """UL2's loss: the first half of every row attends bidirectionally."""
    hidden = model(batch["inputs"], batch["positions"], batch["segment_ids"], bidirectional=batch["bidirectional"])
    metrics = masked_cross_entropy(model.logits(hidden), batch["targets"], batch["loss_mask"])
    return metrics["loss"], metrics


MTP = ("objective=mtp", "model.layers=3")  # a 2-block trunk: the scanned trunk still has more than one layer


@functools.cache
def _grad_fn(kind, *overrides):
    """The jitted loss-and-gradient function of ``SMALL + overrides`` (one trace and compile per distinct
    program: tests that need the same program with other weights reuse it)."""
    config = load_config(None, TINY + SMALL + list(overrides))
    objective = _objective(config, kind)
    graphdef, _, _ = abstract_model(config.model, objective.build_model)
    batch = {k: jnp.asarray(v) for k, v in objective.prepare(_rows(4, 16)).items()}
    if kind == "prefix_lm":
        batch["bidirectional"] = jnp.broadcast_to(jnp.arange(16) < 8, (4, 16)) & (batch["segment_ids"] != 0)
        return jax.jit(jax.value_and_grad(lambda p: _prefix_lm_loss(nnx.merge(graphdef, p), batch), has_aux=True))
    return jax.jit(lambda p: objective.value_and_grad(graphdef, p, batch))


def _value_and_grad(kind, params, *overrides):
    return _grad_fn(kind, *overrides)(params)


def _params(kind, seed, *overrides):
    config = load_config(None, TINY + SMALL + list(overrides))
    return nnx.to_pure_dict(nnx.split(_objective(config, kind).build_model(config.model, nnx.Rngs(seed)))[1])


def _assert_close(a, b, rtol=1e-5, atol=1e-6):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def _objective(config, kind):
    return MultiTokenPrediction(config.objective) if kind == "mtp" else CausalLM(config.objective)


@pytest.mark.parametrize("kind", ["causal", "prefix_lm", "mtp"])
def test_scanned_and_unscanned_layers_give_the_same_loss_and_gradients(kind):
    """GQA, packed segments with padding; prefix-LM bidirectional rows; mtp's trunk + head-by-head backward."""
    extra = (*MTP, "objective.heads=2") if kind == "mtp" else ()
    params = _params(kind, 3, *extra)
    assert "layers" in (params.get("trunk") or params)
    assert jax.tree.leaves(params.get("trunk") or params)[0].shape[0] >= 2  # the scan runs over several layers
    (loss_s, m_s), g_s = _value_and_grad(kind, params, *extra)
    (loss_l, m_l), g_l = _value_and_grad(kind, to_layout(params, False), *extra, "model.scan_layers=false")
    assert float(loss_s) == pytest.approx(float(loss_l), rel=1e-6)
    _assert_close(m_s, m_l)
    _assert_close(g_s, to_layout(g_l, True))
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(g_s))


@pytest.mark.parametrize("policy", [p for p in remat.REMAT_POLICIES if p != "none"])
def test_every_remat_policy_gives_the_gradients_of_none(policy):
    params = _params("causal", 4)
    (loss_n, _), g_n = _value_and_grad("causal", params)  # the same jitted program as the scanned causal case
    (loss_p, _), g_p = _value_and_grad("causal", params, f"model.remat={policy}")
    assert float(loss_p) == pytest.approx(float(loss_n), rel=1e-6)
    _assert_close(g_p, g_n)


def _record_slicing(monkeypatch) -> list[tuple[str, int]]:
    """(method, number of slices) of every sliced MLP traced from now on."""
    calls = []
    for name in ("_in_unit_slices", "_in_sequence_slices"):
        method = getattr(layers.GatedMLP, name)
        monkeypatch.setattr(layers.GatedMLP, name, lambda self, x, norm, n, method=method, name=name:
                            calls.append((name, n)) or method(self, x, norm, n))
    return calls


@pytest.mark.parametrize("policy", remat.RECOMPUTE_BLOCK)
@pytest.mark.parametrize("slicing", ["units", "positions"])
def test_an_mlp_run_in_slices_gives_the_gradients_of_none(policy, slicing, monkeypatch):
    """Policies that recompute whole blocks run the MLP in slices (``layers.MLP_UNITS`` hidden units or
    ``layers.MLP_POSITIONS`` positions, 512 on real models): here 4 slices of 16 of the 64 hidden units (the
    weights outweigh the 4 x 16 positions of rows) or, with units that never divide, 4 slices of 4 positions,
    each slice rematerialised on its own, against the unsliced program."""
    calls = _record_slicing(monkeypatch)
    monkeypatch.setattr(layers, "MLP_UNITS", 16 if slicing == "units" else 1000)
    monkeypatch.setattr(layers, "MLP_POSITIONS", 4)
    params = _params("causal", 6)
    (loss_n, _), g_n = _value_and_grad("causal", params)
    sliced = _grad_fn.__wrapped__("causal", f"model.remat={policy}")  # built now, with the slices
    (loss_p, _), g_p = sliced(params)
    assert set(calls) == {("_in_unit_slices" if slicing == "units" else "_in_sequence_slices", 4)}
    assert float(loss_p) == pytest.approx(float(loss_n), rel=1e-6)
    _assert_close(g_p, g_n)


def test_remat_on_the_unscanned_layout_and_mtp_heads():
    """``apply_block`` (block list, mtp heads) under a named-activation policy."""
    listed = (*MTP, "objective.heads=2", "model.scan_layers=false")  # the listed mtp program of the test above
    params = _params("mtp", 5, *listed)
    (loss_n, _), g_n = _value_and_grad("mtp", params, *listed)
    (loss_p, _), g_p = _value_and_grad("mtp", params, *listed, "model.remat=save_qkv_proj")
    assert float(loss_p) == pytest.approx(float(loss_n), rel=1e-6)
    _assert_close(g_p, g_n)


def _one_sharded_step(tiny_config, scan: bool, remat: str, start=None) -> tuple:
    """One AdamW step on a 2x2x2 (data, fsdp, tensor) mesh from ``start`` (scanned layout; None: fresh weights)
    -> (start, params after the step, metrics)."""
    config = tiny_config(*SMALL, "data.batch_size=8", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
                         f"model.remat={remat}", f"model.scan_layers={str(scan).lower()}")
    mesh, rules = build_mesh(config.mesh, jax.devices()[:8]), rules_from_config([])
    objective = CausalLM(config.objective)
    tx, schedule = make_optimizer(config.optimizer, 10)
    layout = state_layout(config.model, tx, 0, objective.build_model, mesh, rules)
    if start is None:
        state = jax.jit(partial(init_state, config.model, tx, 0), out_shardings=layout.state_sharding)()
        start = jax.device_get(state.params)
    else:  # the given weights with fresh moments
        params = jax.device_put(start if scan else to_layout(start, False), layout.params_sharding)
        state = layout.abstract.replace(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                                        rng=jax.random.key_data(jax.random.key(0)))
    batch = objective.prepare(_rows(8, 16))
    bsh = batch_shardings(mesh, rules, batch)
    step = jit_train_step(make_train_step(layout.graphdef, objective, tx, schedule, mesh, rules),
                          layout.state_sharding, bsh, mesh)
    state, metrics = step(state, to_global(batch, bsh))
    params, metrics = jax.device_get((state.params, metrics))
    return start, (params if scan else to_layout(params, True)), metrics


def test_a_sharded_step_is_the_same_scanned_with_the_mlp_in_slices_and_listed_with_it_whole(tiny_config, monkeypatch):
    """One AdamW step (weight decay skips the stacked norm scales too) on a 2x2x2 mesh: scanned under remat full
    with the MLP in 2 slices of the 32 hidden units each tensor shard holds (16 per chip per slice), against the
    listed layout under remat minimal, which runs each MLP whole."""
    calls = _record_slicing(monkeypatch)
    monkeypatch.setattr(layers, "MLP_UNITS", 16)
    start, scanned, m_scanned = _one_sharded_step(tiny_config, True, "full")
    # d_ff 64 over tensor=2: 32 units per chip (rows: 2 x 16 positions), 2 slices of 16
    assert calls == [("_in_unit_slices", 2)]
    _, listed, m_listed = _one_sharded_step(tiny_config, False, "minimal", start)
    # Adam's first update is lr * g / (|g| + eps): where |g| is near eps, float32 sums taken in another order
    # move it by up to ~1e-5 (a wrong slice would move it by lr)
    _assert_close(scanned, listed, rtol=1e-5, atol=1e-5)
    _assert_close(m_scanned, m_listed)


def test_weight_decay_mask_sees_through_the_layers_axis():
    params = {"layers": {"attn_norm": {"scale": np.ones((3, 8))}, "mlp": {"w_up": np.ones((3, 8, 16))}},
              "blocks": {0: {"attn_norm": {"scale": np.ones(8)}}}, "embedding": np.ones((10, 8))}
    assert decay_mask(params) == {"layers": {"attn_norm": {"scale": False}, "mlp": {"w_up": True}},
                                  "blocks": {0: {"attn_norm": {"scale": False}}}, "embedding": True}


def _lowered_size(config) -> int:
    objective = CausalLM(config.objective)
    graphdef, shapes, _ = abstract_model(config.model)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in objective.prepare(_rows(4, 16)).items()}
    fn = jax.jit(lambda p, b: objective.value_and_grad(graphdef, p, b))
    return len(fn.lower(shapes, batch).as_text())


def test_the_scanned_program_does_not_grow_with_depth(tiny_config):
    """One layer body whatever the depth (compile time then stays flat: scripts/bench_compile.py measures it)."""
    scanned = [_lowered_size(tiny_config(*SMALL, f"model.layers={n}")) for n in (2, 8)]
    listed = [_lowered_size(tiny_config(*SMALL, f"model.layers={n}", "model.scan_layers=false")) for n in (2, 8)]
    assert scanned[1] < 1.05 * scanned[0]
    assert listed[1] > 2 * listed[0]


@pytest.mark.parametrize("scan,mtp", [(True, False), (False, False), (True, True)])
def test_rotary_tables_are_computed_once_per_step_not_again_in_the_backward(tiny_config, scan, mtp):
    """The blocks (and multi-token heads) share one sine/cosine table computed outside the layer scan and remat:
    inside them the backward's recompute emits a second copy (on TPU the largest code units of the program)."""
    config = tiny_config(*SMALL, "model.layers=3", "model.remat=full", f"model.scan_layers={str(scan).lower()}",
                         *(["objective.name=mtp", "objective.heads=2"] if mtp else []))
    objective = MultiTokenPrediction(config.objective) if mtp else CausalLM(config.objective)
    graphdef, shapes, _ = abstract_model(config.model, objective.build_model)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in objective.prepare(_rows(4, 16)).items()}
    text = str(jax.make_jaxpr(lambda p, b: objective.value_and_grad(graphdef, p, b))(shapes, batch))
    assert "checkpoint" in text or "remat" in text  # the blocks are recomputed in the backward
    assert len(re.findall(r"= sin ", text)) == 1 and len(re.findall(r"= cos ", text)) == 1


def test_old_configs_read_as_before():
    assert load_config(None, ["model.remat=true"]).model.remat == "full"
    assert load_config(None, ["model.remat=false"]).model.remat == "none"
    assert load_config(None, []).model.scan_layers is True
    with pytest.raises(ConfigError, match="model.remat='most' is not one of none, full"):
        load_config(None, ["model.remat=most"])
    saved = to_dict(load_config(None, []))["model"]
    del saved["scan_layers"]  # a run written before scan_layers existed holds a `blocks/0/...` list
    assert model_signature(saved)["scan_layers"] is False


def test_offload_is_refused_where_the_platform_has_no_host_memory():
    class Device:
        platform, device_kind = "metal", "Apple M9"

        def addressable_memories(self):
            return [type("Memory", (), {"kind": "device"})()]

    with pytest.raises(ConfigError, match="metal platform"):
        remat.checkpoint_policy("offload", Device())
    assert remat.supports_offload(jax.devices()[0])  # the CPU backend has pinned_host (the policy test ran it)


def test_memory_estimate_follows_the_remat_policy(tiny_config):
    config = tiny_config(*SMALL, "data.seq_len=64")
    by_policy = {p: activation_bytes(dataclasses.replace(config, model=dataclasses.replace(config.model, remat=p)), 1)
                 for p in remat.REMAT_POLICIES}
    order = ["none", "save_dots", "minimal", "save_qkv_proj", "full"]
    assert all(by_policy[a] > by_policy[b] for a, b in zip(order, order[1:], strict=False))
    assert by_policy["offload"] == by_policy["full"]  # offloaded activations live in host memory
    assert by_policy["full_offload"] < by_policy["full"]  # and so do the block inputs that full keeps
    assert by_policy["full"] == activation_bytes(tiny_config(*SMALL, "data.seq_len=64", "model.remat=true"), 1)


def test_decoder_refuses_an_unknown_policy_built_by_hand(tiny_config):
    cfg = dataclasses.replace(tiny_config(*SMALL).model, remat="sometimes")
    with pytest.raises(ConfigError, match="model.remat"):
        Decoder(cfg, nnx.Rngs(0))
