"""Console messages of the library through ``logging``: progress to stdout, ``warning: ...`` lines to stderr.

One logger (``scaling_jax``) with a handler of its own, so messages look the same whether the CLI, a
notebook or a test calls the library, and a caller can still raise the level, add handlers or silence it
with the standard ``logging`` API. On a multi-host job only process 0 speaks (errors excepted): N hosts
printing the same line N times is noise. The streams are looked up at each message, so redirecting
``sys.stdout``/``sys.stderr`` (pytest's capture, a notebook) still catches them.
"""

from __future__ import annotations

import logging
import sys

NAME = "scaling_jax"


class MainProcessOnly(logging.Filter):
    """Drop records below ERROR on every process but JAX's process 0."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        import jax  # only once a message is emitted: importing this module stays cheap

        return jax.process_index() == 0


class ConsoleHandler(logging.Handler):
    """INFO to stdout as is; WARNING and above to stderr as ``warning: message`` / ``error: message``."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            if record.levelno >= logging.ERROR:
                stream, message = sys.stderr, f"error: {message}"
            elif record.levelno >= logging.WARNING:
                stream, message = sys.stderr, f"warning: {message}"
            else:
                stream = sys.stdout
            stream.write(message + "\n")
            stream.flush()
        except Exception:  # a closed stream must not end a training run
            self.handleError(record)


def get_logger() -> logging.Logger:
    """The library's logger, set up on first use (INFO and above, process 0, the console handler)."""
    logger = logging.getLogger(NAME)
    if not any(isinstance(h, ConsoleHandler) for h in logger.handlers):
        handler = ConsoleHandler()
        handler.addFilter(MainProcessOnly())
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # the root logger (absl's, a notebook's) would print every line twice
    return logger


def info(message: str) -> None:
    get_logger().info(message)


def warning(message: str) -> None:
    """``message`` without the ``warning:`` prefix: the handler adds it."""
    get_logger().warning(message)
