"""XLA:CPU client threads for simulated devices: hundreds of queued multi-device steps run without a deadlock."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from scaling_jax.parallel.cpu_threads import (
    THREADS_ENV,
    client_threads,
    ensure_threads_for_collectives,
    simulated_cpu_devices,
    threads_to_set,
)


def test_the_device_count_comes_from_the_config_then_the_xla_flag():
    flags = {"XLA_FLAGS": "--xla_cpu_use_fusion_emitters=false --xla_force_host_platform_device_count=4"}
    assert simulated_cpu_devices(8, flags) == 8  # jax_num_cpu_devices wins over the flag, as in JAX
    assert simulated_cpu_devices(-1, flags) == 4
    assert simulated_cpu_devices(-1, {}) == 1
    assert client_threads(8, cores=2) == 16 and client_threads(2, cores=64) == 64


def test_a_threads_setting_of_the_users_is_kept_and_one_device_needs_none():
    env = {THREADS_ENV: "3", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert ensure_threads_for_collectives(env) is None and env[THREADS_ENV] == "3"
    assert threads_to_set(-1, {}, cores=2) is None and threads_to_set(1, {}, cores=2) is None
    assert threads_to_set(-1, {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}, cores=2) == 8
    assert os.environ[THREADS_ENV] == str(client_threads(8, os.cpu_count()))  # conftest's 8 devices


def test_a_command_that_needs_no_jax_sets_the_threads_without_importing_it():
    script = ("import os, sys; from scaling_jax.parallel.cpu_threads import ensure_threads_for_collectives as e; "
              "print(e(), os.environ['PJRT_NPROC'], 'jax' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != THREADS_ENV} | {"JAX_NUM_CPU_DEVICES": "4"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    expected = client_threads(4, os.cpu_count())
    assert done.stdout.split() == [str(expected), str(expected), "False"]


def test_hundreds_of_queued_steps_on_a_2x4_mesh_finish():
    """With XLA's default pool (one thread per simulated device on a small machine) this aborts the process
    after 40 s in a collective rendezvous; every step here is dispatched before the first one finishes."""
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))
    gathered = NamedSharding(mesh, P())

    def loss(weights, x):
        for w in weights:  # an FSDP all-gather per layer, an all-reduce of every gradient
            x = jnp.tanh(x @ jax.lax.with_sharding_constraint(w, gathered))
        return jnp.mean(x**2)

    @jax.jit
    def step(weights, x):
        return [w - 0.01 * g for w, g in zip(weights, jax.grad(loss)(weights, x), strict=True)]

    start = [jax.device_put(jnp.full((32, 32), 0.01 * (i + 1)), NamedSharding(mesh, P("fsdp"))) for i in range(4)]
    x = jax.device_put(jnp.ones((32, 32)), NamedSharding(mesh, P(("data", "fsdp"))))
    queued = waited = start
    for _ in range(300):
        queued = step(queued, x)
    for _ in range(300):  # the same steps, each finished before the next starts
        waited = jax.block_until_ready(step(waited, x))
    for a, b in zip(queued, waited, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
