"""SIGINT (Ctrl-C) and SIGTERM (`kill`, a scheduler's time limit) end a run cleanly.

While training runs, the first signal only asks to stop: the trainer finishes the optimizer step in progress,
run.py saves a checkpoint where that is wanted and writes results.json with status "interrupted", and the entry
exits 130 / 143 with one line saying how to resume. Outside training (loading data or the model, writing the
adapter), or on a second signal, the run stops at once (RunInterrupted raised from the handler), and the same
results.json is written from what exists.

Under submitit (SLURM arrays, `hydra/launcher=slurm|submitit_local`), its preemption / time-limit signal (USR2
unless SUBMITIT_PREEMPT_SIGNAL says otherwise) is caught too: the run stops and checkpoints the same way, then the
signal is handed to submitit's own handler, which requeues the job; the requeued job finds the interrupted run's
checkpoint in its directory and resumes from it (run.prepare_run_dir).

A process started by torchrun can get one stop twice: from the scheduler (SLURM signals every process of a job
step) and once more from torchrun, which forwards the signal it received to its workers. The same signal again
within FORWARD_WINDOW_S seconds therefore counts as the first one there, so that the run still stops cleanly.

Stdlib only; handlers are installed only in the main thread (signal.signal refuses elsewhere).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from typing import Iterator

from .errors import RunInterrupted

log = logging.getLogger("lorabench")

SIGNALS = (signal.SIGINT, signal.SIGTERM)
FORWARD_WINDOW_S = 3.0  # a repeat of the first signal this soon, under torchrun, is its forwarded copy


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def under_submitit() -> bool:
    return bool(os.environ.get("SUBMITIT_EXECUTOR"))


def preemption_signal() -> int | None:
    """submitit's preemption / time-limit signal when this process is a submitit job, else None."""
    if not under_submitit():
        return None
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)


class StopSignals:
    """Catches SIGINT/SIGTERM for one job. `deferring()` marks the span (training) where a first signal waits
    for the current step to end; `requested` is the signal received, if any."""

    def __init__(self) -> None:
        self.requested: int | None = None
        self._requested_at = 0.0
        self._defer = False
        self.previous: dict[int, object] = {}  # the handlers we replaced, while installed

    def _handle(self, signum: int, frame) -> None:
        if (self._defer and signum == self.requested and under_torchrun()
                and time.monotonic() - self._requested_at < FORWARD_WINDOW_S):
            return  # torchrun's forwarded copy of the signal this process already got
        if self.requested is not None or not self._defer:
            self.requested = self.requested or signum
            raise RunInterrupted(signum)
        self.requested = signum
        self._requested_at = time.monotonic()
        log.warning("%s received: stopping after the current step (send it again to stop at once)",
                    signal.Signals(signum).name)

    def stop_requested(self) -> bool:
        return self.requested is not None

    @contextlib.contextmanager
    def deferring(self) -> Iterator[None]:
        self._defer = True
        try:
            yield
        finally:
            self._defer = False

    @contextlib.contextmanager
    def installed(self) -> Iterator["StopSignals"]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        signals = SIGNALS + ((preemption_signal(),) if preemption_signal() else ())
        self.previous = {s: signal.getsignal(s) for s in signals}
        for s in signals:
            signal.signal(s, self._handle)
        try:
            yield self
        finally:
            for s, handler in self.previous.items():
                signal.signal(s, handler)

    def hand_over(self, signum: int) -> bool:
        """Call the handler we replaced for `signum` (submitit's checkpoint-and-requeue); False if none."""
        handler = self.previous.get(signum)
        if signum != preemption_signal() or not callable(handler):
            return False
        handler(signum, None)
        return True
