"""Stop requests that must end in a checkpoint: SIGTERM, and Cloud TPU maintenance notices.

Two mechanisms reach a job before its TPU VM goes away:

- **SIGTERM.** Spot/preemptible reclaim and ``scripts/tpu/tpu.py stop`` deliver it; the process has
  about 30 s. One process: a Python handler sets a flag the loop reads after each step.
  Several processes: the signal may reach the workers at different moments, and a process that left
  the loop alone would leave the others hanging in the next collective. There JAX's preemption
  service (started by ``jax.distributed.initialize``) owns SIGTERM: it tells every process, agrees on
  one step, and ``multihost_utils.reached_preemption_sync_point(step)`` turns true on all of them at
  that step, so they save one consistent checkpoint together.
- **Host maintenance.** The GCE metadata key ``instance/maintenance-event`` changes from ``NONE``
  (to e.g. ``TERMINATE_ON_HOST_MAINTENANCE``) shortly before maintenance stops the VM; no signal is
  sent for it. ``MaintenanceWatcher`` long-polls that key in a daemon thread and, on a change,
  sends SIGTERM to its own process, so both causes take the same path above.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping

METADATA_ROOT = "http://metadata.google.internal/computeMetadata/v1/"
ENV_METADATA_ROOT = "SCALING_JAX_METADATA_ROOT"  # another metadata server (tests, other GCE setups)
ENV_WATCH = "SCALING_JAX_WATCH_MAINTENANCE"  # on | off | auto (default: on when on a Cloud TPU VM)
EVENT_KEY = "instance/maintenance-event"


def _multi_process() -> bool:
    import jax

    return jax.process_count() > 1


class StopRequest:
    """``should_stop(step)`` is true, on every process at the same step, once a stop was requested.

    Call it once per step on every process with the same step numbers (the loop's own counter).
    One process also takes Ctrl-C (SIGINT) this way: the first finishes the step and saves, like
    SIGTERM; a second raises ``KeyboardInterrupt`` at once (nothing more is saved).
    """

    def __init__(self) -> None:
        self.requested = False
        self.reason = ""  # "SIGTERM" or "Ctrl-C"
        self.at = 0.0  # time.monotonic() when the request was seen (grace-period accounting)
        self._previous: dict[int, object] = {}
        self._multi = False

    def install(self) -> StopRequest:
        self._multi = _multi_process()
        if not self._multi:  # several processes: leave SIGTERM to JAX's preemption service
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt
        if not self.requested:
            self.requested, self.at = True, time.monotonic()
            self.reason = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        if signum == signal.SIGINT:
            print("\nCtrl-C: finishing this step and saving a checkpoint; press Ctrl-C again to quit without saving",
                  file=sys.stderr, flush=True)

    def should_stop(self, step: int) -> bool:
        if self._multi and not self.requested:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                self.requested, self.at, self.reason = True, time.monotonic(), "SIGTERM"
        return self.requested

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}


def sigterm_self(event: str) -> None:
    """Route a maintenance notice into the SIGTERM path (handler or JAX preemption service)."""
    os.kill(os.getpid(), signal.SIGTERM)


class MaintenanceWatcher:
    """Long-polls ``instance/maintenance-event``; calls ``on_event(value)`` once when it is not ``NONE``.

    The metadata server answers a ``wait_for_change`` request when the value changes (or after
    ``timeout_sec``); errors (503s happen around maintenance) are retried after ``retry_s``.
    """

    def __init__(self, on_event: Callable[[str], None] = sigterm_self, root: str = METADATA_ROOT,
                 wait_s: int = 60, retry_s: float = 5.0):
        self.on_event = on_event
        self.url = root.rstrip("/") + "/" + EVENT_KEY
        self.wait_s, self.retry_s = wait_s, retry_s
        self.event: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="maintenance-watcher", daemon=True)

    def start(self) -> MaintenanceWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _get(self, etag: str) -> tuple[str, str]:
        query = f"?wait_for_change=true&timeout_sec={self.wait_s}&last_etag={etag}"
        request = urllib.request.Request(self.url + query, headers={"Metadata-Flavor": "Google"})
        with urllib.request.urlopen(request, timeout=self.wait_s + 10) as response:
            return response.read().decode().strip(), response.headers.get("ETag", etag)

    def _run(self) -> None:
        etag = "0"
        while not self._stop.is_set():
            try:
                value, etag = self._get(etag)
            except (urllib.error.URLError, OSError, ValueError):
                self._stop.wait(self.retry_s)
                continue
            if value and value != "NONE" and not self._stop.is_set():
                self.event = value
                self.on_event(value)
                return


def watch_maintenance(env: Mapping[str, str] | None = None, tpu_vm: bool | None = None,
                      on_event: Callable[[str], None] = sigterm_self,
                      retry_s: float = 5.0) -> MaintenanceWatcher | None:
    """Start a watcher where a metadata server announces maintenance (Cloud TPU VMs), else None."""
    env = os.environ if env is None else env
    mode = env.get(ENV_WATCH, "auto").lower()
    if mode in ("off", "0", "false", "no"):
        return None
    if mode == "auto" and ENV_METADATA_ROOT not in env:
        from scaling_jax.parallel.distributed import on_cloud_tpu_vm

        if not (on_cloud_tpu_vm(env) if tpu_vm is None else tpu_vm):
            return None
    return MaintenanceWatcher(on_event, env.get(ENV_METADATA_ROOT, METADATA_ROOT), retry_s=retry_s).start()
