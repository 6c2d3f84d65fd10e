"""Packing: rows are exact windows of the document stream and documents never mix."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scaling_jax.data.pipeline import PackedRows, segment_positions
from scaling_jax.model.transformer import Decoder
from scaling_jax.objectives.base import build_objective


def test_segment_positions_restart_per_document():
    seg = np.array([[1, 1, 1, 2, 2, 3], [1, 2, 2, 2, 2, 2]])
    np.testing.assert_array_equal(segment_positions(seg), [[0, 1, 2, 0, 1, 0], [0, 0, 1, 2, 3, 4]])


def test_rows_tile_the_bos_doc_eos_stream_exactly():
    docs = [np.arange(10, 10 + n) for n in (3, 7, 1, 12)]
    rows = PackedRows(docs, seq_len=5, bos_id=1, eos_id=2)
    stream = np.concatenate([np.r_[1, d, 2] for d in docs])
    assert len(rows) == (stream.size - 1) // 5
    for i in range(len(rows)):
        r = rows[i]
        np.testing.assert_array_equal(r["tokens"], stream[i * 5: i * 5 + 6])
        assert r["segment_ids"][0] == 1 and np.all(np.diff(r["segment_ids"]) >= 0)
        # a new segment starts exactly at each bos
        starts = np.flatnonzero(np.diff(r["segment_ids"])) + 1
        assert np.all(r["tokens"][starts] == 1)


def test_packed_batch_gives_the_same_per_document_losses_as_one_by_one(tiny_config):
    config = tiny_config("data.seq_len=48", "data.batch_size=1")
    model = Decoder(config.model, nnx.Rngs(3))
    objective = build_objective(config.objective)
    rng = np.random.default_rng(1)
    docs = [rng.integers(3, 250, size=n) for n in (9, 14, 6, 12)]  # 4 docs + bos/eos = 49 tokens = one row
    packed = objective.prepare({k: v[None] for k, v in PackedRows(docs, 48, 1, 2)[0].items()})

    def token_nll(batch):
        hidden = model(jnp.asarray(batch["inputs"]), jnp.asarray(batch["positions"]),
                       jnp.asarray(batch["segment_ids"]))
        logp = jax.nn.log_softmax(model.logits(hidden), axis=-1)
        nll = -jnp.take_along_axis(logp, jnp.asarray(batch["targets"])[..., None], axis=-1)[..., 0]
        return np.asarray(nll)[0], batch["loss_mask"][0].astype(bool)

    packed_nll, packed_mask = token_nll(packed)
    seg = packed["segment_ids"][0]
    for i, doc in enumerate(docs):
        alone = np.r_[1, doc, 2]
        single = objective.prepare({"tokens": alone[None], "segment_ids": np.ones((1, alone.size), np.int32)})
        nll, mask = token_nll(single)
        in_doc = (seg == i + 1) & packed_mask
        np.testing.assert_allclose(packed_nll[in_doc], nll[mask], rtol=1e-5, atol=1e-5)
        assert in_doc.sum() == doc.size + 1  # every within-document prediction counted, none across
