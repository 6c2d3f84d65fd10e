"""T5X interop: a T5X decoder-only checkpoint imported into our decoder gives T5X's own logits.

``tests/fixtures/t5x/`` was made by ``tests/fixtures/make_t5x_fixture.py`` with T5X itself: a tiny random
``t5x.examples.decoder_only`` model (relative-position biases, gated GeLU, tied embeddings, randomised norm
scales and position table) saved by T5X's ``Checkpointer`` (msgpack + tensorstore), its seqio SentencePiece
vocabulary with 10 extra ids, and the logits ``DecoderWrapper.apply`` computed for causal, packed and prefix-LM
batches. Nothing here needs T5X installed. The same model options (``model.position=t5_relative``) also train,
decode with a KV cache, and continue with UL2R.
"""

import dataclasses
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, serialization

from scaling_jax.cli import main
from scaling_jax.config import load_config
from scaling_jax.data.tokenizer import build_tokenizer
from scaling_jax.errors import ConfigError, UserError
from scaling_jax.interop.runs import read_run_params
from scaling_jax.interop.t5x import import_t5x
from scaling_jax.model.attention_kernels import resolve
from scaling_jax.model.decode import CachedLM, SamplingConfig
from scaling_jax.model.family import param_counts
from scaling_jax.model.position_bias import causal_bucket_table
from scaling_jax.model.transformer import Decoder, to_layout

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "t5x")
MODEL_DIR = os.path.join(FIXTURE, "model_dir")
CKPT = os.path.join(MODEL_DIR, "checkpoint_0")
MAX_ERROR = 1e-4  # float32 on both sides; measured ~3.3e-6 on logits of std ~1.2
BATCHES = ("causal", "packed", "prefix")
TINY = ["data.seq_len=64", "data.batch_size=8", "data.max_docs=20", "train.eval_batches=1", "train.progress=false",
        "train.plot=false", "train.tensorboard=false", "train.async_checkpointing=false", "model.max_seq_len=64"]


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """The fixture imported once: (run dir, config, params)."""
    run = str(tmp_path_factory.mktemp("t5x") / "run")
    import_t5x(MODEL_DIR, run, TINY)
    config, _, params = read_run_params(run)
    return run, config, params


@jax.jit
def _logits(graphdef, state, tokens, positions, segment_ids, bidirectional=None):
    model = nnx.merge(graphdef, state)
    return model.logits(model(tokens, positions, segment_ids, bidirectional))


def _model(config, params, scan: bool = True) -> Decoder:
    cfg = dataclasses.replace(config.model, scan_layers=scan)
    graphdef, state = nnx.split(Decoder(cfg, nnx.Rngs(0)))
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, to_layout(params, scan)))
    return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------- logits against T5X


def test_a_checkpoint_written_to_a_bucket_imports_from_its_local_copy(tmp_path, imported):
    """T5X writes tensorstore specs {driver: gcs, bucket, path: relative} when it saves to gs://; a local copy
    keeps them. Its arrays are the files beside the copy (as T5X's own restore reads them): same parameters."""
    from flax import serialization

    copy = tmp_path / "model_dir"
    shutil.copytree(MODEL_DIR, copy)
    ckpt = copy / "checkpoint_0" / "checkpoint"

    def as_written_to_a_bucket(tree):
        if isinstance(tree, dict) and isinstance(tree.get("kvstore"), dict):
            return {**tree, "kvstore": {"driver": "gcs", "bucket": "t5x-bucket", "path": tree["kvstore"]["path"]}}
        return {k: as_written_to_a_bucket(v) for k, v in tree.items()} if isinstance(tree, dict) else tree

    ckpt.write_bytes(serialization.msgpack_serialize(as_written_to_a_bucket(
        serialization.msgpack_restore(ckpt.read_bytes()))))
    import_t5x(str(copy), str(tmp_path / "run"), TINY)
    params = read_run_params(str(tmp_path / "run"))[2]
    jax.tree.map(np.testing.assert_array_equal, params, imported[2])


def test_imported_decoder_gives_t5x_logits_for_causal_packed_and_prefix_rows(imported):
    _, config, params = imported
    m = config.model
    assert (m.position, m.relative_buckets, m.relative_max_distance, m.logits_scale, m.mlp, m.norm_eps) == \
        ("t5_relative", 32, 128, "rsqrt_d_model", "geglu", 1e-6)
    assert (m.layers, m.d_model, m.heads, m.head_dim, m.d_ff, m.tie_embeddings) == (3, 64, 4, 16, 96, True)
    graphdef, state = nnx.split(_model(config, params))  # (the listed layout: see the decoding and gradient tests)
    ref = np.load(os.path.join(FIXTURE, "reference.npz"))
    for name in BATCHES:
        flags = ref[f"{name}_causal_attention"].astype(bool) if name == "prefix" else None
        logits = _logits(graphdef, state, ref[f"{name}_inputs"], ref[f"{name}_positions"], ref[f"{name}_segment_ids"],
                         flags)
        want = ref[f"{name}_logits"]
        got = np.asarray(logits)[..., :want.shape[-1]]
        assert np.abs(got - want).max() <= MAX_ERROR, name


def test_bucket_table_follows_t5s_causal_buckets():
    table = causal_bucket_table(32, 128)
    assert table[:16].tolist() == list(range(16))  # exact distances
    assert table[[16, 20, 32, 64, 127, 128, 129]].tolist() == [16, 17, 21, 26, 31, 31, 31]  # log-spaced, then last
    assert np.all(np.diff(table) >= 0)


def test_the_seqio_vocabulary_travels_into_the_run_with_its_extra_ids_as_sentinels(imported):
    run, config, params = imported
    tok = build_tokenizer(config.data.tokenizer)
    assert config.data.tokenizer.startswith(os.path.join(os.path.abspath(run), "tokenizer"))
    seqio_size = tok.base_size  # 112 SentencePiece ids + 10 extra ids, as seqio numbers them
    assert [tok.sentinel_id(k) for k in range(10)] == [seqio_size - 1 - k for k in range(10)]
    assert (tok.pad_id, tok.eos_id) == (0, 1)  # T5's own; bos, mode tokens, sentinels 10..99 appended above
    ours = {tok.bos_id, *tok.mode_ids.values(), *(tok.sentinel_id(k) for k in range(10, 100))}
    assert min(ours) >= seqio_size and max(ours) < config.model.vocab_size == params["embedding"].shape[0]
    ref = np.load(os.path.join(FIXTURE, "reference.npz"))
    text = tok.decode(ref["causal_inputs"][0])
    assert text and list(tok.encode(text))[:5] == ref["causal_inputs"][0][:5].tolist()


# ----------------------------------------------------------------------------- the options everywhere


def test_relative_position_kv_cache_decoding_equals_full_forward_passes(imported):
    """Left-padded prompts of different lengths through the KV cache (biases from slot distances) give the
    tokens of re-running every whole sequence, in both block layouts."""
    _, config, params = imported
    tok = build_tokenizer(config.data.tokenizer)
    prompts = [[3, 17, 40, 5, 88, 9, 21], [12, 7, 60], [5, 5, 101, 33, 2, 19, 44, 8, 70, 11]]
    length = 32
    positions = np.broadcast_to(np.arange(length), (len(prompts), length))
    for scan in (True, False):
        model = _model(config, params, scan)
        out = CachedLM(model, tok).generate_ids(prompts, SamplingConfig(max_new_tokens=6)).tokens
        graphdef, state = nnx.split(model)
        seqs = [list(p) for p in prompts]
        for _ in range(6):  # every whole sequence again, right-padded to one length (one compiled shape)
            tokens = np.asarray([s + [0] * (length - len(s)) for s in seqs])
            segments = np.asarray([[1] * len(s) + [0] * (length - len(s)) for s in seqs])
            logits = np.asarray(_logits(graphdef, state, tokens, positions, segments))
            for r, seq in enumerate(seqs):
                seq.append(int(np.argmax(logits[r, len(seq) - 1])))
        want = [s[len(p):] for s, p in zip(seqs, prompts, strict=True)]
        want = [w[:w.index(tok.eos_id)] if tok.eos_id in w else w for w in want]
        assert out == want


@pytest.mark.slow
def test_a_ul2r_stage_continues_the_imported_run(imported, tmp_path, capsys):
    run, _, _ = imported
    child = str(tmp_path / "child")
    assert main(["continue", "--from", run, "--stage", "configs/stages/ul2r.yaml", "stage.lr_from_parent=false",
                 "optimizer.lr=1e-3", "budget.steps=2", f"train.run_dir={child}", *TINY]) == 0
    assert "stage ul2r: validation" in capsys.readouterr().out
    config, step, params = read_run_params(child)
    assert step == 2 and config.objective.name == "ul2" and config.model.position == "t5_relative"
    _, _, before = read_run_params(run)
    assert not np.array_equal(params["position_bias"], before["position_bias"])  # the bias table trains


def test_relative_position_gradients_agree_across_layouts_and_reach_the_bias_table(imported):
    """One loss over packed and prefix-LM rows: the scanned and listed blocks give the same gradients, and the
    shared bias table (used by every layer, outside the scan) gets a finite, non-zero one."""
    _, config, params = imported
    ref = np.load(os.path.join(FIXTURE, "reference.npz"))
    batch = [jnp.asarray(np.concatenate([ref[f"packed_{k}"], ref[f"prefix_{k}"]])) for k in
             ("inputs", "positions", "segment_ids")]
    flags = jnp.asarray(np.concatenate([np.zeros_like(ref["packed_inputs"]), ref["prefix_causal_attention"]]) > 0)

    def grads(scan: bool) -> dict:
        graphdef, state = nnx.split(_model(config, params, scan))

        def loss(p):
            model = nnx.merge(graphdef, p)
            logits = model.logits(model(*batch, flags))
            return -jnp.mean(jax.nn.log_softmax(logits)[..., 7])

        return nnx.to_pure_dict(jax.jit(jax.grad(loss))(state))

    scanned, listed = grads(True), grads(False)
    bias = np.asarray(scanned["position_bias"])
    assert np.all(np.isfinite(bias)) and np.abs(bias).max() > 0
    for a, b in zip(jax.tree.leaves(to_layout(scanned, False)), jax.tree.leaves(listed), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_param_counts_and_memory_report_include_the_bias_table():
    from scaling_jax.train.memory import activation_bytes

    overrides = ["model.position=t5_relative", "model.relative_buckets=8", "model.relative_max_distance=16",
                 "model.layers=2", "model.d_model=32", "model.heads=2", "model.d_ff=64", "model.head_dim=15"]
    config = load_config(None, overrides)  # an odd head dim is fine without rotary embeddings
    for scan in (True, False):
        cfg = dataclasses.replace(config.model, scan_layers=scan)
        _, state = nnx.split(nnx.eval_shape(lambda cfg=cfg: Decoder(cfg, nnx.Rngs(0))))
        assert param_counts(cfg).total == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
    assert param_counts(config.model).embedding == 384 * 32 + 2 * 8  # Kaplan's N leaves positions out
    rope = load_config(None, overrides[3:-1])
    assert activation_bytes(config, 1, "tpu") > activation_bytes(rope, 1, "tpu")  # xla scores + the bias


def test_a_position_bias_always_runs_the_xla_kernel_and_mtp_is_refused():
    assert resolve("splash", "tpu", jnp.bfloat16, 64, bias=True) == "xla"
    assert resolve("auto", "gpu", jnp.bfloat16, 64, bias=True) == "xla"
    assert resolve("auto", "tpu", jnp.bfloat16, 64) == "splash"
    with pytest.raises(ConfigError, match="objective=mtp does not support model.position=t5_relative"):
        load_config(None, ["model.position=t5_relative", "objective=mtp"])
    with pytest.raises(ConfigError, match="model.relative_max_distance=8 must be > model.relative_buckets // 2"):
        load_config(None, ["model.position=t5_relative", "model.relative_max_distance=8"])


# ----------------------------------------------------------------------------- bad inputs


def _copy_checkpoint(tmp_path, edit=None, with_vocab: bool = True) -> str:
    """A copy of the fixture's model dir; ``edit(contents)`` rewrites its msgpack ``checkpoint`` file."""
    model_dir = tmp_path / "model_dir"
    shutil.copytree(MODEL_DIR, model_dir)
    if not with_vocab:
        os.remove(model_dir / "sentencepiece.model")
    if edit is not None:
        path = model_dir / "checkpoint_0" / "checkpoint"
        contents = serialization.msgpack_restore(path.read_bytes())
        edit(contents["optimizer"]["target"])
        path.write_bytes(serialization.msgpack_serialize(contents))
    return str(model_dir)


def _refused(source: str, out, match: str, **kwargs) -> None:
    with pytest.raises(UserError, match=match) as info:
        import_t5x(source, str(out), ["data.seq_len=64", "model.max_seq_len=64"], **kwargs)
    assert "\n" not in str(info.value)
    assert not os.path.exists(out)  # nothing written


def test_bad_inputs_are_one_line_errors_and_write_nothing(tmp_path):
    out = tmp_path / "run"
    (tmp_path / "empty").mkdir()
    _refused(str(tmp_path / "empty"), out, "is not a T5X checkpoint: it has no msgpack 'checkpoint' file")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "checkpoint").write_bytes(b"\xc1not msgpack")
    _refused(str(tmp_path / "junk"), out, "is not a T5X msgpack checkpoint")

    def encoder_decoder(target):
        target["encoder"] = {"encoder_norm": {"scale": np.ones(64, np.float32)}}

    _refused(_copy_checkpoint(tmp_path / "a", encoder_decoder), out, r"encoder-decoder checkpoint \(found target/enc")

    def non_gated(target):
        mlp = target["decoder"]["layers_0"]["mlp"]
        mlp["wi"] = mlp.pop("wi_0")

    _refused(_copy_checkpoint(tmp_path / "b", non_gated), out, r"non-gated MLP \(target/decoder/layers_0/mlp/wi\)")

    def shape(target):
        target["decoder"]["layers_1"]["self_attention"]["key"]["kernel"]["metadata"]["shape"] = [64, 32]

    _refused(_copy_checkpoint(tmp_path / "c", shape), out,
             r"layers_1/self_attention/key/kernel has shape \(64, 32\), but .* imply \(64, 64\)")
    _refused(_copy_checkpoint(tmp_path / "d", with_vocab=False), out, "no tokenizer .* pass --tokenizer FILE")
    with pytest.raises(ConfigError, match="model.heads=8 contradicts the T5X checkpoint"):
        import_t5x(MODEL_DIR, str(out), ["model.heads=8"])
    assert not os.path.exists(out)


def test_convert_from_t5x_on_the_command_line(tmp_path, capsys):
    import scaling_jax.cli as cli

    with open(cli.__file__) as f:
        if "from-t5x" not in f.read():
            pytest.skip("the CLI has no --from-t5x flag yet")
    code = main(["convert", "--from-t5x", str(tmp_path / "missing"), "--out", str(tmp_path / "run")])
    assert code == 2 and "is not a directory" in capsys.readouterr().err
    assert main(["convert", "--from-t5x", CKPT, "--out", str(tmp_path / "run"), "data.seq_len=64",
                 "model.max_seq_len=64"]) == 0
    assert (tmp_path / "run" / "config.yaml").is_file()
    capsys.readouterr()
    assert main(["info", str(tmp_path / "run")]) == 0
    assert "T5 relative positions (32 buckets, max distance 128), logits / sqrt(d_model)" in capsys.readouterr().out
