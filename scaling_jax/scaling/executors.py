"""Where a sweep's runs train: ``local`` (in this process, one after another) or ``ray`` (one Ray task per run).

Both call the same per-run function (``train`` on the run's config), so a run writes its own run directory
wherever the executor puts it, and what ``run_sweep`` skips, resumes and records is the same.

``ray``: every run not yet done is submitted at once as a task asking for the sweep file's ``ray`` resources
(``num_cpus``, ``num_gpus``, custom ``resources`` such as ``{TPU: 4}``); Ray starts each when a node has them
free. A task runs in a fresh worker process (``max_calls=1``: a TPU or GPU is released when its run ends).
A worker or node that dies mid-run (the task is lost), and a run stopped by SIGTERM (a TPU maintenance event
or preemption: ``train`` checkpoints and returns, the task raises ``RunPreempted``), are retried by Ray up to
``max_retries`` times; the retry calls ``train`` on the same run directory, which resumes from its latest
checkpoint (the dead attempt's run-directory lock is a ``flock`` the kernel dropped with the process). The
driver alone writes ``manifest.json``. Ray is imported only here, and only when a ray executor is made.

``RayExecutor.map`` is the same engine for work that is not a run: ``data prepare --executor ray`` maps
``write_part`` over a corpus's parts, one task per part (workers are reused; a dead one's task is retried).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from scaling_jax.errors import ConfigError, UserError

EXECUTORS = ("local", "ray")
RAY_KEYS = ("num_cpus", "num_gpus", "resources", "max_retries", "env_vars")
INSTALL_HINT = 'pip install -e ".[ray]"'

TrainFn = Callable[[Any], dict]  # a run's config -> its summary (scaling_jax.train.loop.train)
Started = Callable[[Any], None]  # a planned run (run_id, config) handed to the executor
Finished = Callable[[Any, "dict | None", "BaseException | None"], None]  # run, summary or the error that ended it


@dataclass
class RayOptions:
    """What one run's Ray task asks for (the sweep file's ``ray`` section); None: Ray's default."""

    num_cpus: float | None = None
    num_gpus: float | None = None
    resources: dict[str, float] = field(default_factory=dict)  # custom resources, e.g. {"TPU": 4}
    max_retries: int = 3  # retries after a worker/node dies or the run is preempted; -1: without limit
    env_vars: dict[str, str] = field(default_factory=dict)  # set in each run's worker (Ray's runtime_env)

    def task_options(self) -> dict:
        options: dict[str, Any] = {"max_retries": self.max_retries, "retry_exceptions": [RunPreempted],
                                   "max_calls": 1}
        for key in ("num_cpus", "num_gpus"):
            if getattr(self, key) is not None:
                options[key] = getattr(self, key)
        if self.resources:
            options["resources"] = dict(self.resources)
        if self.env_vars:
            options["runtime_env"] = {"env_vars": dict(self.env_vars)}
        return options

    def request(self) -> dict[str, float]:
        """The resources one task holds while it runs (Ray's default: 1 CPU), named as nodes report them."""
        want = {"CPU": 1.0 if self.num_cpus is None else self.num_cpus, "GPU": self.num_gpus or 0.0,
                **self.resources}
        return {k: v for k, v in want.items() if v}

    def describe(self, what: str = "run") -> str:
        ask = ", ".join(f"{v:g} {k}" for k, v in self.request().items()) or "no resources"
        n = self.max_retries
        retries = "retried without limit" if n < 0 else f"up to {n} {'retry' if n == 1 else 'retries'}"
        return f"each {what} asks for {ask}; {retries}"


def _number(value: Any) -> float:
    try:
        return math.nan if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        return math.nan


def ray_options(raw: Any, path: str) -> RayOptions:
    """Check the sweep file's ``ray`` section (absent or null: Ray's defaults, 3 retries)."""
    def fail(message: str) -> ConfigError:
        return ConfigError(f"sweep file '{path}': {message}")

    if raw is None:
        return RayOptions()
    if not isinstance(raw, dict):
        raise fail(f"ray must be a mapping such as {{num_gpus: 1, max_retries: 3}}, got {raw!r}")
    unknown = sorted(str(k) for k in set(raw) - set(RAY_KEYS))
    if unknown:
        raise fail(f"ray has unknown key '{unknown[0]}'; valid keys: {', '.join(RAY_KEYS)}")
    options = RayOptions()
    for key in ("num_cpus", "num_gpus"):
        if raw.get(key) is None:
            continue
        value = _number(raw[key])
        if not (math.isfinite(value) and value >= 0 and (value <= 1 or value == int(value))):
            raise fail(f"ray.{key}={raw[key]!r} must be a number >= 0 (a whole number above 1)")
        setattr(options, key, value)
    resources = raw.get("resources") or {}
    if not isinstance(resources, dict):
        raise fail(f"ray.resources must map resource names to amounts, such as {{TPU: 4}}, got {resources!r}")
    for name, amount in resources.items():
        if name in ("CPU", "GPU"):
            raise fail(f"ray.resources.{name}: ask for it with ray.num_{str(name).lower()}s instead")
        value = _number(amount)
        if not isinstance(name, str) or not name or not (math.isfinite(value) and value > 0
                                                          and (value <= 1 or value == int(value))):
            raise fail(f"ray.resources.{name}={amount!r} must be a number > 0 (a whole number above 1)")
        options.resources[name] = value
    if raw.get("max_retries") is not None:
        value = raw["max_retries"]
        if isinstance(value, bool) or not isinstance(value, int) or value < -1:
            raise fail(f"ray.max_retries={value!r} must be an integer >= 0, or -1 to retry without limit")
        options.max_retries = value
    env_vars = raw.get("env_vars") or {}
    if not isinstance(env_vars, dict):
        raise fail(f"ray.env_vars must map variable names to values, such as {{XLA_FLAGS: '...'}}, got {env_vars!r}")
    for name, value in env_vars.items():
        if not isinstance(name, str) or not name or "=" in name or not isinstance(value, (str, int, float)) \
                or isinstance(value, bool):
            raise fail(f"ray.env_vars.{name}={value!r}: give a variable name and a string or number value")
        options.env_vars[name] = str(value)
    return options


class RunPreempted(Exception):
    """Raised in a Ray task whose run stopped early (SIGTERM): Ray retries it like a dead worker."""

    def __init__(self, summary: dict):
        super().__init__(summary)  # the only argument, so the exception pickles back with its summary
        self.summary = summary

    def __str__(self) -> str:
        return f"run stopped at step {self.summary.get('step')} ({self.summary.get('stopped_by') or 'preempted'})"


def _attempt(train_fn: TrainFn, config: Any) -> dict:
    """One Ray attempt at a run: the same call the local executor makes."""
    summary = train_fn(config)
    if summary.get("preempted"):
        raise RunPreempted(summary)
    return summary


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class Executor(Protocol):
    """Trains ``runs`` (planned runs: ``run_id``, ``config``) with ``train_fn``, calling ``started(run)`` as each is
    handed over and ``finished(run, summary, error)`` as each ends (on the calling thread; ``run_sweep`` writes
    the manifest there)."""

    name: str
    stops_at_preemption: bool  # whether a run stopped by SIGTERM ends the whole sweep (True locally)

    def run(self, runs: Sequence[Any], train_fn: TrainFn, started: Started, finished: Finished,
            say: Callable[[str], None] = print) -> None: ...


class LocalExecutor:
    """Today's behaviour: in this process, one run after another; a preempted run stops the sweep (this
    machine is going away), and any error propagates at once."""

    name = "local"
    stops_at_preemption = True

    def run(self, runs: Sequence[Any], train_fn: TrainFn, started: Started, finished: Finished,
            say: Callable[[str], None] = print) -> None:
        for run in runs:
            started(run)
            summary = train_fn(run.config)
            finished(run, summary, None)
            if summary.get("preempted"):
                break


class RayExecutor:
    """Every run a Ray task on the cluster at ``address`` (None: ``RAY_ADDRESS`` or a new local one)."""

    name = "ray"
    stops_at_preemption = False

    def __init__(self, options: RayOptions | None = None, address: str | None = None):
        try:
            import ray  # noqa: F401
        except ImportError:
            raise UserError(f"--executor ray needs Ray, which is not installed: {INSTALL_HINT}") from None
        self.options = options or RayOptions()
        self.address = address
        self.submitted: list[str] = []  # run ids handed to Ray, in order (a rerun submits only unfinished runs)

    def _check_reachable(self) -> None:
        """A HOST:PORT that nothing answers on fails here in one line (Ray itself keeps retrying for minutes)."""
        import socket

        host, _, port = (self.address or "").rpartition(":")
        if not host or not port.isdigit() or "://" in self.address:
            return  # auto, ray://..., or no address: Ray's own lookup
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
        except OSError as e:
            raise UserError(f"cannot reach the Ray head at {self.address} ({(e.strerror or str(e)).lower()}); start "
                            "it with `ray start --head --port=6379` or fix --address") from None

    def _connect(self, say: Callable[[str], None], what: str = "run"):
        import ray

        if not ray.is_initialized():
            self._check_reachable()
            say(f"ray: connecting to {self.address or 'RAY_ADDRESS, else a new local Ray'}")
            try:
                ray.init(address=self.address, log_to_driver=True)
            except (ConnectionError, RuntimeError, ValueError) as e:
                where = f"at '{self.address}'" if self.address else "(no --address: RAY_ADDRESS or a new local one)"
                raise UserError(f"cannot reach a Ray cluster {where}: {_one_line(e)}; start one with "
                                "`ray start --head` and pass --address HOST:6379") from None
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        request = self.options.request()
        if not any(all(node.get(k, 0) >= v for k, v in request.items()) for node in nodes):
            say(f"warning: no node of the Ray cluster offers {request} (what one {what} asks for); the {what}s wait "
                "until such a node joins (check the resources asked for and `ray status`)")
        return ray

    def run(self, runs: Sequence[Any], train_fn: TrainFn, started: Started, finished: Finished,
            say: Callable[[str], None] = print) -> None:
        if not runs:
            return
        ray = self._connect(say)
        remote = ray.remote(**self.options.task_options())(_attempt)
        say(f"ray: {len(runs)} run(s) as tasks; {self.options.describe()}")
        pending = {}
        for run in runs:
            started(run)
            pending[remote.options(name=run.run_id).remote(train_fn, run.config)] = run
            self.submitted.append(run.run_id)
        failure: BaseException | None = None
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            run = pending.pop(ref)
            try:
                summary = ray.get(ref)
            except ray.exceptions.RayTaskError as e:  # the run raised (retries, if any, are spent)
                if isinstance(e.cause, RunPreempted):
                    finished(run, e.cause.summary, None)
                    continue
                finished(run, None, e.cause or e)
                # a user error keeps its one line; anything else its remote traceback (in RayTaskError's text)
                failure = failure or (e.cause if isinstance(e.cause, UserError) else e)
                continue
            except ray.exceptions.RayError as e:  # the worker or its node died more than max_retries times
                finished(run, None, e)
                continue
            finished(run, summary, None)
        if failure is not None:
            raise failure

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], say: Callable[[str], None] = print) -> list:
        """``[fn(item) for item in items]`` with every item a Ray task (``data prepare``'s parts), in order.

        A task whose worker or node dies is retried (``max_retries``); the first task that raises cancels the
        others and its error is raised here: a user error keeps its one line, anything else its remote traceback.
        ``fn`` must be importable on the workers (a module-level function of this package)."""
        if not items:
            return []
        ray = self._connect(say, "task")
        options = {k: v for k, v in self.options.task_options().items() if k not in ("retry_exceptions", "max_calls")}
        remote = ray.remote(**options)(fn)
        refs = [remote.options(name=f"{fn.__name__}-{i}").remote(item) for i, item in enumerate(items)]
        say(f"ray: {len(refs)} {fn.__name__} task(s); {self.options.describe('task')}")
        try:
            return _gather(ray, refs, say)
        except BaseException:
            for ref in refs:
                ray.cancel(ref, force=True)  # a no-op for finished tasks; stops the rest
            ray.wait(refs, num_returns=len(refs), timeout=10)  # none still writing when the caller cleans up
            raise


def _gather(ray, refs: list, say: Callable[[str], None]) -> list:
    """The tasks' results in submission order, waiting on all at once; the first failure raises."""
    index = {ref: i for i, ref in enumerate(refs)}
    results: list[Any] = [None] * len(refs)
    pending, last_said = list(refs), time.monotonic()
    while pending:
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
        for ref in ready:
            try:
                results[index[ref]] = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                raise (e.cause if isinstance(e.cause, UserError) else e) from None
            except ray.exceptions.RayError as e:  # its worker or node died more than max_retries times
                raise UserError(f"task {index[ref]} of {len(refs)} was lost ({_one_line(e)}); "
                                "check `ray status` and run the command again") from None
        if pending and time.monotonic() - last_said > 10:
            last_said = time.monotonic()
            say(f"ray: {len(refs) - len(pending)}/{len(refs)} tasks done")
    return results


def check_executor(name: str, address: str | None) -> None:
    """The ``--executor`` / ``--address`` pair of any command that takes them, checked before any work."""
    if name not in EXECUTORS:
        raise UserError(f"--executor {name} is unknown; choose one of {', '.join(EXECUTORS)}")
    if address is not None and name != "ray":
        raise UserError(f"--address applies to --executor ray, not {name}; drop it or add --executor ray")
    if address is not None and not address.strip():
        raise UserError("--address is empty; pass the Ray head's HOST:6379 (or auto, or ray://HOST:10001)")


def make_executor(name: str, options: RayOptions | None = None, address: str | None = None) -> Executor:
    check_executor(name, address)
    return LocalExecutor() if name == "local" else RayExecutor(options, address)
