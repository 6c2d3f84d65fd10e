"""Enough XLA:CPU client threads for collectives over simulated CPU devices.

XLA's CPU client runs each device's share of a program as a task on one pool of ``max(cores, devices)``
threads, and a program with collectives needs the shares of all its devices on threads at once. With 8
simulated devices on 2 cores the pool has 8 threads: once dozens of multi-device steps are queued (a trainer
dispatches ahead of the device), shares of consecutive programs interleave on the pool, each waits in a
rendezvous for a device whose share has no thread, and XLA aborts the process after 40 s ("Termination
timeout for all gather RendezvousKey{...} ... only 3 of them arrived"). Measured on this project's 2-core
machine (jax 0.10.2 and 0.11.2): 100 back-to-back executions of a 2 x 4-mesh gradient step aborted with 8
threads, 3,000 with 12, and 30,200 with 16 never did. Two programs' shares at once is what the pool must
hold, so it gets ``2 x devices`` threads through ``PJRT_NPROC`` (which XLA reads when the CPU client starts,
so this must run before JAX touches a device). A value the user set is kept; one device (or a real
accelerator) needs nothing.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, MutableMapping

THREADS_ENV = "PJRT_NPROC"
_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=(\d+)")


def simulated_cpu_devices(configured: int, env: Mapping[str, str]) -> int:
    """The CPU device count the client will start with: ``jax_num_cpu_devices`` when set (>= 0), else XLA's
    ``--xla_force_host_platform_device_count`` flag, else 1."""
    if configured >= 0:
        return max(configured, 1)
    found = _DEVICE_COUNT_FLAG.findall(env.get("XLA_FLAGS", ""))
    return int(found[-1]) if found else 1


def client_threads(devices: int, cores: int) -> int:
    """Pool size that holds the device shares of two collective programs at once (and never fewer than cores)."""
    return max(cores, 2 * devices)


def threads_to_set(configured: int, env: Mapping[str, str], cores: int) -> int | None:
    """``PJRT_NPROC`` for a multi-device CPU client, or None: the user set it, or there is one device."""
    devices = simulated_cpu_devices(configured, env)
    if THREADS_ENV in env or devices <= 1:
        return None
    return client_threads(devices, cores)


def ensure_threads_for_collectives(env: MutableMapping[str, str] | None = None) -> int | None:
    """Set ``PJRT_NPROC`` for a multi-device CPU client unless already set; returns the value set, or None.

    Reads ``jax_num_cpu_devices`` from JAX when JAX is loaded, else from its environment variable, so that
    commands that never use JAX (``fit``, ``report``) do not pay its ~1 s import here."""
    env = os.environ if env is None else env
    jax = sys.modules.get("jax")
    configured = jax.config.jax_num_cpu_devices if jax is not None else int(env.get("JAX_NUM_CPU_DEVICES", "-1"))
    threads = threads_to_set(configured, env, os.cpu_count() or 1)
    if threads is not None:
        env[THREADS_ENV] = str(threads)
    return threads
