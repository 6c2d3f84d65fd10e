"""The grain pipeline: deterministic, exactly resumable, and split across processes without overlap."""

import dataclasses

import numpy as np
import pytest

from scaling_jax.config import DataConfig
from scaling_jax.data.pipeline import PackedRows, eval_batches, make_iterator, train_dataset
from scaling_jax.data.tokenizer import ByteTokenizer
from scaling_jax.objectives.causal import shift_rows

CFG = dataclasses.replace(DataConfig(), seq_len=16, batch_size=8, shuffle_seed=7, prefetch=2)


def _rows():
    rng = np.random.default_rng(0)
    return PackedRows([rng.integers(3, 250, size=rng.integers(1, 30)) for _ in range(40)], 16, 1, 2)


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_same_seed_same_batches_and_epochs_are_reshuffled():
    rows = _rows()
    a = _take(make_iterator(train_dataset(rows, CFG, 0, 1, shift_rows), CFG), 12)
    b = _take(make_iterator(train_dataset(rows, CFG, 0, 1, shift_rows), CFG), 12)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
    per_epoch = len(rows) // CFG.batch_size
    first = np.concatenate([x["inputs"] for x in a[:per_epoch]])
    second = np.concatenate([x["inputs"] for x in a[per_epoch: 2 * per_epoch]])
    assert not np.array_equal(first, second)


def test_restored_iterator_continues_exactly():
    rows = _rows()
    it = make_iterator(train_dataset(rows, CFG, 0, 1, shift_rows), CFG)
    _take(it, 5)
    state = it.get_state()
    expected = _take(it, 4)
    fresh = make_iterator(train_dataset(rows, CFG, 0, 1, shift_rows), CFG)
    fresh.set_state(state)
    for x, y in zip(expected, _take(fresh, 4), strict=True):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def _assert_same_batches(xs, ys):
    for x, y in zip(xs, ys, strict=True):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


@pytest.mark.slow  # starts worker processes
def test_worker_processes_give_the_thread_stream_and_interchangeable_checkpoint_state():
    """Two grain worker processes run the transform: the same batches in the same order as threads, and a state
    saved by either kind of reader resumes the other exactly (a resume reopens the workers at the index). The
    transform is a closure (pickled by value), so the workers need not import JAX: start-up stays short."""
    rows = _rows()
    offset = lambda r: {**r, "tokens": r["tokens"] + 1}  # noqa: E731
    workers = dataclasses.replace(CFG, worker_processes=2)
    threads = make_iterator(train_dataset(rows, CFG, 0, 1, offset), CFG)
    expected = _take(threads, 9)
    stream = make_iterator(train_dataset(rows, workers, 0, 1, offset), workers)
    try:
        _assert_same_batches(expected[:5], _take(stream, 5))
        resumed = make_iterator(train_dataset(rows, CFG, 0, 1, offset), CFG)
        resumed.set_state(stream.get_state())
        _assert_same_batches(expected[5:7], _take(resumed, 2))
        stream.set_state(resumed.get_state())  # index 7, from a thread reader
        _assert_same_batches(expected[7:], _take(stream, 2))
        assert stream.index == 9
    finally:
        stream.close()


def test_processes_read_disjoint_slices_whose_union_is_the_single_process_stream():
    rows = _rows()
    single = _take(make_iterator(train_dataset(rows, CFG, 0, 1, lambda r: r), CFG), 6)
    for count in (2, 4):
        parts = [_take(make_iterator(train_dataset(rows, CFG, p, count, lambda r: r), CFG), 6) for p in range(count)]
        for step in range(6):
            joined = np.concatenate([parts[p][step]["tokens"] for p in range(count)])
            np.testing.assert_array_equal(joined, single[step]["tokens"])


def test_eval_batches_are_the_first_rows_in_order():
    rows = _rows()
    batches = eval_batches(rows, CFG, 2, 0, 1, lambda r: r)
    np.testing.assert_array_equal(batches[1]["tokens"][3], rows[8 + 3]["tokens"])
    halves = [eval_batches(rows, CFG, 2, p, 2, lambda r: r) for p in range(2)]
    np.testing.assert_array_equal(np.concatenate([h[0]["tokens"] for h in halves]), batches[0]["tokens"])


def test_byte_tokenizer_round_trips_and_reserves_special_ids():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'héllo' + \"✓\"\n"
    assert tok.decode(tok.encode(text)) == text
    ids = tok.encode(text)
    specials = {tok.pad_id, tok.bos_id, tok.eos_id, *tok.mode_ids.values(),
                *(tok.sentinel_id(k) for k in range(tok.num_sentinels))}
    assert len(specials) == 3 + 3 + tok.num_sentinels and tok.num_sentinels >= 100
    assert not specials & set(ids.tolist())
    assert tok.sentinel_id(0) == tok.vocab_size - 1  # T5 numbering: first sentinel at the top
    assert max(specials) < tok.vocab_size and tok.vocab_size % 128 == 0
    assert tok.token_byte_lengths()[ids].sum() == len(text.encode())
