"""The reserved id layout every tokenizer shares: pad/bos/eos, the UL2 mode tokens and the sentinels.

Kept apart from the tokenizer implementations so adapters over other vocabularies (seqio's) build on it
without importing the tokenizers that can in turn dispatch to them. See ``tokenizer.py`` for the layout.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

MODE_TOKENS = ("[NLU]", "[NLG]", "[S2S]")  # UL2 paradigm tokens for R, X and S denoisers
NUM_SENTINELS = 100  # reserved by file tokenizers; T5 and UL2 use 100
SPECIAL_NAMES = {  # piece names looked up in a tokenizer file, first match wins
    "pad": ("<pad>", "[PAD]", "<|pad|>"),
    "bos": ("<s>", "<bos>", "[BOS]", "<|begin_of_text|>", "<|startoftext|>"),
    "eos": ("</s>", "<eos>", "[EOS]", "<|end_of_text|>", "<|endoftext|>"),
}
TRAINED_SPECIALS = ("<pad>", "<s>", "</s>")
VOCAB_MULTIPLE = 128
SAVED_INFO = "tokenizer_info.json"  # beside a saved tokenizer: how to load it, and its fingerprint


def sentinel_piece(k: int) -> str:
    return f"<extra_id_{k}>"


class Tokenizer(Protocol):
    kind: str
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    mode_ids: dict[str, int]
    num_sentinels: int

    def encode(self, text: str) -> np.ndarray: ...
    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]: ...
    def decode(self, ids) -> str: ...
    def sentinel_id(self, k: int) -> int: ...
    def token_byte_lengths(self) -> np.ndarray: ...
    def fingerprint(self) -> str: ...
    def save(self, directory: str) -> str: ...


def reserve_specials(lookup: Callable[[str], int | None], base_size: int, known: dict[str, int | None],
                     num_sentinels: int = NUM_SENTINELS) -> tuple[dict[str, int], list[int], int]:
    """Ids for pad/bos/eos, the mode tokens and the sentinels: the file's own where it has them,
    appended above ``base_size`` where it does not. Returns ``(specials, sentinel_ids, vocab_size)``."""
    sentinels: list[int | None] = [lookup(sentinel_piece(k)) for k in range(num_sentinels)]
    missing = [k for k, i in enumerate(sentinels) if i is None]
    next_id = base_size + len(missing)
    for rank, k in enumerate(missing):  # T5 order: the lowest missing sentinel gets the highest id
        sentinels[k] = next_id - 1 - rank
    specials: dict[str, int] = {}
    for name in ("pad", "bos", "eos"):
        found = known.get(name)
        if found is None:
            found = next((i for piece in SPECIAL_NAMES[name] if (i := lookup(piece)) is not None), None)
        if found is None:
            found, next_id = next_id, next_id + 1
        specials[name] = found
    for mode in MODE_TOKENS:
        found = lookup(mode)
        if found is None:
            found, next_id = next_id, next_id + 1
        specials[mode] = found
    vocab_size = -(-next_id // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    return specials, [int(s) for s in sentinels], vocab_size


class ReservedIds:
    """Shared bookkeeping of tokenizers over an existing vocabulary: special ids, appended ids, fingerprint.

    ``identity`` is the bytes that define the vocabulary (a model file's contents); the fingerprint
    hashes it together with the reserved layout.
    """

    kind = ""

    def __init__(self, identity: bytes, base_size: int, lookup: Callable[[str], int | None],
                 known: dict[str, int | None]):
        self.base_size = base_size
        specials, self._sentinels, self.vocab_size = reserve_specials(lookup, base_size, known)
        self.pad_id, self.bos_id, self.eos_id = specials["pad"], specials["bos"], specials["eos"]
        self.mode_ids = {m: specials[m] for m in MODE_TOKENS}
        self.num_sentinels = len(self._sentinels)
        digest = hashlib.sha256(identity)
        digest.update(json.dumps([self.kind, self.vocab_size, specials, self._sentinels]).encode())
        self._fingerprint = digest.hexdigest()[:16]
        self._special_ids = np.array(sorted({*specials.values(), *self._sentinels}), dtype=np.int64)

    def sentinel_id(self, k: int) -> int:
        if not 0 <= k < self.num_sentinels:
            raise ValueError(f"sentinel {k} out of range [0, {self.num_sentinels})")
        return self._sentinels[k]

    def fingerprint(self) -> str:
        return self._fingerprint

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def _text_ids(self, ids) -> list[int]:
        """The ids a decoder of the file understands: specials and appended ids are dropped."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        keep = (ids >= 0) & (ids < self.base_size) & ~np.isin(ids, self._special_ids)
        return ids[keep].tolist()

    def _lengths(self, piece_bytes: Callable[[int], int]) -> np.ndarray:
        lengths = np.zeros(self.vocab_size, dtype=np.int32)
        for i in range(self.base_size):
            lengths[i] = piece_bytes(i)
        lengths[self._special_ids[self._special_ids < self.vocab_size]] = 0
        return lengths


def _piece_bytes(piece: str) -> int:
    """Bytes of text behind a SentencePiece/WordPiece-style piece: ``▁`` is a space, ``<0xNN>`` one byte."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return 1
    if piece.startswith("##"):
        piece = piece[2:]
    return len(piece.replace("\u2581", " ").encode("utf-8"))


def sentencepiece_bytes(sp, i: int) -> int:
    """Bytes of text behind id ``i`` of a ``SentencePieceProcessor`` (0 for control and unknown ids)."""
    if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
        return 0
    return 1 if sp.is_byte(i) else _piece_bytes(sp.id_to_piece(i))


def write_saved_info(directory: str, tok: Tokenizer, spec: str) -> None:
    """``spec`` reloads the tokenizer: a file name inside ``directory`` for file kinds, else a full spec."""
    os.makedirs(directory, exist_ok=True)
    info = {"kind": tok.kind, "spec": spec, "fingerprint": tok.fingerprint(), "vocab_size": tok.vocab_size}
    tmp = os.path.join(directory, f"{SAVED_INFO}.tmp")
    with open(tmp, "w") as f:
        json.dump(info, f, indent=2)
    os.replace(tmp, os.path.join(directory, SAVED_INFO))


def read_saved_info(directory: str) -> dict | None:
    path = os.path.join(directory, SAVED_INFO)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)
