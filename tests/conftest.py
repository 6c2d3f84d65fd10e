"""Test setup: 8 simulated CPU devices for mesh tests, and small shared builders."""

import jax

jax.config.update("jax_num_cpu_devices", 8)  # before any JAX op; single-device tests use devices()[:1]

import pytest  # noqa: E402

from scaling_jax.config import load_config  # noqa: E402

TINY = ["model.layers=2", "model.d_model=64", "model.heads=4", "model.kv_heads=2", "model.head_dim=16",
        "model.d_ff=128", "data.seq_len=32", "data.batch_size=8", "optimizer.warmup_steps=2"]


@pytest.fixture
def tiny_config():
    """A ~70k-parameter GQA model: compiles in seconds, still exercises every axis."""
    def make(*overrides: str):
        return load_config(None, TINY + list(overrides))
    return make
