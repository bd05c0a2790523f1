"""A model's copies (``model_copies``): N loaded copies of one version, each with its own
batcher, and the routing of each request to the least busy one.

A key loaded with ``copies=N`` (Beam's ``model_copies``) is served by N copies of its
model, loaded one after another and each measured on its own. ``Copies`` stands where a
single batcher stood in the manager's slot: it is what is pinned, submitted to, drained
(every copy) and retired by a swap (every copy at once: requests in flight finish on the
old copies). A model with one copy is the same thing with N = 1.

Routing: each request goes to the copy with the fewest rows queued or being computed
(``Batcher.rows_in_flight``); among equals, the one after the copy chosen last (round
robin), so an idle model's requests take turns.

Compute: on the CPU the server's compute threads and intra-op threads
(``batcher.Compute``) are split among the copies, at least one each, so N copies use the
cores one copy would. On a GPU each copy has its one compute thread, as a model does.

Placement: the manager says on which device each copy lives (``placement.place``: on
GPUs, spread by free budget), and charges each device for the copies on it
(``accounting``). Each copy runs on its own device; a CUDA out-of-memory in a copy
relieves that copy's device.

Counters and histograms: each copy's ``BatchStats`` counts into the model's totals
(``parent``), so a model's ``status`` fields read as they did with one copy, and
``copies`` lists each, with its own ``histograms``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from modelserver import loaders
from modelserver.batcher import Batcher, Batching, Compute, QueueLimits, Work
from modelserver.batchstats import BatchStats
from modelserver.errors import OutOfMemory

QUEUE_FIELDS = ("queued", "queued_rows", "queued_bytes", "running", "in_flight", "compute_threads")


def check_budget(what: str, nbytes: int, budget: int | None, device: str) -> None:
    """OutOfMemory (``what`` ... more than the whole budget) when ``nbytes`` exceed the
    whole ``budget`` of ``device``: no eviction can make room."""
    if budget is not None and nbytes > budget:
        raise OutOfMemory(f"{what}, more than the whole {budget}-byte budget of {device}")


def split(compute: Compute, copies: int) -> Compute:
    """Each copy's share of the server's compute threads and intra-op threads (at least one
    each)."""
    if copies <= 1:
        return compute
    cores = None if compute.cores is None else max(1, compute.cores // copies)
    return Compute(max(1, compute.threads // copies), cores)


@dataclass(frozen=True)
class Copy:
    """One loaded copy: its batcher, device and the bytes charged for it."""

    batcher: Batcher
    device: str
    footprint: int


class Copies:
    """A model's loaded copies, routed least-busy first. Thread-safe; quacks like the one
    ``Batcher`` it replaces (``busy``, ``pin``, ``submit``, ``drain``...)."""

    def __init__(
        self,
        name: str,
        models: list[tuple[loaders.LoadedModel, str, int]],
        *,
        stats: BatchStats,
        compute: Compute,
        on_idle: Callable[[], None] | None = None,
        on_oom: Callable[[str], Callable[[], None]] | None = None,
        limits: QueueLimits | None = None,
        merge: bool = True,
        batching: Batching | None = None,
    ):
        """``models``: (model, device, footprint) of each copy; ``stats``: the model's
        totals, which every copy's counters add to; ``on_oom(device)``: the callback a
        copy on ``device`` calls after running out of memory."""
        if not models:
            raise ValueError("a model needs at least one copy")
        share = split(compute, len(models))
        self._lock = threading.Lock()
        self._next = 0  # where the round robin starts among equally busy copies
        self.copies = [
            Copy(
                Batcher(
                    name if len(models) == 1 else f"{name}#{i}",
                    model,
                    on_idle=on_idle,
                    on_oom=on_oom(device) if on_oom is not None else None,
                    stats=BatchStats(parent=stats),
                    limits=limits,
                    merge=merge,
                    batching=batching,
                    compute=share,
                ),
                device,
                footprint,
            )
            for i, (model, device, footprint) in enumerate(models)
        ]
        first = self.copies[0].batcher
        self.model_id, self.device, self.nbytes = first.model_id, first.device, first.nbytes

    @property
    def busy(self) -> bool:
        """Whether any copy is in use, or a request is on its way in (pinned)."""
        return any(c.batcher.busy for c in self.copies)

    def pin(self) -> None:
        """Hold the model (every copy) in use between looking it up and submitting to it."""
        for c in self.copies:
            c.batcher.pin()

    def unpin(self) -> None:
        for c in self.copies:
            c.batcher.unpin()

    def submit(self, work: Work) -> None:
        """Hand ``work`` to the least busy copy (``Batcher.submit``: it may run it on this
        thread, queue it, or refuse it with Overloaded)."""
        self.choose().submit(work)

    def choose(self) -> Batcher:
        """The copy with the fewest rows in flight; ties go round robin."""
        if len(self.copies) == 1:
            return self.copies[0].batcher
        with self._lock:
            n = len(self.copies)
            order = [(self._next + i) % n for i in range(n)]
            best = min(order, key=lambda i: self.copies[i].batcher.rows_in_flight)
            self._next = (best + 1) % n
        return self.copies[best].batcher

    def configure(self, batching: Batching) -> None:
        for c in self.copies:
            c.batcher.configure(batching)

    def drain(self, timeout: float | None = None) -> bool:
        """Stop every copy taking work, finish what they hold, free them. True when done."""
        deadline = None if timeout is None else time.monotonic() + timeout
        done = True
        for c in self.copies:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            done = c.batcher.drain(left) and done
        return done

    def queue_state(self) -> dict[str, int]:
        """The model's queue, all copies together (the fields of ``Batcher.queue_state``)."""
        total = dict.fromkeys(QUEUE_FIELDS, 0)
        for c in self.copies:
            for k, v in c.batcher.queue_state().items():
                total[k] += v
        return total

    def describe(self) -> list[dict[str, Any]]:
        """Each copy for ``status``: device, footprint, its counters, queue and histograms."""
        out = []
        for c in self.copies:
            stats = c.batcher.stats
            out.append(
                {
                    "device": c.device,
                    "footprint": c.footprint,
                    "requests": stats.requests,
                    "rows": stats.rows,
                    "batches": stats.batches,
                    "busy_seconds": round(stats.busy_seconds, 6),
                    **c.batcher.queue_state(),
                    "histograms": stats.histograms(),
                }
            )
        return out
