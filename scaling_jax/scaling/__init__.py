"""Scaling studies: fits of published law forms, gradient noise scale, sweeps and reports.

``laws`` and ``noise_scale`` are pure numpy/scipy on plain tables (no JAX import), so published
data can be fitted with the same code as our own runs.
"""
