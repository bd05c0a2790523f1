"""A worker process as the harness sees it, and the two ways to start one: fork it from
the run's zygote (runtime/zygote.py: the steps are inherited as written) or exec
``python -m runtime.worker`` (it imports them). Either way the worker gets the harness's
environment with the run's ``env`` on top (the model server's socket, deterministic mode,
the compute threads' variables)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from runtime.computethreads import ComputeThreads
from runtime.control import ControlChannel
from runtime.zygote import ZygoteChild


@dataclass
class WorkerSlot:
    """A worker process and what the harness knows of it."""

    worker_id: int
    process: ZygoteChild | subprocess.Popen[bytes]  # forked, or exec'd
    started: float = field(default_factory=time.monotonic)
    channel: ControlChannel | None = None
    last_seen: float = field(default_factory=time.monotonic)
    threads: int = 1
    killed_for: str | None = None

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    @property
    def start_method(self) -> str:
        return "forked" if isinstance(self.process, ZygoteChild) else "exec'd"

    def exitcode(self) -> int | None:
        return self.process.poll()

    def signal(self, sig: int) -> None:
        """Signal the worker unless it has been reaped (its pid may be another's by now)."""
        try:
            self.process.send_signal(sig)
        except ProcessLookupError:
            pass

    def join(self, timeout: float) -> None:
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass


def exec_worker(
    control_path: str,
    worker_id: int,
    pipeline_ref: str,
    pipeline_args: tuple[str | None, str | None],
    threads: int,
    env: Mapping[str, str],
    compute: ComputeThreads,
    log_level: str = "WARNING",
) -> subprocess.Popen[bytes]:
    """Start ``python -m runtime.worker`` for a pipeline file or module, with ``env`` as its
    whole environment, in a process group of its own so that a Ctrl-C at the terminal
    reaches only the harness, which then stops the workers in its own time."""
    cmd = [
        sys.executable, "-m", "runtime.worker", "--control", control_path,
        "--pipeline", pipeline_ref, "--worker-id", str(worker_id), "--threads", str(threads), "--log-level", log_level,
    ]  # fmt: skip
    inp, outp = pipeline_args
    cmd += ["--input", inp] if inp else []
    cmd += ["--output", outp] if outp else []
    cmd += ["--intra-op-threads", str(compute.intra_op)] if compute.intra_op is not None else []
    cmd += ["--inter-op-threads", str(compute.inter_op)] if compute.inter_op is not None else []
    return subprocess.Popen(cmd, env=dict(env), stdin=subprocess.DEVNULL, process_group=0)
