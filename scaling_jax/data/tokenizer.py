"""Tokenizers with the special ids every objective needs reserved from the start.

One interface for three kinds: the byte-level default (no files, no download), SentencePiece
``.model`` files and Hugging Face ``tokenizers`` JSON files. Every kind owns pad/bos/eos, the UL2
mode tokens and at least 100 sentinels, so a causal checkpoint can later be continued with UL2
span corruption without resizing the embedding.

Layout of ``ByteTokenizer`` (vocab 384, a multiple of 128 for TPU-friendly shapes)::

    0 pad   1 bos   2 eos   3..258 bytes 0..255   259 [NLU]   260 [NLG]   261 [S2S]
    262..383 sentinels, numbered downward from the top as in T5 (sentinel 0 = id 383)

A file tokenizer uses the special pieces it already has (``<pad> <s> </s>``, ``[NLU] [NLG] [S2S]``,
``<extra_id_K>``); whatever is missing is appended above its own ids: first the missing sentinels
(sentinel 0 highest, so a T5 SentencePiece model gets exactly seqio's ``extra_ids`` numbering),
then pad/bos/eos, then the mode tokens. The id count is padded up to a multiple of 128. Tokenizers
trained by ``train_tokenizer`` hold every special in the file itself. Special tokens are never
produced from raw text: the literal string ``<extra_id_0>`` in a document is ordinary text.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from scaling_jax import paths
from scaling_jax.config import BYTE_VOCAB, Config, ModelConfig, byte_vocab, check_vocab_holds
from scaling_jax.data.vocab import (  # noqa: F401  (the layout's names are also read from here)
    MODE_TOKENS,
    NUM_SENTINELS,
    SAVED_INFO,
    SPECIAL_NAMES,
    TRAINED_SPECIALS,
    VOCAB_MULTIPLE,
    ReservedIds,
    Tokenizer,
    _piece_bytes,
    read_saved_info,
    reserve_specials,
    sentencepiece_bytes,
    sentinel_piece,
    write_saved_info,
)
from scaling_jax.errors import ConfigError, DataError


class ByteTokenizer:
    """UTF-8 bytes shifted past three special ids; mode tokens and sentinels at the top."""

    kind = "byte"
    byte_offset = 3
    pad_id, bos_id, eos_id = 0, 1, 2

    def __init__(self, vocab_size: int = BYTE_VOCAB):
        first_free = self.byte_offset + 256 + len(MODE_TOKENS)
        if vocab_size < first_free + 100:
            raise ConfigError(f"byte tokenizer needs vocab_size >= {first_free + 100} to reserve 100 sentinels")
        self.vocab_size = vocab_size
        self.mode_ids = {tok: self.byte_offset + 256 + i for i, tok in enumerate(MODE_TOKENS)}
        self.num_sentinels = vocab_size - first_free

    def encode(self, text: str) -> np.ndarray:
        raw = np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8)
        return raw.astype(np.int32) + self.byte_offset

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        ids = np.asarray(ids, dtype=np.int64)
        keep = ids[(ids >= self.byte_offset) & (ids < self.byte_offset + 256)]
        return (keep - self.byte_offset).astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def sentinel_id(self, k: int) -> int:
        if not 0 <= k < self.num_sentinels:
            raise ValueError(f"sentinel {k} out of range [0, {self.num_sentinels})")
        return self.vocab_size - 1 - k

    def token_byte_lengths(self) -> np.ndarray:
        """Bytes of text each id stands for (0 for specials): turns nats/token into bits/byte."""
        lengths = np.zeros(self.vocab_size, dtype=np.int32)
        lengths[self.byte_offset : self.byte_offset + 256] = 1
        return lengths

    def fingerprint(self) -> str:
        return hashlib.sha256(f"byte:{self.vocab_size}".encode()).hexdigest()[:16]

    def save(self, directory: str) -> str:
        """Nothing to copy: the spec is the whole tokenizer."""
        write_saved_info(directory, self, f"byte:{self.vocab_size}")
        return f"byte:{self.vocab_size}"


# ----------------------------------------------------------------------------- file tokenizers


class _FileTokenizer(ReservedIds):
    """A tokenizer defined by one file, which ``save`` copies."""

    file_name = ""

    def __init__(self, path: str, base_size: int, lookup: Callable[[str], int | None], known: dict[str, int | None]):
        self.path = path
        with open(path, "rb") as f:
            super().__init__(f.read(), base_size, lookup, known)

    def save(self, directory: str) -> str:
        """Copy the file into ``directory`` and return the spec that loads the copy."""
        os.makedirs(directory, exist_ok=True)
        target = os.path.join(directory, self.file_name)
        if os.path.abspath(target) != os.path.abspath(self.path):
            shutil.copyfile(self.path, target)
        write_saved_info(directory, self, self.file_name)
        return target


class SentencePieceTokenizer(_FileTokenizer):
    kind = "sentencepiece"
    file_name = "tokenizer.model"

    def __init__(self, path: str):
        import sentencepiece as spm

        try:
            self.sp = spm.SentencePieceProcessor(model_file=path)
        except (OSError, RuntimeError) as e:
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"data.tokenizer='{path}' is not a readable SentencePiece model ({why}); "
                              "pass a .model file") from None
        sp = self.sp
        size = sp.get_piece_size()

        def lookup(piece: str) -> int | None:
            i = sp.piece_to_id(piece)
            return i if (i != sp.unk_id() or piece == sp.id_to_piece(sp.unk_id())) and i < size else None

        known = {name: (i if 0 <= i < size else None) for name, i in
                 (("pad", sp.pad_id()), ("bos", sp.bos_id()), ("eos", sp.eos_id()))}
        super().__init__(path, size, lookup, known)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.sp.encode(text), dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=np.int32) for ids in self.sp.encode(list(texts))]

    def decode(self, ids) -> str:
        return self.sp.decode(self._text_ids(ids))

    def token_byte_lengths(self) -> np.ndarray:
        return self._lengths(lambda i: sentencepiece_bytes(self.sp, i))


class HFTokenizer(_FileTokenizer):
    kind = "hf"
    file_name = "tokenizer.json"

    def __init__(self, path: str):
        from tokenizers import Tokenizer as HFTok

        try:
            self.tok = HFTok.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise ConfigError(f"data.tokenizer='{path}' is not a readable Hugging Face tokenizer.json "
                              f"({str(e).splitlines()[0][:120]}); pass a tokenizers JSON file") from None
        self.tok.encode_special_tokens = True  # raw text never turns into special ids
        size = self.tok.get_vocab_size(with_added_tokens=True)
        super().__init__(path, size, self.tok.token_to_id, {})
        spec = json.loads(self.tok.to_str())
        self._byte_level = "ByteLevel" in json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])
        self._added = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        out = self.tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in out]

    def decode(self, ids) -> str:
        return self.tok.decode(self._text_ids(ids), skip_special_tokens=True)

    def token_byte_lengths(self) -> np.ndarray:
        def piece_bytes(i: int) -> int:
            piece = self.tok.id_to_token(i)
            if piece is None or i in self._added:
                return 0
            return len(piece) if self._byte_level else _piece_bytes(piece)  # byte-level: one char per byte

        return self._lengths(piece_bytes)


# ----------------------------------------------------------------------------- building


def build_tokenizer(spec: str, seqio_modules: Sequence[str] = ()) -> Tokenizer:
    """``byte`` / ``byte:VOCAB`` (default), a SentencePiece ``.model``, a ``tokenizer.json``, a directory
    holding one of those (a run's ``tokenizer/``), an explicit ``sentencepiece:PATH`` / ``hf:PATH``, or
    ``seqio:TASK[:FEATURE]``: the vocabulary of a registered seqio task's output feature (``targets``),
    after importing ``seqio_modules`` (needs the ``seqio`` extra)."""
    kind, sep, arg = spec.partition(":")
    if kind == "seqio" and arg:
        from scaling_jax.data.seqio_adapter import vocabulary_tokenizer  # TensorFlow only on this path

        name, _, feature = arg.partition(":")
        return vocabulary_tokenizer(name, feature or "targets", seqio_modules)
    if kind == "byte":
        return ByteTokenizer(byte_vocab(spec))
    if kind in ("sentencepiece", "hf") and sep:
        path = os.path.expanduser(arg)
    else:
        kind, path = "", os.path.expanduser(spec)
    if os.path.isdir(path):
        return load_saved_tokenizer(path)
    if not os.path.isfile(path):
        raise ConfigError(f"data.tokenizer='{spec}' is neither 'byte' nor an existing tokenizer file; pass 'byte', "
                          "a SentencePiece .model, a Hugging Face tokenizer.json, or train one with "
                          "'scaling-jax tokenizer train'")
    if not kind:
        kind = "hf" if path.endswith(".json") else "sentencepiece"
    return HFTokenizer(path) if kind == "hf" else SentencePieceTokenizer(path)


def resolve_vocab(model: ModelConfig, tokenizer: Tokenizer, spec: str) -> None:
    """``model.vocab_size=0`` becomes the tokenizer's size; an explicit size must hold the ids text can produce.

    Byte tokenizers were resolved when the config was parsed; every other kind is resolved here, where the
    tokenizer is built anyway, so parsing a config never reads a tokenizer file or imports seqio."""
    text_ids = [i for i, n in enumerate(tokenizer.token_byte_lengths()) if n > 0]
    needed = max([tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, *text_ids[-1:]]) + 1
    if model.vocab_size == 0:
        model.vocab_size = tokenizer.vocab_size
    elif not spec.startswith("seqio:"):
        check_vocab_holds(model.vocab_size, needed, tokenizer.vocab_size, spec)


def resolved_config(config: Config) -> Config:
    """``config`` with ``model.vocab_size`` filled (building the tokenizer only if the size is still unknown)."""
    if config.model.vocab_size == 0:
        d = config.data
        resolve_vocab(config.model, build_tokenizer(d.tokenizer, d.seqio_modules), d.tokenizer)
    return config


def load_saved_tokenizer(directory: str) -> Tokenizer:
    """The tokenizer a run (or ``data prepare``) saved with ``Tokenizer.save``."""
    info = read_saved_info(directory)
    if info is None:
        raise ConfigError(f"'{directory}' holds no saved tokenizer ({SAVED_INFO} missing); pass a tokenizer file")
    file_kind = info["kind"] in (SentencePieceTokenizer.kind, HFTokenizer.kind)
    spec = os.path.join(directory, info["spec"]) if file_kind else info["spec"]
    return build_tokenizer(spec)


# ----------------------------------------------------------------------------- training


def _reserved_pieces() -> list[str]:
    return [*MODE_TOKENS, *(sentinel_piece(k) for k in range(NUM_SENTINELS))]


def _lines(texts: Iterable[str], max_bytes: int = 4096) -> Iterable[str]:
    """SentencePiece trains on "sentences" of at most a few kB: feed it lines, long ones cut."""
    for text in texts:
        for line in text.split("\n"):
            for start in range(0, len(line), max_bytes // 4):
                yield line[start : start + max_bytes // 4]


def train_tokenizer(texts: Iterable[str], output: str, vocab_size: int, kind: str = "bpe",
                    library: str = "", max_sentences: int = 2_000_000) -> Tokenizer:
    """Train a ``bpe`` or ``unigram`` tokenizer on ``texts`` and write it to ``output``.

    ``library`` is ``tokenizers`` (Hugging Face byte-level BPE; writes ``tokenizer.json``) or
    ``sentencepiece`` (BPE or unigram with byte fallback; writes ``.model``); empty picks
    ``tokenizers`` for BPE and ``sentencepiece`` for unigram. Both are lossless on any text.
    The vocabulary holds pad/bos/eos, the mode tokens and 100 sentinels, counted in ``vocab_size``.
    """
    if kind not in ("bpe", "unigram"):
        raise ConfigError(f"--kind {kind} is not one of bpe, unigram")
    library = library or ("tokenizers" if kind == "bpe" else "sentencepiece")
    if library not in ("tokenizers", "sentencepiece"):
        raise ConfigError(f"--library {library} is not one of tokenizers, sentencepiece")
    if library == "tokenizers" and kind != "bpe":
        raise ConfigError("--library tokenizers trains byte-level BPE only; use --library sentencepiece for unigram")
    specials = len(TRAINED_SPECIALS) + len(_reserved_pieces())
    if vocab_size < specials + 256 + 16:
        raise ConfigError(f"--vocab-size {vocab_size} is too small: {specials} ids are reserved and the 256 "
                          f"bytes need their own; use at least {specials + 272}")
    if os.path.lexists(output):
        raise DataError(f"--output '{output}' already exists; name a new file (runs may use the old tokenizer, so "
                        "it is never replaced)")
    if output.endswith(".json") != (library == "tokenizers"):  # data.tokenizer=PATH picks the reader by suffix
        suffix = ".json (a Hugging Face tokenizer.json)" if library == "tokenizers" else ".model (SentencePiece)"
        raise ConfigError(f"--output '{output}': --library {library} writes a {suffix} file; name it so, or "
                          "data.tokenizer=PATH would not read it back")
    out_dir = os.path.dirname(os.path.abspath(output))
    os.makedirs(out_dir, exist_ok=True)
    # a private temporary name: no half-written tokenizer on failure, and no user file named OUTPUT.tmp touched
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".tmp-", suffix=os.path.basename(output))
    os.close(fd)
    os.chmod(tmp, 0o666 & ~paths.umask())  # mkstemp's 0600 would make a team's tokenizer private to its trainer
    try:
        if library == "tokenizers":
            _train_hf(texts, tmp, vocab_size)
        else:
            _train_sentencepiece(texts, tmp, vocab_size, kind, max_sentences)
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return HFTokenizer(output) if library == "tokenizers" else SentencePieceTokenizer(output)


def _train_hf(texts: Iterable[str], path: str, vocab_size: int) -> None:
    """Byte-level BPE (GPT-2 / Llama 3 style): every byte is in the alphabet, so nothing is unknown."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    reserved = [*TRAINED_SPECIALS, *_reserved_pieces()]
    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=reserved, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    if tok.get_vocab_size() < len(reserved) + 16:
        raise DataError("the corpus is too small to train a tokenizer; point --corpus at more text")
    tok.save(path)


def _train_sentencepiece(texts: Iterable[str], path: str, vocab_size: int, kind: str, max_sentences: int) -> None:
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(_lines(texts)), model_writer=model, vocab_size=vocab_size, model_type=kind,
            pad_id=0, bos_id=1, eos_id=2, unk_id=3, control_symbols=_reserved_pieces(), user_defined_symbols=["\n"],
            byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True, character_coverage=0.9999,
            input_sentence_size=max_sentences, shuffle_input_sentence=True, num_threads=os.cpu_count() or 1,
            minloglevel=2)
    except RuntimeError as e:  # e.g. "Vocabulary size too high (32000). Please set it to a value <= 5123."
        raise DataError(f"sentencepiece could not train: {str(e).splitlines()[-1].strip()}; "
                        "change --vocab-size to fit that limit or train on a larger --corpus") from None
    with open(path, "wb") as f:
        f.write(model.getvalue())
