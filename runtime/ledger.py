"""The bundle ledger: where every bundle of a run is, from read to commit.

A pure object (no processes, no sockets, no clock of its own: time comes in as ``now``),
so exactly-once and the retry rules are tested without starting anything
(tests/test_ledger.py). The harness loop wires its events to it:

    admit      a bundle read from the input             -> pending
    take       the next pending bundle, for a worker    -> (the caller sends it)
    assign     sent to worker W with a deadline          -> running
    put_back   the send failed; first in line again      -> pending
    complete   W's result for the current attempt        -> done
    fail       user code raised; retried at the front    -> pending, or BundleExhausted
    time_out   ran past its deadline (W will be killed)  -> marked; still running
    lose       W died: all its running bundles, retried  -> pending, or BundleExhausted
    abandon    W died while the run stops: not retried   -> gone
    commit     done bundles in input order, each once    -> handed out, forgotten

A result or failure for an attempt that is no longer running (its worker was given up on,
the bundle went to another worker) is superseded and ignored: that is what makes a
re-run bundle count once. A bundle has ``max_attempts`` attempts, lost or failed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np


class BundleExhausted(Exception):
    """A bundle has used up its attempts: the run cannot complete."""


@dataclass
class Bundle:
    """One bundle: its place in the input, its elements, and how its attempts went."""

    index: int
    elements: Sequence[Any] | np.ndarray  # a list, or a bundle's rows as one array
    ack: Any = None  # what its source needs back once it is committed
    arrived: float | None = None  # time.time() its first element reached the source
    attempt: int = 0
    losses: list[str] = field(default_factory=list)  # why each earlier attempt ended


class Committed(NamedTuple):
    """A bundle ready to commit (``bundle``, its index): its outputs and dead letters,
    and its source's ack."""

    bundle: int
    outputs: list[Any]
    dead_letters: list[dict[str, Any]]
    ack: Any = None
    arrived: float | None = None


@dataclass
class _Running:
    bundle: Bundle
    worker: int
    deadline: float
    timed_out: bool = False


class BundleLedger:
    """Pending, running and done bundles of one run; at most ``window`` of them at once,
    so memory stays bounded however long the input (completed bundles waiting for a slow
    predecessor count too)."""

    def __init__(self, window: int, max_attempts: int, bundle_timeout: float):
        self.window = window
        self.max_attempts = max_attempts
        self.bundle_timeout = bundle_timeout
        self.pending: deque[Bundle] = deque()
        self.running: dict[int, _Running] = {}
        self.done: dict[int, Committed] = {}
        self.next_index = 0
        self.next_commit = 0
        self.input_exhausted = False
        self.retries = 0  # attempts after the first, lost or failed

    # -- reading ---------------------------------------------------------------------------
    def has_room(self) -> bool:
        """Whether the run should read another bundle now."""
        held = len(self.pending) + len(self.running) + len(self.done)
        return not self.input_exhausted and held < self.window

    def admit(
        self, elements: Sequence[Any] | np.ndarray, ack: Any = None, arrived: float | None = None
    ) -> Bundle:
        bundle = Bundle(self.next_index, elements, ack, arrived)
        self.next_index += 1
        self.pending.append(bundle)
        return bundle

    def end_of_input(self) -> None:
        self.input_exhausted = True

    def finished(self) -> bool:
        """Every bundle read has been committed, and there is nothing more to read."""
        return self.input_exhausted and not self.pending and not self.running and not self.done

    # -- handing out -----------------------------------------------------------------------
    def take(self) -> Bundle | None:
        """The next bundle to send, or None. The caller ``assign``s it, or ``put_back``."""
        return self.pending.popleft() if self.pending else None

    def assign(self, bundle: Bundle, worker: int, now: float) -> None:
        self.running[bundle.index] = _Running(bundle, worker, now + self.bundle_timeout)

    def put_back(self, bundle: Bundle) -> None:
        """It could not be sent: first in line again, the same attempt."""
        self.pending.appendleft(bundle)

    def running_on(self, worker: int) -> int:
        return sum(1 for r in self.running.values() if r.worker == worker)

    # -- what comes back -------------------------------------------------------------------
    def _current(self, worker: int, index: int, attempt: Any) -> _Running | None:
        running = self.running.get(index)
        if running is None or running.worker != worker or running.bundle.attempt != attempt:
            return None  # a superseded attempt
        return running

    def complete(
        self, worker: int, index: int, attempt: Any, outputs: list[Any], dead_letters: list[dict[str, Any]]
    ) -> bool:
        """``worker``'s whole output for ``index``; False (and ignored) if superseded."""
        running = self._current(worker, index, attempt)
        if running is None:
            return False
        del self.running[index]
        bundle = running.bundle
        self.done[index] = Committed(index, outputs, dead_letters, bundle.ack, bundle.arrived)
        return True

    def fail(self, worker: int, index: int, attempt: Any, error: str) -> bool:
        """User code raised on ``index``: it runs again, first in line. False if
        superseded; BundleExhausted when that was its last attempt."""
        running = self._current(worker, index, attempt)
        if running is None:
            return False
        del self.running[index]
        bundle = running.bundle
        bundle.losses.append(f"failed: {error}")
        bundle.attempt += 1
        if bundle.attempt >= self.max_attempts:
            times = "once" if bundle.attempt == 1 else f"{bundle.attempt} times"
            raise BundleExhausted(f"bundle {index} failed {times}: {error}")
        self.retries += 1
        self.pending.appendleft(bundle)
        return True

    def overdue(self, now: float) -> list[tuple[int, int]]:
        """(worker, bundle) for each running bundle past its deadline, not yet timed out."""
        return [(r.worker, i) for i, r in self.running.items() if r.deadline < now and not r.timed_out]

    def time_out(self, index: int) -> None:
        """Its worker is being killed for it: when the worker is lost, this bundle's
        attempt counts as timed out (the others it held were only lost with it)."""
        self.running[index].timed_out = True

    def lose(self, worker: int, why: str) -> list[int]:
        """``worker`` died: each bundle it was running runs again from the start, in input
        order at the front of the line. The bundles put back; BundleExhausted (after
        putting them all back) if one of them has no attempt left."""
        lost = sorted((i for i, r in self.running.items() if r.worker == worker), reverse=True)
        exhausted: list[Bundle] = []
        for index in lost:
            running = self.running.pop(index)
            bundle = running.bundle
            bundle.losses.append(f"timed out after {self.bundle_timeout:g}s" if running.timed_out else why)
            bundle.attempt += 1
            self.retries += 1
            self.pending.appendleft(bundle)
            if bundle.attempt >= self.max_attempts:
                exhausted.append(bundle)
        if exhausted:
            raise BundleExhausted(_exhausted_message(exhausted[-1]))
        return sorted(lost)

    def abandon(self, worker: int) -> int:
        """``worker`` died while the run stops: its bundles are not run again. How many."""
        lost = [i for i, r in self.running.items() if r.worker == worker]
        for index in lost:
            del self.running[index]
        return len(lost)

    def uncommitted(self) -> int:
        return len(self.pending) + len(self.running)

    # -- committing ------------------------------------------------------------------------
    def commit(self) -> Iterator[Committed]:
        """Each bundle that can be committed now: in input order, each exactly once,
        forgotten as it is handed out."""
        while self.next_commit in self.done:
            committed = self.done.pop(self.next_commit)
            self.next_commit += 1
            yield committed


def _exhausted_message(bundle: Bundle) -> str:
    n = len(bundle.losses)
    times = "once" if n == 1 else f"{n} times"
    timeouts = [loss for loss in bundle.losses if loss.startswith("timed out")]
    if len(timeouts) == n:
        return f"bundle {bundle.index} timed out {times} ({timeouts[-1]}, each time its worker was killed)"
    return f"bundle {bundle.index} was lost {times} with its worker: " + "; ".join(bundle.losses)
