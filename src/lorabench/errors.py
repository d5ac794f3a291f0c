"""User-facing errors.

A `ConfigError` or `DataError` is something the user can fix; the entry points print its message as one
line (no traceback) and exit with status 2. Anything else is a bug and keeps its traceback.
"""


class LorabenchError(Exception):
    """Base class: the message says what was wrong and how to fix it."""

    exit_code = 2


class ConfigError(LorabenchError):
    """An option value that cannot work (unknown name, impossible budget, bad path)."""


class DataError(LorabenchError):
    """Missing or malformed GLUE data."""


class TrainingError(LorabenchError):
    """Training cannot continue (non-finite loss)."""
