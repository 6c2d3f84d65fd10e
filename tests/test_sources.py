"""Document sources: stdlib corpus, file readers, the stable split, errors, and the unigram baseline."""

import dataclasses
import json
import math
import os
import random
import subprocess
import sys
import zlib
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scaling_jax.config import DataConfig
from scaling_jax.data import sources
from scaling_jax.data.sources import PIECE_BYTES, Document, is_validation, load_documents, unigram_bits_per_byte
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


def test_stdlib_files_stay_whole_and_leniently_decoded(stdlib_split):
    """The stdlib corpus is not cut into pieces (eval generators reuse its file names) and its few
    deliberately non-UTF-8 test files still load, with U+FFFD, exactly as before."""
    by_name = {d.name: d.text for split in stdlib_split for d in split}
    root = sources._stdlib_dir()
    raw = {f.relative_to(root).as_posix(): f.read_bytes() for f in sources.stdlib_files()}
    big = [n for n, b in raw.items() if len(b) > 2 * PIECE_BYTES and n in by_name]
    assert big and all(by_name[n] == raw[n].decode("utf-8", "replace") for n in big)
    not_utf8 = [n for n, b in raw.items() if b.decode("utf-8", "replace").encode("utf-8") != b]
    assert not_utf8 and all(by_name[n] == raw[n].decode("utf-8", "replace") for n in not_utf8)


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


def reference_pieces(data: bytes) -> list[bytes]:
    """The documented cut rule, written directly on the whole file (lines shorter than a piece):
    each piece ends just after the first newline at or past PIECE_BYTES from its start."""
    pieces, start = [], 0
    while start < len(data):
        newline = data.find(b"\n", start + PIECE_BYTES - 1)
        end = len(data) if newline < 0 else newline + 1
        pieces.append(data[start:end])
        start = end
    return pieces


def test_one_big_text_file_is_cut_into_whole_line_pieces_for_both_splits(tmp_path):
    rng = random.Random(3)
    words = ["alpha", "beta", "caf\u00e9", "\u4e2d\u6587", "\U0001f600", "x" * 40, ""]
    lines = [" ".join(rng.choices(words, k=rng.randint(0, 60))) + rng.choice(["\n", "\r\n"]) for _ in range(30_000)]
    data = "".join(lines).encode("utf-8")  # about 4 MiB: several 1 MiB read blocks, ~60 pieces
    (tmp_path / "corpus.txt").write_bytes(data)
    config = cfg(source=str(tmp_path / "corpus.txt"), val_fraction=0.25)
    train, val = load_documents(config, "train"), load_documents(config, "validation")
    pieces = reference_pieces(data)
    names = [f"corpus.txt#{i}" for i in range(len(pieces))]
    assert sorted(train + val, key=lambda d: int(d.name.split("#")[1])) == [
        Document(n, p.decode("utf-8")) for n, p in zip(names, pieces, strict=True)]
    assert b"".join(pieces) == data and all(p.endswith(b"\n") and len(p) >= PIECE_BYTES for p in pieces[:-1])
    held_out = {n for n in names if zlib.crc32(n.encode()) / 2**32 < 0.25}  # the hash rule, independently
    assert {d.name for d in val} == held_out and train and val
    assert 0.1 < len(val) / len(pieces) < 0.4
    assert (load_documents(config, "train"), load_documents(config, "validation")) == (train, val)


def test_line_without_newline_is_cut_at_a_character_boundary(tmp_path):
    text = "a" + "\u00e9" * (2 * PIECE_BYTES)  # 2-byte characters at odd offsets: PIECE_BYTES falls inside one
    (tmp_path / "one_line.txt").write_text(text, encoding="utf-8")
    docs = load_documents(cfg(source=str(tmp_path / "one_line.txt"), val_fraction=0.0), "train")
    assert [d.name for d in docs] == [f"one_line.txt#{i}" for i in range(4)]
    assert "".join(d.text for d in docs) == text
    # cut once no newline came for a further piece: at PIECE_BYTES, backed off to a character start;
    # the rest (shorter than two pieces) is the last piece
    assert [len(d.text.encode()) for d in docs] == [PIECE_BYTES - 1, PIECE_BYTES, PIECE_BYTES, PIECE_BYTES + 2]


def test_text_file_of_one_piece_keeps_its_name(tmp_path):
    small = "line\n" * (PIECE_BYTES // 5 - 1)
    one_long_line = "y" * (PIECE_BYTES + 100) + "\n"  # past the size, but its only newline ends the file
    (tmp_path / "small.txt").write_text(small)
    (tmp_path / "wide.txt").write_text(one_long_line)
    docs = load_documents(cfg(source=str(tmp_path), val_fraction=0.0), "train")
    assert docs == [Document("small.txt", small), Document("wide.txt", one_long_line)]


def test_non_utf8_text_file_names_file_and_byte_offset(tmp_path):
    data = b"plain ascii line\n" * 5000 + b"caf\xe9 au lait\n"  # the bad byte is past the first piece
    (tmp_path / "latin1.txt").write_bytes(data)
    message = load_error(cfg(source=str(tmp_path / "latin1.txt")))
    assert f"latin1.txt is not valid UTF-8 (byte 0xe9 at offset {data.index(bytes([0xE9]))})" in message
    assert "re-encode it as UTF-8" in message and "data.malformed_lines=skip" in message
    (tmp_path / "latin1.txt").write_bytes("na\u00efve".encode("latin-1"))
    assert "latin1.txt is not valid UTF-8 (byte 0xef at offset 2)" in load_error(cfg(source=str(tmp_path)))


def test_malformed_lines_skip_drops_non_utf8_text_pieces_with_one_warning(tmp_path, capsys):
    (tmp_path / "good.txt").write_text("fine text\n")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 ok \xff")
    big = b"ok\n" * (3 * PIECE_BYTES // 3)  # three pieces; spoil one byte of the middle one
    big = big[:PIECE_BYTES + 10] + b"\xff" + big[PIECE_BYTES + 11:]
    (tmp_path / "big.txt").write_bytes(big)
    config = cfg(source=str(tmp_path), val_fraction=0.0, malformed_lines="skip")
    docs = load_documents(config, "train")
    assert [d.name for d in docs] == ["big.txt#0", "big.txt#2", "good.txt"]
    assert load_documents(config, "train") == docs
    err = capsys.readouterr().err
    assert err.count("skipped 1 non-UTF-8 piece(s) of") == 2 and "latin1.txt" in err
    assert f"big.txt is not valid UTF-8 (byte 0xff at offset {PIECE_BYTES + 10})" in err


def test_jsonl_utf8_error_gives_line_and_file_offset(tmp_path):
    data = b'{"text": "fine"}\n' * 3 + b'{"text": "caf\xe9"}\n'
    (tmp_path / "bad.jsonl").write_bytes(data)
    message = load_error(cfg(source=str(tmp_path / "bad.jsonl")))
    offset = data.index(bytes([0xE9]))
    assert f"bad.jsonl:4 is not valid UTF-8 (byte 0xe9 at column 14, file offset {offset})" in message


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


def test_a_lone_surrogate_escape_is_a_malformed_line(tmp_path):
    """``"\\ud83d"`` (half an emoji, common in scraped text) is valid JSON but no text a tokenizer can take."""
    path = tmp_path / "cut.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "half an emoji \\ud83d"}\n')
    message = load_error(cfg(source=str(path)))
    assert "cut.jsonl:2" in message and "lone surrogate" in message
    assert [d.text for d in load_documents(cfg(source=str(path), malformed_lines="skip"), "train")] == ["fine"]


def test_an_hf_source_that_cannot_be_read_is_one_line(tmp_path):
    pytest.importorskip("datasets")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.jsonl").write_text('{"text": "ok"}\n{oops\n')
    assert "cannot be loaded" in load_error(cfg(source=f"hf:{tmp_path / 'broken'}", source_split="train",
                                                 val_fraction=0.0))


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


def test_empty_split_suggests_val_fraction_only_where_it_helps(tmp_path):
    (tmp_path / "one.txt").write_text("only document")
    message = load_error(cfg(source=str(tmp_path), val_fraction=0.0), "validation")
    assert "raise data.val_fraction" not in message and "no data.val_fraction gives both splits" in message
    (tmp_path / "two.txt").write_text("second document")
    for split, start in (("validation", 0.0), ("train", 0.999)):
        message = load_error(cfg(source=str(tmp_path), val_fraction=start), split)
        value = float(message.split("data.val_fraction to ")[1].split()[0])
        fixed = cfg(source=str(tmp_path), val_fraction=value)
        assert load_documents(fixed, "train") and load_documents(fixed, "validation")  # the suggestion works


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
