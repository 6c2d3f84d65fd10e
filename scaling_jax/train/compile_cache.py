"""A run's compiled programs kept across restarts: XLA's persistent compilation cache, per run by default.

A preempted pod job that resumes would compile its train step again (a minute or more at pod scale, every
restart). jax's persistent compilation cache keys each program by its HLO, compile options, device kind and
jax version, so a restarted run reads back exactly the programs it compiled before and never a stale one.
MaxText keeps one cache per user (``jax_cache_dir``, default ``~/jax_cache``); ours lives inside the run
directory by default, because no command writes outside its own run directory, and a sweep can point all
of its runs at one shared directory (``train.compilation_cache=DIR``).

jax reads the cache directory once, when it first needs the cache, and cannot switch afterwards; a directory
the caller already gave jax (``JAX_COMPILATION_CACHE_DIR``, ``jax.config``) is therefore kept as it is. Only
process 0 writes entries (jax's rule; every process reads). By default jax also points XLA:GPU's autotuning cache
into the directory, which puts the directory's path into every program's key, so a copied or moved run would
compile everything again; off GPUs that cache does nothing and is turned off, so keys depend on programs only.
"""

from __future__ import annotations

from collections import Counter

import jax

from scaling_jax import paths
from scaling_jax.run_dir import COMPILATION_CACHE_DIR

IN_RUN_DIR = "run"  # train.compilation_cache: <run_dir>/compilation_cache
NONE = "none"  # train.compilation_cache: compile every program in every process
READ_EVENT = "/jax/compilation_cache/cache_hits"  # a program read back instead of compiled
WRITTEN_EVENT = "/jax/compilation_cache/cache_misses"  # a program compiled and written for the next process


def cache_dir_for(setting: str, run_dir: str, already: str | None) -> str | None:
    """The directory a run's programs go to: ``already`` (what jax was given before) wins over the default,
    an explicit directory wins over ``already``; ``none`` leaves jax as it is."""
    if setting == NONE:
        return already
    if setting == IN_RUN_DIR:
        return already or paths.join(run_dir, COMPILATION_CACHE_DIR)
    return setting


class CompilationCache:
    """Points jax at the run's cache directory and counts what this process read from and wrote to it."""

    def __init__(self, setting: str, run_dir: str):
        already = jax.config.jax_compilation_cache_dir
        self.directory = cache_dir_for(setting, run_dir, already)
        if self.directory and self.directory != already:
            jax.config.update("jax_compilation_cache_dir", self.directory)
            if jax.default_backend() != "gpu":
                jax.config.update("jax_persistent_cache_enable_xla_caches", "none")
        self.events: Counter[str] = Counter()
        jax.monitoring.register_event_listener(self._count)

    def _count(self, event: str, **kwargs) -> None:
        if event in (READ_EVENT, WRITTEN_EVENT):
            self.events[event] += 1

    def close(self) -> None:
        jax.monitoring.unregister_event_listener(self._count)

    def summary(self) -> dict:
        """For a run's summary: did this start compile its programs or read them back?"""
        return {"dir": self.directory, "programs_read": self.events[READ_EVENT],
                "programs_written": self.events[WRITTEN_EVENT]}
