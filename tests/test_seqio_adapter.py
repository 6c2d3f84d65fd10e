"""A small in-memory seqio Task and Mixture fed into our pipeline: their preprocessors, output features
and vocabulary are respected, and our packing and objectives apply after (needs the seqio extra).

seqio (and TensorFlow) are imported by the fixtures, not at collection, so the rest of the suite
never loads TensorFlow; without seqio every test here is skipped.
"""

import functools

import numpy as np
import pytest
import sentencepiece as spm

from scaling_jax.config import load_config
from scaling_jax.data import seqio_adapter
from scaling_jax.data.tokenizer import SentencePieceTokenizer, build_tokenizer, resolved_config
from scaling_jax.errors import DataError
from scaling_jax.objectives.base import build_objective
from scaling_jax.train.session import DataBundle

TEXTS = {
    "seqio_test_code": [f"def f{i}(x):\n    return x * {i}  # héllo" for i in range(60)],
    "seqio_test_prose": [f"the {i}th sentence of plain prose, twice: {i}" for i in range(30)],
}


@pytest.fixture(scope="module")
def seqio():
    return pytest.importorskip("seqio")


@pytest.fixture(scope="module")
def registered(seqio):
    tf = pytest.importorskip("tensorflow")

    def shout(ds):
        """A preprocessor of the task's own: the documents we get must have gone through it."""
        return ds.map(lambda ex: {**ex, "targets": tf.strings.upper(ex["targets"])})

    vocab = seqio.ByteVocabulary(extra_ids=100)
    for name, texts in TEXTS.items():
        def dataset_fn(split, shuffle_files, seed=None, texts=texts):
            return tf.data.Dataset.from_tensor_slices({"text": texts})

        seqio.TaskRegistry.add(
            name, source=seqio.FunctionDataSource(dataset_fn, splits=["train"]),
            preprocessors=[functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}), shout,
                           seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
            output_features={"targets": seqio.Feature(vocab, add_eos=True)})
    seqio.MixtureRegistry.add("seqio_test_mix", [("seqio_test_code", 2.0), ("seqio_test_prose", 1.0)])
    yield vocab
    seqio.MixtureRegistry.remove("seqio_test_mix")
    for name in TEXTS:
        seqio.TaskRegistry.remove(name)


def bundle(name: str, tokenizer: str | None = None):
    config = load_config(None, ["data.seq_len=32", "data.batch_size=4", "data.val_fraction=0.2",
                                f"data.source=seqio:{name}", f"data.tokenizer={tokenizer or 'seqio:' + name}"])
    return config, DataBundle(config, build_tokenizer(config.data.tokenizer))


def test_vocabulary_is_respected_with_specials_reserved_above_it(registered):
    tok = build_tokenizer("seqio:seqio_test_code")
    assert tok.base_size == registered.vocab_size == 359
    assert (tok.pad_id, tok.eos_id) == (registered.pad_id, registered.eos_id)
    assert [tok.sentinel_id(k) for k in (0, 99)] == [358, 259]  # seqio's extra_ids, sentinel 0 at the top
    assert tok.bos_id == 359 and sorted(tok.mode_ids.values()) == [360, 361, 362] and tok.vocab_size == 384
    text = "héllo ✓"
    np.testing.assert_array_equal(tok.encode(text), registered.encode(text))
    assert tok.decode(tok.encode(text)) == text
    assert tok.token_byte_lengths()[tok.encode(text)].sum() == len(text.encode())


def test_task_examples_become_documents_after_its_preprocessors(registered):
    config, data = bundle("seqio_test_code")
    tok = build_tokenizer("seqio:seqio_test_code")
    assert data.num_train_docs + data.num_val_docs == 60
    stream = np.concatenate([data.train_rows[i]["tokens"][:-1] for i in range(len(data.train_rows))])
    text = tok.decode(stream)
    assert "DEF F" in text and "HéLLO" in text and "def f" not in text  # the task's (ASCII) upper-casing ran
    docs = np.split(stream, np.flatnonzero(stream == tok.bos_id))[1:]
    assert all(d[0] == tok.bos_id and d[-1] == tok.eos_id and (d == tok.eos_id).sum() == 1
               for d in docs[:-1])  # the feature's EOS is the document end, not doubled
    assert 0 < data.baseline_bpb < 8


def test_mixture_gives_examples_of_every_task(registered, seqio):
    _, data = bundle("seqio_test_mix")
    tok = build_tokenizer("seqio:seqio_test_mix")
    mixture = seqio.get_mixture_or_task("seqio_test_mix")
    expected = len(list(mixture.get_dataset(None, "train", shuffle=False, num_epochs=1, seed=0).as_numpy_iterator()))
    assert data.num_train_docs + data.num_val_docs == expected  # seqio stops a finite mixture at its first empty task
    stream = np.concatenate([data.train_rows[i]["tokens"][:-1] for i in range(len(data.train_rows))])
    docs = [tok.decode(d) for d in np.split(stream, np.flatnonzero(stream == tok.bos_id))[1:-1]]  # last: cut
    code, prose = sum("RETURN X" in d for d in docs), sum("PLAIN PROSE" in d for d in docs)
    assert code + prose == len(docs) and 1.4 < code / prose < 2.8  # the mixture's 2:1 rates


def test_our_objectives_apply_after_seqio(registered):
    config, data = bundle("seqio_test_code")
    tok = build_tokenizer(config.data.tokenizer)
    rows = [data.train_rows[i] for i in range(4)]
    stacked = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    config.objective.name = "ul2"
    batch = build_objective(config.objective, tok).prepare(stacked)
    sentinels = {tok.sentinel_id(k) for k in range(tok.num_sentinels)}
    modes = set(tok.mode_ids.values())
    used = set(batch["inputs"].ravel().tolist())
    assert used & sentinels and used & modes and max(used) < tok.vocab_size


def test_a_different_tokenizer_is_refused_with_the_fix(registered):
    with pytest.raises(DataError) as e:
        bundle("seqio_test_code", tokenizer="byte")
    assert "data.tokenizer=seqio:seqio_test_code" in str(e.value) and "\n" not in str(e.value)


def test_unknown_task_and_feature_are_data_errors(registered):
    with pytest.raises(DataError, match="not registered"):
        seqio_adapter.get_provider("seqio_test_missing", [])
    with pytest.raises(DataError, match="seqio_feature"):
        seqio_adapter.vocabulary_tokenizer("seqio_test_code", "inputs")


def test_sentencepiece_vocabulary_matches_our_reading_of_the_same_model(tmp_path, seqio):
    """T5 setup: a SentencePiece model plus 100 extra_ids gives the same ids both ways."""
    lines = [f"line {i} of a small corpus with words" for i in range(200)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "t5"), vocab_size=50,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    path = str(tmp_path / "t5.model")
    theirs = seqio_adapter.VocabularyTokenizer(seqio.SentencePieceVocabulary(path, extra_ids=100), "seqio:t5")
    ours = SentencePieceTokenizer(path)
    for attr in ("pad_id", "eos_id", "bos_id", "mode_ids", "vocab_size", "num_sentinels"):
        assert getattr(theirs, attr) == getattr(ours, attr), attr
    assert [theirs.sentinel_id(k) for k in range(100)] == [ours.sentinel_id(k) for k in range(100)]
    np.testing.assert_array_equal(theirs.encode("line 7 of words"), ours.encode("line 7 of words"))
    np.testing.assert_array_equal(theirs.token_byte_lengths(), ours.token_byte_lengths())


def test_config_imports_the_modules_that_register_tasks(seqio, tmp_path, monkeypatch):
    """``data.seqio_modules`` is imported before the task is looked up, whoever builds the tokenizer first."""
    (tmp_path / "my_seqio_tasks.py").write_text(
        "import seqio, tensorflow as tf\n"
        "seqio.TaskRegistry.add('seqio_test_from_module', source=seqio.FunctionDataSource(\n"
        "    lambda split, shuffle_files, seed=None: tf.data.Dataset.from_tensor_slices({'targets': ['x y z'] * 40}),\n"
        "    splits=['train']), preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],\n"
        "    output_features={'targets': seqio.Feature(seqio.ByteVocabulary(extra_ids=100))})\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        name = "seqio:seqio_test_from_module"
        config = load_config(None, [f"data.source={name}", f"data.tokenizer={name}", "data.seq_len=16",
                                    "data.batch_size=2", "data.seqio_modules=[my_seqio_tasks]"])
        assert config.model.vocab_size == 0  # parsing a config builds no tokenizer (and imports no TensorFlow)
        assert resolved_config(config).model.vocab_size == 384
        data = DataBundle(config, build_tokenizer(config.data.tokenizer, config.data.seqio_modules))
        assert data.num_train_docs + data.num_val_docs == 40
    finally:
        seqio.TaskRegistry.remove("seqio_test_from_module")
