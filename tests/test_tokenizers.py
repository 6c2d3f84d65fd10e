"""Tokenizers of every kind: lossless round trips, reserved special ids, byte accounting, fingerprints,
training, files without specials, and the tokenizer travelling with a run."""

import json
import os

import numpy as np
import pytest
import sentencepiece as spm
from tokenizers import Tokenizer as HFTok
from tokenizers import models, pre_tokenizers

from scaling_jax.cli import main
from scaling_jax.data import sources
from scaling_jax.data.tokenizer import (
    MODE_TOKENS,
    ByteTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    build_tokenizer,
    load_saved_tokenizer,
    train_tokenizer,
)
from scaling_jax.errors import CheckpointError, ConfigError, DataError
from scaling_jax.train.session import sync_run_tokenizer

TRICKY = ("def f(x):\n\tif x:  return  'héllo' + \"✓\"  # 中文 😀\n\n   spaces   \r\n"
          "literal specials stay text: <extra_id_0> [NLU] <pad> </s> <s>")


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    root = sources._stdlib_dir()
    return [(root / name).read_text() for name in ("json/decoder.py", "json/encoder.py", "textwrap.py", "shlex.py")]


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> dict:
    """One tokenizer of each trainable kind (512 or 1024 ids) trained on a few stdlib modules."""
    out = tmp_path_factory.mktemp("tok")
    return {
        "hf-bpe": train_tokenizer(corpus, str(out / "bpe.json"), 512, "bpe"),
        "sp-bpe": train_tokenizer(corpus, str(out / "bpe.model"), 1024, "bpe", "sentencepiece"),
        "sp-unigram": train_tokenizer(corpus, str(out / "uni.model"), 1024, "unigram"),
    }


@pytest.fixture(params=["byte", "hf-bpe", "sp-bpe", "sp-unigram"])
def tok(request, trained):
    return ByteTokenizer() if request.param == "byte" else trained[request.param]


def special_ids(tok) -> list[int]:
    return [tok.pad_id, tok.bos_id, tok.eos_id, *tok.mode_ids.values(),
            *(tok.sentinel_id(k) for k in range(tok.num_sentinels))]


def test_round_trip_is_lossless_for_every_kind(tok):
    for text in (TRICKY, "", " leading and trailing ", "x" * 3000):
        assert tok.decode(tok.encode(text)) == text
    batch = tok.encode_batch([TRICKY, "abc"])
    np.testing.assert_array_equal(batch[0], tok.encode(TRICKY))


def test_specials_are_distinct_reserved_and_never_produced_from_text(tok):
    ids = special_ids(tok)
    assert len(set(ids)) == len(ids) and tok.num_sentinels >= 100
    assert max(ids) < tok.vocab_size and min(ids) >= 0 and tok.vocab_size % 128 == 0
    assert set(tok.mode_ids) == set(MODE_TOKENS)
    encoded = tok.encode(TRICKY)
    assert not set(ids) & set(encoded.tolist())
    assert encoded.max() < tok.vocab_size
    assert tok.decode(np.array(ids)) == ""  # specials decode to nothing


def test_token_byte_lengths_count_exactly_the_text_bytes(tok):
    lengths = tok.token_byte_lengths()
    assert lengths.shape == (tok.vocab_size,)
    assert lengths[special_ids(tok)].sum() == 0
    for text in (TRICKY, "plain ascii words and more words"):
        assert lengths[tok.encode(text)].sum() == len(text.encode("utf-8"))


def test_trained_tokenizers_hold_specials_in_the_file_and_compress(trained, corpus):
    for tok in trained.values():
        assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
        assert tok.vocab_size == tok.base_size in (512, 1024)  # nothing appended
        assert len(corpus[0].encode()) / tok.encode(corpus[0]).size > 2.0  # beats bytes on its own corpus


def test_sentencepiece_file_without_specials_gets_t5_numbering(tmp_path, corpus):
    """A T5-style model (pad 0, eos 1, unk 2, no bos, no sentinels): sentinel k = 32099 - k in T5's case."""
    path = str(tmp_path / "t5like.model")
    spm.SentencePieceTrainer.train(sentence_iterator=iter("\n".join(corpus).split("\n")), model_prefix=path[:-6],
                                   vocab_size=300, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    tok = SentencePieceTokenizer(path)
    assert (tok.pad_id, tok.eos_id) == (0, 1)
    assert [tok.sentinel_id(k) for k in (0, 1, 99)] == [399, 398, 300]  # seqio extra_ids numbering
    assert tok.bos_id == 400 and list(tok.mode_ids.values()) == [401, 402, 403] and tok.vocab_size == 512
    text = "return self.decode(s)"
    assert tok.decode(tok.encode(text)) == tok.sp.decode(tok.sp.encode(text))


def test_hf_file_specials_found_by_name_and_missing_ones_appended(tmp_path):
    vocab = {"<unk>": 0, "<|begin_of_text|>": 1, "<|end_of_text|>": 2, "[S2S]": 3, "hello": 4, "world": 5}
    hf = HFTok(models.WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>", "[S2S]"])
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = build_tokenizer(str(tmp_path / "tokenizer.json"))
    assert isinstance(tok, HFTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.mode_ids["[S2S]"]) == (1, 2, 3)
    assert tok.sentinel_id(0) == 6 + 99 and tok.sentinel_id(99) == 6  # appended above the 6 ids
    assert tok.pad_id == 106 and (tok.mode_ids["[NLU]"], tok.mode_ids["[NLG]"]) == (107, 108)
    assert tok.encode("hello world").tolist() == [4, 5]
    assert tok.token_byte_lengths()[[1, 2, 3, 4, 106]].tolist() == [0, 0, 0, 5, 0]


def test_fingerprint_identifies_the_vocabulary(trained, tmp_path, corpus):
    assert ByteTokenizer().fingerprint() != ByteTokenizer(512).fingerprint()
    prints = {t.fingerprint() for t in trained.values()}
    assert len(prints) == len(trained)
    again = build_tokenizer(trained["sp-unigram"].path)
    assert again.fingerprint() == trained["sp-unigram"].fingerprint()
    other = train_tokenizer(corpus[:2], str(tmp_path / "other.json"), 512, "bpe")
    assert other.fingerprint() != trained["hf-bpe"].fingerprint()


def test_save_and_reload_from_a_directory(tok, tmp_path):
    tok.save(str(tmp_path / "saved"))
    loaded = build_tokenizer(str(tmp_path / "saved"))
    assert loaded.fingerprint() == tok.fingerprint() and loaded.kind == tok.kind
    np.testing.assert_array_equal(loaded.encode(TRICKY), tok.encode(TRICKY))
    assert load_saved_tokenizer(str(tmp_path / "saved")).vocab_size == tok.vocab_size


def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message and error.value.__cause__ is None
    return message


def test_bad_specs_and_files_are_one_line_config_errors(tmp_path):
    with pytest.raises(ConfigError) as e:
        build_tokenizer(str(tmp_path / "missing.model"))
    assert "scaling-jax tokenizer train" in one_line(e)
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(ConfigError) as e:
        build_tokenizer(str(tmp_path / "bad.model"))
    assert "SentencePiece" in one_line(e)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ConfigError) as e:
        build_tokenizer(str(tmp_path / "bad.json"))
    assert "tokenizer.json" in one_line(e)
    with pytest.raises(ConfigError) as e:
        build_tokenizer(str(tmp_path))
    assert "no saved tokenizer" in one_line(e)
    with pytest.raises(ConfigError):
        build_tokenizer("byte:abc")


def test_training_refuses_impossible_requests(tmp_path, corpus):
    with pytest.raises(ConfigError, match="--vocab-size"):
        train_tokenizer(corpus, str(tmp_path / "t.json"), 200, "bpe")
    with pytest.raises(ConfigError, match="unigram"):
        train_tokenizer(corpus, str(tmp_path / "t.json"), 1024, "unigram", "tokenizers")
    # data.tokenizer=PATH reads by suffix: a name the reader would take for the other format is refused
    with pytest.raises(ConfigError, match="writes a .model"):
        train_tokenizer(corpus, str(tmp_path / "t.json"), 1024, "unigram")
    with pytest.raises(ConfigError, match="writes a .json"):
        train_tokenizer(corpus, str(tmp_path / "t.model"), 1024, "bpe")
    with pytest.raises(DataError) as e:
        train_tokenizer(["tiny corpus"], str(tmp_path / "t.model"), 4000, "unigram")
    assert "--vocab-size" in one_line(e)
    assert not os.listdir(tmp_path)  # nothing half-written


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_cli_trains_on_a_jsonl_source(tmp_path, capsys, corpus):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"body": t}) + "\n" for t in corpus * 3))
    out = tmp_path / "tok" / "my.json"
    code = main(["tokenizer", "train", "--corpus", str(data), "--output", str(out), "--vocab-size", "512",
                 "--kind", "bpe", "data.text_field=body", "data.val_fraction=0"])
    assert code == 0 and out.is_file()
    assert f"data.tokenizer={out}" in capsys.readouterr().out
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # readable by the team, as a plain file is
    mixture = tmp_path / "mix.yaml"  # a mixture's sources are not data.source: the user names the corpus
    mixture.write_text(f"data:\n  mixture:\n    - {{source: {data}, weight: 1.0}}\n")
    assert main(["tokenizer", "train", "--config", str(mixture), "--output", str(tmp_path / "m.json"),
                 "--vocab-size", "512"]) == 2
    assert "pass --corpus" in capsys.readouterr().err and not (tmp_path / "m.json").exists()
    assert build_tokenizer(str(out)).decode(build_tokenizer(str(out)).encode(TRICKY)) == TRICKY


def test_tokenizer_travels_with_the_run_and_a_mismatch_on_resume_is_an_error(tmp_path, trained):
    run = tmp_path / "run"
    run.mkdir()
    sync_run_tokenizer(str(run), trained["hf-bpe"], "bpe.json")
    assert build_tokenizer(str(run / "tokenizer")).fingerprint() == trained["hf-bpe"].fingerprint()
    sync_run_tokenizer(str(run), ByteTokenizer(), "byte")  # no checkpoint yet: the new one replaces it
    assert build_tokenizer(str(run / "tokenizer")).kind == "byte"
    (run / "checkpoints" / "5").mkdir(parents=True)
    sync_run_tokenizer(str(run), ByteTokenizer(), "byte")  # same tokenizer: fine
    with pytest.raises(CheckpointError) as e:
        sync_run_tokenizer(str(run), trained["sp-bpe"], "bpe.model")
    message = one_line(e)
    assert "another tokenizer" in message and f"data.tokenizer={run / 'tokenizer'}" in message
