"""Tokenizers with the special ids every objective needs reserved from the start.

The byte-level tokenizer is the embedded default: no files, no download. Its id layout
reserves pad/bos/eos, the UL2 mode tokens and well over 100 sentinels, so a causal
checkpoint can later be continued with UL2 span corruption without resizing the embedding.

Layout of ``ByteTokenizer`` (vocab 384, a multiple of 128 for TPU-friendly shapes)::

    0 pad   1 bos   2 eos   3..258 bytes 0..255   259 [NLU]   260 [NLG]   261 [S2S]
    262..383 sentinels, numbered downward from the top as in T5 (sentinel 0 = id 383)
"""

from __future__ import annotations

import hashlib
from typing import Protocol

import numpy as np

from scaling_jax.errors import ConfigError

MODE_TOKENS = ("[NLU]", "[NLG]", "[S2S]")  # UL2 paradigm tokens for R, X and S denoisers


class Tokenizer(Protocol):
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    mode_ids: dict[str, int]
    num_sentinels: int

    def encode(self, text: str) -> np.ndarray: ...
    def decode(self, ids) -> str: ...
    def sentinel_id(self, k: int) -> int: ...
    def token_byte_lengths(self) -> np.ndarray: ...
    def fingerprint(self) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes shifted past three special ids; mode tokens and sentinels at the top."""

    byte_offset = 3
    pad_id, bos_id, eos_id = 0, 1, 2

    def __init__(self, vocab_size: int = 384):
        first_free = self.byte_offset + 256 + len(MODE_TOKENS)
        if vocab_size < first_free + 100:
            raise ConfigError(f"byte tokenizer needs vocab_size >= {first_free + 100} to reserve 100 sentinels")
        self.vocab_size = vocab_size
        self.mode_ids = {tok: self.byte_offset + 256 + i for i, tok in enumerate(MODE_TOKENS)}
        self.num_sentinels = vocab_size - first_free

    def encode(self, text: str) -> np.ndarray:
        raw = np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8)
        return raw.astype(np.int32) + self.byte_offset

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


def build_tokenizer(spec: str) -> Tokenizer:
    """``byte`` (default) or ``byte:VOCAB``; file-backed tokenizers plug in here."""
    kind, _, arg = spec.partition(":")
    if kind == "byte":
        try:
            return ByteTokenizer(int(arg) if arg else 384)
        except ValueError:
            raise ConfigError(f"data.tokenizer='{spec}': write 'byte' or 'byte:VOCAB_SIZE'") from None
    raise ConfigError(f"data.tokenizer='{spec}' is not a known tokenizer; use 'byte'")
