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


class RunInterrupted(BaseException):
    """SIGINT / SIGTERM ended the run (exit status 128 + the signal: 130 for Ctrl-C, 143 for SIGTERM).

    `step` / `total_steps` say how far training got (None before training started). A BaseException, like
    KeyboardInterrupt: the signal handler raises it wherever the main thread is, and an `except Exception` there
    (a cache read that falls back, a library's optional import) must not swallow the stop."""

    def __init__(self, signum: int, step: int | None = None, total_steps: int | None = None) -> None:
        import signal

        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        self.step = step
        self.total_steps = total_steps
        self.exit_code = 128 + signum
        where = f"at step {step}/{total_steps}" if step is not None else "before training started"
        super().__init__(f"{self.signal_name} {where}")
