"""scaling_jax: pretrain decoder-only LMs with JAX/Flax NNX and study how they scale."""

__version__ = "0.1.0"
