"""Start-up, step by step: how long each step of a run's start took, one INFO line each.

    start-up: harness import 0.41s (process start to main)
    start-up: pipeline import 1.93s (examples/classify.py)
    start-up: model server 0.35s from spawn to serving (pid 4242, forked)
    start-up: worker 0 0.52s from spawn to hello (pid 4243, forked)
    start-up: first bundle committed 2.71s after the process started (0.37s after the run started)

The lines go to the ``beamlet.startup`` logger (``--log-level INFO`` shows them); what
each step covers is written in docs/runtime.md.
"""

from __future__ import annotations

import logging
import os
import time

import psutil

log = logging.getLogger("beamlet.startup")


def process_age() -> float:
    """Seconds since this process started, to the kernel's clock tick (10 ms). On Linux
    both ends are read on the boot clock: psutil's wall-clock start time rests on a boot
    time rounded to the second."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, ValueError, IndexError, AttributeError):
        return max(0.0, time.time() - psutil.Process().create_time())


def step(what: str, seconds: float, detail: str = "") -> None:
    """Log one step of the start: ``start-up: <what> <seconds>s [(detail)]``."""
    log.info("start-up: %s %.2fs%s", what, seconds, f" ({detail})" if detail else "")
