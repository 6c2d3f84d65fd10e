"""User-facing errors.

Anything a user can cause (a bad config, an empty data source, a checkpoint from another
model) raises a subclass of ``UserError`` whose message is one line naming the problem and
the fix. The CLI prints that line and exits non-zero; tracebacks are for our own bugs.
"""


class UserError(Exception):
    """A problem with the user's input; the message says what to change."""


class ConfigError(UserError):
    """A config field is unknown, mistyped or inconsistent."""


class DataError(UserError):
    """A data source is missing, empty or malformed."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type's name when it has none), for a one-line error."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]


class CheckpointError(UserError):
    """A run directory or checkpoint cannot be used as asked."""
