#!/usr/bin/env python
"""Compile the real train step for a Cloud TPU topology on a machine without a TPU.

    python scripts/aot_compile_tpu.py configs/tpu/v5e-16.yaml --topology v5e:4x4 [key=value ...]
    python scripts/aot_compile_tpu.py configs/tpu/v5e-16.yaml --topology v5e:4x4 --num-slices 2

``--num-slices N`` compiles for N such slices joined by the data-center network (multislice): the config's
``mesh.dcn_data`` / ``mesh.dcn_fsdp`` say which axes span the slices (their product must be N; a config
with neither set gets ``mesh.dcn_data=N``, and the script says so).

libtpu (``pip install 'scaling_jax[tpu]'``) holds the TPU compiler; ``jax.experimental.topologies``
describes the chips of a slice without owning them. The step is the one ``scaling-jax train``
jits (same objective, optimizer, shardings, donation), lowered from shapes only, so nothing is
allocated. For each topology the script prints per-chip memory from XLA's buffer assignment
(arguments, outputs, temporaries, donated aliases), FLOPs per step, and a step-time estimate
from the chip's bf16 peak and an assumed MFU. A config that does not fit HBM is reported (XLA
refuses it at compile time) before anyone rents a pod. Exit status: 0 all fit, 1 some did not,
2 bad input.

FLOPs: the analytic count (6 x matmul params + attention, as ``scaling-jax info`` and the
trainer's MFU use) is the basis of the estimate; XLA's cost analysis is printed beside it as a
cross-check only: it also counts elementwise and optimizer work, and counts a loop body once.
"""

from __future__ import annotations

import os

# Quiet libtpu's start-up probes (no metadata server or TPU here), keep JAX's own backend on the CPU, and
# let several compiles run at once (libtpu's lockfile guards TPU chips, which a compile never touches).
for _key, _value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                     ("TPU_ACCELERATOR_TYPE", "v5litepod-4"), ("JAX_PLATFORMS", "cpu"),
                     ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
    os.environ.setdefault(_key, _value)

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402

import jax  # noqa: E402

from scaling_jax.config import Config, load_config  # noqa: E402
from scaling_jax.data.synthetic import example_batch  # noqa: E402
from scaling_jax.data.tokenizer import build_tokenizer  # noqa: E402
from scaling_jax.errors import ConfigError, UserError  # noqa: E402
from scaling_jax.model.family import flops_per_token, param_counts  # noqa: E402
from scaling_jax.objectives.base import build_objective  # noqa: E402
from scaling_jax.parallel.mesh import MESH_AXES, build_mesh, dcn_shape, ici_shape  # noqa: E402
from scaling_jax.train.compute import build_compute  # noqa: E402
from scaling_jax.train.metrics import peak_flops_per_device  # noqa: E402

GIB = 2**30
# Published HBM per chip (Cloud TPU system architecture pages); XLA's own limit decides "fits" at compile time.
HBM_GIB = {"v4": 32.0, "v5e": 16.0, "v5p": 95.0, "v6e": 32.0}
# TensorCores of v4 / v5p run as one JAX device per chip ("megacore").
CHIP_CONFIG = {"v4": "megacore", "v5p": "megacore", "v5e": "default", "v6e": "default"}
TOPOLOGY = re.compile(r"(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})")


@dataclass
class Report:
    topology: str
    chips: int = 0  # all slices together
    device_kind: str = ""
    mesh: dict = field(default_factory=dict)
    slices: int = 1
    dcn_mesh: dict = field(default_factory=dict)  # each mesh axis = dcn x ici (slices outermost)
    ici_mesh: dict = field(default_factory=dict)
    fits: bool = False
    compile_s: float = 0.0
    hbm_bytes: float = 0.0
    argument_bytes: int = 0
    output_bytes: int = 0
    temp_bytes: int = 0
    alias_bytes: int = 0
    code_bytes: int = 0
    peak_bytes: int = 0
    flops_per_step: float = 0.0  # analytic, whole slice
    xla_flops_per_chip: float = 0.0
    peak_flops_per_chip: float = 0.0
    error: str = ""

    def check_fit(self) -> Report:
        """Fits when XLA compiled it and the peak is within HBM (unknown HBM: XLA's verdict alone)."""
        self.fits = not self.error and (not self.hbm_bytes or self.peak_bytes <= self.hbm_bytes)
        return self


def parse_topology(name: str) -> tuple[str, tuple[int, ...]]:
    """``'v5e:4x4'`` -> ``('v5e', (4, 4))``; one-line error for anything else."""
    m = TOPOLOGY.fullmatch(name)
    if not m:
        raise ConfigError(f"--topology '{name}' is not GEN:AxB[xC] with GEN one of v4, v5e, v5p, v6e "
                          "(e.g. v5e:4x4, v5p:4x4x4, v6e:8x8)")
    return m.group(1), tuple(int(x) for x in m.group(2).split("x"))


def parse_chips_per_host(text: str) -> tuple[int, int, int]:
    """``'2x2x1'`` -> ``(2, 2, 1)``; ``'2x2'`` means ``2x2x1`` (a host's chips are one layer)."""
    m = re.fullmatch(r"(\d+)x(\d+)(?:x(\d+))?", text)
    if not m:
        raise UserError(f"--chips-per-host '{text}' is not AxB or AxBxC (e.g. 2x2 or 2x2x1)")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 1)


def topology_devices(name: str, chips_per_host: tuple[int, ...] | None = None, num_slices: int = 1) -> list:
    """The chips of a slice as JAX devices that can be compiled for (not run on)."""
    from jax.experimental import topologies

    gen, dims = parse_topology(name)
    bounds = chips_per_host or tuple(min(2, d) for d in dims[:2]) + (1,)  # Cloud TPU hosts hold 2x2 chips
    try:
        return topologies.get_topology_desc(platform="tpu", topology_name=name, chip_config_name=CHIP_CONFIG[gen],
                                            chips_per_host_bounds=bounds, num_slices=num_slices).devices
    except jax.errors.JaxRuntimeError as e:  # a shape libtpu cannot lay out (e.g. v5e:3x3 on 2x2 hosts)
        raise ConfigError(f"--topology {name} (hosts of {'x'.join(map(str, bounds))} chips): libtpu refuses it "
                          f"({str(e).strip().splitlines()[0][:200]}); use a Cloud TPU slice shape") from None


def build_train_step(config: Config, devices: list):
    """The trainer's jitted step (``compute.build_compute`` builds it for training too) for ``devices``, with the
    example batch whose shapes it is lowered from: ``(compute, batch, mesh shape, objective)``."""
    d = config.data
    tokenizer = build_tokenizer(d.tokenizer, d.seqio_modules)
    objective = build_objective(config.objective, tokenizer)
    try:
        mesh = build_mesh(config.mesh, devices)
    except NotImplementedError as e:  # jax.make_mesh maps mesh axes onto whole physical (ICI) axes
        raise ConfigError(f"mesh data x fsdp x tensor = {'x'.join(map(str, ici_shape(config.mesh, len(devices))))} "
                          f"does not map onto this slice's physical axes: each mesh axis must be a product of "
                          f"physical axis sizes ({str(e).split('with remaining assignable mesh ')[-1][:12]}...); "
                          "change mesh.fsdp / mesh.tensor") from None
    # the objective decides the batch fields and their shapes
    batch = objective.prepare(example_batch(d.batch_size, d.seq_len, tokenizer.vocab_size))
    compute = build_compute(config, objective, batch, mesh=mesh)
    return compute, batch, dict(mesh.shape), objective


def slices_for(config: Config, num_slices: int) -> str:
    """``--num-slices N`` with a config whose DCN axes span one slice: data parallelism across the N slices
    (``mesh.dcn_data=N``, set in place). Returns the note to print ('' when the config already says)."""
    if num_slices > 1 and dcn_shape(config.mesh) == (1, 1, 1):
        config.mesh.dcn_data = num_slices
        return (f"--num-slices {num_slices}: the config spans no slices over DCN, so mesh.dcn_data={num_slices} "
                "(data parallelism across slices; set mesh.dcn_data / mesh.dcn_fsdp to choose)")
    spans = math.prod(dcn_shape(config.mesh))
    if spans != num_slices:  # else one slice's hosts would be compiled as if they were slices
        raise UserError(f"mesh.dcn_data x mesh.dcn_fsdp = {spans} slices but --num-slices {num_slices}; pass "
                        f"--num-slices {spans} (or set the DCN axes to the slices you compile for)")
    return ""


def compile_for(config: Config, topology: str, hbm_gib: float | None = None,
                chips_per_host: tuple[int, ...] | None = None, devices: list | None = None,
                num_slices: int = 1) -> Report:
    """Compile for one topology (``num_slices`` of it) and collect what fits where (``devices`` overrides the
    topology: tests)."""
    report = Report(topology, slices=num_slices)
    gen = parse_topology(topology)[0] if devices is None else None
    devices = devices if devices is not None else topology_devices(topology, chips_per_host, num_slices)
    report.chips, report.device_kind = len(devices), devices[0].device_kind
    report.dcn_mesh = dict(zip(MESH_AXES, dcn_shape(config.mesh), strict=True))
    report.ici_mesh = dict(zip(MESH_AXES, ici_shape(config.mesh, len(devices)), strict=True))
    report.hbm_bytes = (hbm_gib or HBM_GIB.get(gen or "", 0.0)) * GIB
    report.peak_flops_per_chip = peak_flops_per_device(report.device_kind) or 0.0
    compute, batch, report.mesh, objective = build_train_step(config, devices)
    started = time.perf_counter()  # lowering + XLA compile (what MaxText's train_compile times too)
    try:
        compiled = compute.lower(batch).compile()
    except Exception as e:  # XLA reports an oversized program as an error at compile time
        text = str(e)
        if "RESOURCE_EXHAUSTED" not in text and "exceeds" not in text:
            raise
        report.error = next((ln.strip() for ln in text.splitlines() if "exceed" in ln or "RESOURCE" in ln), text)[:400]
        report.compile_s = time.perf_counter() - started
        return report.check_fit()
    report.compile_s = time.perf_counter() - started
    mem = compiled.memory_analysis()
    report.argument_bytes, report.output_bytes = mem.argument_size_in_bytes, mem.output_size_in_bytes
    report.temp_bytes, report.alias_bytes = mem.temp_size_in_bytes, mem.alias_size_in_bytes
    report.code_bytes = mem.generated_code_size_in_bytes
    report.peak_bytes = report.argument_bytes + report.output_bytes - report.alias_bytes + report.temp_bytes
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    report.xla_flops_per_chip = float((cost or {}).get("flops", 0.0))
    extras = objective.size_extras()
    report.flops_per_step = flops_per_token(config.model, config.data.seq_len, **extras) * \
        config.data.batch_size * config.data.seq_len
    return report.check_fit()


def _duration(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1e3:.3g} ms"


def format_report(config: Config, r: Report, mfu: float) -> str:
    gib = lambda b: f"{b / GIB:.2f} GiB" if b >= GIB / 10 else f"{b / 2**20:.1f} MiB"  # noqa: E731
    m, d = config.model, config.data
    counts = param_counts(m, **build_objective(config.objective).size_extras())
    where = r.topology if r.slices == 1 else f"{r.slices} x {r.topology} (multislice)"
    head = (f"{where}: {r.chips} chips ({r.device_kind}, {gib(r.hbm_bytes) if r.hbm_bytes else '? GiB'} HBM each)"
            f"; model {counts.total / 1e6:,.1f}M params ({m.layers} layers, d_model {m.d_model}, {m.dtype}),"
            f" batch {d.batch_size} x {d.seq_len} tokens, objective {config.objective.name}")
    if r.error:
        return "\n".join([head, f"  DOES NOT FIT (XLA, after {r.compile_s:.1f} s): {r.error}"])
    multislice = max(r.dcn_mesh.values(), default=1) > 1
    layout = f" = DCN {r.dcn_mesh} x ICI {r.ici_mesh} per slice (slices outermost)" if multislice else ""
    lines = [head, f"  mesh               {r.mesh}{layout}; compiled in {r.compile_s:.1f} s",
             f"  per-chip memory    arguments {gib(r.argument_bytes)}, outputs {gib(r.output_bytes)}, "
             f"temporaries {gib(r.temp_bytes)}, donated (aliased) {gib(r.alias_bytes)}, code {gib(r.code_bytes)}",
             f"  per-chip peak      {gib(r.peak_bytes)} = arguments + outputs - aliased + temporaries"
             + (f" = {100 * r.peak_bytes / r.hbm_bytes:.0f}% of HBM: {'fits' if r.fits else 'DOES NOT FIT'}"
                if r.hbm_bytes else "")]
    per_chip = r.flops_per_step / r.chips
    lines.append(f"  FLOPs/step         {r.flops_per_step:.4g} analytic ({per_chip:.4g} per chip); "
                 f"XLA cost analysis {r.xla_flops_per_chip:.4g} per chip (cross-check only)")
    if r.peak_flops_per_chip:
        ideal = per_chip / r.peak_flops_per_chip
        step = ideal / mfu
        tokens = d.batch_size * d.seq_len / step
        lines.append(f"  step time          {_duration(ideal)} at 100% of {r.peak_flops_per_chip / 1e12:.0f} "
                     f"TFLOP/s per chip; {_duration(step)} at MFU {mfu:.0%} -> {tokens:,.0f} tokens/s "
                     f"({tokens / r.chips:,.0f} per chip)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML config, e.g. configs/tpu/v5e-16.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides such as model.series=kaplan:24x2048")
    parser.add_argument("--topology", action="append", required=True,
                        help="TPU slice, e.g. v5e:4x4, v5p:4x4x4, v6e:8x8 (repeat for several)")
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation for the estimate")
    parser.add_argument("--hbm-gib", type=float, help="override the per-chip HBM used for the fit verdict")
    parser.add_argument("--num-slices", type=int, default=1,
                        help="compile for this many slices of each topology joined over DCN (multislice)")
    parser.add_argument("--chips-per-host", help="host bounds, e.g. 2x2x1 (default: Cloud TPU's 2x2 chips per host)")
    parser.add_argument("--json", help="also write the reports to this JSON file")
    args, extra = parser.parse_known_args(argv)
    try:
        if importlib.util.find_spec("libtpu") is None:
            raise UserError(f"libtpu is not installed; pip install 'jax[tpu]=={jax.__version__}' "
                            "(or the project's extra: pip install -e '.[tpu]')")
        if not 0 < args.mfu <= 1:
            raise UserError(f"--mfu={args.mfu} must be in (0, 1]")
        if args.num_slices < 1:
            raise UserError(f"--num-slices {args.num_slices} must be an integer >= 1")
        config = load_config(args.config, list(args.overrides) + extra)
        note = slices_for(config, args.num_slices)
        if note:
            print(note, flush=True)
        bounds = parse_chips_per_host(args.chips_per_host) if args.chips_per_host else None
        for name in args.topology:
            parse_topology(name)
        reports = []
        for name in args.topology:
            reports.append(compile_for(config, name, args.hbm_gib, bounds, num_slices=args.num_slices))
            print(format_report(config, reports[-1], args.mfu), flush=True)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in reports], f, indent=2)
    return 0 if all(r.fits for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
