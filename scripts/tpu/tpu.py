#!/usr/bin/env python
"""Cloud TPU VM life cycle for scaling_jax with gcloud: create, install, run, logs, stop, delete.

    python scripts/tpu/tpu.py --project P --zone us-west4-a --name lm --accelerator v5litepod-16 create
    python scripts/tpu/tpu.py ... install             # this checkout -> every worker, pip install -e .[tpu,gcs]
    python scripts/tpu/tpu.py ... run configs/tpu/v5e-16.yaml train.run_dir=gs://BUCKET/runs/lm
    python scripts/tpu/tpu.py ... logs                # follow worker 0's log
    python scripts/tpu/tpu.py ... stop                # SIGTERM on every worker: checkpoint, clean exit
    python scripts/tpu/tpu.py ... delete

Every subcommand accepts ``--dry-run``: the gcloud commands are printed (``+ gcloud ...``, shell-quoted,
one per line) and nothing runs. ``--queued`` uses a queued resource (the way to get v5p/v6e capacity
and Spot slices) instead of a plain TPU VM. Defaults for the shared flags come from the environment
(``SCALING_JAX_TPU_PROJECT``, ``_ZONE``, ``_NAME``, ``_ACCELERATOR``, ``_RUNTIME``) so a shell can set them once.

``run`` starts ``python3 -m scaling_jax.cli train`` on all workers at once (``--worker=all``); JAX on a TPU
VM finds the other workers through the metadata server, so no coordinator flags are needed. The job
runs under nohup, logs to ``~/scaling_jax/train.log`` on each worker and survives the ssh session;
rerunning the same ``run`` after a preemption resumes from the latest checkpoint in ``train.run_dir``.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REMOTE_DIR = "scaling_jax"  # under the worker's home directory
LOG = f"{REMOTE_DIR}/train.log"
PID = f"{REMOTE_DIR}/train.pid"
# TPU software versions per generation (Cloud TPU "TPU software versions" page).
RUNTIME = {"v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5",
           "v6e": "v2-alpha-tpuv6e"}
ACCELERATOR = re.compile(r"(v4|v5litepod|v5p|v6e)-(\d+)")
EXCLUDE = {".git", "runs", "__pycache__", ".pytest_cache", ".ruff_cache", "build", "dist"}


class Gcloud:
    """Runs (or, dry, prints) gcloud commands for one TPU."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.where = ["--project", args.project, "--zone", args.zone]

    def __call__(self, *argv: str, check: bool = True, capture: bool = False) -> str:
        cmd = ["gcloud", *argv]
        print("+ " + shlex.join(cmd), flush=True)
        if self.args.dry_run:
            return ""
        out = subprocess.run(cmd, check=check, text=True, stdout=subprocess.PIPE if capture else None)
        return out.stdout or ""

    def ssh(self, command: str, worker: str = "all") -> str:
        return self("compute", "tpus", "tpu-vm", "ssh", self.args.name, *self.where, f"--worker={worker}",
                    "--command", command)

    def scp(self, local: str, remote: str) -> str:
        return self("compute", "tpus", "tpu-vm", "scp", local, f"{self.args.name}:{remote}", *self.where,
                    "--worker=all")


class BadInput(Exception):
    """What the user asked for cannot be done: one ``error:`` line, exit 2."""


def runtime_version(accelerator: str) -> str:
    m = ACCELERATOR.fullmatch(accelerator)
    if not m:
        raise BadInput(f"--accelerator '{accelerator}' is not GEN-SIZE with GEN one of v4, v5litepod, v5p, "
                         "v6e (e.g. v5litepod-16, v5p-128, v6e-64)")
    return RUNTIME[m.group(1)]


def create(g: Gcloud, a: argparse.Namespace) -> None:
    version = a.runtime_version or runtime_version(a.accelerator)
    pricing = ["--spot"] if a.spot else []
    if not a.queued:
        g("compute", "tpus", "tpu-vm", "create", a.name, *g.where, "--accelerator-type", a.accelerator,
          "--version", version, *pricing)
        return
    g("compute", "tpus", "queued-resources", "create", a.name, *g.where, "--node-id", a.name,
      "--accelerator-type", a.accelerator, "--runtime-version", version, *pricing)
    if a.dry_run:
        g("compute", "tpus", "queued-resources", "describe", a.name, *g.where, "--format=value(state.state)")
        return
    while True:  # a queued resource waits for capacity; the TPU VM exists once it is ACTIVE
        state = g("compute", "tpus", "queued-resources", "describe", a.name, *g.where,
                  "--format=value(state.state)", capture=True).strip()
        print(f"queued resource {a.name}: {state}", flush=True)
        if state == "ACTIVE":
            return
        if state in ("FAILED", "SUSPENDED"):
            raise BadInput(f"queued resource {a.name} is {state}; see `gcloud compute tpus queued-resources "
                             f"describe {a.name}`")
        time.sleep(a.poll_s)


def checkout_files() -> list[str]:
    """The files git would commit (tracked and untracked, minus .gitignore'd), relative to the repo;
    without git, everything but EXCLUDE."""
    try:
        out = subprocess.run(["git", "-C", REPO, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             check=True, capture_output=True, text=True).stdout
        return sorted(p for p in out.split("\0") if p and os.path.isfile(os.path.join(REPO, p)))
    except (OSError, subprocess.CalledProcessError):
        files = []
        for directory, dirs, names in os.walk(REPO):
            dirs[:] = [d for d in dirs if d not in EXCLUDE and not d.endswith(".egg-info")]
            files += [os.path.relpath(os.path.join(directory, n), REPO) for n in names if not n.endswith(".pyc")]
        return sorted(files)


def pack_checkout(path: str) -> None:
    """This checkout's work tree (uncommitted edits included) as a tarball rooted at REMOTE_DIR."""
    with tarfile.open(path, "w:gz") as tar:
        for rel in checkout_files():
            tar.add(os.path.join(REPO, rel), arcname=f"{REMOTE_DIR}/{rel}", recursive=False)


def install(g: Gcloud, a: argparse.Namespace) -> None:
    archive = os.path.join(tempfile.gettempdir(), f"scaling_jax-{a.name}.tar.gz")
    if not a.dry_run:
        pack_checkout(archive)
    try:
        g.scp(archive, "scaling_jax.tar.gz")
    finally:
        if not a.dry_run and os.path.exists(archive):  # a dry run made none: a file there is someone else's
            os.remove(archive)
    g.ssh(f"rm -rf {REMOTE_DIR}/scaling_jax && tar xzf scaling_jax.tar.gz && rm scaling_jax.tar.gz && "
          f"python3 -m pip install -q -e './{REMOTE_DIR}[{a.extras}]'")


def run(g: Gcloud, a: argparse.Namespace) -> None:
    """Copy the config to every worker, then start training on all of them at once."""
    if not a.dry_run and not os.path.isfile(a.config):
        raise BadInput(f"config file '{a.config}' does not exist")
    remote_config = f"{REMOTE_DIR}/run-config.yaml"
    g.scp(a.config, remote_config)
    train = shlex.join(["python3", "-m", "scaling_jax.cli", "train", "run-config.yaml", *a.overrides])
    job = " ".join([*(f"{k}={shlex.quote(v)}" for k, v in (kv.split("=", 1) for kv in a.env)), "nohup", train])
    # one trainer per worker: a run still going (or still saving after `stop`) is not joined by a second one
    running = ("if test -f train.pid && kill -0 $(cat train.pid) 2>/dev/null; then echo \"a trainer is still "
               "running (pid $(cat train.pid)); stop it first\" >&2; exit 1; fi")
    if a.foreground:  # pipefail: the trainer's exit status, not tee's
        g.ssh(f"cd {REMOTE_DIR} && {running}; set -o pipefail; {job.replace('nohup ', '')} 2>&1 | tee -a train.log")
        return
    g.ssh(f"cd {REMOTE_DIR} && {running}; ({job} >> train.log 2>&1 & echo $! > train.pid)")  # earlier logs kept
    print(f"started on all workers; follow with: {os.path.basename(sys.argv[0])} ... logs", flush=True)


def logs(g: Gcloud, a: argparse.Namespace) -> None:
    g.ssh(f"tail -n +1 {'-F ' if a.follow else ''}{LOG}", worker=a.worker)


def stop(g: Gcloud, a: argparse.Namespace) -> None:
    """SIGTERM is what preemption sends: the trainer saves a checkpoint and exits cleanly; this returns once it
    has (so a `run` right after starts no second trainer beside it)."""
    g.ssh(f"if test -f {PID}; then p=$(cat {PID}); kill -TERM $p 2>/dev/null; "
          f"while kill -0 $p 2>/dev/null; do sleep 1; done; fi; true")


def status(g: Gcloud, a: argparse.Namespace) -> None:
    kind = ["queued-resources"] if a.queued else ["tpu-vm"]
    g("compute", "tpus", *kind, "describe", a.name, *g.where)


def delete(g: Gcloud, a: argparse.Namespace) -> None:
    if a.queued:
        g("compute", "tpus", "queued-resources", "delete", a.name, *g.where, "--force", "--quiet")
    else:
        g("compute", "tpus", "tpu-vm", "delete", a.name, *g.where, "--quiet")


def build_parser() -> argparse.ArgumentParser:
    env = lambda key: os.environ.get(f"SCALING_JAX_TPU_{key}")  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--project", default=env("PROJECT"), help="Google Cloud project")
    p.add_argument("--zone", default=env("ZONE"), help="zone with capacity for the accelerator, e.g. us-west4-a")
    p.add_argument("--name", default=env("NAME"), help="TPU (and queued resource) name")
    p.add_argument("--accelerator", default=env("ACCELERATOR"), help="e.g. v5litepod-16, v5p-128, v6e-64, v4-32")
    p.add_argument("--runtime-version", default=env("RUNTIME"), help="TPU software version (default: per generation)")
    p.add_argument("--queued", action="store_true", help="use a queued resource instead of a plain TPU VM")
    p.add_argument("--dry-run", action="store_true", help="print the gcloud commands; run nothing")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("create", help="create the TPU VM (or queued resource, waiting until ACTIVE)")
    c.add_argument("--spot", action="store_true", help="Spot capacity: cheaper, preemptible (SIGTERM first)")
    c.add_argument("--poll-s", type=float, default=30.0, help="queued resource: seconds between state checks")
    c.set_defaults(func=create)
    i = sub.add_parser("install", help="copy this checkout to every worker and pip install it")
    i.add_argument("--extras", default="tpu,gcs", help="pip extras to install (default: tpu,gcs)")
    i.set_defaults(func=install)
    r = sub.add_parser("run", help="train CONFIG on all workers")
    r.add_argument("config", help="YAML config, e.g. configs/tpu/v5e-16.yaml")
    r.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.run_dir=gs://BUCKET/run")
    r.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the job (repeatable), e.g. LIBTPU_INIT_ARGS=...")
    r.add_argument("--foreground", action="store_true", help="stay attached and stream output (dies with ssh)")
    r.set_defaults(func=run)
    lg = sub.add_parser("logs", help="show (and follow) one worker's training log")
    lg.add_argument("--worker", default="0", help="worker index (default 0, the one that logs metrics)")
    lg.add_argument("--no-follow", dest="follow", action="store_false", help="print the log and return")
    lg.set_defaults(func=logs)
    sub.add_parser("stop", help="SIGTERM the job on every worker: it checkpoints and exits").set_defaults(func=stop)
    sub.add_parser("status", help="describe the TPU / queued resource").set_defaults(func=status)
    sub.add_parser("delete", help="delete the TPU VM (or queued resource)").set_defaults(func=delete)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    missing = [f"--{k.replace('_', '-')}" for k in ("project", "zone", "name") if not getattr(args, k)]
    if args.command == "create" and not args.accelerator:
        missing.append("--accelerator")
    if missing:
        parser.error(f"{', '.join(missing)} required (or set SCALING_JAX_TPU_PROJECT / _ZONE / _NAME / _ACCELERATOR)")
    for kv in getattr(args, "env", []):
        if "=" not in kv:
            parser.error(f"--env '{kv}' is not KEY=VALUE")
    try:
        args.func(Gcloud(args), args)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as e:
        print(f"error: {shlex.join(e.cmd)} exited with {e.returncode}", file=sys.stderr)
        return 1
    except FileNotFoundError as e:
        print(f"error: {e.filename} not found; install the Google Cloud CLI (gcloud)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
