"""MaxText interop: our logits equal MaxText's own, and MaxText's checkpoints survive a round trip bit for bit.

The fixtures under ``tests/fixtures/maxtext/`` were written by MaxText 0.2.5 itself
(``tests/fixtures/make_maxtext_fixture.py``): tiny random llama2-block Transformers saved with MaxText's own
checkpoint writer, the MaxText keys they were built with, and the logits MaxText's model computed. One is
scanned + GQA + untied SwiGLU, the other unscanned + MHA + tied (logits normalised by sqrt(emb_dim)) + tanh
GeGLU with head_dim * heads != emb_dim; norm scales are randomised. No test here needs MaxText.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import yaml
from conftest import assert_fixture_script_reproduces, decoder_logits
from flax import nnx

from scaling_jax.cli import main
from scaling_jax.config import ModelConfig
from scaling_jax.errors import CheckpointError, ConfigError
from scaling_jax.interop import maxtext_files as mf
from scaling_jax.interop import maxtext_weights as mw
from scaling_jax.interop.maxtext_runs import export_maxtext, import_maxtext, split_overrides
from scaling_jax.interop.runs import read_run_params
from scaling_jax.model.transformer import Decoder

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "maxtext")
VARIANTS = ("scanned_gqa", "unscanned_tied")
TOL = dict(rtol=1e-4, atol=1e-4)  # float32 on both sides; measured max error ~2.6e-6 on logits of std ~1.15
TINY = ["data.seq_len=32", "data.batch_size=8", "data.max_docs=20", "train.eval_batches=1", "train.progress=false",
        "train.plot=false", "train.tensorboard=false", "train.async_checkpointing=false"]


def _fixture(variant: str) -> tuple[str, dict, ModelConfig, dict]:
    """(checkpoint dir, MaxText keys, our model config, MaxText's reference ids and logits)."""
    path = os.path.join(FIXTURES, variant)
    keys = mf.read_maxtext_keys([os.path.join(path, "maxtext_config.yml")], {})
    cfg = ModelConfig(**mw.model_fields_from_maxtext(keys))
    return path, keys, cfg, dict(np.load(os.path.join(path, "reference.npz")))


def _import(variant: str, scan: bool = True) -> tuple[dict, ModelConfig, dict, dict]:
    path, keys, cfg, ref = _fixture(variant)
    cfg = ModelConfig(**{**cfg.__dict__, "scan_layers": scan})
    weights = mf.read_maxtext_weights(mf.find_items(path))
    return mw.params_from_maxtext(weights, cfg, keys["scan_layers"]), cfg, ref, weights


def _paths(tree: dict) -> list[str]:
    return sorted("/".join(p) for p in mw.flatten(tree))


# ----------------------------------------------------------------------------- import


@pytest.mark.parametrize("variant, scan", [(v, s) for v in VARIANTS for s in (True, False)])
def test_imported_maxtext_checkpoint_reproduces_maxtexts_own_logits(variant, scan):
    """Into either of our layouts, from MaxText's scanned (layers on axis 1) or unscanned (layers_N) one."""
    params, cfg, ref, _ = _import(variant, scan)
    assert ("layers" in params) == scan
    logits = decoder_logits(params, cfg, ref["input_ids"])
    np.testing.assert_allclose(logits, ref["logits"], **TOL)
    assert np.abs(ref["logits"]).max() > 1.0 and ref["logits"].std() > 0.5  # not a comparison of near-zeros


def test_maxtext_config_keys_map_onto_ours():
    _, gqa_keys, gqa, _ = _fixture("scanned_gqa")
    _, _, tied, _ = _fixture("unscanned_tied")
    assert gqa_keys["scan_layers"] is True
    assert (gqa.heads, gqa.kv_heads, gqa.head_dim, gqa.mlp, gqa.tie_embeddings) == (4, 2, 16, "swiglu", False)
    assert (gqa.rope_theta, gqa.norm_eps, gqa.vocab_size, gqa.logits_scale) == (500000.0, 1e-5, 256, "none")
    assert (tied.heads, tied.kv_heads, tied.mlp, tied.tie_embeddings, tied.norm_eps) == (2, 2, "geglu", True, 1e-6)
    assert tied.logits_scale == "rsqrt_d_model" and tied.head_dim * tied.heads != tied.d_model


def test_wrong_rope_layout_would_be_caught():
    """Negative control: MaxText's default RoPE is half-split like ours; interleaving q/k pairs breaks the match."""
    params, cfg, ref, _ = _import("scanned_gqa")
    hd = cfg.head_dim
    interleave = np.stack([np.arange(hd // 2), np.arange(hd // 2) + hd // 2], axis=1).reshape(-1)
    for name in ("wq", "wk"):
        params["layers"]["attn"][name] = params["layers"]["attn"][name][..., interleave]
    assert np.abs(decoder_logits(params, cfg, ref["input_ids"]) - ref["logits"]).max() > 1e-2


def test_query_scale_and_tied_logit_normalisation_would_be_caught():
    """Negative controls for the two conventions that differ: MaxText's query kernel carries 1/sqrt(head_dim)
    (ours is applied in attention), and its tied logits are divided by sqrt(emb_dim)."""
    params, cfg, ref, _ = _import("scanned_gqa")
    params["layers"]["attn"]["wq"] = params["layers"]["attn"]["wq"] / np.sqrt(cfg.head_dim)  # as stored
    assert np.abs(decoder_logits(params, cfg, ref["input_ids"]) - ref["logits"]).max() > 1e-2
    params, cfg, ref, _ = _import("unscanned_tied")
    unscaled = ModelConfig(**{**cfg.__dict__, "logits_scale": "none"})
    assert np.abs(decoder_logits(params, unscaled, ref["input_ids"]) - ref["logits"]).max() > 1e-1


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("variant", VARIANTS)
def test_round_trip_gives_maxtexts_identical_tensors_and_tree(tmp_path, variant):
    """MaxText -> ours (either layout) -> MaxText: the same arrays at the same paths, and the same item tree
    (``params/params/...``) and recorded ``scan_layers`` that MaxText's loaders read."""
    path, keys, _, _ = _fixture(variant)
    for scan in (True, False):
        params, cfg, _, original = _import(variant, scan)
        items = mf.write_maxtext_checkpoint(str(tmp_path / f"{scan}" / "0"), mw.maxtext_from_params(
            params, cfg, keys["scan_layers"]), keys["scan_layers"])
        back = mf.read_maxtext_weights(items)
        assert _paths(back) == _paths(original)
        for name, value in mw.flatten(original).items():
            np.testing.assert_array_equal(mw.flatten(back)[name], value, err_msg="/".join(name))
        assert mf.saved_scan_layers(items) == keys["scan_layers"]
    import orbax.checkpoint as ocp

    theirs = ocp.PyTreeCheckpointer().metadata(mf.find_items(path)).item_metadata.tree
    ours = ocp.PyTreeCheckpointer().metadata(items).item_metadata.tree
    shapes = lambda t: jax.tree.map(lambda m: (m.shape, str(m.dtype)), t["params"])  # noqa: E731
    assert shapes(ours) == shapes(theirs)


def test_exported_config_rebuilds_the_same_model():
    for variant in VARIANTS:
        _, keys, cfg, _ = _fixture(variant)
        exported = mw.maxtext_keys_from_model(cfg, keys["scan_layers"])
        assert mw.model_fields_from_maxtext(exported) == mw.model_fields_from_maxtext(keys)
        assert {k: exported[k] for k in keys if k != "base_config"} == {k: v for k, v in keys.items()
                                                                      if k != "base_config"}


def test_query_scale_round_trip_is_within_one_ulp_when_sqrt_head_dim_is_not_a_power_of_two():
    cfg = ModelConfig(layers=1, d_model=16, heads=2, head_dim=8, d_ff=32, vocab_size=64)
    rng = np.random.default_rng(0)
    _, state = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, nnx.Rngs(0))))
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), nnx.to_pure_dict(state))
    back = mw.params_from_maxtext(mw.maxtext_from_params(params, cfg), cfg, scan_layers=True)
    wq, wq_back = params["layers"]["attn"]["wq"], back["layers"]["attn"]["wq"]
    assert np.all(np.abs(wq_back - wq) <= np.spacing(np.abs(wq)))
    np.testing.assert_array_equal(back["layers"]["mlp"]["w_up"], params["layers"]["mlp"]["w_up"])


# ----------------------------------------------------------------------------- run directories and the CLI


def _cli_import(variant: str, out, *extra: str) -> int:
    path = os.path.join(FIXTURES, variant)
    return main(["convert", "--from-maxtext", path, "--maxtext-config", os.path.join(path, "maxtext_config.yml"),
                 "--out", str(out), *extra])


def test_cli_round_trip_through_a_run_directory(tmp_path, capsys):
    """convert --from-maxtext (the step directory) -> run dir -> convert --to-maxtext: the original tensors (the
    embedding grew to the byte tokenizer's 384 ids: new rows appended), a runnable YAML, and an import of the
    export that needs no --tokenizer (the export records a byte-level tokenizer)."""
    run, out = tmp_path / "run", tmp_path / "mt"
    assert _cli_import("unscanned_tied", run, "--tokenizer", "byte", *TINY) == 0
    assert "continue with: scaling-jax train" in capsys.readouterr().out
    lineage = json.loads((run / "lineage.json").read_text())
    assert lineage[0]["stage"] == "maxtext-import" and lineage[0]["objective"] == "maxtext-llama"
    assert main(["convert", "--to-maxtext", str(out), "--checkpoint", str(run), "scan_layers=false"]) == 0
    original = mw.flatten(mf.read_maxtext_weights(mf.find_items(os.path.join(FIXTURES, "unscanned_tied"))))
    back = mw.flatten(mf.read_maxtext_weights(mf.find_items(str(out))))
    assert sorted(back) == sorted(original)
    for name, value in original.items():
        np.testing.assert_array_equal(back[name][: value.shape[0]], value, err_msg="/".join(name))
    keys = yaml.safe_load((out / "maxtext_config.yml").read_text())
    assert keys["base_config"] == "base.yml" and keys["vocab_size"] == 384 and keys["scan_layers"] is False
    assert keys["load_parameters_path"] == str(out / "0" / "items") and (out / "0" / "items").is_dir()
    config = import_maxtext(str(out), str(tmp_path / "again"), TINY, config_files=[str(out / "maxtext_config.yml")])
    assert config.data.tokenizer == "byte:384" and config.model.logits_scale == "rsqrt_d_model"


def test_a_ul2r_stage_runs_from_an_imported_maxtext_checkpoint(tmp_path, capsys):
    run, child = tmp_path / "run", tmp_path / "child"
    assert _cli_import("scanned_gqa", run, "--tokenizer", "byte", *TINY) == 0
    assert main(["continue", "--from", str(run), "--stage", "configs/stages/ul2r.yaml", "stage.lr_from_parent=false",
                 "optimizer.lr=1e-3", "budget.steps=2", f"train.run_dir={child}", *TINY]) == 0
    assert "stage ul2r: validation" in capsys.readouterr().out
    config, step, params = read_run_params(str(child))
    assert step == 2 and config.objective.name == "ul2"
    _, _, before = read_run_params(str(run))
    assert not np.array_equal(params["layers"]["attn"]["wq"], before["layers"]["attn"]["wq"])  # it trained
    stages = [r["stage"] for r in json.loads((child / "lineage.json").read_text())]
    assert stages[0] == "maxtext-import" and stages[-1] == "ul2r"


def test_overrides_split_into_ours_and_maxtexts():
    ours, theirs = split_overrides(["data.seq_len=32", "objective=ul2", "base_emb_dim=64", "scan_layers=false"])
    assert ours == ["data.seq_len=32", "objective=ul2"] and theirs == {"base_emb_dim": 64, "scan_layers": False}
    with pytest.raises(ConfigError, match="neither one of our config sections"):
        split_overrides(["modle.layers=2"])


def test_a_scan_axis_that_is_not_a_number_is_a_config_error():
    from scaling_jax.interop.maxtext_runs import _scan_axis

    assert _scan_axis({}) == 1 and _scan_axis({"param_scan_axis": 0}) == 0
    with pytest.raises(ConfigError, match="param_scan_axis='abc' is not an integer"):
        _scan_axis({"param_scan_axis": "abc"})


def test_training_and_nnx_checkpoint_layouts_give_the_same_weights(tmp_path):
    """A trainer's checkpoint (weights beside ``step`` and ``opt_state``: only the weights are restored) and the
    NNX layout of ``generate_param_only_checkpoint`` (every array under ``value``) read as the fixture does."""
    from orbax.checkpoint import v1 as ocp_v1

    weights = mf.read_maxtext_weights(mf.find_items(os.path.join(FIXTURES, "scanned_gqa")))
    moments = jax.tree.map(lambda a: np.full_like(a, 7.0), weights)
    step = np.asarray(5, np.int32)
    trainer = {"params": {"params": weights}, "step": step,
               "opt_state": {"0": {"mu": {"params": moments}, "nu": {"params": moments}, "count": step}}}
    ocp_v1.save(str(tmp_path / "ckpts" / "5"), trainer, checkpointable_name="items")
    wrapped = jax.tree.map(lambda a: {"value": a}, weights)
    ocp_v1.save(str(tmp_path / "nnx" / "0"), wrapped, checkpointable_name="items")
    for root in ("ckpts", "nnx"):
        back = mw.flatten(mf.read_maxtext_weights(mf.find_items(str(tmp_path / root))))
        assert sorted(back) == sorted(mw.flatten(weights))
        for name, value in mw.flatten(weights).items():
            np.testing.assert_array_equal(back[name], value)


def test_checkpoint_is_found_from_its_item_step_or_checkpoints_directory(tmp_path):
    step = os.path.join(FIXTURES, "scanned_gqa", "0")
    items = os.path.join(step, "items")
    assert mf.find_items(items) == items and mf.find_items(step) == items
    assert mf.find_items(os.path.join(FIXTURES, "scanned_gqa")) == items  # the checkpoints root: latest step
    shutil.copytree(os.path.join(FIXTURES, "scanned_gqa", "0"), tmp_path / "7")
    assert mf.find_items(str(tmp_path)) == str(tmp_path / "7" / "items")


# ----------------------------------------------------------------------------- what is refused


@pytest.mark.parametrize("change, fragment", [
    ({"decoder_block": "gemma2"}, "decoder_block='gemma2'"),
    ({"use_qk_norm": True}, "use_qk_norm=True"),
    ({"rope_type": "yarn"}, "rope_type='yarn'"),
    ({"num_experts": 8}, "num_experts=8"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"final_logits_soft_cap": 30.0}, "final_logits_soft_cap=30.0"),
    ({"model_name": "llama2-7b"}, "model_name='llama2-7b'"),
    ({"mlp_activations": ["relu", "linear"]}, "mlp_activations="),
])
def test_unsupported_maxtext_architecture_fields_are_refused_by_name(change, fragment):
    _, keys, _, _ = _fixture("scanned_gqa")
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[")):
        mw.model_fields_from_maxtext(keys | change)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("args, fragment", [
    (["use_qk_norm=true", "--tokenizer", "byte"], "use_qk_norm=True is not supported"),
    (["base_mlp_dim=256", "--tokenizer", "byte"], "'decoder/layers/mlp/wi_0/kernel' has shape (64, 2, 128), the "
                                                  "MaxText config implies (64, 2, 256)"),
    (["scan_layers=false", "--tokenizer", "byte"], "scan_layers=false contradicts the checkpoint"),
    (["logits_via_embedding=true", "--tokenizer", "byte"], "set logits_via_embedding=false"),
    (["model.d_model=32", "--tokenizer", "byte"], "model.d_model=32 contradicts the MaxText config"),
    ([], "a MaxText checkpoint carries no tokenizer"),
    (["tokenizer_path=assets/tokenizer.llama2"], "tokenizer_path='assets/tokenizer.llama2' is not a file here"),
])
def test_bad_imports_are_one_error_line_and_write_nothing(tmp_path, capsys, args, fragment):
    assert _cli_import("scanned_gqa", tmp_path / "run", *args, *TINY) == 2
    assert fragment in _one_error_line(capsys)
    assert not os.listdir(tmp_path)


def test_a_directory_that_is_not_a_maxtext_checkpoint_is_refused(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    out = tmp_path / "run"
    assert main(["convert", "--from-maxtext", str(tmp_path), "--out", str(out), "--tokenizer", "byte"]) == 2
    assert "is not a MaxText checkpoint" in _one_error_line(capsys)
    assert not out.exists()
    hf = os.path.join(os.path.dirname(__file__), "fixtures", "hf_llama", "gqa")
    assert main(["convert", "--from-maxtext", hf, "--out", str(out), "--tokenizer", "byte"]) == 2
    assert "is not a MaxText checkpoint" in _one_error_line(capsys)
    assert not out.exists()


def test_export_refusals_are_one_line(tmp_path, capsys):
    assert main(["convert", "--to-maxtext", str(tmp_path / "x"), "--checkpoint", str(tmp_path), "--dtype",
                 "float32"]) == 2
    assert _one_error_line(capsys) == "error: --dtype does not apply to convert --to-maxtext; drop it (see " \
                                      "scaling-jax convert --help)"
    assert main(["convert", "--to-maxtext", str(tmp_path / "x"), "--checkpoint", str(tmp_path), "vocab_size=8"]) == 2
    assert "takes only scan_layers=true|false" in _one_error_line(capsys)
    assert main(["convert", "--from-hf", str(tmp_path), "--out", str(tmp_path / "r"), "--maxtext-config", "a.yml"]) == 2
    assert "--maxtext-config does not apply to convert --from-hf" in _one_error_line(capsys)
    with pytest.raises(CheckpointError, match="has no config.yaml"):
        export_maxtext(str(tmp_path), str(tmp_path / "y"))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_fixture_script_reproduces_the_stored_reference(tmp_path):
    """Only where MaxText is installed (its own venv; ~2 minutes on CPU): the script regenerates the same logits."""
    pytest.importorskip("maxtext")
    assert_fixture_script_reproduces("make_maxtext_fixture", FIXTURES, VARIANTS, tmp_path, **TOL)
