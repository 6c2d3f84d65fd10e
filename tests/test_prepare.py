"""Pre-tokenized ArrayRecord shards: prepare -> read gives back the exact token stream and rows, the
manifest counts what was written, and training reads the shards through the usual pipeline."""

import dataclasses
import json

import numpy as np
import pytest

from scaling_jax.cli import main
from scaling_jax.config import DataConfig, load_config
from scaling_jax.data import prepare as prep
from scaling_jax.data.pipeline import PackedRows, make_iterator, tokenize_documents, train_dataset
from scaling_jax.data.sources import load_documents
from scaling_jax.data.tokenizer import ByteTokenizer, build_tokenizer, train_tokenizer
from scaling_jax.errors import DataError
from scaling_jax.train.session import DataBundle

SEQ = 24


def corpus_dir(tmp_path):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "héllo", "中文", "\n", "  "]
    (tmp_path / "docs").mkdir(exist_ok=True)
    lines = [json.dumps({"text": " ".join(rng.choice(words, size=rng.integers(1, 60)))}) for _ in range(120)]
    lines.insert(5, json.dumps({"text": ""}))  # empty documents are skipped, as in the in-memory path
    (tmp_path / "docs" / "a.jsonl").write_text("\n".join(lines[:70]) + "\n")
    (tmp_path / "docs" / "b.jsonl").write_text("\n".join(lines[70:]) + "\n")
    return dataclasses.replace(DataConfig(), source=str(tmp_path / "docs"), val_fraction=0.2, seq_len=SEQ)


@pytest.fixture
def prepared(tmp_path):
    cfg = corpus_dir(tmp_path)
    tok = ByteTokenizer()
    # tiny chunks and shards, so rows cross record and file boundaries
    manifest = prep.prepare(cfg, tok, str(tmp_path / "prepared"), chunk_tokens=37, chunks_per_shard=9, log=None)
    return cfg, tok, tmp_path / "prepared", manifest


@pytest.mark.parametrize("split", ["train", "validation"])
def test_shards_give_back_the_exact_stream_and_rows(prepared, split):
    cfg, tok, out, _ = prepared
    docs = load_documents(cfg, split)  # source order, as prepare writes it
    reference = PackedRows(tokenize_documents(docs, tok), SEQ, tok.bos_id, tok.eos_id)
    rows = prep.ShardRows(str(out), split, SEQ, tok)
    assert rows.num_tokens == reference.num_tokens and len(rows) == len(reference)
    np.testing.assert_array_equal(rows.tokens(0, rows.num_tokens), reference.stream)
    for i in range(len(rows)):
        for key in ("tokens", "segment_ids"):
            np.testing.assert_array_equal(rows[i][key], reference[i][key])
    assert rows.num_documents == len(docs)


def test_manifest_counts_tokens_documents_shards_and_tokenizer(prepared):
    cfg, tok, out, manifest = prepared
    assert manifest == prep.read_manifest(str(out))
    assert manifest["tokenizer"]["fingerprint"] == tok.fingerprint()
    assert build_tokenizer(str(out / "tokenizer")).fingerprint() == tok.fingerprint()
    for split in ("train", "validation"):
        docs = load_documents(cfg, split)
        info = manifest["splits"][split]
        assert info["documents"] == len(docs) == sum(s["documents"] for s in info["shards"])
        assert info["text_tokens"] == sum(len(d.text.encode()) for d in docs)
        assert info["tokens"] == info["text_tokens"] + 2 * len(docs) == sum(s["tokens"] for s in info["shards"])
        assert all(s["chunks"] <= 9 for s in info["shards"]) and len(info["shards"]) > 1
        assert (out / info["shards"][0]["file"]).is_file()
    assert not (out.parent / "prepared.tmp").exists()


def test_reading_with_another_tokenizer_names_the_saved_one(prepared):
    _, _, out, _ = prepared
    with pytest.raises(DataError) as e:
        prep.ShardRows(str(out), "train", SEQ, ByteTokenizer(512))
    assert f"data.tokenizer={out / 'tokenizer'}" in str(e.value)


def test_training_bundle_reads_shards_like_the_raw_source(prepared):
    cfg, tok, out, _ = prepared
    overrides = [f"data.seq_len={SEQ}", "data.batch_size=4", "data.val_fraction=0.2"]
    raw = DataBundle(load_config(None, [*overrides, f"data.source={cfg.source}"]), tok)
    shards = DataBundle(load_config(None, [*overrides, f"data.source={out}"]), tok)
    assert isinstance(shards.train_rows, prep.ShardRows)
    assert shards.baseline_bpb == pytest.approx(raw.baseline_bpb, rel=1e-12)  # byte counts kept in the manifest
    assert (shards.num_train_docs, shards.num_val_docs) == (raw.num_train_docs, raw.num_val_docs)
    assert shards.train_rows.num_tokens == raw.train_rows.num_tokens  # same documents (raw is doc-shuffled)
    d = load_config(None, overrides).data
    it = make_iterator(train_dataset(shards.train_rows, d, 0, 1, lambda r: r), d)
    batches = [next(it) for _ in range(3)]
    state = it.get_state()
    expected = next(it)
    again = make_iterator(train_dataset(shards.train_rows, d, 0, 1, lambda r: r), d)
    again.set_state(state)
    np.testing.assert_array_equal(next(again)["tokens"], expected["tokens"])
    assert batches[0]["tokens"].shape == (4, SEQ + 1)


def test_mixture_of_prepared_and_raw_sources(prepared, tmp_path):
    cfg, tok, out, _ = prepared
    config = load_config(None, [f"data.seq_len={SEQ}", "data.batch_size=4", "data.val_fraction=0.2"])
    config.data.mixture = [{"source": str(out), "rate": 0.5}, {"source": cfg.source, "rate": 0.5}]
    bundle = DataBundle(config, tok)
    assert isinstance(bundle.train_rows[0][0], prep.ShardRows) and len(bundle.train_rows) == 2


def test_prepare_refuses_to_overwrite_and_leaves_nothing_on_failure(prepared, tmp_path):
    cfg, tok, out, _ = prepared
    with pytest.raises(DataError, match="--overwrite"):
        prep.prepare(cfg, tok, str(out), log=None)
    bad = dataclasses.replace(cfg, source=str(tmp_path / "bad.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        prep.prepare(bad, tok, str(tmp_path / "never"), log=None)
    assert not (tmp_path / "never").exists() and not (tmp_path / "never.tmp").exists()
    with pytest.raises(DataError, match="one text source"):
        prep.prepare(dataclasses.replace(cfg, source=str(out)), tok, str(tmp_path / "again"), log=None)


def test_cli_prepares_with_a_trained_tokenizer(tmp_path, capsys):
    cfg = corpus_dir(tmp_path)
    texts = [d.text for d in load_documents(cfg, "train")]
    tok = train_tokenizer(texts, str(tmp_path / "tok.json"), 512, "bpe")
    code = main(["data", "prepare", "--output", str(tmp_path / "out"), f"data.source={cfg.source}",
                 f"data.tokenizer={tmp_path / 'tok.json'}", "data.val_fraction=0.2", "--chunk-tokens", "64"])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"data.source={tmp_path / 'out'}" in printed and "train " in printed
    rows = prep.ShardRows(str(tmp_path / "out"), "train", SEQ, build_tokenizer(str(tmp_path / "out" / "tokenizer")))
    reference = PackedRows(tokenize_documents(load_documents(cfg, "train"), tok), SEQ, tok.bos_id, tok.eos_id)
    np.testing.assert_array_equal(rows.tokens(0, rows.num_tokens), reference.stream)


@pytest.mark.slow
def test_trains_from_shards_with_its_own_tokenizer_and_resume_refuses_another(tmp_path):
    """End to end: train a tokenizer, prepare shards with it, train, and resume only with the same tokenizer."""
    from scaling_jax.errors import CheckpointError
    from scaling_jax.train.loop import train

    cfg = corpus_dir(tmp_path)
    train_tokenizer([d.text for d in load_documents(cfg, "train")], str(tmp_path / "tok.model"), 384, "unigram")
    assert main(["data", "prepare", "--output", str(tmp_path / "shards"), f"data.source={cfg.source}",
                 f"data.tokenizer={tmp_path / 'tok.model'}", "data.val_fraction=0.2"]) == 0
    run = tmp_path / "run"
    tiny = ["model.layers=1", "model.d_model=32", "model.heads=2", "model.head_dim=16", "model.d_ff=64",
            f"data.seq_len={SEQ}", "data.batch_size=8", "train.eval_batches=1", "optimizer.warmup_steps=1",
            "train.progress=false", "train.tensorboard=false", "train.plot=false", f"train.run_dir={run}",
            f"data.source={tmp_path / 'shards'}"]
    summary = train(load_config(None, [*tiny, f"data.tokenizer={tmp_path / 'shards' / 'tokenizer'}",
                                       "train.steps=2"]))
    assert summary["step"] == 2 and np.isfinite(summary["val_loss"]) and summary["baseline_bpb"] > 0
    saved = build_tokenizer(str(run / "tokenizer"))
    assert saved.kind == "sentencepiece" and saved.vocab_size == 384
    resumed = train(load_config(None, [*tiny, f"data.tokenizer={run / 'tokenizer'}", "train.steps=3"]))
    assert resumed["step"] == 3
    with pytest.raises(CheckpointError) as e:
        train(load_config(None, [*tiny, "data.tokenizer=byte:512", "train.steps=4"]))
    assert f"data.tokenizer={run / 'tokenizer'}" in str(e.value)
