"""A registered seqio Task or Mixture as a data source (optional extra: ``pip install -e ".[seqio]"``).

seqio does what it does for T5X users: reads its source, runs the task's preprocessors and
tokenizes with the output feature's vocabulary. What comes out of ``get_dataset`` — the token ids
of one output feature (``data.seqio_feature``, default ``targets``) per example — becomes one
document of our pipeline, which then packs, shuffles and applies our objective as for any source.
A trailing EOS added by the feature (``add_eos``) is the document end our packing writes anyway,
so it is not doubled.

The vocabulary is respected, not re-encoded: ``data.tokenizer=seqio:TASK`` wraps the feature's
``seqio.Vocabulary`` as our tokenizer (its pad/eos, its ``extra_ids`` as sentinels — sentinel k
is id ``vocab_size - 1 - k`` as in seqio — and bos, mode tokens and missing sentinels appended
above it). Any other ``data.tokenizer`` must be that same vocabulary, or loading fails with the fix.

This is the only module that imports seqio (and with it TensorFlow).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import numpy as np

from scaling_jax.config import DataConfig
from scaling_jax.data.sources import is_validation
from scaling_jax.data.vocab import ReservedIds, Tokenizer, sentencepiece_bytes, sentinel_piece, write_saved_info
from scaling_jax.errors import ConfigError, DataError


def _seqio():
    try:
        import seqio
    except ImportError:
        raise ConfigError("seqio sources need the seqio extra: pip install -e \".[seqio]\"") from None
    return seqio


def get_provider(name: str, modules: Sequence[str]):
    """The registered Task or Mixture ``name``, after importing the modules that register it."""
    seqio = _seqio()
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ConfigError(f"data.seqio_modules entry '{module}' cannot be imported ({e}); "
                              "list importable modules that register your tasks") from None
    try:
        return seqio.get_mixture_or_task(name)
    except ValueError:
        raise DataError(f"seqio task or mixture '{name}' is not registered; add the module that registers it "
                        "to data.seqio_modules") from None


def _feature(provider, feature: str):
    features = provider.output_features
    if feature not in features:
        raise DataError(f"seqio '{provider.name}' has no output feature '{feature}' (features: "
                        f"{', '.join(features)}); set data.seqio_feature")
    return features[feature]


class VocabularyTokenizer(ReservedIds):
    """A ``seqio.Vocabulary`` seen through our tokenizer interface (same ids, specials reserved)."""

    kind = "seqio"

    def __init__(self, vocab, spec: str):
        self.vocab, self.spec = vocab, spec
        base = int(vocab.vocab_size)
        extra = int(getattr(vocab, "extra_ids", 0) or 0)
        sentinels = {sentinel_piece(k): base - 1 - k for k in range(extra)}
        bos = getattr(vocab, "bos_id", None)
        usable_bos = bos if isinstance(bos, int) and 0 <= bos < base and bos not in (vocab.pad_id, vocab.eos_id) \
            else None
        self._sp = getattr(vocab, "tokenizer", None) if hasattr(vocab, "sentencepiece_model_file") else None
        identity = [type(vocab).__name__, base, extra, vocab.pad_id, vocab.eos_id]
        model = self._sp.serialized_model_proto() if self._sp is not None else b""
        super().__init__(repr(identity).encode() + model, base, sentinels.get,
                         {"pad": vocab.pad_id, "eos": vocab.eos_id, "bos": usable_bos})

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.vocab.encode(text), dtype=np.int32)

    def decode(self, ids) -> str:
        return self.vocab.decode(self._text_ids(ids))

    def token_byte_lengths(self) -> np.ndarray:
        if self._sp is not None:
            return self._lengths(lambda i: sentencepiece_bytes(self._sp, i))
        if isinstance(self.vocab, _seqio().ByteVocabulary):  # pad, eos, unk, then the 256 bytes
            return self._lengths(lambda i: int(3 <= i < 259))
        return self._lengths(lambda i: len(self.vocab.decode([i]).encode("utf-8")))

    def save(self, directory: str) -> str:
        write_saved_info(directory, self, self.spec)
        return self.spec


def vocabulary_tokenizer(name: str, feature: str = "targets", modules: Sequence[str] = ()) -> VocabularyTokenizer:
    """Our tokenizer for the vocabulary of ``feature`` of the registered task or mixture ``name``."""
    provider = get_provider(name, modules)
    spec = f"seqio:{name}" + (f":{feature}" if feature != "targets" else "")
    return VocabularyTokenizer(_feature(provider, feature).vocabulary, spec)


def seqio_documents(cfg: DataConfig, tokenizer: Tokenizer) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Token ids of ``cfg.seqio_feature`` per example of ``cfg.source`` (``seqio:NAME``), split into
    train/validation by a stable hash of ``NAME:SPLIT#INDEX`` (as file documents are split by name)."""
    name = cfg.source[len("seqio:"):]
    provider = get_provider(name, cfg.seqio_modules)
    theirs = VocabularyTokenizer(_feature(provider, cfg.seqio_feature).vocabulary, f"seqio:{name}")
    if theirs.fingerprint() != tokenizer.fingerprint():
        raise DataError(f"seqio '{name}' feature '{cfg.seqio_feature}' uses its own vocabulary "
                        f"({type(theirs.vocab).__name__}, {theirs.base_size} ids), not data.tokenizer; "
                        f"set data.tokenizer=seqio:{name}")
    try:
        ds = provider.get_dataset(sequence_length=None, split=cfg.source_split, shuffle=False, num_epochs=1,
                                  seed=cfg.shuffle_seed, use_cached=False, trim_output_features=False)
    except (ValueError, KeyError) as e:
        raise DataError(f"seqio '{name}' cannot give split '{cfg.source_split}' ({str(e).splitlines()[0][:160]}); "
                        "set data.source_split") from None
    splits: dict[bool, list[np.ndarray]] = {False: [], True: []}
    for index, example in enumerate(ds.as_numpy_iterator()):
        ids = np.asarray(example[cfg.seqio_feature], dtype=np.int32).reshape(-1)
        if ids.size and ids[-1] == tokenizer.eos_id:
            ids = ids[:-1]  # packing writes the document end itself
        if not ids.size:
            continue
        held_out = is_validation(f"{name}:{cfg.source_split}#{index}", cfg.val_fraction)
        if not cfg.max_docs or len(splits[held_out]) < cfg.max_docs:
            splits[held_out].append(ids)
    for held_out, docs in splits.items():
        if not docs:
            which = "validation" if held_out else "train"
            raise DataError(f"seqio '{name}' split '{cfg.source_split}' gives no {which} examples "
                            f"(data.val_fraction={cfg.val_fraction}); change data.val_fraction or the task")
    return splits[False], splits[True]

