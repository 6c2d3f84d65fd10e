#!/usr/bin/env python
"""Our AOT-compiled train step against MaxText's ``train_compile`` for the same shape and TPU topology.

Both compile on this CPU host for a TPU topology (libtpu's compiler, nothing allocated), each in its own
fresh process so neither reuses the other's caches. The MaxText side gets the shape of our config in its own
keys (``base_emb_dim``, ``base_num_query_heads``, ``base_num_kv_heads``, ``base_mlp_dim``,
``base_num_decoder_layers``, ``head_dim``, ``vocab_size``, ``logits_via_embedding``, ``max_target_length``,
``per_device_batch_size``, ``dtype=bfloat16``, ``weight_dtype=float32``, ``remat_policy``,
``ici_fsdp_parallelism`` / ``ici_tensor_parallelism``, ``attention``) and ``dataset_type=synthetic``. One table
compares per-chip peak (arguments + outputs - donated aliases + temporaries, as XLA's buffer assignment
reports it on both sides), temporaries, generated code size and compile wall time; ratios are ours/MaxText.
With ``--repeats N`` both compile N times, alternating which goes first (ours, MaxText, MaxText, ours, ...), so
a change in the machine's load falls on both; times are the medians (memory is the same every time), and each
repeat's compile-time ratio is printed as well.

MaxText is a measuring stick, never a dependency: it runs in whatever interpreter ``--maxtext-python`` names
(Python >= 3.12 with ``pip install "maxtext[tpu]==0.2.5"``), ours in this one (libtpu needed on both).

    python scripts/bench_vs_maxtext.py configs/tpu/v5e-16.yaml --topology v5e:4x4 \\
        --maxtext-python /path/to/maxtext-venv/bin/python [--repeats 3] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

from scaling_jax.config import Config, load_config
from scaling_jax.errors import UserError
from scaling_jax.parallel.mesh import ici_shape

GIB = 2**30
SCRIPTS = os.path.dirname(os.path.abspath(__file__))
# Our remat policy -> MaxText's remat_policy (same intent; MaxText has no "none": its "minimal" saves most)
REMAT = {"full": "full", "minimal": "minimal", "save_dots": "save_dot_with_context_except_mlp",
         "save_qkv_proj": "save_qkv_proj", "offload": "minimal_offloaded",
         "full_offload": "custom decoder_layer_input=offload"}
ATTENTION = {"xla": "dot_product", "splash": "flash", "auto": "flash"}
MLP = {"swiglu": '["silu","linear"]', "geglu": '["gelu","linear"]'}
# TensorCores per chip in MaxText's topology names (v4 / v5p count cores: v5p-128 is 64 chips)
CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}
ENV = {"JAX_PLATFORMS": "cpu", "TPU_SKIP_MDS_QUERY": "1", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


def maxtext_topology(topology: str) -> tuple[str, int]:
    """``v5e:4x4`` -> (``v5e-16``, 16 chips): MaxText names a topology by its TensorCore count."""
    m = re.fullmatch(r"(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})", topology)
    if not m:
        raise UserError(f"--topology '{topology}' is not GEN:AxB[xC] with GEN one of v4, v5e, v5p, v6e (e.g. v5e:4x4; "
                        "MaxText's own names such as v5e-16 are derived from it)")
    gen, chips = m.group(1), math.prod(int(x) for x in m.group(2).split("x"))
    return f"{gen}-{chips * CORES_PER_CHIP[gen]}", chips


def maxtext_args(config: Config, topology: str, out_dir: str) -> list[str]:
    """Our config's shape and layout in MaxText's config keys."""
    m, d, mesh = config.model, config.data, config.mesh
    name, chips = maxtext_topology(topology)
    if d.batch_size % chips:
        raise UserError(f"data.batch_size={d.batch_size} must be divisible by the {chips} chips of {topology}")
    if m.remat not in REMAT:
        raise UserError(f"model.remat={m.remat} has no MaxText counterpart; use one of {', '.join(REMAT)}")
    if m.attention not in ATTENTION:
        raise UserError(f"model.attention={m.attention} has no MaxText TPU counterpart; use xla or splash")
    # what the MaxText flags below cannot say: refused, so the two sides never compile different programs
    unmapped = {"model.position": (m.position, "rope"), "model.logits_scale": (m.logits_scale, "none"),
                "objective": (config.objective.name, "causal"), "mesh.dcn_data": (mesh.dcn_data, 1),
                "mesh.dcn_fsdp": (mesh.dcn_fsdp, 1)}
    for key, (value, plain) in unmapped.items():
        if value != plain:
            raise UserError(f"{key}={value} has no counterpart in the MaxText flags this bench passes; compare "
                            f"with {key}={plain}")
    data, fsdp, tensor = ici_shape(mesh, chips)
    return [f"base_emb_dim={m.d_model}", f"base_num_query_heads={m.heads}",
            f"base_num_kv_heads={m.kv_heads or m.heads}", f"base_mlp_dim={m.d_ff}",
            f"base_num_decoder_layers={m.layers}", f"head_dim={m.head_dim}", f"vocab_size={m.vocab_size}",
            f"logits_via_embedding={str(m.tie_embeddings).lower()}", f"mlp_activations={MLP[m.mlp]}",
            f"normalization_layer_epsilon={m.norm_eps}", f"rope_max_timescale={int(m.rope_theta)}",
            f"max_target_length={d.seq_len}", f"per_device_batch_size={d.batch_size // chips}",
            f"dtype={m.dtype}", f"weight_dtype={m.param_dtype}", *f"remat_policy={REMAT[m.remat]}".split(),
            f"attention={ATTENTION[m.attention]}", f"scan_layers={str(m.scan_layers).lower()}",
            f"ici_fsdp_parallelism={fsdp}", f"ici_tensor_parallelism={tensor}", f"ici_data_parallelism={data}",
            f"compile_topology={name}", "compile_topology_num_slices=1", "dataset_type=synthetic",
            "enable_checkpointing=false", "skip_jax_distributed_system=true", "jax_cache_dir=",
            f"base_output_directory={out_dir}", "run_name=bench_vs_maxtext", "decoder_block=llama2"]


def run_maxtext(python: str, args: list[str]) -> dict:
    """Run MaxText's train_compile; compile seconds between its 'Jitting and compiling' and 'complete' lines,
    memory from the ``Memory analysis:`` line it prints (``CompiledMemoryStats``)."""
    code = ("import sys, os, maxtext; from maxtext.trainers.pre_train import train_compile; "
            "base = os.path.join(os.path.dirname(maxtext.__file__), 'configs', 'base.yml'); "
            "train_compile.main(['train_compile', base, *sys.argv[1:]])")
    proc = subprocess.Popen([python, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **ENV})
    compiling = done = None
    started, lines = time.perf_counter(), []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("Jitting and compiling train step"):
            compiling = time.perf_counter()
        elif line.startswith("Jitting and compilation complete"):
            done = time.perf_counter()
    proc.wait()
    text = "".join(lines)
    mem = re.search(r"Memory analysis: CompiledMemoryStats\((.*)\)", text)
    if proc.returncode or not mem or compiling is None or done is None:
        tail = "".join(lines[-15:])
        raise RuntimeError(f"MaxText train_compile failed (exit {proc.returncode}):\n{tail}")
    sizes = []
    for key in ("argument", "output", "alias", "temp", "generated_code"):
        found = re.search(rf"{key}_size_in_bytes=(\d+)", mem.group(1))
        sizes.append(int(found.group(1)) if found else 0)
    return {"compile_s": done - compiling, "process_s": time.perf_counter() - started, **_memory(*sizes)}


def _memory(argument: int, output: int, alias: int, temp: int, code: int) -> dict:
    return {"argument": argument, "temp": temp, "code": code, "peak": argument + output - alias + temp}


def run_ours(config_path: str, overrides: list[str], topology: str) -> dict:
    """``scripts/aot_compile_tpu.py`` in a fresh process (its JSON report)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, os.path.join(SCRIPTS, "aot_compile_tpu.py"), config_path,
                               "--topology", topology, "--json", out.name, *overrides],
                              capture_output=True, text=True, env={**os.environ, **ENV})
        if proc.returncode not in (0, 1):
            raise RuntimeError(f"aot_compile_tpu.py failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
        report = json.load(open(out.name))[0]
    if report["error"]:
        raise RuntimeError(f"ours does not fit: {report['error']}")
    return {"compile_s": report["compile_s"], "process_s": time.perf_counter() - started,
            **_memory(*(report[f"{k}_bytes"] for k in ("argument", "output", "alias", "temp", "code")))}


def table(ours: dict, theirs: dict) -> str:
    rows = [("per-chip peak", "peak", GIB, "GiB"), ("temporaries", "temp", GIB, "GiB"),
            ("arguments", "argument", GIB, "GiB"), ("code", "code", 2**20, "MiB"),
            ("compile wall time", "compile_s", 1, "s"), ("whole process", "process_s", 1, "s")]
    out = [f"{'':>18} {'ours':>10} {'MaxText':>10} {'ours/MaxText':>13}"]
    for label, key, scale, unit in rows:
        ratio = ours[key] / theirs[key] if theirs[key] else float("nan")
        out.append(f"{label:>18} {ours[key] / scale:9.2f}{unit[0]} {theirs[key] / scale:9.2f}{unit[0]} {ratio:13.3f}")
    return "\n".join(out) + "\n(G = GiB, M = MiB, s = seconds)"


def median_run(runs: list[dict]) -> dict:
    """One side's runs as one: median times; memory from the first run (XLA's buffer assignment is deterministic,
    so a repeat that differs is reported, not averaged)."""
    first = runs[0]
    for run in runs[1:]:
        if any(run[k] != first[k] for k in ("peak", "temp", "argument", "code")):
            print(f"note: memory differed between repeats: {run} vs {first}", flush=True)
    return {**first, **{k: statistics.median(run[k] for run in runs) for k in ("compile_s", "process_s")}}


def side_by_side(config_path: str, overrides: list[str], topology: str, maxtext_python: str, mt_args: list[str],
                 repeats: int) -> tuple[list[dict], list[dict]]:
    """``repeats`` compiles of each side, the first to go alternating (ours first on even repeats)."""
    ours, theirs = [], []
    for i in range(repeats):
        order = ("ours", "maxtext") if i % 2 == 0 else ("maxtext", "ours")
        for side in order:
            if side == "ours":
                ours.append(run_ours(config_path, overrides, topology))
                print(f"[{i + 1}/{repeats}] ours compiled in {ours[-1]['compile_s']:.1f} s", flush=True)
            else:
                theirs.append(run_maxtext(maxtext_python, mt_args))
                print(f"[{i + 1}/{repeats}] MaxText compiled in {theirs[-1]['compile_s']:.1f} s", flush=True)
    return ours, theirs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--topology", required=True, help="e.g. v5e:4x4, v6e:8x8")
    parser.add_argument("--maxtext-python", default=sys.executable, help="an interpreter that imports maxtext")
    parser.add_argument("--repeats", type=int, default=1,
                        help="compile each side this many times, alternating which goes first; report medians")
    parser.add_argument("--json", help="also write both measurements here")
    args = parser.parse_intermixed_args(argv)  # overrides may follow the options too
    if args.repeats < 1:
        print(f"error: --repeats {args.repeats} must be at least 1", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config, args.overrides)
        out_dir = tempfile.mkdtemp(prefix="bench_vs_maxtext_")
        mt_args = maxtext_args(config, args.topology, out_dir)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m = config.model
    print(f"{args.config} {' '.join(args.overrides)} on {args.topology}: {m.layers} layers, d_model {m.d_model}, "
          f"remat {m.remat}, attention {m.attention}, batch {config.data.batch_size} x {config.data.seq_len}",
          flush=True)
    print(f"MaxText: {' '.join(mt_args)}", flush=True)
    try:
        ours_runs, their_runs = side_by_side(args.config, args.overrides, args.topology, args.maxtext_python, mt_args,
                                             args.repeats)
    except RuntimeError as e:  # a side that failed or did not fit: its message, then the tail of its output
        print(f"error: {e}", file=sys.stderr)
        return 2
    ours, theirs = median_run(ours_runs), median_run(their_runs)
    if args.repeats > 1:
        ratios = [a["compile_s"] / b["compile_s"] for a, b in zip(ours_runs, their_runs, strict=True)]
        print(f"\ncompile-time ratio per repeat: {', '.join(f'{r:.3f}' for r in ratios)}; times below are medians "
              f"of {args.repeats}")
    print("\n" + table(ours, theirs))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ours": ours_runs, "maxtext": their_runs, "maxtext_args": mt_args}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
