"""One rule table, any mesh: same numbers, and weights really split as the rules say."""

import functools

import jax
import numpy as np
import pytest
from conftest import TINY
from jax.sharding import PartitionSpec
from jax.sharding import PartitionSpec as P

from scaling_jax.config import load_config
from scaling_jax.data.pipeline import PackedRows
from scaling_jax.errors import ConfigError
from scaling_jax.objectives.base import build_objective, make_loss_fn
from scaling_jax.parallel.mesh import build_mesh, mesh_shape
from scaling_jax.parallel.sharding import DEFAULT_RULES, logical_to_spec, rules_from_config
from scaling_jax.train.state import abstract_model, init_state, make_optimizer, param_shardings, state_shardings
from scaling_jax.train.step import batch_shardings, to_global


def _batch(config, seed=0):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(3, 250, size=rng.integers(5, 40)) for _ in range(60)]
    rows = PackedRows(docs, config.data.seq_len, 1, 2)
    objective = build_objective(config.objective)
    b = config.data.batch_size
    rows = {k: np.stack([rows[i][k] for i in range(b)]) for k in ("tokens", "segment_ids")}
    return objective, objective.prepare(rows)


@functools.cache
def _loss_and_grads(shape):
    """Loss, gradients and sharded initial state of the tiny model on a ``shape`` mesh; cached, so the mesh and
    rule tests share the (2, 2, 2) run rather than compiling it twice."""
    config = load_config(None, TINY)
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = shape
    mesh = build_mesh(config.mesh, jax.devices()[: int(np.prod(shape))])
    rules = rules_from_config([])
    tx, _ = make_optimizer(config.optimizer, 10)
    graphdef, shapes, axes = abstract_model(config.model)
    psh = param_shardings(mesh, rules, shapes, axes)
    abstract = jax.eval_shape(lambda: init_state(config.model, tx, 0))
    ssh = state_shardings(mesh, abstract, psh)
    state = jax.jit(lambda: init_state(config.model, tx, 0), out_shardings=ssh)()
    objective, batch = _batch(config)
    bsh = batch_shardings(mesh, rules, batch)
    grad_fn = jax.jit(jax.value_and_grad(make_loss_fn(graphdef, objective), has_aux=True),
                      in_shardings=(psh, bsh))
    (loss, _), grads = grad_fn(state.params, to_global(batch, bsh))
    return float(loss), jax.device_get(grads), state


def test_meshes_give_the_same_loss_and_gradients():
    reference_loss, reference_grads, _ = _loss_and_grads((1, 1, 1))
    for shape in [(8, 1, 1), (1, 8, 1), (2, 2, 2)]:
        loss, grads, _ = _loss_and_grads(shape)
        assert loss == pytest.approx(reference_loss, rel=1e-5), shape
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6), grads, reference_grads)


def test_parameters_are_sharded_as_the_rules_say():
    _, _, state = _loss_and_grads((2, 2, 2))
    p = state.params
    assert p["embedding"].sharding.spec == P("tensor", "fsdp")  # (vocab, embed)
    # scanned blocks: the leading `layers` axis stays whole (the rules map it to None)
    assert p["layers"]["attn"]["wq"].sharding.spec == P(None, "fsdp", "tensor", None)  # (layers, embed, heads, kv)
    assert p["layers"]["mlp"]["w_down"].sharding.spec == P(None, "tensor", "fsdp")  # (layers, mlp, embed)
    assert p["layers"]["attn_norm"]["scale"].sharding.spec == P(None, "fsdp")
    # each device holds a quarter of a (fsdp x tensor)-sharded matrix
    w = p["layers"]["mlp"]["w_up"]
    assert w.addressable_shards[0].data.size == w.size // 4
    mu = state.opt_state[1][0].mu["layers"]["mlp"]["w_up"]
    assert mu.sharding.spec == w.sharding.spec  # AdamW moments follow their parameter


def test_rule_resolution_skips_used_axes_and_non_divisible_dims():
    mesh = build_mesh(type("M", (), {"data": 2, "fsdp": 2, "tensor": 2, "rules": []})(), jax.devices())
    # activations: batch takes data+fsdp, so embed (-> fsdp) stays whole
    assert logical_to_spec(("batch", "length", "embed"), DEFAULT_RULES, mesh, (8, 16, 64)) == P(("data", "fsdp"),
                                                                                              None, None)
    # a dimension the mesh axis does not divide is replicated
    assert logical_to_spec(("embed", "mlp"), DEFAULT_RULES, mesh, (3, 64)) == P(None, "tensor")
    custom = rules_from_config([["embed", None], ["mlp", ["fsdp", "tensor"]]])
    assert logical_to_spec(("embed", "mlp"), custom, mesh, (64, 64)) == P(None, ("fsdp", "tensor"))


def test_a_null_rule_replicates_as_in_flax_and_t5x():
    """A leading ``[embed, null]`` overrides a later ``[embed, fsdp]``: checked against flax's own
    ``logical_to_mesh_axes`` (the T5X resolution) on rule tables that mix null, used and list rules (where no
    two dimensions contend for one mesh axis: there flax gives it to the earlier rule, ours to the earlier
    dimension)."""
    from flax.linen import partitioning as flax_partitioning

    mesh = build_mesh(type("M", (), {"data": 2, "fsdp": 2, "tensor": 2, "rules": []})(), jax.devices())
    tables = ([["embed", None], ["embed", "fsdp"], ["mlp", "tensor"]],
              [["mlp", None], ["mlp", "tensor"], ["embed", "fsdp"], ["embed", None]],
              [["batch", ["data", "fsdp"]], ["embed", "fsdp"], ["embed", "tensor"], ["length", None]])
    for table in tables:
        rules = rules_from_config(table)
        for axes in (("embed", "mlp"), ("mlp", "embed"), ("batch", "length", "embed")):
            ours = logical_to_spec(axes, rules, mesh, (8,) * len(axes))
            theirs = flax_partitioning.logical_to_mesh_axes(axes, rules)
            assert ours == PartitionSpec(*theirs), (table, axes)


@pytest.mark.parametrize("rule, fragment", [(["mlp", "tesnor"], "mesh axis 'tesnor'"),
                                            (["mpl", "tensor"], "logical axis 'mpl'"),
                                            (["batch", ["data", "fdsp"]], "mesh axis 'fdsp'")])
def test_a_rule_that_could_never_match_is_a_config_error(rule, fragment):
    with pytest.raises(ConfigError, match=fragment):
        rules_from_config([rule])


def test_impossible_mesh_is_a_clear_error():
    with pytest.raises(ConfigError, match="16 but 8 devices"):
        mesh_shape(type("M", (), {"data": 4, "fsdp": 4, "tensor": 1})(), 8)
    with pytest.raises(ConfigError, match="does not divide"):
        mesh_shape(type("M", (), {"data": -1, "fsdp": 3, "tensor": 1})(), 8)
