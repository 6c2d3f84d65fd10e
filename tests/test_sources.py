"""Document sources: stdlib corpus, file readers, the stable split, errors, and the unigram baseline."""

import dataclasses
import json
import math
import os
import random
import subprocess
import sys
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scaling_jax.config import DataConfig
from scaling_jax.data import sources
from scaling_jax.data.sources import Document, is_validation, load_documents, unigram_bits_per_byte
from scaling_jax.errors import DataError


def cfg(**kw) -> DataConfig:
    return dataclasses.replace(DataConfig(), **kw)


def load_error(config: DataConfig, split: str = "train") -> str:
    """The DataError message, checked to be the promised single line with no chained traceback."""
    with pytest.raises(DataError) as info:
        load_documents(config, split)
    error = info.value
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
    message = str(info.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------- stdlib corpus


@pytest.fixture(scope="module")
def stdlib_split():
    return load_documents(cfg(), "train"), load_documents(cfg(), "validation")


def test_stdlib_files_are_sorted_py_files_without_site_packages():
    files = sources.stdlib_files()
    root = sources._stdlib_dir()
    rel = [f.relative_to(root).as_posix() for f in files]
    assert len(files) > 500 and rel == sorted(rel)
    assert all(r.endswith(".py") for r in rel)
    assert "os.py" in rel and "json/__init__.py" in rel
    assert not any(part in ("site-packages", "dist-packages") for r in rel for part in r.split("/"))


def test_stdlib_split_is_deterministic_and_disjoint(stdlib_split):
    train, val = stdlib_split
    train_names, val_names = [d.name for d in train], [d.name for d in val]
    assert not set(train_names) & set(val_names)
    root = sources._stdlib_dir()
    non_empty = {f.relative_to(root).as_posix() for f in sources.stdlib_files() if f.stat().st_size > 0}
    assert set(train_names) | set(val_names) == non_empty
    assert all(is_validation(n, 0.05) for n in val_names) and not any(is_validation(n, 0.05) for n in train_names)
    assert abs(len(val) / (len(train) + len(val)) - 0.05) < 0.03
    assert train_names == sorted(train_names)
    assert load_documents(cfg(), "validation") == val  # a second call reads the same documents


def test_stdlib_baseline_is_between_english_and_random(stdlib_split):
    train, val = stdlib_split
    bpb = unigram_bits_per_byte((d.text for d in train), (d.text for d in val))
    assert 4.0 < bpb < 5.5


def test_max_docs_keeps_the_first_documents_of_the_split(stdlib_split):
    _, val = stdlib_split
    assert load_documents(cfg(max_docs=3), "validation") == val[:3]


def test_unknown_split_is_a_value_error():
    with pytest.raises(ValueError, match="split"):
        load_documents(cfg(), "test")


def test_is_validation_independent_of_hash_seed():
    names = [f"dir{i}/file{i * 7}.py" for i in range(300)]
    code = ("import sys; from scaling_jax.data.sources import is_validation; "
            "print(''.join('1' if is_validation(n, 0.3) else '0' for n in sys.stdin.read().split()))")
    here = "".join("1" if is_validation(n, 0.3) else "0" for n in names)
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-c", code], input="\n".join(names), env=env,
                             capture_output=True, text=True, check=True).stdout.strip()
        assert out == here
    assert 50 < here.count("1") < 130  # and the fraction is honoured (30% of 300)


# ----------------------------------------------------------------------------- file sources


def test_text_directory_gives_one_document_per_non_empty_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub" / "b.md").write_text("beta\n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / ".hidden").write_text("skipped like glob skips it")
    docs = load_documents(cfg(source=str(tmp_path), val_fraction=0.0), "train")
    assert docs == [Document("a.txt", "alpha"), Document("sub/b.md", "beta\n")]


def test_recursive_glob_names_are_relative_to_the_fixed_prefix(tmp_path):
    (tmp_path / "x" / "y").mkdir(parents=True)
    (tmp_path / "x" / "y" / "deep.txt").write_text("deep")
    (tmp_path / "x" / "top.txt").write_text("top")
    (tmp_path / "x" / "other.md").write_text("not matched")
    docs = load_documents(cfg(source=str(tmp_path / "x" / "**" / "*.txt"), val_fraction=0.0), "train")
    assert docs == [Document("top.txt", "top"), Document("y/deep.txt", "deep")]


def test_jsonl_with_custom_text_field(tmp_path):
    rows = [{"body": "first", "id": 1}, {"body": ""}, {"body": "third \u2028 has a JSON-legal line separator"}]
    lines = [json.dumps(rows[0]), json.dumps(rows[1]), "", json.dumps(rows[2], ensure_ascii=False)]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    docs = load_documents(cfg(source=str(tmp_path / "d.jsonl"), text_field="body", val_fraction=0.0), "train")
    assert docs == [Document("d.jsonl:1", "first"), Document("d.jsonl:4", rows[2]["body"])]


def test_parquet_column_one_document_per_row(tmp_path):
    table = pa.table({"id": [0, 1, 2, 3], "content": ["zero", None, "", "three"]})
    pq.write_table(table, tmp_path / "p.parquet", row_group_size=2)  # rows span two row groups
    docs = load_documents(cfg(source=str(tmp_path / "p.parquet"), text_field="content", val_fraction=0.0), "train")
    assert docs == [Document("p.parquet#0", "zero"), Document("p.parquet#3", "three")]


def test_explicit_format_overrides_the_extension(tmp_path):
    (tmp_path / "records.dat").write_text('{"text": "from jsonl"}\n')
    as_jsonl = load_documents(cfg(source=str(tmp_path / "records.dat"), format="jsonl", val_fraction=0.0), "train")
    as_text = load_documents(cfg(source=str(tmp_path / "records.dat"), val_fraction=0.0), "train")
    assert as_jsonl == [Document("records.dat:1", "from jsonl")]
    assert as_text == [Document("records.dat", '{"text": "from jsonl"}\n')]


def test_invalid_utf8_becomes_replacement_char(tmp_path):
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9 ok \xff")
    (doc,) = load_documents(cfg(source=str(tmp_path / "latin.txt"), val_fraction=0.0), "train")
    assert doc.text == "caf\ufffd ok \ufffd"


def test_split_partitions_file_documents_by_name(tmp_path):
    (tmp_path / "many.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(200)))
    config = cfg(source=str(tmp_path / "many.jsonl"), val_fraction=0.5)
    train, val = load_documents(config, "train"), load_documents(config, "validation")
    assert len(train) + len(val) == 200 and 60 < len(val) < 140
    assert {d.name for d in train}.isdisjoint(d.name for d in val)
    assert all(is_validation(d.name, 0.5) for d in val)


# ----------------------------------------------------------------------------- errors


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": oops}\n')
    message = load_error(cfg(source=str(path)))
    assert "bad.jsonl:2" in message and "not valid JSON" in message


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('["text", "a list"]\n')
    assert "list.jsonl:1" in (message := load_error(cfg(source=str(path)))) and "not an object" in message


def test_jsonl_missing_or_non_string_field_suggests_text_field(tmp_path):
    path = tmp_path / "fields.jsonl"
    path.write_text('{"content": "hello"}\n')
    message = load_error(cfg(source=str(path)))
    assert "fields.jsonl:1" in message and "'text'" in message and "content" in message
    assert "data.text_field=" in message
    path.write_text('{"text": 42}\n')
    message = load_error(cfg(source=str(path)))
    assert "fields.jsonl:1" in message and "not a string" in message and "data.text_field=" in message


def test_parquet_missing_column_lists_available_columns(tmp_path):
    pq.write_table(pa.table({"body": ["x"], "lang": ["en"]}), tmp_path / "t.parquet")
    message = load_error(cfg(source=str(tmp_path / "t.parquet")))
    assert "'text'" in message and "body, lang" in message and "data.text_field=" in message


def test_source_matching_nothing(tmp_path):
    assert "matches no files" in load_error(cfg(source=str(tmp_path / "nope" / "*.jsonl")))
    assert "matches no files" in load_error(cfg(source=str(tmp_path / "missing.txt")))
    (tmp_path / "empty_dir").mkdir()
    assert "no files" in load_error(cfg(source=str(tmp_path / "empty_dir")))


def test_empty_split_says_which_split_and_how_to_fix(tmp_path):
    (tmp_path / "blank.txt").write_text("")
    (tmp_path / "one.txt").write_text("only document")
    source = str(tmp_path)
    message = load_error(cfg(source=source, val_fraction=0.0), "validation")
    assert "validation" in message and source in message and "data.val_fraction" in message
    message = load_error(cfg(source=str(tmp_path / "blank.txt")), "train")
    assert "train" in message and "0 non-empty documents" in message


# ----------------------------------------------------------------------------- unigram baseline


def slow_unigram_bits_per_byte(train: list[str], val: list[str]) -> float:
    counts = Counter(b for t in train for b in t.encode("utf-8"))
    total = sum(counts.values())
    val_bytes = [b for t in val for b in t.encode("utf-8")]
    return -sum(math.log2((counts[b] + 1) / (total + 256)) for b in val_bytes) / len(val_bytes)


def test_unigram_baseline_matches_slow_reference():
    rng = random.Random(0)
    alphabet = "abcde fgh\n\u00e9\u4e2d\U0001f600"  # 1- to 4-byte UTF-8 characters
    for _ in range(5):
        train = ["".join(rng.choices(alphabet, k=rng.randint(0, 300))) for _ in range(rng.randint(1, 6))]
        val = ["".join(rng.choices(alphabet + "xyz", k=rng.randint(1, 200))) for _ in range(rng.randint(1, 4))]
        assert unigram_bits_per_byte(iter(train), iter(val)) == pytest.approx(
            slow_unigram_bits_per_byte(train, val), abs=1e-9)


def test_unigram_baseline_scale():
    rng = random.Random(1)
    # Uniform over k byte values costs log2(k) bits. A str cannot hold uniform random *bytes* (UTF-8 is not
    # uniform), so use the 128 ASCII values: 7 bits, i.e. 8 bits minus the unused high bit.
    uniform = ["".join(chr(rng.randrange(128)) for _ in range(200_000))]
    held_out = ["".join(chr(rng.randrange(128)) for _ in range(50_000))]
    assert unigram_bits_per_byte(uniform, held_out) == pytest.approx(7.0, abs=0.01)
    english = ("the quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun " * 20,)
    assert unigram_bits_per_byte(english, ["a dog and a fox are in the sun"]) < 5.0
    # add-one smoothing: a byte never seen in training costs log2(N + 256) bits instead of infinity
    assert unigram_bits_per_byte(["aaaa"], ["b"]) == pytest.approx(math.log2(4 + 256))
    with pytest.raises(ValueError):
        unigram_bits_per_byte(["abc"], [""])
