"""``scaling-jax data prepare --executor ray``: on the session's local Ray (conftest's ``ray_cluster``) every part is a
task, the files written are byte for byte the local prepare's (manifest included), and a part that fails ends
the prepare in one line with nothing written. Skipped without Ray; the flag checks are in test_prepare.py."""

import os

import pytest
from test_prepare import corpus_dir, same_files

from scaling_jax.cli import main
from scaling_jax.data import prepare as prep


def _prepare(tmp_path, source, out, *more):
    """Every file its own part (--part-mib of about 1 byte), tiny chunks and shards."""
    return main(["data", "prepare", "--output", str(tmp_path / out), f"data.source={source}", "data.val_fraction=0.2",
                 "--chunk-tokens", "37", "--chunks-per-shard", "2", "--part-mib", "0.000001", *more])


@pytest.mark.slow
def test_ray_prepare_writes_the_local_prepares_files_byte_for_byte(tmp_path, ray_cluster, capsys):
    source = corpus_dir(tmp_path, files=5).source
    assert _prepare(tmp_path, source, "local") == 0
    assert _prepare(tmp_path, source, "ray", "--executor", "ray") == 0
    printed = capsys.readouterr().out
    assert "ray: 6 write_part task(s); each task asks for 1 CPU; up to 3 retries" in printed
    assert "6 part(s), ray" in printed and "6 part(s), local" in printed
    assert same_files(tmp_path / "local", tmp_path / "ray")  # manifest.json, shards and tokenizer/
    assert len(prep.read_manifest(str(tmp_path / "ray"))["parts"]) == 6


@pytest.mark.slow
def test_a_failing_part_ends_the_ray_prepare_in_one_line_with_nothing_written(tmp_path, ray_cluster, capsys):
    source = corpus_dir(tmp_path, files=5).source
    (tmp_path / "docs" / "c.jsonl").write_text('{"text": "ok"}\n{oops\n')
    assert _prepare(tmp_path, source, "out", "--executor", "ray") == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert errors == [f"error: {tmp_path / 'docs' / 'c.jsonl'}:2 is not valid JSON (Expecting property name enclosed "
                      "in double quotes); each line of a jsonl file must be one JSON object (or set "
                      "data.malformed_lines=skip to skip such lines)"]
    assert sorted(os.listdir(tmp_path)) == ["docs"]  # no output, no temporary directory
