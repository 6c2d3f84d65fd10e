"""A run's compiled programs kept across restarts: XLA's persistent compilation cache, per run by default.

A preempted pod job that resumes would compile its train step again (a minute or more at pod scale, every
restart). jax's persistent compilation cache keys each program by its HLO, compile options, device kind and
jax version, so a restarted run reads back exactly the programs it compiled before and never a stale one.
MaxText keeps one cache per user (``jax_cache_dir``, default ``~/jax_cache``); ours lives inside the run
directory by default, because no command writes outside its own run directory, and a sweep can point all
of its runs at one shared directory (``train.compilation_cache=DIR``).

A directory the caller already gave jax (``JAX_COMPILATION_CACHE_DIR``, ``jax.config``) is kept whatever the
config says (but ``none``). jax reads its cache directory once, when it first needs it, so switching means
resetting jax's cache (``reset_cache``); a Trainer switches only for its own lifetime and gives the process back
the directory it found, so runs one after another in one process (a local sweep, a notebook) each write where
they say. Only process 0 writes entries (jax's rule; every process reads). By default jax also points XLA:GPU's
autotuning cache into the directory, which puts the directory's path into every program's key, so a copied or
moved run would compile everything again; off GPUs that cache does nothing and is turned off while a run's
cache is in use.
"""

from __future__ import annotations

from collections import Counter

import jax
from jax.experimental.compilation_cache import compilation_cache as jax_cache

from scaling_jax import paths
from scaling_jax.config import COMPILATION_CACHE_IN_RUN, COMPILATION_CACHE_NONE
from scaling_jax.run_dir import COMPILATION_CACHE_DIR

READ_EVENT = "/jax/compilation_cache/cache_hits"  # a program read back instead of compiled
WRITTEN_EVENT = "/jax/compilation_cache/cache_misses"  # a program compiled and written for the next process


def cache_dir_for(setting: str, run_dir: str, already: str | None) -> str | None:
    """The directory a run's programs go to: ``none``: no directory; else the one the caller gave jax
    (``already``: the process's own choice, as in MaxText's ``jax_cache_dir``), else the config's."""
    if setting == COMPILATION_CACHE_NONE:
        return None
    if already:
        return already
    return paths.join(run_dir, COMPILATION_CACHE_DIR) if setting == COMPILATION_CACHE_IN_RUN else setting


class CompilationCache:
    """Points jax at the run's cache directory and counts what this process read from and wrote to it."""

    def __init__(self, setting: str, run_dir: str):
        self.found = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_enable_xla_caches)
        self.directory = cache_dir_for(setting, run_dir, self.found[0])
        self.switched = self.directory != self.found[0]
        if self.switched:
            keep_gpu_caches = jax.default_backend() == "gpu" or not self.directory
            _point_jax_at(self.directory, self.found[1] if keep_gpu_caches else "none")
        self.events: Counter[str] = Counter()
        self.counting = True
        jax.monitoring.register_event_listener(self._count)

    def _count(self, event: str, **kwargs) -> None:
        if event in (READ_EVENT, WRITTEN_EVENT):
            self.events[event] += 1

    def close(self) -> None:
        """Stop counting; the process gets back the cache directory it had before this run."""
        if self.counting:
            jax.monitoring.unregister_event_listener(self._count)
            self.counting = False
        if self.switched:
            _point_jax_at(*self.found)
            self.switched = False

    def summary(self) -> dict:
        """For a run's summary: did this start compile its programs or read them back?"""
        return {"dir": self.directory, "programs_read": self.events[READ_EVENT],
                "programs_written": self.events[WRITTEN_EVENT]}


def _point_jax_at(directory: str | None, xla_caches: str) -> None:
    jax_cache.reset_cache()  # jax read its directory when it first needed it; make it read the new one
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_enable_xla_caches", xla_caches)
