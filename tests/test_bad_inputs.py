"""The bad-input catalogue: configs, data, tokenizers, checkpoints.

Every case runs the real command line in-process (``scaling_jax.cli.main``) and must end with one
``error:`` line naming the problem and the fix (fragments checked), exit non-zero, print no traceback
without ``--debug``, and leave every file the user already had byte-for-byte unchanged.
"""

import glob
import gzip
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scaling_jax.cli import main
from scaling_jax.config import load_config
from scaling_jax.data.sources import load_documents
from scaling_jax.errors import UserError
from scaling_jax.train.loop import train

TINY = ["model.series=custom", "model.layers=1", "model.d_model=32", "model.heads=1", "model.head_dim=32",
        "model.d_ff=64", "data.seq_len=32", "data.batch_size=8", "data.max_docs=20", "train.steps=1",
        "optimizer.warmup_steps=1", "train.eval_batches=1", "train.progress=false", "train.plot=false",
        "train.tensorboard=false", "train.async_checkpointing=false"]
GOOD_LINE = '{"text": "def f(x):\\n    return x + 1\\n"}\n'


def _make_user_files(root) -> None:
    """What a user might hand us: configs, data files and tokenizer files, most of them broken."""
    os.makedirs(root, exist_ok=True)
    files = {
        "broken.yaml": b"model: [1, 2\n",
        "list.yaml": b"- model\n- data\n",
        "empty.txt": b"",
        "tiny.txt": b"hi",
        "few_short.jsonl": b'{"text": "h"}\n' * 60,
        "bad_utf8.jsonl": GOOD_LINE.encode() * 3 + b'{"text": "caf\xe9"}\n',
        "bad_json.jsonl": GOOD_LINE.encode() * 3 + b'{"text": "unterminated\n',
        "all_bad.jsonl": b"not json\n[1, 2]\n",
        "no_field.jsonl": b'{"body": "text under another key"}\n',
        "array.jsonl": b'["a", "b"]\n',
        "junk.parquet": b"PAR1 but not really",
        "tok.model": b"not a sentencepiece model",
        "tokenizer.json": b'{"model": {"type": ',
        "data.txt.gz": gzip.compress(b"print('hello')\n" * 200),
        "task_no_examples.json": b'{"name": "t", "metrics": ["exact_str_match"]}',
        "task_empty_examples.json": b'{"examples": [], "metrics": ["exact_str_match"]}',
        "task_no_input.json": b'{"examples": [{"target": "4"}], "metrics": ["exact_str_match"]}',
        "task_no_target.json": b'{"examples": [{"input": "2+2="}], "metrics": ["exact_str_match"]}',
        "task_bad_metric.json": b'{"examples": [{"input": "2+2=", "target": "4"}], "metrics": ["bleurt"]}',
        "task_not_json.json": b'{"examples": [',
    }
    for name, content in files.items():
        with open(os.path.join(root, name), "wb") as f:
            f.write(content)
    pq.write_table(pa.table({"body": ["a b c"] * 20}), os.path.join(root, "no_column.parquet"))
    pq.write_table(pa.table({"text": list(range(20))}), os.path.join(root, "int_column.parquet"))


def _snapshot(root) -> dict:
    """Content and mtime of every file under ``root`` (the lock file is ours, not the user's)."""
    out = {}
    for path in glob.glob(os.path.join(root, "**"), recursive=True):
        if os.path.isfile(path) and os.path.basename(path) != ".lock":
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = (f.read(), os.stat(path).st_mtime_ns)
    return out


def _assert_clean_failure(argv, capsys, root, fragments):
    before = _snapshot(root)
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code != 0, err
    assert lines and lines[-1].startswith("error: "), err
    assert all(line.startswith("warning: ") for line in lines[:-1]), err  # nothing else: no traceback, no noise
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    after = _snapshot(root)
    assert {k: after.get(k) for k in before} == before, "a user file was modified"
    return lines[-1]


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("user"))
    _make_user_files(root)
    return root


def _train_args(tmp_path, *overrides):
    return ["train", "configs/quickstart.yaml", *TINY, f"train.run_dir={tmp_path / 'run'}", *overrides]


CONFIG_CASES = [  # (id, overrides, fragments of the error line)
    ("unknown-key", ["model.layer=3"], ["unknown config key 'model.layer'", "did you mean 'model.layers'"]),
    ("wrong-type", ["train.steps=many"], ["train.steps must be int, got 'many'", "fix the value"]),
    ("negative-size", ["model.d_model=-64"], ["model.d_model must be > 0, got -64"]),
    ("kv-heads-not-dividing-heads", ["model.heads=4", "model.kv_heads=3"],
     ["model.kv_heads=3 must divide model.heads=4"]),
    ("odd-head-dim", ["model.head_dim=33"], ["model.head_dim=33 must be even"]),
    ("mesh-bigger-than-devices", ["mesh.data=16"], ["= 16 but 8 devices are available", "set one axis to -1"]),
    ("seq-len-over-model-max", ["data.seq_len=4096"],
     ["data.seq_len=4096 exceeds model.max_seq_len=2048", "lower data.seq_len or raise model.max_seq_len"]),
    ("unknown-choice", ["train.nan_policy=ignore"], ["train.nan_policy='ignore' is not one of halt, skip_batch"]),
    ("batch-not-divisible-by-mesh", ["data.batch_size=12"],
     ["data.batch_size=12 must be divisible by 8", "change data.batch_size or the mesh"]),
    ("vocab-smaller-than-tokenizer", ["model.vocab_size=200"],
     ["model.vocab_size=200 cannot hold the 259 text and pad/bos/eos ids", "set model.vocab_size=384"]),
    ("warmup-longer-than-run", ["optimizer.warmup_steps=5"], ["optimizer.warmup_steps=5 must be in [0, train.steps"]),
]

DATA_CASES = [  # (id, data overrides with {u} = the user's directory, fragments)
    ("empty-file", ["data.source={u}/empty.txt"], ["gives no train documents", "point data.source at more data"]),
    ("missing-source", ["data.source={u}/nowhere/*.jsonl"], ["matches no files", "point it at a file"]),
    ("invalid-utf8-jsonl", ["data.source={u}/bad_utf8.jsonl"],
     ["bad_utf8.jsonl:4 is not valid UTF-8 (byte 0xe9", "re-encode the file as UTF-8", "data.malformed_lines=skip"]),
    ("malformed-jsonl-line-is-fatal-by-default", ["data.source={u}/bad_json.jsonl"],
     ["bad_json.jsonl:4 is not valid JSON", "data.malformed_lines=skip"]),
    ("malformed-lines-skipped-leave-nothing", ["data.source={u}/all_bad.jsonl", "data.malformed_lines=skip"],
     ["gives no train documents (0 non-empty documents"]),
    ("jsonl-missing-field", ["data.source={u}/no_field.jsonl"],
     ["no_field.jsonl:1 has no field 'text' (keys: body)", "set data.text_field"]),
    ("jsonl-line-not-an-object", ["data.source={u}/array.jsonl"], ["holds a JSON list, not an object"]),
    ("parquet-missing-column", ["data.source={u}/no_column.parquet"],
     ["no_column.parquet has no column 'text' (columns: body)", "set data.text_field"]),
    ("parquet-column-not-text", ["data.source={u}/int_column.parquet"], ["column 'text' has type int64, not string"]),
    ("not-a-parquet-file", ["data.source={u}/junk.parquet"], ["junk.parquet is not a readable parquet file"]),
    ("compressed-file-as-text", ["data.source={u}/data.txt.gz"], ["data.txt.gz looks binary", "decompress"]),
    ("too-little-data-for-a-batch", ["data.source={u}/few_short.jsonl", "data.val_fraction=0.2"],
     ["fewer than data.batch_size=8", "use more data or smaller seq_len / batch_size"]),
    ("bad-data-format", ["data.format=csv"], ["data.format='csv' is not one of auto, text, jsonl, parquet"]),
]

TOKENIZER_CASES = [
    ("vocabulary-without-reserved-ids", ["data.tokenizer=byte:300"],
     ["byte tokenizer needs vocab_size >= 362 to reserve 100 sentinels"]),
    ("missing-tokenizer-file", ["data.tokenizer={u}/nope.model"],
     ["neither 'byte' nor an existing tokenizer file", "scaling-jax tokenizer train"]),
    ("unreadable-sentencepiece-model", ["data.tokenizer={u}/tok.model"],
     ["tok.model' is not a readable SentencePiece model", "pass a .model file"]),
    ("unreadable-hf-tokenizer-json", ["data.tokenizer={u}/tokenizer.json"],
     ["is not a readable Hugging Face tokenizer.json", "pass a tokenizers JSON file"]),
]

FILE_CASES = [  # (id, argv with {u}, fragments): config files and command arguments
    ("config-not-yaml", ["train", "{u}/broken.yaml"], ["broken.yaml' is not valid YAML at line 2", "fix its syntax"]),
    ("config-not-a-mapping", ["train", "{u}/list.yaml"], ["list.yaml' must hold a mapping of sections"]),
    ("config-missing", ["train", "{u}/none.yaml"], ["none.yaml' does not exist", "configs/quickstart.yaml"]),
    ("run-dir-is-a-file", ["train", "configs/quickstart.yaml", *TINY, "train.run_dir={u}/tiny.txt"],
     ["tiny.txt' is a file", "point train.run_dir at a directory"]),
    ("continue-from-missing-directory", ["continue", "--from", "{u}/no-run", "--stage", "configs/stages/ul2r.yaml"],
     ["no-run' is not a directory", "pass a run directory"]),
    ("continue-from-a-file", ["continue", "--from", "{u}/tiny.txt", "--stage", "configs/stages/ul2r.yaml"],
     ["tiny.txt' is not a directory"]),
    ("info-on-a-directory-without-config", ["info", "{u}"], ["without config.yaml", "pass a config file"]),
    ("hf-import-into-a-bucket", ["convert", "--from-hf", "{u}", "--out", "gs://bucket/run"],
     ["gs://bucket/run' must be a local directory"]),
]


def _fill(items, user_dir):
    return [item.replace("{u}", user_dir) for item in items]


@pytest.mark.parametrize("overrides, fragments", [c[1:] for c in CONFIG_CASES + DATA_CASES + TOKENIZER_CASES],
                         ids=[c[0] for c in CONFIG_CASES + DATA_CASES + TOKENIZER_CASES])
def test_bad_config_data_or_tokenizer_is_one_line(tmp_path, capsys, user_dir, overrides, fragments):
    _assert_clean_failure(_train_args(tmp_path, *_fill(overrides, user_dir)), capsys, user_dir, fragments)
    assert not glob.glob(str(tmp_path / "run" / "checkpoints" / "*"))  # nothing trained, nothing saved


@pytest.mark.parametrize("argv, fragments", [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES])
def test_bad_file_or_argument_is_one_line(capsys, user_dir, argv, fragments):
    _assert_clean_failure(_fill(argv, user_dir), capsys, user_dir, fragments)


def test_debug_shows_the_traceback_instead(user_dir):
    with pytest.raises(UserError, match="is not valid YAML"):
        main(["--debug", "train", f"{user_dir}/broken.yaml"])


def test_malformed_lines_can_be_skipped_and_are_counted(user_dir, capsys):
    config = load_config(None, [f"data.source={user_dir}/bad_json.jsonl", "data.malformed_lines=skip",
                                "data.val_fraction=0"])
    docs = load_documents(config.data, "train")
    assert [d.name for d in docs] == ["bad_json.jsonl:1", "bad_json.jsonl:2", "bad_json.jsonl:3"]
    assert "skipped 1 malformed line(s) of" in capsys.readouterr().err


# ----------------------------------------------------------------------------- checkpoints of a real run


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One real run (1 step, tiny model) whose checkpoint the cases below try to misuse."""
    root = str(tmp_path_factory.mktemp("trained"))
    run_dir = os.path.join(root, "run")
    train(load_config("configs/quickstart.yaml", TINY + [f"train.run_dir={run_dir}"]))
    return run_dir


CHECKPOINT_CASES = [
    ("other-model-shape", ["model.d_model=64"], ["model.d_model=32 but the config says 64", "a new train.run_dir"]),
    ("other-mlp", ["model.mlp=swiglu"], ["model.mlp='geglu' but the config says 'swiglu'"]),
    ("other-tokenizer", ["data.tokenizer=byte:512"],
     ["was trained with another tokenizer", "use a new train.run_dir"]),
]


@pytest.mark.parametrize("overrides, fragments", [c[1:] for c in CHECKPOINT_CASES],
                         ids=[c[0] for c in CHECKPOINT_CASES])
def test_resuming_a_checkpoint_with_other_settings_is_one_line(trained_run, capsys, overrides, fragments):
    argv = ["train", "configs/quickstart.yaml", *TINY, f"train.run_dir={trained_run}", "train.steps=2", *overrides]
    _assert_clean_failure(argv, capsys, trained_run, fragments)


def test_a_run_whose_every_checkpoint_is_damaged_is_one_line(trained_run, tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    shutil.copytree(trained_run, run_dir)
    for data_file in glob.glob(os.path.join(run_dir, "checkpoints", "*", "state", "**", "d", "*"), recursive=True):
        with open(data_file, "r+b") as f:
            f.write(b"\x00\x01\x02\x03")
    argv = ["train", "configs/quickstart.yaml", *TINY, f"train.run_dir={run_dir}", "train.steps=2"]
    _assert_clean_failure(argv, capsys, run_dir, ["no intact checkpoint in", "restore one from a backup"])


EVAL_CASES = [  # (id, --tasks with {u}, fragments): BIG-bench task files handed to `scaling-jax eval`
    ("task-without-examples", "{u}/task_no_examples.json", ["task_no_examples.json': examples is missing or empty",
                                                            "fix the file"]),
    ("task-with-empty-examples", "{u}/task_empty_examples.json", ["examples is missing or empty"]),
    ("example-without-input", "{u}/task_no_input.json", ["examples[0].input is missing or not a string"]),
    ("example-without-target", "{u}/task_no_target.json", ["examples[0] has neither 'target' nor 'target_scores'"]),
    ("task-with-unsupported-metric", "{u}/task_bad_metric.json", ["name no supported metric"]),
    ("task-file-not-json", "{u}/task_not_json.json", ["task_not_json.json' is not valid JSON (line 1"]),
    ("task-file-missing", "{u}/no_task.json", ["no_task.json' does not exist", "or a generator name"]),
]


@pytest.mark.parametrize("tasks, fragments", [c[1:] for c in EVAL_CASES], ids=[c[0] for c in EVAL_CASES])
def test_bad_eval_task_file_is_one_line(trained_run, user_dir, tmp_path, capsys, tasks, fragments):
    argv = ["eval", "--checkpoint", trained_run, "--tasks", tasks.replace("{u}", user_dir), "--out",
            str(tmp_path / "eval")]
    _assert_clean_failure(argv, capsys, user_dir, fragments)


def test_eval_of_a_directory_that_is_not_a_run_is_one_line(user_dir, tmp_path, capsys):
    argv = ["eval", "--checkpoint", user_dir, "--tasks", "arithmetic", "--out", str(tmp_path / "eval")]
    _assert_clean_failure(argv, capsys, user_dir, ["is not a run directory (needs config.yaml"])
