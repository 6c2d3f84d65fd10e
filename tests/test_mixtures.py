"""Sources beyond local files (fsspec URLs, Hugging Face datasets) and mixtures of sources with rates:
rates realised, deterministic, exactly resumable, split across processes without overlap."""

import dataclasses
import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may download
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import fsspec  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402

from scaling_jax.config import DataConfig, load_config  # noqa: E402
from scaling_jax.data import sources  # noqa: E402
from scaling_jax.data.pipeline import PackedRows, make_iterator, train_dataset  # noqa: E402
from scaling_jax.data.sources import Document, load_documents, source_components, unigram_bits_from_counts  # noqa: E402
from scaling_jax.data.tokenizer import ByteTokenizer  # noqa: E402
from scaling_jax.errors import DataError  # noqa: E402
from scaling_jax.train.session import DataBundle  # noqa: E402

CFG = dataclasses.replace(DataConfig(), seq_len=16, batch_size=8, shuffle_seed=3, prefetch=2)
RATES = [0.5, 0.3, 0.2]


def cfg(**kw) -> DataConfig:
    return dataclasses.replace(DataConfig(), **kw)


def source_rows(k: int, docs: int = 30) -> PackedRows:
    """Rows whose tokens all lie in source k's own id range [10 + 100k, 100 + 100k)."""
    rng = np.random.default_rng(k)
    return PackedRows([rng.integers(10 + 100 * k, 100 + 100 * k, size=rng.integers(5, 40)) for _ in range(docs)],
                      16, 1, 2)


def source_of(row_tokens: np.ndarray) -> int:
    content = row_tokens[row_tokens >= 10]
    return int(content[0] // 100)


def mixture():
    return [(source_rows(k, docs=10 + 20 * k), rate) for k, rate in enumerate(RATES)]


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


# ----------------------------------------------------------------------------- mixing


def test_mixture_rates_are_realised():
    batches = take(make_iterator(train_dataset(mixture(), CFG, 0, 1, lambda r: r), CFG), 50)
    counts = np.bincount([source_of(row) for b in batches for row in b["tokens"]], minlength=3)
    assert counts.sum() == 400
    np.testing.assert_allclose(counts / 400, RATES, atol=0.02)


def test_each_source_is_shuffled_and_reused_by_epoch():
    parts = mixture()
    rows = [row for b in take(make_iterator(train_dataset(parts, CFG, 0, 1, lambda r: r), CFG), 50)
            for row in b["tokens"]]
    first = [r for r in rows if source_of(r) == 0]
    n = len(parts[0][0])
    seen = [next(i for i in range(n) if np.array_equal(parts[0][0][i]["tokens"], r)) for r in first]
    assert sorted(seen[:n]) == list(range(n))  # the first epoch of source 0 is a permutation of its rows
    assert seen[:n] != list(range(n)) and seen[:n] != seen[n: 2 * n]  # shuffled, and reshuffled next epoch


def test_same_seed_same_mixed_batches_and_another_seed_differs():
    a = take(make_iterator(train_dataset(mixture(), CFG, 0, 1, lambda r: r), CFG), 10)
    b = take(make_iterator(train_dataset(mixture(), CFG, 0, 1, lambda r: r), CFG), 10)
    c = take(make_iterator(train_dataset(mixture(), dataclasses.replace(CFG, shuffle_seed=4), 0, 1,
                                         lambda r: r), CFG), 10)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["tokens"], y["tokens"])
    assert not all(np.array_equal(x["tokens"], z["tokens"]) for x, z in zip(a, c, strict=True))


def test_mixture_iterator_restores_exactly():
    it = make_iterator(train_dataset(mixture(), CFG, 0, 1, lambda r: r), CFG)
    take(it, 7)
    state = it.get_state()
    expected = take(it, 5)
    fresh = make_iterator(train_dataset(mixture(), CFG, 0, 1, lambda r: r), CFG)
    fresh.set_state(state)
    for x, y in zip(expected, take(fresh, 5), strict=True):
        np.testing.assert_array_equal(x["tokens"], y["tokens"])
        np.testing.assert_array_equal(x["segment_ids"], y["segment_ids"])


def test_mixture_processes_read_disjoint_slices_of_the_single_process_stream():
    single = take(make_iterator(train_dataset(mixture(), CFG, 0, 1, lambda r: r), CFG), 4)
    parts = [take(make_iterator(train_dataset(mixture(), CFG, p, 2, lambda r: r), CFG), 4) for p in range(2)]
    for step in range(4):
        joined = np.concatenate([parts[p][step]["tokens"] for p in range(2)])
        np.testing.assert_array_equal(joined, single[step]["tokens"])


def test_a_mixture_source_too_small_for_one_row_is_named():
    tiny = PackedRows([np.array([50, 51])], 16, 1, 2)  # 4 tokens: no row of 16
    with pytest.raises(DataError, match=r"data.mixture\[1\] packs into no row"):
        train_dataset([(source_rows(0), 0.5), (tiny, 0.5)], CFG, 0, 1, lambda r: r)


def test_source_components_normalise_rates_and_override_fields():
    base = cfg(text_field="text", mixture=[{"source": "a.jsonl", "rate": 3, "text_field": "body"},
                                           {"source": "b", "rate": 1.0}])
    (a, ra), (b, rb) = source_components(base)
    assert (ra, rb) == (0.75, 0.25)
    assert (a.source, a.text_field, a.mixture) == ("a.jsonl", "body", [])
    assert (b.source, b.text_field) == ("b", "text")
    assert source_components(cfg(source="x")) == [(cfg(source="x"), 1.0)]
    with pytest.raises(DataError, match="both set"):
        source_components(cfg(source="x", mixture=[{"source": "y"}]))


@pytest.mark.parametrize("entry, words", [
    ({"rate": 1}, "'source'"),
    ({"source": "a", "rate": -1}, "positive"),
    ({"source": "a", "rate": True}, "positive"),
    ({"source": "a", "weight": 1}, "unknown key(s) weight"),
    ("a.jsonl", "mapping"),
])
def test_bad_mixture_entries_are_one_line_errors(entry, words):
    with pytest.raises(DataError) as e:
        source_components(cfg(mixture=[{"source": "ok"}, entry]))
    assert words in str(e.value) and "data.mixture[1]" in str(e.value) and "\n" not in str(e.value)


def slow_mixture_baseline(parts) -> float:
    """Independent reference: per-byte loops over the mixed smoothed frequencies."""
    p = [sum(rate * (train[b] + 1) / (sum(train) + 256) for train, _, rate in parts) for b in range(256)]
    bits = 0.0
    for _, val, rate in parts:
        bits += rate * sum(-val[b] * math.log2(p[b]) for b in range(256)) / sum(val)
    return bits / sum(rate for *_, rate in parts)


def test_mixture_baseline_matches_reference_and_single_source_formula():
    rng = np.random.default_rng(0)
    parts = [(rng.integers(0, 50, 256), rng.integers(0, 9, 256), r) for r in (0.6, 0.4)]
    assert unigram_bits_from_counts(parts) == pytest.approx(slow_mixture_baseline(parts), rel=1e-9)
    texts = (["the cat sat on the mat"], ["a dog"])
    one = unigram_bits_from_counts([(sources.byte_counts(texts[0]), sources.byte_counts(texts[1]), 1.0)])
    assert one == pytest.approx(sources.unigram_bits_per_byte(*texts))


# ----------------------------------------------------------------------------- sources


def write_jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({field: t}) + "\n" for t in texts))


def test_fsspec_url_sources_read_like_local_files(tmp_path):
    fs = fsspec.filesystem("memory")
    texts = [f"remote document {i}" for i in range(4)]
    fs.makedirs("/bucket/data/sub", exist_ok=True)
    with fs.open("/bucket/data/a.jsonl", "w") as f:
        f.write("".join(json.dumps({"text": t}) + "\n" for t in texts[:2]))
    with fs.open("/bucket/data/sub/b.txt", "w") as f:
        f.write(texts[2])
    with fs.open("/bucket/data/.hidden", "w") as f:
        f.write("skipped")
    table = pa.table({"text": texts[3:]})
    with fs.open("/bucket/data/c.parquet", "wb") as f:
        pq.write_table(table, f)
    docs = load_documents(cfg(source="memory://bucket/data", val_fraction=0.0), "train")
    assert docs == [Document("a.jsonl:1", texts[0]), Document("a.jsonl:2", texts[1]),
                    Document("c.parquet#0", texts[3]), Document("sub/b.txt", texts[2])]
    globbed = load_documents(cfg(source="memory://bucket/data/**/*.txt", val_fraction=0.0), "train")
    assert globbed == [Document("sub/b.txt", texts[2])]
    # a bare ** also lists the directories: each file is still read once, as the directory form reads it
    assert load_documents(cfg(source="memory://bucket/data/**", val_fraction=0.0), "train") == docs
    with pytest.raises(DataError, match="matches no files"):
        load_documents(cfg(source="memory://bucket/nothing/*.jsonl"), "train")


def test_unknown_url_scheme_says_what_to_install():
    with pytest.raises(DataError) as e:
        load_documents(cfg(source="nosuchfs://bucket/x.jsonl"), "train")
    assert "install" in str(e.value) and "\n" not in str(e.value)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """A save_to_disk data set and a directory of JSONL files, both local."""
    root = tmp_path_factory.mktemp("hf")
    texts = [f"hugging face row {i} " * (i % 3 + 1) for i in range(40)]
    import datasets  # here, not at the top: ~0.8 s in every worker's collection

    datasets.Dataset.from_dict({"content": texts + [None], "id": list(range(41))}).save_to_disk(str(root / "saved"))
    (root / "raw").mkdir()
    write_jsonl(root / "raw" / "part.jsonl", texts, "content")
    return root, texts


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("kind", ["saved", "raw"])
def test_hf_datasets_local_and_streaming_give_the_same_documents(hf_dirs, kind, streaming):
    root, texts = hf_dirs
    config = cfg(source=f"hf:{root / kind}", text_field="content", streaming=streaming, val_fraction=0.0)
    docs = load_documents(config, "train")
    assert [d.text for d in docs] == texts
    assert [d.name for d in docs] == [f"train#{i}" for i in range(40)]


def test_hf_dataset_errors_name_the_fix(hf_dirs, tmp_path):
    root, _ = hf_dirs
    with pytest.raises(DataError) as e:
        load_documents(cfg(source=f"hf:{root / 'saved'}"), "train")
    assert "no column 'text'" in str(e.value) and "content" in str(e.value)
    with pytest.raises(DataError) as e:
        load_documents(cfg(source=f"hf:{tmp_path / 'missing'}"), "train")
    assert "cannot be loaded" in str(e.value) and "\n" not in str(e.value)


def test_data_bundle_mixes_jsonl_parquet_and_hf_sources(tmp_path, hf_dirs):
    root, _ = hf_dirs
    write_jsonl(tmp_path / "a.jsonl", [f"jsonl text number {i}, " * 5 for i in range(60)])
    pq.write_table(pa.table({"text": [f"parquet row {i}; " * 6 for i in range(60)]}), tmp_path / "b.parquet")
    mix = [{"source": str(tmp_path / "a.jsonl"), "rate": 2}, {"source": str(tmp_path / "b.parquet"), "rate": 1},
           {"source": f"hf:{root / 'saved'}", "text_field": "content", "rate": 1}]
    config = load_config(None, ["data.seq_len=32", "data.batch_size=4", "data.val_fraction=0.2"])
    config.data.mixture = mix
    bundle = DataBundle(config, ByteTokenizer())
    assert [rate for _, rate in bundle.train_rows] == [0.5, 0.25, 0.25]
    assert bundle.num_train_docs + bundle.num_val_docs == 60 + 60 + 40
    val = [bundle.val_rows[i]["tokens"] for i in range(8)]
    assert all(v.shape == (33,) for v in val)
    assert 0 < bundle.baseline_bpb < 8
    batch = next(make_iterator(train_dataset(bundle.train_rows, config.data, 0, 1, lambda r: r), config.data))
    assert batch["tokens"].shape == (4, 33)
