"""A worker process as the harness sees it, and the two ways to start one: fork (the
steps are inherited as written) or exec ``python -m runtime.worker`` (it imports them).
Either way the worker gets the run's ``env`` (the model server's socket, deterministic
mode) on top of the harness's own environment."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import multiprocess

from modelserver import config
from runtime.control import ControlChannel


@dataclass
class WorkerSlot:
    """A worker process and what the harness knows of it."""

    worker_id: int
    process: Any  # multiprocess.Process (fork) or subprocess.Popen (exec)
    started: float = field(default_factory=time.monotonic)
    channel: ControlChannel | None = None
    last_seen: float = field(default_factory=time.monotonic)
    threads: int = 1
    killed_for: str | None = None
    start_method: str = "forked"  # or "exec'd"

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    def exitcode(self) -> int | None:
        if isinstance(self.process, subprocess.Popen):
            code = self.process.poll()
            return code
        return self.process.exitcode  # type: ignore[no-any-return]

    def signal(self, sig: int) -> None:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def join(self, timeout: float) -> None:
        if isinstance(self.process, subprocess.Popen):
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        else:
            self.process.join(timeout)


def fork_worker(control_path: str, worker_id: int, steps: Any, threads: int, env: dict[str, str]) -> Any:
    """Fork a worker (the ``multiprocess`` package) that inherits ``steps``."""
    ctx = multiprocess.get_context("fork")
    process = ctx.Process(
        target=_forked_worker,
        args=(control_path, worker_id, steps, threads, env),
        name=f"beamlet-worker-{worker_id}",
        daemon=False,
    )
    process.start()
    return process


def exec_worker(
    control_path: str,
    worker_id: int,
    pipeline_ref: str,
    pipeline_args: tuple[str | None, str | None],
    threads: int,
    env: dict[str, str],
    log_level: str = "WARNING",
) -> subprocess.Popen[bytes]:
    """Start ``python -m runtime.worker`` for a pipeline file or module, in a process group
    of its own so that a Ctrl-C at the terminal reaches only the harness, which then stops
    the workers in its own time."""
    cmd = [
        sys.executable, "-m", "runtime.worker", "--control", control_path,
        "--pipeline", pipeline_ref, "--worker-id", str(worker_id), "--threads", str(threads), "--log-level", log_level,
    ]  # fmt: skip
    inp, outp = pipeline_args
    cmd += ["--input", inp] if inp else []
    cmd += ["--output", outp] if outp else []
    return subprocess.Popen(cmd, env=config.child_env(env), stdin=subprocess.DEVNULL, process_group=0)


def _forked_worker(control_path: str, worker_id: int, steps: Any, threads: int, env: dict[str, str]) -> None:
    os.environ.update(env)
    from runtime.worker import worker_main  # here, so `python -m runtime.worker` is not pre-imported

    worker_main(control_path, worker_id, steps, threads)
