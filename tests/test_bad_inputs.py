"""The bad-input catalogue: configs, data, tokenizers, checkpoints.

Every case runs the real command line in-process (``scaling_jax.cli.main``) and must end with one
``error:`` line naming the problem and the fix (fragments checked), exit 2, print no traceback
without ``--debug``, and leave every file the user already had byte-for-byte unchanged.
"""

import builtins
import errno
import glob
import gzip
import json
import os
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import TINY_RUN

from scaling_jax.cli import main
from scaling_jax.config import load_config
from scaling_jax.data.sources import load_documents
from scaling_jax.errors import UserError

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
        "latin1.txt": b"plain ascii line 1\n" + "caf\u00e9 cr\u00e8me\n".encode("latin-1"),
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
        "task_bad_metric.json": b'{"examples": [{"input": "2+2=", "target": "4"}], "metrics": ["vibes"]}',
        "task_not_json.json": b'{"examples": [',
        "table_ok.csv": b"N,loss\n1e6,3.0\n2e6,2.8\n4e6,2.6\n",
        "table_bom.csv": b"\xef\xbb\xbfN,loss\n1e6,3.0\n2e6,2.8\n4e6,2.6\n",  # a spreadsheet's UTF-8 CSV
        "table_header_only.csv": b"N,loss\n",
        "table_other_columns.csv": b"params,tokens\n1e6,2e7\n",
        "table_latin1.csv": b"N,loss\n1e6,3.0 \xb1 0.1\n",
        "sweep_bad_warmup.yaml": b"objectives: [causal]\nsizes: [passuntil:1]\nbudgets: [{tokens: 1000}]\n"
                                 b"warmup_fraction: soon\n",
        "sweep_infinite_budget.yaml": b"objectives: [causal]\nsizes: [passuntil:1]\nbudgets: [{tokens: .inf}]\n",
        "sweep_sizes_not_a_list.yaml": b"objectives: [causal]\nsizes: passuntil:1\nbudgets: [{tokens: 1000}]\n",
        "sweep_objective_not_a_mapping.yaml": b"objectives: {causal: 3}\nsizes: [passuntil:1]\n"
                                              b"budgets: [{tokens: 1000}]\n",
        "sweep_repeated_seeds.yaml": b"objectives: [causal]\nsizes: [passuntil:1]\nbudgets: [{tokens: 1000}]\n"
                                     b"seeds: [0, 1, 1]\n",
        "sweep_negative_seed.yaml": b"objectives: [causal]\nsizes: [passuntil:1]\nbudgets: [{tokens: 1000}]\n"
                                    b"seeds: [0, -2]\n",
        "torn_sweep/manifest.json": b'{"sweep": "x", "runs": [',
        "old_sweep/manifest.json": b'{"sweep": "x", "runs": [{"run_id": "a", "objective": "causal"}]}',
        "notes/todo.txt": b"my own notes\n",
    }
    for name, content in files.items():
        os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
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
    assert code == 2, err
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
    ("unknown-attention-kernel", ["model.attention=flash"],
     ["model.attention='flash' is not one of auto, xla, splash, cudnn"]),
    ("batch-not-divisible-by-mesh", ["data.batch_size=12"],
     ["data.batch_size=12 must be divisible by 8", "change data.batch_size or the mesh"]),
    ("vocab-smaller-than-tokenizer", ["model.vocab_size=200"],
     ["model.vocab_size=200 cannot hold the 259 text and pad/bos/eos ids", "set model.vocab_size=384"]),
    ("warmup-longer-than-run", ["optimizer.warmup_steps=5"], ["optimizer.warmup_steps=5 must be in [0, train.steps"]),
    # single-field ranges (issue 15): each was trained on (or crashed later) before it was checked
    ("adam-b2-not-below-one", ["optimizer.b2=1.5"], ["optimizer.b2=1.5 must be in [0, 1)"]),
    ("adam-b1-negative", ["optimizer.b1=-0.1"], ["optimizer.b1=-0.1 must be in [0, 1)"]),
    ("adam-eps-zero", ["optimizer.eps=0"], ["optimizer.eps=0.0 must be > 0", "1e-8"]),
    ("negative-weight-decay", ["optimizer.weight_decay=-0.1"], ["optimizer.weight_decay=-0.1 must be >= 0"]),
    ("negative-clip-norm", ["optimizer.clip_norm=-1"], ["optimizer.clip_norm=-1.0 must be >= 0", "0 disables"]),
    ("lr-not-a-number", ["optimizer.lr=.nan"], ["optimizer.lr must be > 0, got nan"]),
    ("lr-infinite", ["optimizer.lr=.inf"], ["optimizer.lr must be a finite number > 0, got inf"]),
    ("rope-theta-zero", ["model.rope_theta=0"], ["model.rope_theta=0.0 must be > 0"]),
    ("norm-eps-negative", ["model.norm_eps=-1e-6"], ["model.norm_eps=-1e-06 must be > 0"]),
    ("init-std-zero", ["model.init_std=0"], ["model.init_std=0.0 must be > 0"]),
    ("negative-vocab-size", ["model.vocab_size=-5"], ["model.vocab_size=-5 must be >= 0", "or 0 to take it"]),
    ("negative-max-docs", ["data.max_docs=-1"], ["data.max_docs=-1 must be >= 0", "0 reads every document"]),
    ("no-read-threads", ["data.num_threads=0"], ["data.num_threads=0 must be >= 1"]),
    ("negative-prefetch", ["data.prefetch=-1"], ["data.prefetch=-1 must be >= 0"]),
    ("negative-shuffle-seed", ["data.shuffle_seed=-1"], ["data.shuffle_seed=-1 must be >= 0"]),
    ("negative-train-seed", ["train.seed=-3"], ["train.seed=-3 must be >= 0"]),
    ("negative-peak-flops", ["train.peak_flops_per_device=-1"], ["train.peak_flops_per_device=-1.0 must be >= 0"]),
    ("empty-text-field", ["data.text_field="], ["data.text_field='' must be non-empty"]),
    ("empty-data-source", ["data.source="], ["data.source='' must be non-empty", "data.source=stdlib"]),
    ("two-mesh-axes-fill", ["mesh.data=-1", "mesh.fsdp=-1"], ["only one of mesh.data, mesh.fsdp, mesh.tensor"]),
    ("mesh-rule-maps-to-a-number", ["mesh.rules=[[batch, 3]]"], ["mesh.rules entry ['batch', 3] must map to"]),
    ("mtp-with-one-layer", ["objective.name=mtp", "model.layers=1"], ["model.layers=1 must be >= 2 for objective=mtp"]),
    # multislice (issue 17): DCN axes must match the slices there are; tensor parallelism never crosses DCN
    ("mesh-dcn-slices-not-there", ["mesh.dcn_data=2"],
     ["mesh.dcn_data x mesh.dcn_fsdp = 2x1 = 2 but the devices form 1 slice(s)", "so that their product is 1"]),
    ("mesh-dcn-zero", ["mesh.dcn_fsdp=0"], ["mesh.dcn_fsdp=0 must be an integer >= 1"]),
    ("mesh-dcn-tensor", ["mesh.dcn_tensor=2"],
     ["mesh.dcn_tensor=2 is not supported: tensor parallelism over DCN", "mesh.dcn_data or mesh.dcn_fsdp"]),
    ("mixture-negative-rate", ["data.mixture=[{source: a.txt, rate: -1}]"],
     ["data.mixture[0].rate=-1 must be a finite number > 0"]),
    ("mixture-infinite-rate", ["data.mixture=[{source: a.txt, rate: .inf}]"],
     ["data.mixture[0].rate=inf must be a finite number > 0"]),
    ("mixture-unknown-key", ["data.mixture=[{source: a.txt, weight: 2}]"],
     ["data.mixture[0] has unknown key(s) weight"]),
    ("mixture-entry-wrong-type", ["data.mixture=[{source: a.txt, max_docs: many}]"],
     ["data.mixture[0].max_docs must be int, got 'many'"]),
    ("mixture-entry-out-of-range", ["data.mixture=[{source: a.txt, max_docs: -3}]"],
     ["data.mixture[0].max_docs=-3 must be >= 0"]),
    ("mixture-next-to-a-source", ["data.mixture=[{source: a.txt}]", "data.source={u}/tiny.txt"],
     ["and data.mixture are both set"]),
    ("instructions-unknown-template", ["data.instructions=[{source: 'generated:arithmetic', template: chat}]"],
     ["data.instructions[0].template='chat' is not one of zero_shot, few_shot, cot"]),
    ("instructions-zero-shots", ["data.instructions=[{source: 'generated:arithmetic', shots: 0}]"],
     ["data.instructions[0].shots=0 must be an integer >= 1"]),
    ("instructions-unknown-task", ["data.instructions=['generated:trivia']"], ["unknown generated task 'trivia'"]),
    ("budget-fraction-over-one", ["budget.fraction=5"], ["budget.fraction=5.0 must be in [0, 1]", "budget.tokens"]),
    ("budget-negative-steps", ["budget.steps=-1"], ["budget.steps=-1 must be >= 0"]),
    ("stage-parent-not-a-checkpoint", ["stage.parent={u}", "budget.steps=1"],
     ["must be a checkpoint directory RUN_DIR/.../STEP", "scaling-jax continue --from RUN_DIR"]),
    ("stage-name-with-a-slash", ["stage.name=a/b"], ["stage.name='a/b' must be a non-empty label without slashes"]),
    # objective fields, checked when the objective is built (before any data is read)
    ("mtp-without-heads", ["objective=mtp", "model.layers=2", "objective.heads=0"],
     ["objective.heads=0 must be an integer >= 1"]),
    ("mtp-weights-per-head", ["objective=mtp", "model.layers=2", "objective.head_weights=[1]"],
     ["objective.head_weights has 1 entries but objective.heads=2"]),
    ("ul2-no-examples-per-row", ["objective=ul2", "objective.examples_per_row=0"],
     ["objective.examples_per_row=0 must be >= 1"]),
    ("ul2-denoiser-rate", ["objective=ul2", "objective.denoisers=[{kind: R, rate: 1.5, mean_span: 3}]"],
     ["objective.denoisers[0].rate=1.5 must be in (0, 1)"]),
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
    ("invalid-utf8-text", ["data.source={u}/latin1.txt"],
     ["latin1.txt is not valid UTF-8 (byte 0xe9 at offset 22)", "re-encode it as UTF-8", "data.malformed_lines=skip"]),
    ("invalid-utf8-text-skipped-leaves-nothing", ["data.source={u}/latin1.txt", "data.malformed_lines=skip"],
     ["gives no train documents", "point data.source at more data"]),
    ("one-small-file-has-no-validation", ["data.source={u}/tiny.txt"],
     ["gives no validation documents", "no data.val_fraction gives both splits a document",
      "point data.source at more data"]),
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
    ("empty-run-dir", ["train", "configs/quickstart.yaml", *TINY, "train.run_dir="],
     ["train.run_dir is empty", "train.run_dir=runs/NAME"]),
    ("run-dir-holding-user-files", ["train", "configs/quickstart.yaml", *TINY, "train.run_dir={u}"],
     ["already holds files that are not a scaling_jax run", "choose a new or empty directory"]),
    ("resume-of-a-directory-that-is-not-a-run", ["resume", "{u}"],
     ["without config.yaml", "scaling-jax train RUN_DIR"]),
    ("resume-of-a-config-file", ["resume", "configs/quickstart.yaml"], ["is not a run directory"]),
    ("unknown-flag", ["eval", "--checkpoint", "{u}", "--tasks", "arithmetic", "--bogus"],
     ["unrecognized arguments: --bogus", "see scaling-jax --help"]),
    ("flag-choice-not-offered", ["tokenizer", "train", "--output", "{u}/t.json", "--kind", "wordpiece"],
     ["argument --kind: invalid choice: 'wordpiece'", "see scaling-jax tokenizer train --help"]),
    ("missing-required-flag", ["continue", "--from", "{u}"], ["the following arguments are required: --stage"]),
    ("no-command", [], ["the following arguments are required: command"]),
    ("tokenizer-output-exists", ["tokenizer", "train", "--output", "{u}/tiny.txt", "--corpus", "{u}/few_short.jsonl"],
     ["tiny.txt' already exists", "name a new file"]),
]

FLAG_CASES = [  # (id, argv with {u}, fragments): numeric flags are checked by the command (one line, no usage text)
    ("info-negative-devices", ["info", "configs/quickstart.yaml", "--devices", "-1"],
     ["--devices -1 must be an integer >= 0"]),
    ("info-devices-not-a-number", ["info", "configs/quickstart.yaml", "--devices", "two"],
     ["--devices two must be an integer"]),
    ("export-negative-step", ["convert", "--to-hf", "{u}/hf", "--checkpoint", "{u}", "--step", "-1"],
     ["--step -1 must be an integer >= 0"]),
    ("export-with-an-import-flag", ["convert", "--to-hf", "{u}/hf", "--checkpoint", "{u}", "--tokenizer", "byte"],
     ["--tokenizer does not apply to convert --to-hf"]),
    ("import-with-an-export-flag", ["convert", "--from-hf", "{u}", "--out", "{u}/run", "--step", "3"],
     ["--step does not apply to convert --from-hf"]),
    ("tokenizer-vocab-too-small", ["tokenizer", "train", "--output", "{u}/t.json", "--vocab-size", "100"],
     ["--vocab-size 100 must be an integer >= 378", "ids are reserved"]),
    ("tokenizer-vocab-not-a-number", ["tokenizer", "train", "--output", "{u}/t.json", "--vocab-size", "32k"],
     ["--vocab-size 32k must be an integer"]),
    ("tokenizer-vocab-too-large", ["tokenizer", "train", "--output", "{u}/t.json", "--vocab-size", "100000000000"],
     ["--vocab-size 100000000000 is larger than 1,048,576"]),  # the trainer aborted the process allocating it
    ("tokenizer-output-is-a-directory", ["tokenizer", "train", "--output", "{u}/notes"],
     ["notes' is a directory", "name the file to write"]),
    ("prepare-zero-chunk-tokens", ["data", "prepare", "--output", "{u}/prep", "--chunk-tokens", "0"],
     ["--chunk-tokens 0 must be an integer >= 1"]),
    ("prepare-negative-chunks-per-shard", ["data", "prepare", "--output", "{u}/prep", "--chunks-per-shard", "-1"],
     ["--chunks-per-shard -1 must be an integer >= 1"]),
    ("prepare-overwrite-of-user-files", ["data", "prepare", "--output", "{u}/notes", "--overwrite"],
     ["notes' exists and is not a prepared data directory", "choose another --output"]),
    ("eval-passes-without-passuntil", ["eval", "--checkpoint", "{u}", "--tasks", "arithmetic", "--passes", "3"],
     ["--passes applies to PassUntil; add --passuntil"]),
    ("eval-zero-passes", ["eval", "--checkpoint", "{u}", "--tasks", "arithmetic", "--passuntil", "--passes", "0"],
     ["--passes 0 must be an integer >= 1"]),
    ("eval-fewer-samples-than-passes", ["eval", "--checkpoint", "{u}", "--tasks", "arithmetic", "--passuntil",
                                        "--passes", "5", "--max-samples", "4"],
     ["--max-samples 4 must be an integer >= 5"]),
    ("eval-negative-shots", ["eval", "--checkpoint", "{u}", "--tasks", "arithmetic", "--shots", "-1"],
     ["--shots -1 must be an integer >= 0"]),
    ("eval-no-generated-examples", ["eval", "--checkpoint", "{u}", "--tasks", "arithmetic", "--num-examples", "0"],
     ["--num-examples 0 must be an integer >= 1"]),
    ("eval-negative-max-examples", ["eval", "--checkpoint", "{u}", "--tasks", "arithmetic", "--max-examples", "-1"],
     ["--max-examples -1 must be an integer >= 0"]),
    ("eval-predict-at-zero", ["eval", "--checkpoint", "{u}", "--tasks", "arithmetic", "--passuntil",
                              "--predict-n", "0"], ["--predict-n 0 must be a number > 0"]),
    ("eval-no-tasks", ["eval", "--checkpoint", "{u}", "--tasks", ","], ["eval needs --tasks naming at least one task"]),
    ("fit-unknown-law", ["fit", "{u}/table_ok.csv", "--law", "kaplan"], ["--law kaplan is unknown", "chinchilla"]),
    ("fit-compute-for-another-law", ["fit", "{u}/table_ok.csv", "--law", "kaplan_n", "--compute", "1e20"],
     ["--compute applies to --law chinchilla"]),
    ("fit-negative-compute", ["fit", "{u}/table_ok.csv", "--law", "chinchilla", "--compute", "-1"],
     ["--compute -1 must be a number > 0"]),
    ("fit-negative-bootstrap", ["fit", "{u}/table_ok.csv", "--law", "kaplan_n", "--bootstrap", "-1"],
     ["--bootstrap -1 must be an integer >= 0"]),
    ("convert-to-an-empty-path", ["convert", "--to-hf", "", "--checkpoint", "{u}"], ["--to-hf needs a directory"]),
    ("fit-table-is-a-directory", ["fit", "{u}", "--law", "kaplan_n"], ["is a directory", "pass a CSV file"]),
    ("fit-table-without-rows", ["fit", "{u}/table_header_only.csv", "--law", "kaplan_n"], ["has no data rows"]),
    ("fit-table-without-the-columns", ["fit", "{u}/table_other_columns.csv", "--law", "kaplan_n"],
     ["the table lacks n, loss (its columns: params, tokens)"]),
    ("fit-table-not-utf8", ["fit", "{u}/table_latin1.csv", "--law", "kaplan_n"], ["is not a readable CSV (not UTF-8"]),
    ("fit-stray-override", ["fit", "{u}/table_ok.csv", "--law", "kaplan_n", "model.layers=2"],
     ["fit takes no config overrides"]),
    ("report-target-flops-zero", ["report", "{u}", "--target-flops", "0"], ["--target-flops 0 must be a number > 0"]),
    ("report-of-a-torn-manifest", ["report", "{u}/torn_sweep", "--out", "{u}/rep"],
     ["torn_sweep/manifest.json' is not valid JSON", "rerun the command that wrote it"]),
    ("report-of-an-old-manifest", ["report", "{u}/old_sweep", "--out", "{u}/rep"],
     ["manifest.json' run 0 lacks size, status, run_dir, n, tokens, flops"]),
    ("sweep-warmup-not-a-number", ["sweep", "{u}/sweep_bad_warmup.yaml", "--dry-run"],
     ["warmup_fraction='soon' must be a number in [0, 1)"]),
    ("sweep-infinite-budget", ["sweep", "{u}/sweep_infinite_budget.yaml", "--dry-run"],
     ["budget tokens=inf must be > 0 (a finite number)"]),
    ("sweep-sizes-not-a-list", ["sweep", "{u}/sweep_sizes_not_a_list.yaml", "--dry-run"],
     ["sizes must be a list, got 'passuntil:1'"]),
    ("sweep-objective-not-a-mapping", ["sweep", "{u}/sweep_objective_not_a_mapping.yaml", "--dry-run"],
     ["objective 'causal' must map to dotted overrides"]),
    ("sweep-seeds-repeated", ["sweep", "{u}/sweep_repeated_seeds.yaml", "--dry-run"],
     ["seeds must be a non-empty list of distinct integers >= 0", "1 is listed twice"]),
    ("sweep-seeds-negative", ["sweep", "{u}/sweep_negative_seed.yaml", "--dry-run"],
     ["seeds must be a non-empty list of distinct integers >= 0", "-2 is not"]),
]


def _fill(items, user_dir):
    return [item.replace("{u}", user_dir) for item in items]


@pytest.mark.parametrize("overrides, fragments", [c[1:] for c in CONFIG_CASES + DATA_CASES + TOKENIZER_CASES],
                         ids=[c[0] for c in CONFIG_CASES + DATA_CASES + TOKENIZER_CASES])
def test_bad_config_data_or_tokenizer_is_one_line(tmp_path, capsys, user_dir, overrides, fragments):
    _assert_clean_failure(_train_args(tmp_path, *_fill(overrides, user_dir)), capsys, user_dir, fragments)
    assert not (tmp_path / "run").exists()  # a failed fresh start leaves no run directory behind


@pytest.mark.parametrize("argv, fragments", [c[1:] for c in FILE_CASES + FLAG_CASES],
                         ids=[c[0] for c in FILE_CASES + FLAG_CASES])
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
def trained_run(tiny_trained_run):
    """One real run (1 step, tiny model) whose checkpoint the cases below try to misuse (the session's shared
    run of this TINY; every case checks it is left unchanged)."""
    assert TINY == TINY_RUN
    return str(tiny_trained_run)


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
    ("task-without-examples", "{u}/task_no_examples.json", ["task_no_examples.json' has no 'examples'",
                                                            "fix the file"]),
    ("task-with-empty-examples", "{u}/task_empty_examples.json", ["examples is missing or empty"]),
    ("example-without-input", "{u}/task_no_input.json", ["examples[0].input is missing or not a string"]),
    ("example-without-target", "{u}/task_no_target.json", ["examples[0] has neither 'target' nor 'target_scores'"]),
    ("task-with-unsupported-metric", "{u}/task_bad_metric.json", ["metrics name ['vibes'], not BIG-bench metrics"]),
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


def test_a_csv_with_a_byte_order_mark_fits_like_one_without(user_dir, capsys):
    outputs = []
    for name in ("table_ok.csv", "table_bom.csv"):
        assert main(["fit", os.path.join(user_dir, name), "--law", "kaplan_n", "--bootstrap", "0"]) == 0
        outputs.append(capsys.readouterr().out.replace(name, "TABLE"))
    assert outputs[0] == outputs[1] and "alpha = " in outputs[0]


def test_unreachable_remote_storage_is_one_line(user_dir, tmp_path, capsys, monkeypatch):
    """No network (or no credentials) for a gs:// path: the client library's exception becomes one line."""
    aiohttp = pytest.importorskip("aiohttp")
    from scaling_jax import paths

    def unreachable(path):
        raise aiohttp.ClientOSError(-2, "Cannot connect to host storage.googleapis.com:443 [Name or service not known]")

    monkeypatch.setattr(paths, "exists", unreachable)
    argv = ["eval", "--checkpoint", "gs://bucket/runs/a", "--tasks", "arithmetic", "--out", str(tmp_path / "eval")]
    _assert_clean_failure(argv, capsys, user_dir, ["remote storage could not be reached", "ClientOSError",
                                                   "Cannot connect to host", "check the network and the credentials"])


# ----------------------------------------------------------------------------- where eval and report write


@pytest.fixture
def read_only(monkeypatch):
    """``read_only(DIR)`` makes every write under DIR fail as on a read-only directory or mount. Tests run as
    root, which chmod does not stop, so the refusal is made at the calls every write goes through (open for
    writing, os.open, os.mkdir: os.makedirs, tempfile, shutil and matplotlib all end in them)."""
    roots = []

    def denied(path) -> bool:
        if isinstance(path, int):
            return False
        path = os.path.abspath(os.fsdecode(path))
        return any(path == r or path.startswith(r + os.sep) for r in roots)

    def refuse(path):
        raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))

    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def fake_open(file, mode="r", *args, **kwargs):
        if denied(file) and any(c in mode for c in "wax+"):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def fake_os_open(path, flags, *args, **kwargs):
        if denied(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    def fake_mkdir(path, *args, **kwargs):
        if denied(path):
            refuse(path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)
    return lambda path: roots.append(os.path.abspath(path))


@pytest.mark.parametrize("command", ["eval", "report"])
def test_a_read_only_run_is_refused_before_any_work_naming_out(trained_run, read_only, capsys, command):
    """Issue 15 item 8: both default to writing into the run (RUN/eval, RUN/report) and ended in a PermissionError
    traceback, eval after scoring every task. Now one line, before any checkpoint is read, says to pass --out."""
    read_only(trained_run)
    argv = (["eval", "--checkpoint", trained_run, "--tasks", "arithmetic", "--num-examples", "2"]
            if command == "eval" else ["report", trained_run])
    _assert_clean_failure(argv, capsys, trained_run, [f"cannot write the default output directory '{trained_run}/"
                                                      f"{command}' inside '{trained_run}' (permission denied)",
                                                      "pass --out DIR naming a writable directory"])
    assert not os.path.exists(os.path.join(trained_run, command))


@pytest.mark.parametrize("command", ["eval", "report"])
def test_out_that_is_a_file_is_one_line(trained_run, user_dir, capsys, command):
    argv = (["eval", "--checkpoint", trained_run, "--tasks", "arithmetic", "--out", f"{user_dir}/tiny.txt"]
            if command == "eval" else ["report", trained_run, "--out", f"{user_dir}/tiny.txt"])
    _assert_clean_failure(argv, capsys, user_dir, ["--out '", "tiny.txt' is a file", "pass --out DIR"])


def test_a_read_only_out_is_one_line(trained_run, user_dir, read_only, capsys):
    read_only(os.path.join(user_dir, "notes"))
    argv = ["report", trained_run, "--out", f"{user_dir}/notes/report"]
    _assert_clean_failure(argv, capsys, user_dir, ["cannot write --out '", "notes/report' (permission denied)"])


def test_report_and_eval_into_a_directory_of_user_files_only_add_their_own(trained_run, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.md").write_text("my notes\n")
    (out / "data.json").write_text(json.dumps({"mine": True}))
    before = _snapshot(str(out))
    assert main(["report", trained_run, "--out", str(out)]) == 0
    assert main(["eval", "--checkpoint", trained_run, "--tasks", "arithmetic", "--num-examples", "2",
                 "--max-examples", "2", "--out", str(out)]) == 0
    capsys.readouterr()
    after = _snapshot(str(out))
    assert {k: after[k] for k in before} == before  # the user's files untouched
    assert {"report.md", "report.json", "results.json", "results.md"} <= set(after)
    assert main(["report", trained_run, "--out", str(out)]) == 0  # a rerun replaces its own earlier output
    # a user's own report.md or results.json is never written over
    for command, name in (("report", "report.md"), ("eval", "results.json")):
        theirs = tmp_path / f"theirs-{command}"
        theirs.mkdir()
        (theirs / name).write_text("mine")
        args = [trained_run] if command == "report" else ["--checkpoint", trained_run, "--tasks", "arithmetic"]
        assert main([command, *args, "--out", str(theirs)]) == 2
        assert f"already holds {name}, which scaling-jax {command} did not write" in capsys.readouterr().err
        assert sorted(os.listdir(theirs)) == [name] and (theirs / name).read_text() == "mine"


def test_links_under_out_a_run_inside_a_run_and_a_sweep_in_a_users_directory_are_refused(trained_run, tmp_path,
                                                                                           capsys):
    """Each wrote or moved something outside its output: report/eval through a dangling link named like their
    output (creating the file it pointed at), tokenizer train over a dangling link, a run inside another run's
    checkpoints (the other's resume moved it aside as a damaged checkpoint), a sweep among a user's files."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.md").symlink_to(tmp_path / "victim.md")
    assert main(["report", trained_run, "--out", str(out)]) == 2
    assert "symbolic link" in capsys.readouterr().err and not (tmp_path / "victim.md").exists()
    (tmp_path / "tok.json").symlink_to(tmp_path / "nowhere" / "t.json")
    assert main(["tokenizer", "train", "--corpus", trained_run, "--output", str(tmp_path / "tok.json"),
                 "--vocab-size", "400"]) == 2
    assert "already exists" in capsys.readouterr().err and (tmp_path / "tok.json").is_symlink()
    inside = os.path.join(trained_run, "checkpoints", "9")
    assert main(["train", "configs/quickstart.yaml", *TINY, f"train.run_dir={inside}"]) == 2
    assert f"lies inside the run '{trained_run}'" in capsys.readouterr().err and not os.path.exists(inside)
    users = tmp_path / "users"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    spec = tmp_path / "sweep.yaml"
    spec.write_text(json.dumps({"name": "s", "base": os.path.abspath("configs/quickstart.yaml"), "out_dir": str(users),
                                "objectives": ["causal"], "sizes": ["passuntil:1"], "budgets": [{"tokens": 512}]}))
    assert main(["sweep", str(spec)]) == 2
    assert "holds notes.txt, which no sweep wrote" in capsys.readouterr().err and os.listdir(users) == ["notes.txt"]


def _read_only_mount_works(path) -> bool:
    probe = f"mount --bind -o ro '{path}' '{path}' && ! touch '{path}/.probe' 2>/dev/null"
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "--mount", "sh", "-c", probe], capture_output=True).returncode == 0


@pytest.mark.slow  # two whole report and eval processes (the permission-denied case above runs in this one)
def test_a_really_read_only_run_mount_is_one_line(trained_run, tmp_path):
    """The same through a real read-only bind mount (where the machine allows one: root with mount rights)."""
    if not _read_only_mount_works(tmp_path):
        pytest.skip("no read-only bind mount here (needs unshare and mount rights)")
    commands = [f"{sys.executable} -m scaling_jax.cli report '{trained_run}'",
                f"{sys.executable} -m scaling_jax.cli eval --checkpoint '{trained_run}' --tasks arithmetic"]
    script = f"mount --bind -o ro '{trained_run}' '{trained_run}' && " + " ; ".join(
        f"{c}; echo rc=$?" for c in commands)
    done = subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True, text=True)
    assert done.stdout.split() == ["rc=2", "rc=2"], done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if not line.startswith("warning: ")]
    assert len(errors) == 2 and all(e.startswith("error: cannot write the default output directory") and
                                    "(read-only file system); pass --out DIR" in e for e in errors), done.stderr
