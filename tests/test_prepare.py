"""Pre-tokenized ArrayRecord shards: prepare -> read gives back the exact token stream and rows (written as
independent parts, rows crossing short chunks and parts; a format-1 directory still reads), parts written in
any order give the same bytes, the manifest counts what was written, training reads the shards through the
usual pipeline, and the ``--executor`` flags of ``data prepare`` fail in one line before anything is written.
Ray itself: tests/test_prepare_ray.py."""

import dataclasses
import filecmp
import itertools
import json
import os
import sys

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


def corpus_dir(tmp_path, files: int = 2):
    """``files`` jsonl files of the same 121 lines; with more than 2, also a file of one 2-byte document, whose
    part is shorter than a row."""
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "héllo", "中文", "\n", "  "]
    (tmp_path / "docs").mkdir(exist_ok=True)
    lines = [json.dumps({"text": " ".join(rng.choice(words, size=rng.integers(1, 60)))}) for _ in range(120)]
    lines.insert(5, json.dumps({"text": ""}))  # empty documents are skipped, as in the in-memory path
    cuts = [0, 70, len(lines)] if files == 2 else np.linspace(0, len(lines), files + 1).astype(int).tolist()
    for i, (a, b) in enumerate(itertools.pairwise(cuts)):
        (tmp_path / "docs" / f"{chr(ord('a') + i)}.jsonl").write_text("\n".join(lines[a:b]) + "\n")
    if files > 2:
        (tmp_path / "docs" / "aa.jsonl").write_text(json.dumps({"text": "hi"}) + "\n")
    return dataclasses.replace(DataConfig(), source=str(tmp_path / "docs"), val_fraction=0.2, seq_len=SEQ)


def prepare_parts(cfg, out, **kwargs):
    """Every file its own part (part_bytes=1), tiny chunks and shards: rows cross records, short chunks, parts
    and files."""
    return prep.prepare(cfg, ByteTokenizer(), str(out), chunk_tokens=37, chunks_per_shard=2, log=None, part_bytes=1,
                        **kwargs)


@pytest.fixture
def prepared(tmp_path):
    cfg = corpus_dir(tmp_path, files=5)
    return cfg, ByteTokenizer(), tmp_path / "prepared", prepare_parts(cfg, tmp_path / "prepared")


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


def test_rows_cross_parts_and_short_chunks(prepared):
    cfg, tok, out, manifest = prepared
    assert len(manifest["parts"]) == 6 and [p["first"] for p in manifest["parts"]][:2] == ["a.jsonl", "aa.jsonl"]
    rows = prep.ShardRows(str(out), "train", SEQ, tok)
    spans = [(rows._record(i * SEQ)[0], rows._record(i * SEQ + SEQ)[0]) for i in range(len(rows))]
    part_of = [s["part"] for s in manifest["splits"]["train"]["shards"] for _ in range(s["chunks"])]
    assert any(part_of[first] != part_of[last] for first, last in spans)  # a row across a part boundary
    assert max(last - first for first, last in spans) >= 2  # ... and across a part shorter than a row


def write_format_1(prepared_dir, out, chunks_per_shard=3):
    """The layout before parts: each split one stream of full chunks (the last may be short) in rotating shards
    ``SPLIT-NNNNN.array_record``; ``format_version`` 1, ``seconds`` in the manifest."""
    from array_record.python.array_record_module import ArrayRecordWriter

    manifest = prep.read_manifest(str(prepared_dir))
    chunk, splits = manifest["chunk_tokens"], {}
    for split, info in manifest["splits"].items():
        stream = prep.ShardRows(str(prepared_dir), split, SEQ, ByteTokenizer()).tokens(0, info["tokens"])
        chunks = [stream[i : i + chunk] for i in range(0, stream.size, chunk)]
        shards = []
        for n, first in enumerate(range(0, len(chunks), chunks_per_shard)):
            group = chunks[first : first + chunks_per_shard]
            writer = ArrayRecordWriter(str(out / f"{split}-{n:05d}.array_record"), prep.WRITER_OPTIONS)
            for c in group:
                writer.write(c.tobytes())
            writer.close()
            shards.append({"file": f"{split}-{n:05d}.array_record", "chunks": len(group),
                           "tokens": sum(c.size for c in group), "documents": sum(int((c == 1).sum()) for c in group)})
        splits[split] = {**{k: v for k, v in info.items() if k != "shards"}, "shards": shards}
    keep = ("source", "format", "text_field", "val_fraction", "max_docs", "tokenizer", "dtype", "chunk_tokens")
    (out / prep.MANIFEST).write_text(json.dumps({"format_version": 1, **{k: manifest[k] for k in keep},
                                                 "splits": splits, "seconds": 0.1}))


def test_a_format_1_directory_still_reads(prepared, tmp_path):
    cfg, tok, out, _ = prepared
    old = tmp_path / "v1"
    old.mkdir()
    write_format_1(out, old)
    for split in ("train", "validation"):
        new_rows, old_rows = prep.ShardRows(str(out), split, SEQ, tok), prep.ShardRows(str(old), split, SEQ, tok)
        assert len(old_rows) == len(new_rows) > 0 and old_rows.num_documents == new_rows.num_documents
        np.testing.assert_array_equal(old_rows.tokens(0, old_rows.num_tokens), new_rows.tokens(0, new_rows.num_tokens))
        for i in range(0, len(old_rows), 5):
            np.testing.assert_array_equal(old_rows[i]["tokens"], new_rows[i]["tokens"])
    (old / prep.MANIFEST).write_text(json.dumps({"format_version": 3}))
    with pytest.raises(DataError, match=r"has format_version 3, this version reads 1, 2; run 'scaling-jax data "
                                        r"prepare' again$"):
        prep.ShardRows(str(old), "train", SEQ, tok)


def same_files(a, b) -> bool:
    """Both directory trees hold the same file names with the same bytes."""
    compared = filecmp.dircmp(a, b)
    if compared.left_only or compared.right_only or compared.funny_files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, compared.common_files, shallow=False)
    return not mismatch and not errors and all(same_files(os.path.join(a, d), os.path.join(b, d))
                                                for d in compared.common_dirs)


def test_parts_written_in_any_order_give_the_same_bytes(prepared, tmp_path):
    """What a parallel executor may do: here the parts are written last to first."""
    cfg, _, out, manifest = prepared
    backwards = lambda fn, jobs: [fn(job) for job in reversed(jobs)][::-1]
    assert prepare_parts(cfg, tmp_path / "backwards", parallel_map=backwards) == manifest
    assert same_files(out, tmp_path / "backwards")
    with pytest.raises(DataError, match=r"^data.max_docs=5 keeps the first documents of the whole stream"):
        prepare_parts(dataclasses.replace(cfg, max_docs=5), tmp_path / "never", parallel_map=backwards)
    assert not (tmp_path / "never").exists()


def test_parts_written_where_this_machine_does_not_read_fail_in_one_line(tmp_path):
    """A Ray node that does not share --output's disk: its tasks find no temporary directory, or write to
    another disk at the same path."""
    cfg = corpus_dir(tmp_path, files=5)
    (tmp_path / "elsewhere").mkdir()
    for where, message in ((tmp_path / "missing", r"^'.*missing' \(the prepare's temporary output\) does not exist "
                                                  r"on .*; put --output on storage every Ray node mounts"),
                           (tmp_path / "elsewhere", r"^\d+ shard file\(s\) such as train-00000-00000.array_record "
                                                    r"were written where .* is not this machine's; put --output")):
        other_disk = lambda fn, jobs, where=where: [fn(dataclasses.replace(j, directory=str(where)), ByteTokenizer())
                                                    for j in jobs]
        with pytest.raises(DataError, match=message):
            prepare_parts(cfg, tmp_path / "out", parallel_map=other_disk)
    assert sorted(os.listdir(tmp_path)) == ["docs", "elsewhere"]


def test_max_docs_keeps_the_first_documents_across_parts(tmp_path):
    cfg = dataclasses.replace(corpus_dir(tmp_path, files=5), max_docs=30)
    manifest = prepare_parts(cfg, tmp_path / "out")
    train = load_documents(cfg, "train")
    assert manifest["splits"]["train"]["documents"] == len(train) == 30
    rows = prep.ShardRows(str(tmp_path / "out"), "train", SEQ, ByteTokenizer())
    reference = PackedRows(tokenize_documents(train, ByteTokenizer()), SEQ, 1, 2)
    np.testing.assert_array_equal(rows.tokens(0, rows.num_tokens), reference.stream)
    assert 1 < len(manifest["parts"]) < 6  # the parts after the 30th training document are not read


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
    # --overwrite deletes only what data prepare wrote: not a sweep's (or anyone's) directory with a manifest.json
    theirs = tmp_path / "a_sweep"
    theirs.mkdir()
    (theirs / "manifest.json").write_text('{"runs": []}')
    (theirs / "MY_NOTES.txt").write_text("keep")
    with pytest.raises(DataError, match="is not a prepared data directory"):
        prep.prepare(cfg, tok, str(theirs), overwrite=True, log=None)
    assert sorted(os.listdir(theirs)) == ["MY_NOTES.txt", "manifest.json"]


def test_overwrite_through_a_link_replaces_the_directory_it_names(prepared, tmp_path):
    """The link stays and reads the new data; nothing is left beside it; the data set is as readable as the
    user's umask makes new directories (mkdtemp alone would make it private)."""
    cfg, tok, _, _ = prepared
    real, link = tmp_path / "real", tmp_path / "link"
    prep.prepare(cfg, tok, str(real), log=None)
    link.symlink_to(real)
    fewer = dataclasses.replace(cfg, max_docs=3)
    manifest = prep.prepare(fewer, tok, str(link), overwrite=True, log=None)
    assert link.is_symlink() and prep.read_manifest(str(link)) == manifest
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temporary or old copy left
    mask = os.umask(0)
    os.umask(mask)
    assert oct(real.stat().st_mode & 0o777) == oct(0o777 & ~mask)


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


def _prepare_cli(capsys, tmp_path, *args):
    code = main(["data", "prepare", "--output", str(tmp_path / "out"), *args])
    return code, capsys.readouterr().err.strip().splitlines()


def test_executor_flags_of_data_prepare_fail_in_one_line_before_anything_is_written(tmp_path, capsys, monkeypatch):
    source = f"data.source={corpus_dir(tmp_path).source}"
    cases = [(["--executor", "dask"], "argument --executor: invalid choice: 'dask'"),
             (["--address", "10.0.0.2:6379", source], "--address applies to --executor ray, not local"),
             (["--executor", "ray", "--address", " ", source], "--address is empty"),
             (["--part-mib", "0", source], "--part-mib 0 must be a number > 0"),
             (["--executor", "ray", "data.source=hf:some/set"],
              "data prepare --executor ray reads files or stdlib, not data.source='hf:some/set'"),
             (["--executor", "ray", source, "data.max_docs=10"], "data.max_docs=10 keeps the first documents"),
             (["--executor", "ray", source], 'error: --executor ray needs Ray, which is not installed: pip install')]
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as it does where Ray is not installed
    for args, message in cases:
        code, err = _prepare_cli(capsys, tmp_path, *args)
        assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], (args, err)
    assert sorted(os.listdir(tmp_path)) == ["docs"]  # no output, no temporary directory
