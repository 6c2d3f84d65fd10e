"""How much accelerator memory a training process lets jax's allocator take.

jax's GPU client reserves 75% of device memory by default (``XLA_PYTHON_CLIENT_MEM_FRACTION``), and XLA's own
rematerialisation pass then squeezes the compiled step into that limit by recomputing activations. On one 80 GB
H100 the limit is 56.96 GiB: the 0.97B preset at batch 20 with ``model.remat=minimal`` needs 57.3 GiB, was
recomputed down to fit and ran at 49.0% MFU, below batch 16's 49.9%; given 95% it runs at 50.5-50.7%
(``docs/benchmarks.md``). A trainer or benchmark owns its device, so it takes 95%. A value the user set (or a
platform allocator setting that makes the fraction moot) is kept; CPU and TPU ignore the variable.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

MEM_FRACTION_ENV = "XLA_PYTHON_CLIENT_MEM_FRACTION"
OWNED_DEVICE_FRACTION = "0.95"
# Settings under which the user chose how the allocator behaves: the fraction is left alone
_USER_ALLOCATOR_ENV = (MEM_FRACTION_ENV, "XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_ALLOCATOR")


def claim_device_memory(env: MutableMapping[str, str] = os.environ) -> bool:
    """Let the allocator take 95% of each device, unless the user configured it; True when it was set here.
    Must run before jax starts a GPU client (the variable is read then)."""
    if any(name in env for name in _USER_ALLOCATOR_ENV):
        return False
    env[MEM_FRACTION_ENV] = OWNED_DEVICE_FRACTION
    return True
