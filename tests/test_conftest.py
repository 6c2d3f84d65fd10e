"""The test setup's own helpers: the kept compilation cache is trimmed oldest first."""

import os

from conftest import _forget_oldest


def test_a_full_compilation_cache_loses_its_oldest_entries_down_to_half(tmp_path):
    _entries(tmp_path, {"a": 300, "b": 300, "c": 300, "d": 300})
    _forget_oldest(str(tmp_path), keep_bytes=1200)  # not over the limit: nothing goes
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "c", "d"]
    _entries(tmp_path, {"a": 300, "b": 300, "c": 300, "d": 300, "e": 100})
    _forget_oldest(str(tmp_path), keep_bytes=1200)  # 1300 bytes: the oldest go until at most 600 are left
    assert sorted(os.listdir(tmp_path)) == ["d", "e"]


def _entries(directory, sizes: dict[str, int]) -> None:
    for age, (name, size) in enumerate(sizes.items()):
        path = os.path.join(directory, name)
        with open(path, "wb") as f:
            f.write(b"x" * size)
        os.utime(path, (1_000_000 + age, 1_000_000 + age))  # written in the order given
