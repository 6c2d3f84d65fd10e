"""Continuation stages: a child starts exactly from its parent, never touches it, and keeps its lineage."""

import hashlib
import json
import os
import shutil

import jax
import numpy as np
import optax
import pytest
import yaml

from scaling_jax.cli import main
from scaling_jax.config import load_config
from scaling_jax.data import pipeline
from scaling_jax.errors import CheckpointError, ConfigError
from scaling_jax.model.family import flops_per_token
from scaling_jax.objectives.base import make_loss_fn
from scaling_jax.train.checkpoint import Checkpointer
from scaling_jax.train.continuation import child_config, start_from_parent
from scaling_jax.train.loop import train
from scaling_jax.train.metrics import read_metrics
from scaling_jax.train.session import build_session
from scaling_jax.train.state import abstract_model, make_schedule

RUN = ["model.series=custom", "model.layers=2", "model.d_model=64", "model.heads=2", "model.head_dim=32",
       "model.d_ff=128", "data.seq_len=64", "data.batch_size=8", "data.max_docs=40", "optimizer.warmup_steps=2",
       "train.eval_every=0", "train.eval_batches=1", "train.plot=false", "train.tensorboard=false",
       "train.progress=false", "train.async_checkpointing=false"]
PARENT_STEPS = 4
UL2R = "configs/stages/ul2r.yaml"
CHILD = ["train.progress=false", "train.checkpoint_every=2", "mesh.data=2", "mesh.fsdp=4"]  # another mesh


def _digests(directory) -> dict:
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _train_parent(directory, *extra):
    config = load_config(None, [*RUN, f"train.steps={PARENT_STEPS}", f"train.run_dir={directory}", *extra])
    train(config)
    return config


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("stages") / "parent")
    return directory, _train_parent(directory)


@pytest.fixture(scope="module")
def ul2r_child(parent):
    """A 4-step UL2R child on another mesh, with the parent's digests before and after."""
    parent_dir, _ = parent
    before = _digests(parent_dir)
    config, notes = child_config(parent_dir, UL2R, [*CHILD, "budget.steps=4", f"train.run_dir={parent_dir}-ul2r"])
    summary = train(config)
    return config, notes, summary, before, _digests(parent_dir)


def _parent_state(parent_config):
    session = build_session(parent_config)
    checkpointer = Checkpointer(parent_config.train.run_dir, keep=1, async_save=False)
    state, _ = checkpointer.restore(PARENT_STEPS, session.abstract, session.state_sharding, None)
    checkpointer.close()
    return state


def _adam(opt_state) -> optax.ScaleByAdamState:
    return next(s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
                if isinstance(s, optax.ScaleByAdamState))


def test_ul2r_child_first_loss_is_the_parent_under_the_new_objective(parent, ul2r_child):
    parent_dir, parent_config = parent
    config, _, _, before, after = ul2r_child
    assert after == before and any(k.startswith("checkpoints") for k in before)  # parent byte-identical

    child_session = build_session(config)
    stream = pipeline.make_iterator(child_session.train_ds, config.data)
    stream.seek(PARENT_STEPS)  # the same data as the parent's: the child reads on past its rows
    batch = next(stream)
    assert batch["bidirectional"].any()  # the first batch is a UL2 (prefix-LM) batch
    graphdef = abstract_model(config.model, child_session.objective.build_model)[0]
    loss_fn = jax.jit(make_loss_fn(graphdef, child_session.objective))
    params = jax.device_get(_parent_state(parent_config).params)  # restored independently, on the parent's mesh
    expected = float(loss_fn(params, batch)[0])
    fresh = float(loss_fn(jax.device_get(child_session.init_state().params), batch)[0])

    rows = [r for r in read_metrics(os.path.join(config.train.run_dir, "metrics.jsonl")) if "loss" in r]
    assert rows[0]["step"] == 1
    np.testing.assert_allclose(rows[0]["loss"], expected, rtol=1e-5)
    assert abs(fresh - expected) > 0.05  # the check can tell parent weights from fresh ones


def test_child_curves_continue_the_parents_compute_axis_and_record_lineage(parent, ul2r_child):
    parent_dir, parent_config = parent
    config, _, summary, _, _ = ul2r_child
    tokens_per_step = 8 * 64
    flops_per_step = flops_per_token(config.model, 64) * tokens_per_step
    rows = [r for r in read_metrics(os.path.join(config.train.run_dir, "metrics.jsonl")) if "loss" in r]
    assert [r["total_step"] for r in rows] == [PARENT_STEPS + s for s in (1, 2, 3, 4)]
    assert rows[0]["tokens"] == (PARENT_STEPS + 1) * tokens_per_step
    assert rows[-1]["flops"] == pytest.approx((PARENT_STEPS + 4) * flops_per_step)
    assert summary["tokens"] == 4 * tokens_per_step and summary["total_tokens"] == 8 * tokens_per_step

    with open(os.path.join(config.train.run_dir, "lineage.json")) as f:
        lineage = json.load(f)
    assert [(r["stage"], r["objective"], r["steps"]) for r in lineage] == [("pretrain", "causal", 4),
                                                                          ("ul2r", "ul2", 4)]
    assert lineage[1]["parent"] == os.path.join(os.path.abspath(parent_dir), "checkpoints", str(PARENT_STEPS))
    assert lineage[1]["parent_step"] == PARENT_STEPS and lineage[1]["start_step"] == PARENT_STEPS
    ckpt = Checkpointer(config.train.run_dir, keep=1, async_save=False)
    assert ckpt.read_meta(4)["lineage"] == lineage  # in every checkpoint, too
    ckpt.close()


def _losses(run_dir) -> dict:
    return {r["step"]: r["loss"] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if "loss" in r}


@pytest.mark.slow
def test_interrupted_child_resumes_from_its_own_checkpoint(parent, ul2r_child, tmp_path):
    parent_dir, _ = parent
    straight = ul2r_child[0].train.run_dir
    child = tmp_path / "child"
    shutil.copytree(straight, child)
    shutil.rmtree(child / "checkpoints" / "4")  # as if killed after the step-2 checkpoint
    config, _ = child_config(parent_dir, UL2R, [*CHILD, "budget.steps=4", f"train.run_dir={child}"])
    summary = train(config)
    assert _losses(child) == _losses(straight)  # steps 3-4 from the child's step 2, not from the parent
    assert summary["total_step"] == PARENT_STEPS + 4
    with open(child / "lineage.json") as f:
        assert [r["stage"] for r in json.load(f)] == ["pretrain", "ul2r"]


def test_a_child_on_the_parents_data_reads_on_where_the_parent_stopped(parent, ul2r_child):
    config, notes, summary, _, _ = ul2r_child
    assert any("reads on from global batch 4" in note for note in notes)
    saved = os.path.join(config.train.run_dir, "checkpoints", str(summary["step"]), "data", "process_0-of-1.json")
    with open(saved) as f:
        assert json.load(f)["next_index"] == PARENT_STEPS + summary["step"]  # parent's 4 batches + its own


def test_stream_position_rounds_up_to_the_child_batch_and_resets_on_other_data():
    from scaling_jax.train.continuation import continued_stream_index

    data = {"source": "stdlib", "seq_len": 64, "batch_size": 8, "shuffle_seed": 0, "num_threads": 1}
    assert continued_stream_index(data, {**data, "batch_size": 16, "num_threads": 4}, 5) == 3  # 40 rows -> batch 3
    assert continued_stream_index(data, {**data, "batch_size": 4}, 5) == 10
    assert continued_stream_index(data, {**data, "shuffle_seed": 1}, 5) == 0
    assert continued_stream_index(data, {**data, "seq_len": 32}, 5) == 0


def test_a_parent_config_from_before_newer_data_fields_still_reads_on(parent):
    from scaling_jax.config import to_dict
    from scaling_jax.train.continuation import continued_stream_index, parent_data_config

    _, config = parent
    data = to_dict(config)["data"]
    old = {k: v for k, v in data.items() if k not in ("malformed_lines", "instructions", "mixture")}  # older schema
    assert parent_data_config({"data": old}) == data
    assert continued_stream_index(parent_data_config({"data": old}), data, 4) == 4


def test_the_recorded_data_position_is_the_one_grain_saved(parent):
    import dataclasses

    from scaling_jax.train.continuation import parent_data_index, parent_meta, resolve_parent

    run_dir, step = resolve_parent(parent[0])
    meta = parent_meta(run_dir, step)
    assert meta.version == 1 and meta.data_index is not None
    older = dataclasses.replace(meta, data_index=None)  # a checkpoint written before the meta recorded it
    assert parent_data_index(run_dir, step, meta) == parent_data_index(run_dir, step, older) > 0


def test_optimizer_continue_keeps_moments_and_reset_drops_them(parent):
    parent_dir, parent_config = parent
    parent_adam = _adam(_parent_state(parent_config).opt_state)
    mu = jax.device_get(parent_adam.mu)
    assert any(np.abs(x).max() > 0 for x in jax.tree.leaves(mu))
    # "continue-unclipped": the stage turns gradient clipping off, so its optimizer tree lacks the parent's
    # clipping state around the same Adam moments
    for policy in ("continue", "reset", "continue-unclipped"):
        clip = ["optimizer.clip_norm=0"] if policy == "continue-unclipped" else []
        config, _ = child_config(parent_dir, UL2R, [*CHILD, "budget.steps=2", *clip,
                                                    f"stage.optimizer_state={policy.split('-')[0]}",
                                                    "train.run_dir=unused"])
        state = start_from_parent(build_session(config)).state
        adam = _adam(state.opt_state)
        schedule_counts = [s.count for s in jax.tree.leaves(
            state.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
            if isinstance(s, optax.ScaleByScheduleState)]
        assert [int(c) for c in schedule_counts] == [0]  # the new schedule starts at its beginning
        if policy.startswith("continue"):
            assert int(adam.count) == PARENT_STEPS
            jax.tree.map(np.testing.assert_array_equal, jax.device_get(adam.mu), mu)
            jax.tree.map(np.testing.assert_array_equal, jax.device_get(adam.nu), jax.device_get(parent_adam.nu))
        else:
            assert int(adam.count) == 0
            assert all(not np.any(x) for x in jax.tree.leaves(jax.device_get((adam.mu, adam.nu))))
        assert int(state.step) == 0


def test_budget_fraction_and_lr_from_parent(parent):
    parent_dir, parent_config = parent
    config, notes = child_config(parent_dir, UL2R, ["budget.fraction=0.5", "train.run_dir=unused"])
    assert config.train.steps == PARENT_STEPS // 2  # same model and batch: half the FLOPs is half the steps
    assert any("50.000% of the parent's compute" in n for n in notes)
    expected_lr = float(make_schedule(parent_config.optimizer, PARENT_STEPS)(PARENT_STEPS))
    assert config.optimizer.lr == pytest.approx(expected_lr)
    assert config.stage.parent.endswith(os.path.join("checkpoints", str(PARENT_STEPS)))
    with pytest.raises(ConfigError, match="warmup_steps"):
        child_config(parent_dir, UL2R, ["budget.steps=1", "optimizer.warmup_steps=5", "train.run_dir=unused"])
    with pytest.raises(CheckpointError, match="model.layers"):
        child_config(parent_dir, UL2R, ["budget.steps=1", "model.layers=3", "train.run_dir=unused"])
    with pytest.raises(CheckpointError, match="never modified"):
        child_config(parent_dir, UL2R, ["budget.steps=1", f"train.run_dir={parent_dir}"])
    # the position scheme is part of what the weights mean (a relative-bias table would be made up or dropped)
    with pytest.raises(CheckpointError, match="model.position='rope' but the stage asks for 't5_relative'"):
        child_config(parent_dir, UL2R, ["budget.steps=1", "model.position=t5_relative", "model.attention=xla",
                                        "train.run_dir=unused"])
    # an optimizer.lr given on the command line is kept: the stage's lr_from_parent does not replace it
    config, notes = child_config(parent_dir, UL2R, ["budget.steps=1", "optimizer.lr=1e-5", "train.run_dir=unused"])
    assert config.optimizer.lr == 1e-5 and any("as given (stage.lr_from_parent not applied)" in n for n in notes)


def test_a_stage_never_writes_into_its_parent_through_a_link_or_into_another_parents_stage(parent, ul2r_child,
                                                                                            tmp_path):
    parent_dir, _ = parent
    link = tmp_path / "link-to-parent"
    link.symlink_to(parent_dir)
    with pytest.raises(CheckpointError, match="never modified"):
        child_config(parent_dir, UL2R, ["budget.steps=1", f"train.run_dir={link}"])
    # the same stage again, into a directory that is a stage of another parent step: refused, not reused
    other = tmp_path / "other-stage"
    shutil.copytree(ul2r_child[0].train.run_dir, other)
    saved = yaml.safe_load((other / "config.yaml").read_text())
    saved["stage"]["parent"] = os.path.join(parent_dir, "checkpoints", "2")
    (other / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(CheckpointError, match="already a stage of parent .*checkpoints/2, not"):
        child_config(parent_dir, UL2R, [*CHILD, "budget.steps=4", f"train.run_dir={other}"])
    config, _ = child_config(parent_dir, UL2R, [*CHILD, "budget.steps=4",  # its own stage resumes as before
                                                f"train.run_dir={ul2r_child[0].train.run_dir}"])
    assert config.stage.parent == ul2r_child[0].stage.parent


@pytest.mark.slow
def test_missing_special_ids_are_refused_unless_the_vocabulary_is_extended(tmp_path):
    small = str(tmp_path / "small-vocab")
    parent_config = _train_parent(small, "model.vocab_size=320", "train.steps=2")
    with pytest.raises(CheckpointError, match="extend_vocab=true"):
        child_config(small, UL2R, ["budget.steps=1", "train.run_dir=unused"])
    config, notes = child_config(small, UL2R, ["budget.steps=1", "stage.extend_vocab=true", "train.run_dir=unused"])
    assert config.model.vocab_size == 384 and any("320 -> 384" in n for n in notes)
    state = start_from_parent(build_session(config)).state
    checkpointer = Checkpointer(small, keep=1, async_save=False)
    old = checkpointer.restore_partial(2, {"params": {"embedding": jax.ShapeDtypeStruct((320, 64), np.float32)}})
    checkpointer.close()
    old = np.asarray(old["params"]["embedding"])
    new = np.asarray(jax.device_get(state.params["embedding"]))
    np.testing.assert_array_equal(new[:320], old)
    np.testing.assert_allclose(new[320:], np.broadcast_to(old.mean(axis=0), (64, 64)), atol=1e-8)
    new_mu = np.asarray(jax.device_get(_adam(state.opt_state).mu["embedding"]))  # continue: moments kept, new rows 0
    assert new_mu.shape == (384, 64) and not new_mu[320:].any() and new_mu[:320].any()
    assert parent_config.model.vocab_size == 320


def test_continue_command_errors_are_one_line(tmp_path, capsys):
    assert main(["continue", "--from", str(tmp_path / "nope"), "--stage", UL2R]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --from") and "\n" not in err
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert main(["continue", "--from", str(tmp_path / "run"), "--stage", UL2R]) == 2
    assert "no finished checkpoint" in capsys.readouterr().err


def test_stage_options_without_a_parent_are_refused():
    with pytest.raises(ConfigError, match="budget.fraction applies to a continuation"):
        load_config(None, ["budget.fraction=0.01"])
    with pytest.raises(ConfigError, match="stage.optimizer_state=continue"):
        load_config(None, ["stage.optimizer_state=continue"])
