"""Error policy of the `python -m train` entry (Hydra-free, so it is testable as a plain function).

Single run: a user-fixable error prints one line (`error: ...`) and exits 2; a bug keeps its traceback.
Sweep job: every failure is recorded in that job's results.json and the sweep goes on (Hydra skips its
multirun-end callback when a job raises); the reporter lists failed jobs and the sweep exits non-zero.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from .errors import LorabenchError
from .run import run_job

log = logging.getLogger("lorabench")

# Jobs that failed in this process (a sweep with the basic launcher runs every job here).
FAILED_JOBS: list[str] = []


def run_configured_job(config: dict[str, Any], out_dir: str | Path, in_sweep: bool = False) -> dict[str, Any] | None:
    try:
        return run_job(config, out_dir)
    except KeyboardInterrupt:
        raise
    except Exception as e:
        if in_sweep:
            FAILED_JOBS.append(str(out_dir))
            log.error("job failed (%s: %s); recorded in %s/results.json, the sweep goes on",
                      type(e).__name__, e, out_dir)
            return None
        if isinstance(e, LorabenchError):
            print(f"error: {e}", file=sys.stderr)
            sys.exit(e.exit_code)
        raise
