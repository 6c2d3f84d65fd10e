"""Multi-process start-up: ``jax.distributed.initialize`` when a job spans several processes.

Every process of a multi-host job (the workers of a TPU pod slice, SLURM / Open MPI ranks, or
processes started by hand) must join one coordination service before JAX touches a device, so
that ``jax.devices()`` is the global device list and collectives span hosts. A single process
needs none of that, so the default is a no-op there.

Where the settings come from, first match wins:

1. explicit values (``scaling-jax train --coordinator-address HOST:PORT --num-processes N
   --process-id I``) or the environment (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
   ``JAX_PROCESS_ID``); all three are needed, and ``N == 1`` is a no-op;
2. a cluster JAX detects by itself: a Cloud TPU VM (``/dev/accel*`` or ``/dev/vfio`` with libtpu
   installed; JAX reads worker count and id from the TPU metadata), SLURM with more than one task,
   Open MPI with more than one rank; then ``jax.distributed.initialize()`` runs without arguments;
3. otherwise nothing happens.

``SCALING_JAX_DISTRIBUTED=off`` skips all of it (e.g. to run one worker of a pod on its own).
"""

from __future__ import annotations

import glob
import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass

from scaling_jax.errors import ConfigError

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_SWITCH = "SCALING_JAX_DISTRIBUTED"  # off | auto (default)


@dataclass(frozen=True)
class DistributedSettings:
    """What to pass to ``jax.distributed.initialize``; ``auto`` means "let JAX detect the cluster"."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False
    source: str = ""  # where the settings came from, for the start-up log line


def _int(value: str | int | None, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} must be an integer") from None


def on_cloud_tpu_vm(env: Mapping[str, str] | None = None) -> bool:
    """A TPU VM exposes its chips as /dev/accel* (v4, v5p) or /dev/vfio (v5e, v6e); libtpu must be there too."""
    env = os.environ if env is None else env
    has_chips = bool(glob.glob("/dev/accel*")) or os.path.isdir("/dev/vfio")
    return has_chips and "TPU_SKIP_MDS_QUERY" not in env and importlib.util.find_spec("libtpu") is not None


def resolve(coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None,
            env: Mapping[str, str] | None = None, tpu_vm: bool | None = None) -> DistributedSettings | None:
    """The settings for this process, or None when it runs alone. Pure: reads only its arguments
    (``env`` and ``tpu_vm`` default to this machine's) so every branch is testable."""
    env = os.environ if env is None else env
    if env.get(ENV_SWITCH, "auto").lower() in ("off", "0", "false", "no"):
        return None
    coordinator = coordinator_address or env.get(ENV_COORDINATOR) or None
    count = num_processes if num_processes is not None else _int(env.get(ENV_NUM_PROCESSES), ENV_NUM_PROCESSES)
    index = process_id if process_id is not None else _int(env.get(ENV_PROCESS_ID), ENV_PROCESS_ID)
    given = {"--coordinator-address / " + ENV_COORDINATOR: coordinator,
             "--num-processes / " + ENV_NUM_PROCESSES: count, "--process-id / " + ENV_PROCESS_ID: index}
    if any(v is not None for v in given.values()):
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise ConfigError(f"multi-process run needs {', '.join(missing)} as well "
                              "(a coordinator HOST:PORT, the process count and this process's id)")
        if count < 1 or not 0 <= index < count:
            raise ConfigError(f"process id {index} must be in [0, num_processes={count}) and num_processes >= 1")
        if count == 1:
            return None
        if ":" not in coordinator:
            raise ConfigError(f"coordinator address '{coordinator}' needs a port: HOST:PORT, e.g. 10.0.0.2:8476")
        return DistributedSettings(coordinator, count, index, source="explicit")
    if on_cloud_tpu_vm(env) if tpu_vm is None else tpu_vm:
        return DistributedSettings(auto=True, source="Cloud TPU VM")
    if (_int(env.get("SLURM_NTASKS"), "SLURM_NTASKS") or 0) > 1:
        return DistributedSettings(auto=True, source="SLURM")
    if (_int(env.get("OMPI_COMM_WORLD_SIZE"), "OMPI_COMM_WORLD_SIZE") or 0) > 1:
        return DistributedSettings(auto=True, source="Open MPI")
    return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> DistributedSettings | None:
    """Join the job's coordination service if this process is one of several; a no-op otherwise.

    Must run before anything initialises a JAX backend (``jax.devices()``, any array op); calling
    it again after a successful start is harmless.
    """
    import jax

    settings = resolve(coordinator_address, num_processes, process_id)
    if settings is None or jax.distributed.is_initialized():
        return settings
    if settings.auto:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(settings.coordinator_address, settings.num_processes, settings.process_id)
    return settings


def agree_to_stop(requested: bool) -> bool:
    """True on every process if any process asks to stop (SIGTERM, maintenance notice).

    A signal can reach the workers of a pod at different moments; a process that left the loop on
    its own would leave the others hanging in the next collective and the checkpoint half written.
    One tiny all-gather per call makes all processes stop after the same step. One process: no-op.
    """
    import jax

    if jax.process_count() == 1:
        return requested
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.int32(requested))).max())
