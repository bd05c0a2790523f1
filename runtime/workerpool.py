"""The run's SDK-worker processes: spawn, reap (each end logged with its cause), kill the
ones that hang, and stop them all in bounded stages.

The pool knows processes, not bundles: what a worker's end means for the bundles it held,
and whether to replace it, is the harness's policy (runtime/harness.py) and the ledger's
(runtime/ledger.py).
"""

from __future__ import annotations

import itertools
import logging
import signal
import time
from typing import Any

from modelserver import config
from runtime.computethreads import ComputeThreads
from runtime.control import ControlChannel
from runtime.workerslot import WorkerSlot, exec_worker
from runtime.zygote import Zygote

log = logging.getLogger("beamlet.harness")


class WorkerPool:
    """Workers connected to ``control_path``, each with ``threads`` threads and ``compute``
    torch threads: forked from ``zygote`` with its steps inherited, or, with
    ``pipeline_ref``, started as ``python -m runtime.worker``."""

    def __init__(
        self,
        control_path: str,
        threads: int,
        compute: ComputeThreads,
        zygote: Zygote | None = None,
        pipeline_ref: str | None = None,
        pipeline_args: tuple[str | None, str | None] = (None, None),
    ):
        self.control_path = control_path
        self.threads = threads
        self.compute = compute
        self.zygote = zygote
        self.pipeline_ref = pipeline_ref
        self.pipeline_args = pipeline_args
        self.slots: dict[int, WorkerSlot] = {}
        self._ids = itertools.count()

    def spawn(self, env: dict[str, str]) -> WorkerSlot:
        """Start one more worker, with ``env`` on top of this process's environment.
        Raises ZygoteLost when its zygote has gone."""
        worker_id = next(self._ids)
        child_env = config.child_env({**env, **self.compute.env})
        process: Any
        if self.pipeline_ref:
            process = exec_worker(
                self.control_path,
                worker_id,
                self.pipeline_ref,
                self.pipeline_args,
                self.threads,
                child_env,
                self.compute,
            )
        else:
            assert self.zygote is not None, "a pool without a pipeline_ref forks from a zygote"
            process = self.zygote.spawn_worker(
                worker_id, self.control_path, self.threads, child_env, self.compute
            )
        slot = self.slots[worker_id] = WorkerSlot(worker_id, process, threads=self.threads)
        log.info("spawned worker %d (pid %d, %s)", worker_id, process.pid, slot.start_method)
        return slot

    def of_channel(self, channel: ControlChannel) -> WorkerSlot | None:
        for slot in self.slots.values():
            if slot.channel is channel:
                return slot
        return None

    def reap(self) -> list[tuple[WorkerSlot, int, str]]:
        """Forget the workers that have ended: (slot, exit code, how it ended) for each,
        its end logged with its cause and its channel closed."""
        ended = []
        for slot in list(self.slots.values()):
            code = slot.exitcode()
            if code is None:
                continue
            del self.slots[slot.worker_id]
            slot.join(0)
            if slot.channel is not None:
                slot.channel.close()
            ended.append((slot, code, _log_exit(slot, code)))
        return ended

    def kill(self, slot: WorkerSlot, why: str) -> None:
        """SIGKILL a worker, remembering why; ``reap`` reports it once it has gone."""
        slot.killed_for = why
        log.warning("killing worker %d (pid %d): %s", slot.worker_id, slot.pid, why)
        slot.signal(signal.SIGKILL)

    def kill_silent(self, now: float, heartbeat_timeout: float) -> None:
        """Kill workers that went quiet: no heartbeat, or never a hello (booting takes
        longer, so it gets twice the time)."""
        for slot in list(self.slots.values()):
            if slot.killed_for:
                continue
            if slot.channel is not None and now - slot.last_seen > heartbeat_timeout:
                self.kill(slot, f"no heartbeat for {heartbeat_timeout:g}s")
            elif slot.channel is None and now - slot.started > heartbeat_timeout * 2:
                self.kill(slot, "never said hello")

    def stop(self) -> None:
        """Ask each worker to stop, then SIGTERM, then SIGKILL, each stage bounded; every
        worker is reaped."""
        for slot in self.slots.values():
            if slot.channel is not None:
                try:
                    slot.channel.send({"op": "stop"})
                except OSError:
                    pass
            else:
                # Still booting: it holds no bundle and has no channel to be asked on; a
                # SIGTERM could land before it installs its own handlers, so SIGKILL.
                slot.killed_for = slot.killed_for or "the run ended before it booted"
                slot.signal(signal.SIGKILL)
        self._reap_until(time.monotonic() + 10)
        for slot in self.slots.values():
            slot.signal(signal.SIGTERM)
        self._reap_until(time.monotonic() + 5)
        for slot in self.slots.values():
            slot.signal(signal.SIGKILL)
        self._reap_until(time.monotonic() + 10)

    def _reap_until(self, deadline: float) -> None:
        while self.slots and time.monotonic() < deadline:
            for slot in list(self.slots.values()):
                code = slot.exitcode()
                if code is not None:
                    slot.join(0)
                    del self.slots[slot.worker_id]
                    if slot.channel is not None:
                        slot.channel.close()
            if self.slots:
                next(iter(self.slots.values())).join(0.05)


def _log_exit(slot: WorkerSlot, code: int) -> str:
    """Log how a worker ended, with its cause; the same words, short, to return."""
    who = f"worker {slot.worker_id} (pid {slot.pid})"
    why = f" ({slot.killed_for})" if slot.killed_for else ""
    if code < 0:
        name = signal.Signals(-code).name
        hint = " Perhaps out of memory?" if -code == signal.SIGKILL and not slot.killed_for else ""
        log.warning("%s was killed by %s%s.%s", who, name, why, hint)
        return f"{who} was killed by {name}{why}"
    if code != 0:
        log.warning("%s exited with code %d%s", who, code, why)
        return f"{who} exited with code {code}{why}"
    log.info("%s exited", who)
    return f"{who} exited"
