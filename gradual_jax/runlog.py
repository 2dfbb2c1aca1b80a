"""The run's log file and how a launch process ends.

Process 0 keeps ``<run>/run.log``: what the console shows (warnings; with ``-v`` progress too)
and the traceback of an internal failure. A process ends with `exit_process`: after a failure
nothing may keep it alive. ``kill -USR1 <pid>`` prints every thread's stack (`stacks_on_signal`).
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from pathlib import Path

RUN_LOG = "run.log"
log = logging.getLogger("gradual_jax")


def open_run_log(root: Path) -> logging.Handler | None:
    """Process 0's log file handler on ``<root>/run.log``, attached to the package's logger (so
    it holds what the console shows); None on other processes. The caller removes it."""
    from gradual_jax.distributed import is_main_process

    if not is_main_process():
        return None
    handler = logging.FileHandler(root / RUN_LOG, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    return handler


def append_traceback(root: Path) -> None:
    """Append the exception being handled, with its traceback, to ``<root>/run.log``."""
    with open(root / RUN_LOG, "a", encoding="utf-8") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} internal failure:\n{traceback.format_exc()}")


def stacks_on_signal() -> None:
    """``kill -USR1 <pid>`` prints every thread's Python stack to stderr (a hung process of a
    multi-process run shows where it waits)."""
    import faulthandler
    import signal

    if hasattr(signal, "SIGUSR1"):
        try:
            faulthandler.register(signal.SIGUSR1, all_threads=True)
        except (ValueError, RuntimeError, OSError):
            pass  # not the main thread, or stderr has no file descriptor (a notebook)


def exit_process(code: int) -> None:
    """End the process with ``code``. After a failure nothing may keep it alive (an async
    checkpoint save, a worker thread, JAX's exit barrier waiting for the other processes):
    streams and log handlers are flushed, then ``os._exit``. Exit 0 ends normally."""
    if code == 0:
        sys.exit(0)
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)
