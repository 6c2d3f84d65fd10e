"""Hugging Face Llama interop: our logits equal transformers' in both directions.

Import: the fixtures under ``tests/fixtures/hf_llama/`` hold tiny random ``LlamaForCausalLM``s
(GQA + untied + RoPE theta 5e5; MHA + tied + head_dim != hidden/heads + tanh-GeGLU; norm weights
randomised) and the logits transformers computed; our decoder on the imported weights must give
the same logits. Export: our tensors written as HF files and read back give the identical
tensors, so the exported files carry the semantics the import test verified; where torch is
installed, transformers itself loads our export and reproduces our logits. No test here needs torch
unless it says so.
"""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest
from conftest import assert_fixture_script_reproduces, decoder_logits
from flax import nnx

from scaling_jax.config import ModelConfig, load_config
from scaling_jax.errors import CheckpointError, ConfigError
from scaling_jax.interop import hf_runs
from scaling_jax.interop import hf_weights as hc
from scaling_jax.model.transformer import Decoder

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf_llama")
VARIANTS = ("gqa", "tied")
TOL = dict(rtol=1e-4, atol=1e-4)  # float32 on both sides; measured max error ~1.3e-6 on logits of std ~0.6


def _fixture(variant: str) -> tuple[str, ModelConfig, dict]:
    path = os.path.join(FIXTURES, variant)
    cfg = ModelConfig(**hc.model_fields_from_hf(hc.read_hf_config(path)))
    return path, cfg, dict(np.load(os.path.join(path, "reference.npz")))


def _random_params(cfg: ModelConfig, seed: int) -> dict:
    """Random weights (std 0.1: logits far from uniform) and norm scales around 1 (ones would hide a
    norm-convention mix-up), in our decoder's parameter tree."""
    _, state = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        return 1.0 + 0.5 * noise if path[-1].key == "scale" else 0.1 * noise

    return jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state))


# ----------------------------------------------------------------------------- import


@pytest.mark.parametrize("variant, scan", [(v, s) for v in VARIANTS for s in (True, False)])
def test_imported_hf_llama_reproduces_transformers_logits(variant, scan):
    """Into either layout: HF's per-layer tensors stacked on `layers` (scanned) or a list of blocks."""
    path, cfg, ref = _fixture(variant)
    cfg = dataclasses.replace(cfg, scan_layers=scan)
    params = hc.params_from_hf(hc.load_hf_tensors(path), cfg)
    assert ("layers" in params) == scan and ("blocks" in params) != scan
    logits = decoder_logits(params, cfg, ref["input_ids"])
    np.testing.assert_allclose(logits, ref["logits"], **TOL)
    assert np.abs(ref["logits"]).max() > 1.0  # the comparison is not between near-zero numbers


def test_hf_config_fields_map_onto_ours():
    _, gqa, _ = _fixture("gqa")
    _, tied, _ = _fixture("tied")
    assert (gqa.heads, gqa.kv_heads, gqa.head_dim, gqa.mlp, gqa.tie_embeddings) == (4, 2, 8, "swiglu", False)
    assert (gqa.rope_theta, gqa.norm_eps, gqa.vocab_size) == (500000.0, 1e-5, 384)
    assert (tied.heads, tied.kv_heads, tied.head_dim, tied.mlp, tied.tie_embeddings) == (2, 2, 24, "geglu", True)
    assert tied.head_dim * tied.heads != tied.d_model  # head_dim is read, not derived


def test_wrong_rope_layout_would_be_caught():
    """Negative control: interleaving q/k pairs (Meta's layout) must break the match by far."""
    path, cfg, ref = _fixture("gqa")
    params = hc.params_from_hf(hc.load_hf_tensors(path), cfg)
    hd = cfg.head_dim
    interleave = np.stack([np.arange(hd // 2), np.arange(hd // 2) + hd // 2], axis=1).reshape(-1)
    for name in ("wq", "wk"):  # every layer at once: the blocks are stacked on `layers`
        params["layers"]["attn"][name] = params["layers"]["attn"][name][..., interleave]
    err = np.abs(decoder_logits(params, cfg, ref["input_ids"]) - ref["logits"]).max()
    assert err > 1e-2


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("variant, scan", [("gqa", True), ("tied", True), ("gqa", False)])
def test_export_writes_back_the_identical_hf_tensors_and_config(tmp_path, variant, scan):
    path, cfg, _ = _fixture(variant)
    cfg = dataclasses.replace(cfg, scan_layers=scan)
    original = hc.load_hf_tensors(path)
    params = hc.params_from_hf(original, cfg)
    shards = hc.save_hf_tensors(hc.hf_from_params(params, cfg), str(tmp_path), max_shard_bytes=40_000)
    assert len(shards) > 1 and (tmp_path / hc.INDEX_FILE).is_file()  # sharded + index, as transformers writes
    back = hc.load_hf_tensors(str(tmp_path))
    assert sorted(back) == sorted(original)
    for name, value in original.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)
    exported = hc.hf_config_from_model(cfg, "float32")
    assert hc.model_fields_from_hf(exported) == hc.model_fields_from_hf(hc.read_hf_config(path))


@pytest.mark.parametrize("mlp, tied", [("swiglu", False), ("geglu", True)])
def test_our_model_survives_export_and_import_with_identical_logits(tmp_path, mlp, tied):
    cfg = load_config(None, ["model.layers=2", "model.d_model=32", "model.heads=4", "model.kv_heads=1",
                             "model.head_dim=12", "model.d_ff=48", f"model.mlp={mlp}",
                             f"model.tie_embeddings={str(tied).lower()}", "model.rope_theta=20000"]).model
    params = _random_params(cfg, seed=3)
    (tmp_path / "config.json").write_text(json.dumps(hc.hf_config_from_model(cfg, "float32")))
    hc.save_hf_tensors(hc.hf_from_params(params, cfg), str(tmp_path))
    cfg_back = ModelConfig(**hc.model_fields_from_hf(hc.read_hf_config(str(tmp_path))))
    back = hc.params_from_hf(hc.load_hf_tensors(str(tmp_path)), cfg_back)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12))
    np.testing.assert_array_equal(decoder_logits(back, cfg_back, ids), decoder_logits(params, cfg, ids))


def test_bfloat16_export_loads_back_rounded(tmp_path):
    path, cfg, _ = _fixture("tied")
    params = hc.params_from_hf(hc.load_hf_tensors(path), cfg)
    hc.save_hf_tensors(hc.hf_from_params(params, cfg, "bfloat16"), str(tmp_path))
    back = hc.load_hf_tensors(str(tmp_path))
    emb = back["model.embed_tokens.weight"]
    assert emb.dtype.name == "bfloat16"
    np.testing.assert_allclose(emb.astype(np.float32), params["embedding"], rtol=1e-2)


def test_mtp_export_is_trunk_plus_first_head():
    cfg = ModelConfig(layers=3)
    block = lambda i: {"tag": i}  # noqa: E731
    params = {"trunk": {"embedding": "E", "final_norm": "N", "blocks": {0: block(0), 1: block(1)}},
              "heads": {0: block("h1"), 1: block("h2")}}
    out = hc.decoder_params(params, cfg)
    assert out["blocks"] == {0: block(0), 1: block(1), 2: block("h1")} and out["embedding"] == "E"
    stacked = {"trunk": {"embedding": "E", "final_norm": "N", "layers": {"w": np.array([[0.0], [1.0]])}},
               "heads": {0: {"w": np.array([5.0])}, 1: {"w": np.array([6.0])}}}
    out = hc.decoder_params(stacked, cfg)  # a scanned trunk: head 1's block becomes the last stacked layer
    assert set(out) == {"embedding", "final_norm", "layers"}
    np.testing.assert_array_equal(out["layers"]["w"], [[0.0], [1.0], [5.0]])


def test_vocab_resize_keeps_existing_rows_and_appends_means():
    emb = np.arange(12, dtype=np.float32).reshape(4, 3)
    out = hc.resize_vocab({"embedding": emb, "unembedding": emb.T.copy()}, 6)
    np.testing.assert_array_equal(out["embedding"][:4], emb)
    np.testing.assert_array_equal(out["embedding"][4:], np.repeat(emb.mean(0, keepdims=True), 2, 0))
    np.testing.assert_array_equal(out["unembedding"], out["embedding"].T)


def test_vocab_resize_takes_its_mean_in_float32_and_replaces_padding_rows():
    """bfloat16 tables (model.param_dtype=bfloat16): the mean of 32,000 rows of 0.05 is 0.05, not the ~0.001
    where a bfloat16 running sum stalls. A checkpoint padded past its tokenizer (rows 5, 6 here: zeros no token
    uses) gives those rows the mean of the real ones too, and they stay out of it."""
    import ml_dtypes

    emb = np.full((32000, 4), 0.05, np.float32).astype(ml_dtypes.bfloat16)
    out = hc.resize_vocab({"embedding": emb}, 32003)["embedding"]
    np.testing.assert_allclose(out[32000:].astype(np.float32), 0.05, rtol=1e-2)
    padded = np.concatenate([np.arange(15, dtype=np.float32).reshape(5, 3), np.zeros((2, 3), np.float32)])
    out = hc.resize_vocab({"embedding": padded, "unembedding": padded.T.copy()}, 9, real_rows=5)
    np.testing.assert_array_equal(out["embedding"][:5], padded[:5])
    np.testing.assert_array_equal(out["embedding"][5:], np.repeat(padded[:5].mean(0, keepdims=True), 4, 0))
    np.testing.assert_array_equal(out["unembedding"], out["embedding"].T)


def test_an_export_into_the_empty_current_directory_fills_it(tmp_path, monkeypatch):
    from scaling_jax.interop.runs import write_new_dir

    monkeypatch.chdir(tmp_path)
    assert write_new_dir(".", "--to-hf", lambda d: open(os.path.join(d, "config.json"), "w").close())
    assert os.listdir(tmp_path) == ["config.json"]


def test_a_damaged_shard_index_is_a_checkpoint_error(tmp_path):
    for text in ('{"weight_map": {"model.embed_tokens.weight": "model.safe', '{"metadata": {}}'):
        (tmp_path / hc.INDEX_FILE).write_text(text)
        with pytest.raises(CheckpointError, match="is not a valid shard index"):
            hc.load_hf_tensors(str(tmp_path))


# ----------------------------------------------------------------------------- what is refused


@pytest.mark.parametrize("change, fragment", [
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "rope_type='llama3'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.rope_type='linear'"),
    ({"attention_bias": True}, "attention_bias=true"),
    ({"model_type": "mistral"}, "model_type='mistral'"),
])
def test_unsupported_hf_configs_are_one_line_errors(change, fragment):
    hf = hc.read_hf_config(os.path.join(FIXTURES, "gqa")) | change
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[")):
        hc.model_fields_from_hf(hf)


def test_weights_that_do_not_fit_the_config_are_refused():
    path, cfg, _ = _fixture("gqa")
    tensors = hc.load_hf_tensors(path)
    with pytest.raises(CheckpointError, match="'model.layers.1.mlp.up_proj.weight' is missing"):
        hc.params_from_hf({k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}, cfg)
    with pytest.raises(CheckpointError, match="no place in a Llama decoder"):
        hc.params_from_hf(tensors | {"model.layers.0.self_attn.q_norm.weight": np.ones(8, np.float32)}, cfg)
    with pytest.raises(CheckpointError, match=r"has shape \(384, 32\), config.json implies \(500, 32\)"):
        hc.params_from_hf(tensors, ModelConfig(**{**cfg.__dict__, "vocab_size": 500}))


# ----------------------------------------------------------------------------- run directories


TRAIN_TINY = ["data.seq_len=32", "data.batch_size=8", "data.max_docs=20", "train.steps=1",
              "optimizer.warmup_steps=0", "optimizer.lr=1e-9", "train.progress=false", "train.plot=false",
              "train.tensorboard=false", "train.eval_batches=1"]


@pytest.mark.slow
def test_imported_run_trains_from_the_hf_weights_and_exports_them_back(tmp_path):
    """convert --from-hf -> `train` resumes its step-0 checkpoint -> convert --to-hf gives the HF weights back.

    The learning rate is 1e-9, so after one step the exported weights must still equal the HF ones:
    training really started from the import (not a fresh init) and its checkpoint round-trips.
    """
    from scaling_jax.train.loop import train

    path, _, ref = _fixture("gqa")  # vocab 384 = the byte tokenizer's, so it trains on the embedded corpus
    run = str(tmp_path / "run")
    config = hf_runs.import_hf(path, run, TRAIN_TINY, tokenizer="byte")
    assert config.model.vocab_size == 384 and config.data.tokenizer == "byte:384"
    summary = train(load_config(os.path.join(run, "config.yaml")))
    assert summary["step"] == 1 and np.isfinite(summary["val_loss"])
    lineage = json.loads((tmp_path / "run" / "lineage.json").read_text())
    assert [r["stage"] for r in lineage] == ["hf-import", "pretrain"] and lineage[1]["steps"] == 1
    assert lineage[1]["parent"] == os.path.abspath(path)
    out = tmp_path / "hf"
    hf_runs.export_hf(run, str(out))
    original = hc.load_hf_tensors(path)
    back = hc.load_hf_tensors(str(out))
    assert sorted(back) == sorted(original)
    for name, value in original.items():
        np.testing.assert_allclose(back[name], value, atol=1e-6, err_msg=name)
    exported = json.loads((out / "config.json").read_text())
    assert exported["scaling_jax"]["step"] == 1 and exported["scaling_jax"]["tokenizer"] == "byte:384"
    cfg = ModelConfig(**hc.model_fields_from_hf(exported))
    logits = decoder_logits(hc.params_from_hf(back, cfg), cfg, ref["input_ids"])
    np.testing.assert_allclose(logits, ref["logits"], **TOL)
    with pytest.raises(CheckpointError, match="not an empty directory"):
        hf_runs.export_hf(run, str(out))
    with pytest.raises(CheckpointError, match="already holds a run"):
        hf_runs.import_hf(path, run, TRAIN_TINY, tokenizer="byte")


def test_import_refuses_shape_overrides_and_missing_tokenizer(tmp_path):
    path = os.path.join(FIXTURES, "gqa")
    with pytest.raises(ConfigError, match="model.layers=4 contradicts"):
        hf_runs.import_hf(path, str(tmp_path / "a"), ["model.layers=4"], tokenizer="byte")
    with pytest.raises(ConfigError, match="no tokenizer.json or tokenizer.model; pass --tokenizer"):
        hf_runs.import_hf(path, str(tmp_path / "b"))
    with pytest.raises(ConfigError, match="model.vocab_size=256 must be an integer >= 384"):
        hf_runs.import_hf(path, str(tmp_path / "c"), ["model.vocab_size=256"], tokenizer="byte")
    assert not os.listdir(tmp_path)  # nothing half-written


def test_failed_import_removes_the_run_dir_it_created(tmp_path):
    hf_dir = tmp_path / "hf"
    shutil.copytree(os.path.join(FIXTURES, "gqa"), hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps(config | {"intermediate_size": 65}))
    with pytest.raises(CheckpointError, match="mlp.gate_proj.weight' has shape"):
        hf_runs.import_hf(str(hf_dir), str(tmp_path / "run"), ["data.seq_len=32"], tokenizer="byte")
    assert not (tmp_path / "run").exists()


def test_import_copies_the_hf_tokenizer_into_the_run_and_grows_the_vocab(tmp_path):
    """A tokenizer without our specials gets them appended above its ids; the embedding grows to match."""
    tokenizers = pytest.importorskip("tokenizers")
    hf_dir = tmp_path / "hf"
    shutil.copytree(os.path.join(FIXTURES, "tied"), hf_dir)
    vocab = {f"t{i}": i for i in range(300)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(hf_dir / "tokenizer.json"))
    run = tmp_path / "run"
    config = hf_runs.import_hf(str(hf_dir), str(run), ["data.seq_len=32"])
    assert config.data.tokenizer.startswith(str(run / "tokenizer"))
    assert config.model.vocab_size > 300 and config.model.vocab_size % 128 == 0
    from scaling_jax.data.tokenizer import build_tokenizer

    assert build_tokenizer(config.data.tokenizer).vocab_size == config.model.vocab_size
    saved = load_config(str(run / "config.yaml"))
    assert saved.model.vocab_size == config.model.vocab_size and saved.data.tokenizer == config.data.tokenizer


# ----------------------------------------------------------------------------- with torch only


@pytest.mark.parametrize("mlp, tied", [("swiglu", False), ("geglu", True)])
def test_transformers_loads_our_export_withdecoder_logits(tmp_path, mlp, tied):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = load_config(None, ["model.layers=2", "model.d_model=32", "model.heads=4", "model.kv_heads=2",
                             "model.head_dim=16", "model.d_ff=48", f"model.mlp={mlp}",
                             f"model.tie_embeddings={str(tied).lower()}", "model.rope_theta=30000",
                             "model.norm_eps=1e-5"]).model
    params = _random_params(cfg, seed=7)
    (tmp_path / "config.json").write_text(json.dumps(hc.hf_config_from_model(cfg, "float32")))
    hc.save_hf_tensors(hc.hf_from_params(params, cfg), str(tmp_path))
    model = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(ids)).logits.float().numpy()
    np.testing.assert_allclose(decoder_logits(params, cfg, ids), theirs, **TOL)


def test_fixture_script_reproduces_the_stored_reference(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    assert_fixture_script_reproduces("make_hf_llama_fixture", FIXTURES, VARIANTS, tmp_path, **TOL)


def test_convert_command_round_trips_through_the_cli(tmp_path, capsys):
    from scaling_jax.cli import main

    src, run, out = os.path.join(FIXTURES, "tied"), tmp_path / "run", tmp_path / "hf"
    assert main(["convert", "--from-hf", src, "--out", str(run), "--tokenizer", "byte:384", "data.seq_len=32",
                 "model.vocab_size=512"]) == 0
    assert "continue with: scaling-jax train" in capsys.readouterr().out and (run / "config.yaml").is_file()
    assert main(["convert", "--to-hf", str(out), "--checkpoint", str(run), "--dtype", "float32"]) == 0
    original = hc.load_hf_tensors(src)
    back = hc.load_hf_tensors(str(out))
    for name, value in original.items():  # vocab 300 grew to the requested 512: new rows appended
        np.testing.assert_array_equal(back[name][: value.shape[0]], value, err_msg=name)
    assert back["model.embed_tokens.weight"].shape == (512, 32)
    capsys.readouterr()
    assert main(["convert", "--to-hf", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip() == "error: convert --to-hf needs --checkpoint RUN_DIR (the run to export)"
