"""A T5X model's seqio ``SentencePieceVocabulary`` as one of our tokenizers, extra ids included.

seqio appends ``extra_ids`` pieces after the SentencePiece model's own ids, in reverse (``<extra_id_0>`` gets
the highest id, as span corruption expects), so with ``N`` extra ids sentinel ``k`` is id ``size + N - 1 - k``.
Our tokenizers find sentinels as ``<extra_id_K>`` pieces of the file and append the missing ones above it
(``data/vocab.py``): exactly seqio's numbering when N is 100, and not otherwise. So the run's tokenizer is the
model file with the N extra-id pieces added where seqio puts them; ids from there on (the rest of our 100
sentinels, bos, the UL2 mode tokens) come after. The pieces are CONTROL pieces, so, as everywhere in our
tokenizers, the text ``<extra_id_0>`` is never turned into the sentinel (seqio's USER_DEFINED pieces would).
"""

from __future__ import annotations

import os

from scaling_jax.data.tokenizer import build_tokenizer
from scaling_jax.data.vocab import Tokenizer, sentinel_piece
from scaling_jax.errors import ConfigError

T5_EXTRA_IDS = 100  # t5.data's default and every public T5 vocabulary's


def with_extra_ids(model_file: str, extra_ids: int, out_dir: str) -> str:
    """Write ``model_file`` with seqio's ``extra_ids`` sentinels added as pieces into ``out_dir``; returns the
    new file (the file itself when it already names every one of them)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    try:
        with open(model_file, "rb") as f:
            proto.ParseFromString(f.read())
    except Exception as e:  # protobuf's DecodeError, or OSError
        raise ConfigError(f"tokenizer '{model_file}' is not a readable SentencePiece model ({type(e).__name__}); "
                          "pass the T5X model's SentencePiece .model file with --tokenizer") from None
    have = {p.piece for p in proto.pieces}
    wanted = [sentinel_piece(k) for k in reversed(range(extra_ids))]
    if all(piece in have for piece in wanted):
        return model_file
    if any(piece in have for piece in wanted):
        raise ConfigError(f"tokenizer '{model_file}' names some but not all of its {extra_ids} extra ids as pieces; "
                          "pass the plain SentencePiece model seqio loads")
    for piece in wanted:
        proto.pieces.add(piece=piece, score=0.0, type=pb.ModelProto.SentencePiece.CONTROL)
    out = os.path.join(out_dir, "tokenizer.model")
    with open(out, "wb") as f:
        f.write(proto.SerializeToString())
    return out


def t5x_tokenizer(spec: str, extra_ids: int, work_dir: str) -> Tokenizer:
    """Our tokenizer for a T5X vocabulary: ``byte`` specs as they are, a SentencePiece file with its
    ``extra_ids`` in seqio's places (written under ``work_dir``)."""
    if spec.split(":")[0] == "byte":
        return build_tokenizer(spec)
    path = os.path.expanduser(spec.removeprefix("sentencepiece:"))
    if not os.path.isfile(path):
        raise ConfigError(f"tokenizer '{spec}' is not a file; pass the T5X model's SentencePiece .model file "
                          "with --tokenizer")
    return build_tokenizer(with_extra_ids(path, extra_ids, work_dir))
