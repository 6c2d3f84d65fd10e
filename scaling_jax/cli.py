"""``scaling-jax`` command line: train, resume, continue, info, eval, sweep, fit, report, convert, tokenizer, data.

User errors (``UserError``) print one line and exit 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import sys
from collections.abc import Iterator

from scaling_jax.errors import UserError, first_line
from scaling_jax.parallel.cpu_threads import ensure_threads_for_collectives
from scaling_jax.parallel.device_memory import claim_device_memory
from scaling_jax.run_dir import CONFIG_FILE, EVAL_DIR, REPORT_DIR


@contextlib.contextmanager
def no_notebook_probe() -> Iterator[None]:
    """flax.nnx asks IPython at import whether it runs in a notebook (to colour its reprs), and where IPython is
    installed that imports all of it: 0.1-0.5 CPU-s of every command's start (a 1-step tiny training: 5.3-6.3 ->
    5.0-6.1 CPU-s, 4 alternated pairs, load ~1.1). A process that has not loaded IPython is no notebook, so while
    a command runs there, importing IPython fails at once (flax, tqdm and matplotlib take their terminal branch)."""
    if "IPython" in sys.modules:
        yield
        return
    sys.modules["IPython"] = None  # type: ignore[assignment]  # the import system's "known missing" marker
    try:
        yield
    finally:
        if "IPython" in sys.modules and sys.modules["IPython"] is None:
            del sys.modules["IPython"]


def _join_processes(args: argparse.Namespace) -> None:
    """Multi-process jobs join the coordination service before any JAX device use."""
    from scaling_jax.parallel.distributed import initialize

    initialize(args.coordinator_address, args.num_processes, args.process_id)


def _run_config(args: argparse.Namespace, resume: bool = False):
    """The config to train: a YAML file, or a run directory (or its ``config.yaml``), which then trains in place.

    A run's stored ``train.run_dir`` is where it was first written; resuming goes by the directory given, so
    a copied run trains in the copy, from wherever the command runs.
    """
    from scaling_jax.config import load_config
    from scaling_jax.run_dir import resolve_run_config

    found = resolve_run_config(args.config)
    if found is None:
        if resume:
            raise UserError(f"'{args.config}' is not a run directory; pass the train.run_dir of an earlier run")
        return load_config(args.config, args.overrides)
    run, config_file = found
    override = [o for o in args.overrides if o.partition("=")[0].strip() == "train.run_dir"]
    if resume and override:
        raise UserError(f"resume trains in '{run}' itself; drop {override[0]} (or use `scaling-jax train "
                        f"{config_file} {override[0]}` to start a new run from this run's config)")
    return load_config(config_file, ([] if override else [f"train.run_dir={run}"]) + args.overrides, saved_run=True)


def _stop_note(summary: dict, run_dir: str) -> str:
    """Says which step a validation number is from when a stop request ended the run before its last step."""
    if not summary.get("stopped_by"):
        return ""
    return (f"; stopped by {summary['stopped_by']} at step {summary['step']}, validation is from step "
            f"{summary.get('val_step', '?')}; resume with: scaling-jax train {run_dir}")


def _train(args: argparse.Namespace, resume: bool = False) -> int:
    config = _run_config(args, resume)  # a bad config fails in a second, before JAX and the trainer load
    _join_processes(args)  # before any device is touched (loading a config touches none)
    from scaling_jax.train.loop import train

    summary = train(config)
    run_dir = config.train.run_dir
    if "val_bpb" in summary:
        print(f"validation at step {summary['val_step']}: {summary['val_bpb']:.3f} bits/byte (unigram baseline "
              f"{summary['baseline_bpb']:.3f}), {summary['val_loss']:.4f} nats/token; "
              f"{summary['step']} steps, {summary['tokens']:,} tokens in {summary['wall_time']:.1f} s; "
              f"run dir {run_dir}{_stop_note(summary, run_dir)}")
    return 130 if summary.get("stopped_by") == "Ctrl-C" else 0


def _resume(args: argparse.Namespace) -> int:
    return _train(args, resume=True)


def _continue(args: argparse.Namespace) -> int:
    from scaling_jax.train.continuation import child_config
    from scaling_jax.train.loop import train
    from scaling_jax.train.start import StartSpec

    _join_processes(args)
    config, notes = child_config(args.source, args.stage, args.overrides)
    for note in notes:
        print(f"stage {config.stage.name}: {note}", flush=True)
    summary = train(config, StartSpec.from_config(config))  # resuming the child later reads the same spec
    run_dir = config.train.run_dir
    if "val_bpb" in summary:
        print(f"stage {config.stage.name}: validation {summary['val_bpb']:.3f} bits/byte, {summary['val_loss']:.4f} "
              f"nats/token at step {summary['val_step']}; totals over all stages {summary['total_tokens']:,} tokens, "
              f"{summary['total_flops']:.4g} FLOPs; run dir {run_dir}{_stop_note(summary, run_dir)}")
    return 130 if summary.get("stopped_by") == "Ctrl-C" else 0


def _info(args: argparse.Namespace) -> int:
    import jax

    from scaling_jax import paths
    from scaling_jax.config import load_config
    from scaling_jax.data.tokenizer import resolved_config
    from scaling_jax.info import describe, format_lineage, format_report, read_lineage

    path = args.config
    run_dir = paths.isdir(path)  # a run directory, local or gs://
    if run_dir:
        saved = paths.join(path, CONFIG_FILE)
        if not paths.exists(saved):
            raise UserError(f"'{path}' is a directory without config.yaml; pass a config file or a run directory")
        path = saved
    devices = _flag(args, "devices", int, 0, hint="0 plans for this machine's devices")
    config = resolved_config(load_config(path, args.overrides, saved_run=bool(run_dir)))
    devices = devices or jax.device_count()
    print(format_report(config, describe(config, devices, jax.devices()[0].platform)))
    lineage = read_lineage(args.config) if run_dir else None
    if lineage:
        print(format_lineage(lineage))
    return 0


# The flags each direction takes; any other one given is a one-line error naming it.
CONVERT_FLAGS = {"from_hf": ("out", "tokenizer"), "from_maxtext": ("out", "tokenizer", "maxtext_config"),
                 "from_t5x": ("out", "tokenizer"), "to_hf": ("checkpoint", "step", "dtype"),
                 "to_maxtext": ("checkpoint", "step")}


def _convert(args: argparse.Namespace) -> int:
    _flag(args, "step", int, 0)
    name = next(n for n in CONVERT_FLAGS if getattr(args, n) is not None)
    way = "--" + name.replace("_", "-")
    if not getattr(args, name).strip():
        raise UserError(f"{way} needs a directory; got an empty value")
    stray = [f"--{f.replace('_', '-')}" for f in ("checkpoint", "step", "dtype", "out", "tokenizer", "maxtext_config")
             if f not in CONVERT_FLAGS[name] and getattr(args, f) is not None]
    if stray:
        raise UserError(f"{stray[0]} does not apply to convert {way}; drop it (see scaling-jax convert --help)")
    return _convert_import(args, name, way) if name.startswith("from") else _convert_export(args, name, way)


def _convert_import(args: argparse.Namespace, name: str, way: str) -> int:
    if not args.out:
        raise UserError(f"convert {way} needs --out RUN_DIR (the run directory to write)")
    source = getattr(args, name)
    if name == "from_hf":
        from scaling_jax.interop import hf_runs

        config = hf_runs.import_hf(source, args.out, args.overrides, args.tokenizer)
    elif name == "from_maxtext":
        from scaling_jax.interop import maxtext_runs

        config = maxtext_runs.import_maxtext(source, args.out, args.overrides, args.tokenizer,
                                             args.maxtext_config or ())
    else:
        from scaling_jax.interop import t5x

        config = t5x.import_t5x(source, args.out, args.overrides, args.tokenizer)
    m = config.model
    print(f"imported {source}: {m.layers} layers, d_model {m.d_model}, {m.heads} heads "
          f"({m.kv_heads or m.heads} kv), {m.mlp}, vocab {m.vocab_size}; step-0 checkpoint in {args.out} "
          f"(tokenizer {config.data.tokenizer}); continue with: scaling-jax train {args.out}/config.yaml")
    return 0


def _convert_export(args: argparse.Namespace, name: str, way: str) -> int:
    if not args.checkpoint:
        raise UserError(f"convert {way} needs --checkpoint RUN_DIR (the run to export)")
    if name == "to_maxtext":
        from scaling_jax.interop import maxtext_runs

        scan = maxtext_runs.export_layout(args.overrides)
        out = maxtext_runs.export_maxtext(args.checkpoint, args.to_maxtext, args.step, scan)
        print(f"exported {args.checkpoint} to {out} (MaxText llama2 parameter checkpoint); run MaxText with "
              f"{out}/{maxtext_runs.CONFIG_FILE} (it sets load_parameters_path={out}/0/items)")
        return 0
    from scaling_jax.interop import hf_runs

    if args.overrides:
        raise UserError(f"convert --to-hf takes no config overrides (got {' '.join(args.overrides)})")
    out = hf_runs.export_hf(args.checkpoint, args.to_hf, args.step, args.dtype)
    print(f"exported {args.checkpoint} to {out} (Hugging Face LlamaForCausalLM, safetensors)")
    return 0


def _flag(args: argparse.Namespace, name: str, kind: type = int, low: float | None = None, *,
          above: bool = False, hint: str = ""):
    """A numeric flag, converted and range-checked here rather than by argparse (which answers with its usage
    text): ``--passes 0 must be an integer >= 1``, one line. Sets the converted value back on ``args``."""
    import math

    raw = getattr(args, name)
    if raw is None:
        return None
    try:
        value = kind(raw)
    except (TypeError, ValueError):
        value = None
    ok = value is not None and math.isfinite(value) and (low is None or (value > low if above else value >= low))
    if not ok:
        rule = "" if low is None else f" {'>' if above else '>='} {low:g}"
        raise UserError(f"--{name.replace('_', '-')} {raw} must be {'an integer' if kind is int else 'a number'}"
                        f"{rule}" + (f"; {hint}" if hint else ""))
    setattr(args, name, value)
    return value


def _writable_out(out: str, default_in: str | None = None, flag: str = "--out") -> None:
    """Fail now, in one line, if the output directory cannot be made or written (not after the work is done).

    ``default_in``: the directory ``out`` defaults into (a run or sweep), named in the message."""
    import tempfile

    from scaling_jax import paths

    fix, kind = ("pass --out DIR naming a writable directory", "pass --out DIR") if flag == "--out" else \
        (f"pass {flag} naming a writable place", f"pass {flag} naming a writable place")
    flag = flag if default_in is None else "the default output directory"
    if paths.is_remote(out):
        where = "write locally and copy the files up" if default_in is None else "pass --out LOCAL_DIR"
        raise UserError(f"{flag} '{out}' must be a local directory; {where}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"{flag} '{out}' is a file; {kind} (a new or existing directory)")
    probe = os.path.abspath(out)
    while not os.path.exists(probe):  # the nearest existing ancestor is where a directory gets created
        probe = os.path.dirname(probe)
    try:
        if not os.path.isdir(probe):
            raise NotADirectoryError(0, f"'{probe}' is a file")
        with tempfile.TemporaryFile(dir=probe):  # created and removed: nothing of the user's is touched
            pass
    except OSError as e:
        why = (e.strerror or str(e)).lower()
        where = f" inside '{default_in}'" if default_in else ""
        raise UserError(f"cannot write {flag} '{out}'{where} ({why}); {fix}") from None


OUTPUT_MARKER = ".scaling_jax_output"  # in an --out directory: which command wrote its files


def _own_out(out: str, command: str, names: tuple[str, ...]) -> None:
    """An ``--out`` directory may already hold the files ``command`` writes only if ``command`` wrote them (a
    rerun): a user's own report.md or results.json is never written over."""
    taken = [n for n in names if os.path.lexists(os.path.join(out, n))]  # a dangling link is the user's too
    marker = os.path.join(out, OUTPUT_MARKER)
    if os.path.islink(marker) or any(os.path.islink(os.path.join(out, n)) for n in taken):
        raise UserError(f"--out '{out}' holds a symbolic link where scaling-jax {command} writes its files; choose "
                        "another --out (a new or empty directory, or an earlier output of this command)")
    writers = set(open(marker).read().split()) if os.path.isfile(marker) else set()
    if taken and command not in writers:
        raise UserError(f"--out '{out}' already holds {taken[0]}, which scaling-jax {command} did not write; choose "
                        "another --out (a new or empty directory, or an earlier output of this command)")
    os.makedirs(out, exist_ok=True)
    with open(marker, "w") as f:
        f.write("\n".join(sorted(writers | {command})) + "\n")


def _data_config(args: argparse.Namespace):
    """The data section of ``--config`` (optional) with dotted overrides: the source, format, tokenizer, split."""
    from scaling_jax.config import load_config

    return load_config(args.config, args.overrides).data


MAX_TRAINED_VOCAB = 1 << 20


def _tokenizer_train(args: argparse.Namespace) -> int:
    from scaling_jax.data.sources import load_documents
    from scaling_jax.data.tokenizer import MODE_TOKENS, NUM_SENTINELS, TRAINED_SPECIALS, train_tokenizer

    least = len(TRAINED_SPECIALS) + len(MODE_TOKENS) + NUM_SENTINELS + 256 + 16  # as train_tokenizer requires
    size = _flag(args, "vocab_size", int, least,
                 hint=f"{least - 272} ids are reserved and the 256 bytes need their own")
    if size is not None and size > MAX_TRAINED_VOCAB:  # the trainers allocate per id and abort the process
        raise UserError(f"--vocab-size {size} is larger than {MAX_TRAINED_VOCAB:,}; LLM vocabularies are 32k-256k")
    if os.path.isdir(args.output):
        raise UserError(f"--output '{args.output}' is a directory; name the file to write, e.g. "
                        f"{os.path.join(args.output, 'tokenizer.json')}")
    if os.path.lexists(args.output):  # a file, or a link (even one to nothing): runs may use what it names
        raise UserError(f"--output '{args.output}' already exists; name a new file (runs may use the old "
                        "tokenizer, so it is never replaced)")
    _writable_out(os.path.dirname(os.path.abspath(args.output)), flag="--output")  # before the training
    data = _data_config(args)
    if args.corpus:
        data.source = args.corpus
    elif data.mixture:  # load_documents reads data.source, which a mixture leaves at its default
        raise UserError("tokenizer train reads one corpus, and the config's data is a data.mixture; pass --corpus "
                        "(a file, directory or glob holding text from the mixture's sources)")
    docs = load_documents(data, "train")  # the validation split stays unseen by the tokenizer too
    tok = train_tokenizer((d.text for d in docs), args.output, args.vocab_size, args.kind, args.library)
    sample = docs[0].text[:2000]
    bytes_per_token = len(sample.encode()) / max(len(tok.encode(sample)), 1)
    lines = [f"trained {args.kind} ({tok.kind}) on {len(docs):,} documents of {data.source}: {args.output}",
             f"  vocab {tok.vocab_size}: pad {tok.pad_id}, bos {tok.bos_id}, eos {tok.eos_id}, modes "
             f"{list(tok.mode_ids.values())}, {tok.num_sentinels} sentinels; {bytes_per_token:.2f} bytes/token",
             f"  use it with data.tokenizer={args.output}"]
    print("\n".join(lines))
    return 0


def _data_prepare(args: argparse.Namespace) -> int:
    import time

    from scaling_jax.data import prepare as prep
    from scaling_jax.data.tokenizer import build_tokenizer
    from scaling_jax.scaling import executors

    executors.check_executor(args.executor, args.address)
    _flag(args, "chunk_tokens", int, 1)
    _flag(args, "chunks_per_shard", int, 1)
    part_mib = _flag(args, "part_mib", float, 0, above=True, hint="input MiB per part, e.g. 64")
    prep.check_output(args.output, args.overwrite)  # before the tokenizer and any Ray cluster start
    _writable_out(os.path.dirname(os.path.abspath(args.output)), flag="--output")
    data = _data_config(args)
    parallel_map = None
    if args.executor == "ray":
        prep.check_parallel(data)
        parallel_map = executors.make_executor("ray", address=args.address).map  # no Ray: one line, the pip command
    tokenizer = build_tokenizer(data.tokenizer, data.seqio_modules)
    started = time.perf_counter()
    manifest = prep.prepare(data, tokenizer, args.output, args.chunk_tokens, args.chunks_per_shard, args.overwrite,
                            part_bytes=max(1, round(part_mib * 2**20)), parallel_map=parallel_map)
    splits = manifest["splits"]
    print(f"prepared {data.source} -> {args.output}: " + "; ".join(
        f"{name} {s['documents']:,} documents, {s['tokens']:,} tokens in {len(s['shards'])} shard(s)"
        for name, s in splits.items()) + f" ({tokenizer.kind} tokenizer {tokenizer.fingerprint()}; "
        f"{len(manifest['parts'])} part(s), {args.executor}, {time.perf_counter() - started:.1f} s); train on it "
        f"with data.source={args.output} data.tokenizer={args.output}/tokenizer")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from scaling_jax.eval.generators import split_task_specs
    from scaling_jax.eval.harness import PassUntilOptions, check_run_dir, run_eval

    if args.overrides:
        raise UserError(f"eval takes no config overrides (got {' '.join(args.overrides)}); "
                        "the run's own config.yaml is used")
    checkpoints = [c for item in args.checkpoint for c in item.split(",") if c]
    tasks = split_task_specs(args.tasks)
    if not checkpoints:
        raise UserError("eval needs --checkpoint RUN_DIR naming at least one run")
    if not tasks:
        raise UserError("eval needs --tasks naming at least one task file or generator (e.g. --tasks arithmetic)")
    for name, low in (("shots", 0), ("seed", 0), ("num_examples", 1), ("max_examples", 0), ("max_new_tokens", 1)):
        _flag(args, name, int, low)
    _flag(args, "predict_n", float, 0, above=True, hint="a parameter count N such as 1e9")
    given = [f"--{n.replace('_', '-')}" for n in ("passes", "max_samples", "predict_n") if getattr(args, n) is not None]
    if given and not args.passuntil:
        raise UserError(f"{given[0]} applies to PassUntil; add --passuntil or drop it")
    if args.predict_n is not None and len(checkpoints) < 2:
        raise UserError("--predict-n extrapolates a series; give two or more --checkpoint runs or drop it")
    options = None
    if args.passuntil:
        defaults = PassUntilOptions()
        passes = _flag(args, "passes", int, 1) or defaults.passes
        max_samples = _flag(args, "max_samples", int, passes, hint="sampling stops at --passes passes")
        if max_samples is None and defaults.max_samples < passes:
            raise UserError(f"--passes {passes} exceeds the default --max-samples {defaults.max_samples}; "
                            f"pass --max-samples {passes} or more")
        options = PassUntilOptions(passes=passes, max_samples=max_samples or defaults.max_samples,
                                   max_new_tokens=args.max_new_tokens)
    for ckpt in checkpoints:  # every input checked before anything is written or loaded
        check_run_dir(ckpt)
    out_dir = args.out or os.path.join(checkpoints[0], EVAL_DIR)
    _writable_out(out_dir, None if args.out else checkpoints[0])
    if args.out:
        _own_out(out_dir, "eval", ("results.json", "results.md", "plots", "tasks"))
    out = run_eval(checkpoints, tasks, args.shots, out_dir, args.seed, args.num_examples, args.max_examples,
                   options, args.predict_n, args.max_new_tokens)
    with open(out["markdown"]) as f:
        print(f.read(), end="")
    print(f"results: {out['out_dir']}/results.json, results.md" + (f", {len(out['plots'])} plot(s)" if out["plots"]
                                                                     else ""))
    return 0


def _split(items: list[str] | None) -> list[str] | None:
    return [x for item in items for x in item.split(",") if x] if items else None


def _sweep(args: argparse.Namespace) -> int:
    from scaling_jax.scaling import executors, sweep

    executors.check_executor(args.executor, args.address)
    spec = sweep.load_sweep(args.spec, args.overrides)
    objectives, sizes = _split(args.objectives), _split(args.sizes)
    if args.dry_run:
        print(sweep.format_plan(sweep.plan(spec, objectives, sizes)))
        if args.executor == "ray":
            print(f"ray: {spec.ray.describe()}")
        return 0
    executor = executors.make_executor(args.executor, spec.ray, args.address)  # no Ray: one line, the pip command
    entries = sweep.run_sweep(spec, objectives, sizes, executor=executor)
    print(f"manifest: {spec.out_dir}/{sweep.MANIFEST}")
    if not args.no_report and any(e["status"] == "done" for e in entries):
        from scaling_jax.scaling.plots import write_report

        print(f"report: {write_report([spec.out_dir], os.path.join(spec.out_dir, 'report'))}")
    return 0 if all(e["status"] == "done" for e in entries) else 1


def _fit(args: argparse.Namespace) -> int:
    import csv

    from scaling_jax.scaling import laws

    if args.overrides:
        raise UserError(f"fit takes no config overrides (got {' '.join(args.overrides)})")
    if args.law not in laws.TABLE_FITS:
        raise UserError(f"--law {args.law} is unknown; choose one of {', '.join(laws.TABLE_FITS)}")
    _flag(args, "bootstrap", int, 0, hint="0 fits without intervals")
    if _flag(args, "compute", float, 0, above=True, hint="training FLOPs such as 1e21") and args.law != "chinchilla":
        raise UserError(f"--compute applies to --law chinchilla (the compute-optimal N and D), not {args.law}; "
                        "drop it")
    if not os.path.isfile(args.table):
        what = "is a directory" if os.path.isdir(args.table) else "does not exist"
        raise UserError(f"table '{args.table}' {what}; pass a CSV file with a header such as N,D,loss")
    try:  # utf-8-sig: spreadsheets often start a UTF-8 CSV with a byte-order mark
        with open(args.table, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        why = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else "malformed CSV"
        raise UserError(f"table '{args.table}' is not a readable CSV ({why}); save it as UTF-8 CSV with a header "
                        "such as N,D,loss") from None
    if not rows:
        raise UserError(f"table '{args.table}' has no data rows; give a header such as N,D,loss and one row per run")
    try:
        table = {k.strip(): [float(r[k]) for r in rows] for k in rows[0]}
    except (AttributeError, TypeError, ValueError):
        raise UserError(f"table '{args.table}' has a non-numeric, missing or extra cell; make every row's cells "
                        "numbers under the header") from None
    fit = laws.fit_table(table, args.law, n_boot=args.bootstrap)
    exact = args.bootstrap and len(rows) <= len(fit.params)  # every resample is fitted exactly: no error to see
    intervals = (f"95% bootstrap intervals, {len(fit.samples)} refits" if len(fit.samples) else
                 "no bootstrap intervals" + (": no more rows than parameters, so the fit is exact" if exact else ""))
    print(f"{args.law} on {len(rows)} rows ({intervals}):")
    for name, value in fit.params.items():
        low, high = fit.ci[name]
        print(f"  {name} = {value:.6g}" + (f" [{low:.6g}, {high:.6g}]" if len(fit.samples) else ""))
    if args.law == "chinchilla" and args.compute:
        alloc = laws.chinchilla_optimal(fit.params, args.compute)
        print(f"  compute-optimal at C = {args.compute:.3g}: N = {float(alloc.n):.4g}, D = {float(alloc.d):.4g} "
              f"({float(alloc.tokens_per_param):.1f} tokens/parameter)")
    return 0


def _report(args: argparse.Namespace) -> int:
    from scaling_jax.scaling.plots import REPORT_FILES, check_report_paths, write_report

    if args.overrides:
        raise UserError(f"report takes no config overrides (got {' '.join(args.overrides)})")
    _flag(args, "target_flops", float, 0, above=True, hint="training FLOPs such as 1e21")
    check_report_paths(args.paths)  # every input checked before anything is written
    out = args.out or os.path.join(args.paths[0], REPORT_DIR)
    _writable_out(out, None if args.out else args.paths[0])
    if args.out:
        _own_out(out, "report", REPORT_FILES)
    print(f"report: {write_report(args.paths, out, args.target_flops)}")
    return 0


def _add_process_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--coordinator-address", help="multi-process: HOST:PORT of process 0 (TPU pods detect it)")
    parser.add_argument("--num-processes", type=int, help="multi-process: number of processes")
    parser.add_argument("--process-id", type=int, help="multi-process: this process's index")


class _Parser(argparse.ArgumentParser):
    """argparse prints its usage block before an error; ours is the one ``error:`` line every command gives."""

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="scaling-jax", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for user errors")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model as a config describes, or resume a run directory")
    train.add_argument("config", help="YAML config (e.g. configs/quickstart.yaml), or a run directory to resume")
    train.add_argument("overrides", nargs="*", help="dotted overrides such as model.layers=4 train.steps=200")
    _add_process_flags(train)
    train.set_defaults(func=_train)

    resume = sub.add_parser("resume", help="resume a run directory where it stopped (the run trains in place)")
    resume.add_argument("config", metavar="RUN_DIR", help="run directory of an earlier `train`")
    resume.add_argument("overrides", nargs="*", help="dotted overrides such as train.steps=2000")
    _add_process_flags(resume)
    resume.set_defaults(func=_resume)

    cont = sub.add_parser("continue", help="start a new stage (UL2R, finetuning) from a parent checkpoint")
    cont.add_argument("--from", dest="source", required=True, metavar="RUN_DIR_OR_CHECKPOINT",
                      help="parent run directory (its latest checkpoint) or RUN_DIR/checkpoints/STEP")
    cont.add_argument("--stage", required=True, help="stage YAML, e.g. configs/stages/ul2r.yaml")
    cont.add_argument("overrides", nargs="*", help="dotted overrides such as budget.fraction=0.001")
    _add_process_flags(cont)
    cont.set_defaults(func=_continue)

    info = sub.add_parser("info", help="parameter count, FLOPs/token and memory per device of a config or run")
    info.add_argument("config", help="YAML config or run directory")
    info.add_argument("overrides", nargs="*")
    info.add_argument("--devices", default=0, help="device count to plan for (default 0: this machine's)")
    info.set_defaults(func=_info)

    convert = sub.add_parser("convert", help="import a Hugging Face / MaxText / T5X checkpoint as a run, or export a "
                             "run to Hugging Face or MaxText")
    way = convert.add_mutually_exclusive_group(required=True)
    way.add_argument("--from-hf", metavar="HF_DIR", help="HF model directory (config.json + *.safetensors)")
    way.add_argument("--from-maxtext", metavar="CKPT_DIR", help="MaxText checkpoint: CHECKPOINTS/STEP/items (what "
                     "load_parameters_path names), its step directory, or CHECKPOINTS (latest step)")
    way.add_argument("--from-t5x", metavar="CKPT_DIR", help="T5X checkpoint directory")
    way.add_argument("--to-hf", metavar="HF_DIR", help="empty or new directory to write the HF model into")
    way.add_argument("--to-maxtext", metavar="OUT_DIR", help="empty or new directory to write a MaxText parameter "
                     "checkpoint (OUT_DIR/0/items) and its maxtext_config.yml into; scan_layers=false unstacks layers")
    convert.add_argument("--out", metavar="RUN_DIR", help="--from-*: run directory to create")
    convert.add_argument("--tokenizer", help="--from-*: tokenizer file or spec (byte) when the checkpoint has none")
    convert.add_argument("--maxtext-config", metavar="FILE", action="append",
                         help="--from-maxtext: YAML of the MaxText keys the model was trained with (base_emb_dim, "
                              "base_num_query_heads, ...; repeatable, later files win; missing keys take MaxText's "
                              "base.yml defaults)")
    convert.add_argument("--checkpoint", metavar="RUN_DIR", help="--to-*: run directory to export")
    convert.add_argument("--step", help="--to-*: checkpoint step >= 0 (default: latest)")
    convert.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                         help="--to-hf: weight dtype (default: the run's model.param_dtype)")
    convert.add_argument("overrides", nargs="*", help="--from-*: dotted overrides such as data.source=...; "
                         "--from-maxtext also takes MaxText keys (base_emb_dim=64, scan_layers=false)")
    convert.set_defaults(func=_convert)

    tok = sub.add_parser("tokenizer", help="train a tokenizer").add_subparsers(dest="action", required=True)
    tok_train = tok.add_parser("train", help="train a BPE or unigram tokenizer on any data source")
    tok_train.add_argument("--corpus", help="data source: file, directory, glob, gs://..., hf:..., stdlib "
                                            "(default: data.source of --config)")
    tok_train.add_argument("--output", required=True, help="tokenizer file to write: NAME.json (tokenizers) "
                                                           "or NAME.model (sentencepiece)")
    tok_train.add_argument("--vocab-size", default=32000, help="ids in all, reserved specials included (>= 378)")
    tok_train.add_argument("--kind", choices=("bpe", "unigram"), default="bpe")
    tok_train.add_argument("--library", choices=("tokenizers", "sentencepiece"), default="",
                           help="default: tokenizers for bpe, sentencepiece for unigram")
    tok_train.add_argument("--config", help="YAML config whose data section describes the corpus")
    tok_train.add_argument("overrides", nargs="*", help="dotted data overrides such as data.text_field=body")
    tok_train.set_defaults(func=_tokenizer_train)

    data = sub.add_parser("data", help="prepare pre-tokenized shards").add_subparsers(dest="action", required=True)
    prep = data.add_parser("prepare", help="tokenize a source once into ArrayRecord shards with a manifest")
    prep.add_argument("--output", required=True, help="directory to create (train on it with data.source=DIR)")
    prep.add_argument("--config", help="YAML config whose data section names source, format and tokenizer")
    prep.add_argument("--chunk-tokens", default=8192, help="tokens per record (>= 1)")
    prep.add_argument("--chunks-per-shard", default=4096, help="records per ArrayRecord file (>= 1)")
    prep.add_argument("--overwrite", action="store_true", help="replace an output directory an earlier prepare wrote")
    prep.add_argument("--part-mib", default=64, help="input MiB per part (> 0): files are grouped in order into "
                                                     "parts, each tokenized on its own (one task with --executor ray)")
    prep.add_argument("--executor", choices=("local", "ray"), default="local",
                      help="local: the parts one after another in this process (default); ray: every part a Ray "
                           "task (--output on storage every node sees); both write the same files")
    prep.add_argument("--address", help="--executor ray: the cluster's HOST:6379, auto or ray://HOST:10001 "
                                        "(default: RAY_ADDRESS, else a new local Ray)")
    prep.add_argument("overrides", nargs="*", help="dotted data overrides such as data.source=... data.tokenizer=...")
    prep.set_defaults(func=_data_prepare)
    ev = sub.add_parser("eval", help="score checkpoints on BIG-bench-style tasks; PassUntil and its scaling law")
    ev.add_argument("--checkpoint", action="append", required=True, metavar="RUN_DIR",
                    help="run directory (repeat or comma-separate several to fit the task law over a series)")
    ev.add_argument("--tasks", required=True, help="comma-separated task.json paths, bigbench:NAME (e.g. "
                    "bigbench:navigate, from BIGBENCH_DIR or an installed bigbench), bigbench-lite, and generators "
                    "(navigate, date_arith, arithmetic, code_completion; difficulty as NAME:key=value)")
    ev.add_argument("--shots", default=0, help="k shots (>= 0) for each example, drawn from the other examples; "
                    "every example is scored (BIG-bench's protocol)")
    ev.add_argument("--passuntil", action="store_true", help="also estimate PassUntil PU per instance and task")
    ev.add_argument("--passes", help="PassUntil: sample until this many passes (>= 1, default 2)")
    ev.add_argument("--max-samples", help="PassUntil: samples per instance at most (>= --passes, default 64)")
    ev.add_argument("--num-examples", default=100, help="examples per generated task (>= 1)")
    ev.add_argument("--max-examples", default=0, help="score at most this many examples per task (0: all)")
    ev.add_argument("--predict-n", help="PassUntil series: predict PU at this N > 0 (default: the largest run's)")
    ev.add_argument("--seed", default=42, help="sampling, shot and choice-order seed (>= 0; 42 is BIG-bench's own)")
    ev.add_argument("--max-new-tokens", default=48, help="generative tasks: answer budget in tokens, and BIG-bench's "
                    "cut of the answer in characters (its max_length; BIG-bench's own CLI uses 30)")
    ev.add_argument("--out", help="output directory (default: FIRST_RUN_DIR/eval)")
    ev.set_defaults(func=_eval)

    sw = sub.add_parser("sweep", help="run an objectives x sizes x budgets grid (resumable) and write its report")
    sw.add_argument("spec", help="sweep file, e.g. configs/sweeps/micro.yaml")
    sw.add_argument("overrides", nargs="*", help="dotted overrides for every run, e.g. train.eval_batches=8")
    sw.add_argument("--objectives", action="append", help="only these objective labels (comma-separated)")
    sw.add_argument("--sizes", action="append", help="only these size labels (comma-separated)")
    sw.add_argument("--dry-run", action="store_true", help="print the grid (N, tokens, FLOPs, steps) and exit")
    sw.add_argument("--no-report", action="store_true", help="skip the report at the end")
    sw.add_argument("--executor", choices=("local", "ray"), default="local",
                    help="local: one run after another in this process (default); ray: every run a Ray task, "
                         "with the sweep file's ray resources, retried when its worker dies")
    sw.add_argument("--address", help="--executor ray: the cluster's HOST:6379, auto or ray://HOST:10001 (default: "
                                      "RAY_ADDRESS, else a new local Ray)")
    sw.set_defaults(func=_sweep)

    fit = sub.add_parser("fit", help="fit a scaling law to a CSV table (yours or published numbers)")
    fit.add_argument("table", help="CSV with a header: N, D, C and/or loss columns")
    fit.add_argument("--law", required=True, help="kaplan_n | kaplan_d | kaplan_c | offset_n | kaplan_nd | chinchilla")
    fit.add_argument("--compute", help="chinchilla: compute-optimal N, D at this C = 6·N·D (FLOPs > 0)")
    fit.add_argument("--bootstrap", default=200, help="bootstrap refits for the intervals (0: none)")
    fit.set_defaults(func=_fit)

    rep = sub.add_parser("report", help="loss vs tokens/FLOPs/wall-clock plots, scaling fits and a Markdown table")
    rep.add_argument("paths", nargs="+", help="sweep directories (manifest.json) and/or run directories")
    rep.add_argument("--out", help="output directory (default: FIRST_PATH/report)")
    rep.add_argument("--target-flops", help="extrapolate the fitted L(C) to this compute > 0 (default: 10x the "
                     "largest run)")
    rep.set_defaults(func=_report)
    return parser


# Packages whose exceptions mean a gs:// (or other fsspec) path could not be reached: no network, no credentials,
# a refused request. They reach the user as one error line, not a traceback from inside the client library.
REMOTE_STORAGE_PACKAGES = ("aiohttp", "gcsfs", "google")


def from_remote_storage(error: BaseException) -> bool:
    return type(error).__module__.split(".")[0] in REMOTE_STORAGE_PACKAGES


OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # disk full, quota, file-size limit


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        unknown = [a for a in extra if "=" not in a or a.startswith("-")]
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.overrides = list(getattr(args, "overrides", [])) + extra  # key=value after an --option
    ensure_threads_for_collectives()  # before any command touches a device
    if args.func in (_train, _resume, _continue, _sweep):
        claim_device_memory()  # a trainer owns its accelerator: 95% of it for the step, not jax's default 75%
    logging.getLogger("gcsfs").setLevel(logging.CRITICAL)  # its retry tracebacks: the error line below says it
    try:
        with no_notebook_probe():
            return args.func(args)
    except UserError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (PermissionError, FileExistsError, NotADirectoryError, IsADirectoryError) as e:
        if args.debug or not e.filename:
            raise
        # a path the command was given (or made from one) that cannot be read or written as asked
        print(f"error: '{e.filename}': {e.strerror}; check the path you gave (its permissions, or a file where a "
              "directory is needed or the other way round)", file=sys.stderr)
        return 2
    except Exception as e:
        if args.debug:
            raise
        if isinstance(e, OSError) and e.errno in OUT_OF_SPACE:
            # most often the metrics log's append, written every step; a torn last row is repaired on resume
            where = f" writing '{e.filename}'" if e.filename else ""
            print(f"error: {e.strerror}{where}; free disk space (or raise the file-size limit) and run the command "
                  "again: a run resumes from its newest checkpoint (scaling-jax resume RUN_DIR)", file=sys.stderr)
            return 2
        if not from_remote_storage(e):
            raise
        print(f"error: remote storage could not be reached or refused the request ({type(e).__name__}: "
              f"{first_line(e)}); check the network and the credentials (gcloud auth application-default login), "
              "or give a local path", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted without saving; a rerun resumes from the newest checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
