"""Multi-token prediction: targets, the memory-efficient gradient, n=1 == causal, sizes, a sharded train step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scaling_jax.errors import ConfigError
from scaling_jax.model.family import flops_per_token, param_counts
from scaling_jax.model.transformer import to_layout
from scaling_jax.objectives.causal import CausalLM, shift_rows
from scaling_jax.objectives.multi_token import MultiTokenPrediction, prepare_rows, target_keys
from scaling_jax.parallel.mesh import build_mesh
from scaling_jax.parallel.sharding import rules_from_config
from scaling_jax.train.state import abstract_model, init_state, make_optimizer, param_shardings, state_shardings
from scaling_jax.train.step import batch_shardings, jit_train_step, make_train_step, to_global

SMALL = ["model.layers=2", "model.d_model=32", "model.heads=2", "model.kv_heads=1", "model.head_dim=16",
         "model.d_ff=64", "data.seq_len=16", "data.batch_size=4", "objective=mtp"]


def _rows(batch: int, seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Packed-looking rows: several documents per row, one row ending in padding (segment 0)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 250, size=(batch, seq_len + 1)).astype(np.int32)
    seg = np.ones((batch, seq_len + 1), np.int32)
    for r in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, seq_len + 1), size=2, replace=False))
        seg[r] += (np.arange(seq_len + 1)[:, None] >= cuts[None]).sum(-1)
    seg[-1, -3:] = 0
    return {"tokens": tokens, "segment_ids": seg}


def _setup(tiny_config, *overrides, seed=0):
    config = tiny_config(*SMALL, *overrides)
    objective = MultiTokenPrediction(config.objective)
    graphdef, state = nnx.split(objective.build_model(config.model, nnx.Rngs(seed)))
    batch = {k: jnp.asarray(v) for k, v in objective.prepare(_rows(4, 16, seed)).items()}
    return config, objective, graphdef, nnx.to_pure_dict(state), batch


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def test_head_i_targets_are_the_tokens_i_ahead_within_one_document():
    rows = _rows(3, 12, seed=1)
    out = prepare_rows(rows, heads=4)
    tok, seg = rows["tokens"], rows["segment_ids"]
    for head in range(1, 5):
        targets, mask = (out[k] for k in target_keys(head))
        assert targets.shape == mask.shape == (3, 12)
        for r in range(3):
            for t in range(12):
                ok = t + head <= 12 and seg[r, t] != 0 and len(set(seg[r, t:t + head + 1])) == 1
                assert mask[r, t] == ok, (head, r, t)
                if ok:
                    assert targets[r, t] == tok[r, t + head]
    causal = shift_rows(rows)  # head 1 is exactly the causal batch, so eval's bits/byte are comparable
    for key, value in causal.items():
        np.testing.assert_array_equal(out[key], value)


def test_memory_efficient_gradients_equal_plain_autodiff(tiny_config):
    """All heads at once, unequal weights, tied embedding (its gradient sums the lookup and the unembedding)."""
    _, objective, graphdef, params, batch = _setup(tiny_config, "objective.heads=3",
                                                   "objective.head_weights=[1,0.5,0.25]")
    naive = MultiTokenPrediction(objective.cfg, memory_efficient=False)
    (loss_e, m_e), g_e = jax.jit(lambda p, b: objective.value_and_grad(graphdef, p, b))(params, batch)
    (loss_n, m_n), g_n = jax.jit(lambda p, b: naive.value_and_grad(graphdef, p, b))(params, batch)
    assert float(loss_e) == pytest.approx(float(loss_n), rel=1e-6)
    _assert_trees_close(m_e, m_n)
    _assert_trees_close(g_e, g_n)
    weights = objective.weights  # the objective is the weighted mean; `loss` is head 1's
    expected = sum(w * float(m_n[f"loss_head{i + 1}"]) for i, w in enumerate(weights))
    assert float(loss_n) == pytest.approx(expected, rel=1e-6)
    assert float(m_n["loss"]) == float(m_n["loss_head1"])
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(g_e["heads"]))


@pytest.mark.parametrize("scan", [True, False])
def test_one_head_is_exactly_the_causal_model(tiny_config, scan):
    """Same weights (trunk blocks + head block = the causal blocks), untied unembedding: same loss and gradients,
    with the trunk's blocks stacked and scanned or a list."""
    config, objective, graphdef, params, batch = _setup(tiny_config, "objective.heads=1", "model.tie_embeddings=false",
                                                        f"model.scan_layers={str(scan).lower()}")
    causal = CausalLM(config.objective)
    c_graphdef, c_state = nnx.split(causal.build_model(config.model, nnx.Rngs(1)))
    trunk, head = to_layout(params["trunk"], scan_layers=False), params["heads"][0]
    c_params = to_layout({**trunk, "blocks": {**trunk["blocks"], len(trunk["blocks"]): head}}, scan)
    assert jax.tree.structure(c_params) == jax.tree.structure(nnx.to_pure_dict(c_state))
    (loss_c, m_c), g_c = jax.jit(lambda p, b: causal.value_and_grad(c_graphdef, p, b))(c_params, batch)
    (loss_m, m_m), g_m = jax.jit(lambda p, b: objective.value_and_grad(graphdef, p, b))(params, batch)
    assert float(loss_m) == pytest.approx(float(loss_c), rel=1e-6)
    for key in ("loss", "accuracy", "nll_sum", "tokens"):
        assert float(m_m[key]) == pytest.approx(float(m_c[key]), rel=1e-6)
    g_c = to_layout(g_c, scan_layers=False)
    blocks = g_c["blocks"]
    mapped = {"trunk": to_layout({**g_c, "blocks": {i: blocks[i] for i in range(len(blocks) - 1)}}, scan),
              "heads": {0: blocks[len(blocks) - 1]}}
    _assert_trees_close(g_m, mapped)


def test_parameter_count_and_flops_include_the_heads(tiny_config):
    for heads in (1, 4):
        config = tiny_config(*SMALL, f"objective.heads={heads}")
        objective = MultiTokenPrediction(config.objective)
        _, shapes, _ = abstract_model(config.model, objective.build_model)
        real = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
        assert param_counts(config.model, **objective.size_extras()).total == real
    assert flops_per_token(config.model, 16, extra_layers=0, output_heads=1) == flops_per_token(config.model, 16)


@pytest.mark.parametrize("overrides, field", [
    (["objective.heads=0"], "objective.heads"),
    (["objective.heads=2", "objective.head_weights=[1]"], "objective.head_weights"),
    (["objective.heads=2", "objective.head_weights=[1,-1]"], "objective.head_weights"),
    (["objective.heads=2", "objective.head_weights=[0,0]"], "objective.head_weights"),
    (["model.layers=1"], "model.layers"),
])
def test_bad_settings_are_one_line_config_errors(tiny_config, overrides, field):
    with pytest.raises(ConfigError, match=field):  # when the config is read (model.layers) or the model is built
        config = tiny_config(*SMALL, *overrides)
        MultiTokenPrediction(config.objective).build_model(config.model, nnx.Rngs(0))


def test_jitted_train_step_runs_on_a_2x2x2_mesh(tiny_config):
    """The trainer's own jitted step (built as build_session builds it) with the head-by-head backward, sharded."""
    config = tiny_config(*SMALL, "objective.heads=2", "data.batch_size=8", "mesh.data=2", "mesh.fsdp=2",
                         "mesh.tensor=2", "optimizer.schedule=constant", "optimizer.warmup_steps=0")
    mesh, rules = build_mesh(config.mesh, jax.devices()[:8]), rules_from_config([])
    objective = MultiTokenPrediction(config.objective)
    tx, schedule = make_optimizer(config.optimizer, 10)
    graphdef, shapes, axes = abstract_model(config.model, objective.build_model)
    abstract = jax.eval_shape(lambda: init_state(config.model, tx, 0, objective.build_model))
    ssh = state_shardings(mesh, abstract, param_shardings(mesh, rules, shapes, axes))
    state = jax.jit(lambda: init_state(config.model, tx, 0, objective.build_model), out_shardings=ssh)()
    before = jax.device_get(state.params)
    batch = objective.prepare(_rows(8, 16))
    bsh = batch_shardings(mesh, rules, batch)
    step = jit_train_step(make_train_step(graphdef, objective, tx, schedule, mesh, rules), ssh, bsh, mesh)
    state, metrics = step(state, to_global(batch, bsh))
    metrics = jax.device_get(metrics)
    assert int(state.step) == 1 and np.isfinite(metrics["grad_norm"]) and metrics["grad_norm"] > 0
    assert abs(float(metrics["loss"]) - np.log(config.model.vocab_size)) < 1.0  # ~uniform at init
    assert state.params["heads"][1]["mlp"]["w_up"].sharding.spec == ssh.params["heads"][1]["mlp"]["w_up"].spec
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), jax.device_get(state.params), before)
    assert all(jax.tree.leaves(changed["heads"]))
