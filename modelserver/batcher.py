"""The batcher: one thread per loaded model that runs its requests, merging where it can.

Requests from any connection, thread or process for the same model land in one queue.
The batcher thread takes the oldest request and merges the queued ones that can share a
forward pass with it (the same method, the same input structure, dtypes and trailing
shapes, and side arguments equal to its own: only batch inputs are concatenated, never
the arguments beside them) up to the model's batch limit, runs them once, splits the
outputs by rows and replies to each. A merged batch that fails is re-run request by request, so one
bad input never fails its neighbours.

Batching across callers (``Batching``): the batch limit is the handler's
``max_batch_size`` (else ``DEFAULT_MAX_MERGE_ROWS``). A batch short of it waits up to
``max_batch_duration_secs`` (counted from when its oldest request arrived; default
``DEFAULT_QUEUE_DELAY``) for requests from the other callers (connections) that used the
model in the last ``ACTIVE_WINDOW`` seconds, and goes as soon as every such caller has a
request in it: a lone caller never waits, and batch-1 traffic from many workers and
threads is computed in large batches. ``max_batch_duration_secs=0`` turns merging off.

Forwards run only on the model's compute threads, never on a connection's reader: the
threads that compute (and the OpenMP teams torch starts for them) are a fixed few per
loaded model (``Compute``), however many clients connect. A CPU model has
``Compute.threads`` of them sharing ``Compute.cores`` intra-op threads: a batch that runs
alone uses every core, n batches at once use ``cores // n`` each (torch's thread count
is per calling thread), so concurrent callers get one single-threaded forward per core,
which on CPU outruns one forward over all cores (docs/benchmarks.md). Only one thread at
a time gathers a batch, so two threads never split what one would merge. A GPU model,
and every model in the deterministic mode, has one compute thread and torch's threads as
they are. A request that finds a compute thread free and nothing queued holds its
connection's reader until its forward is done, as if the reader ran it: a lone client's
pipelined requests then go one at a time instead of filling the queue. ``busy`` tells
the manager whether the model is in use.

Bounded: the queue holds at most ``QueueLimits.rows`` rows and ``QueueLimits.nbytes``
bytes of inputs (a request that finds the queue empty is always taken, whatever its
size, so every request can run). A request over the limits is refused at once with
``Overloaded``, whose ``retry_after`` is the time the model needs to work through what is
queued, by its measured rows per second. In the deterministic mode (``merge=False``) no
two requests share a forward pass: every request is its own batch, whatever the load.

Seeing inside: each forward batch counts into the model's ``BatchStats``
(``batchstats``: counters, and histograms of queue wait, batch size, forward and reply
time) and gives each of its requests its stage times (``Work.stages``), which the server
sends back with the reply; for requests that are not ``timed`` (``serve
--no-metrics``) neither histograms nor stage times, only the few clock reads per batch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from modelserver import loaders, memory
from modelserver.batchstats import MIN_RETRY_AFTER as MIN_RETRY_AFTER  # the manager's too
from modelserver.batchstats import BatchStats
from modelserver.errors import BeamletError, InternalError, OutOfMemory, Overloaded
from modelserver.work import Work, rows_of

log = logging.getLogger("beamlet.batcher")

DEFAULT_MAX_MERGE_ROWS = 256
DEFAULT_QUEUE_DELAY = 0.005  # seconds a short batch may wait for other callers' requests
ACTIVE_WINDOW = 1.0  # a caller that sent a request this recently may send another soon
DEFAULT_MAX_QUEUE_ROWS = 8192  # 32 full merged batches
DEFAULT_MAX_QUEUE_BYTES = 256 << 20


@dataclass(frozen=True)
class QueueLimits:
    """How much one model's queue may hold: rows (latency) and input bytes (memory)."""

    rows: int = DEFAULT_MAX_QUEUE_ROWS
    nbytes: int = DEFAULT_MAX_QUEUE_BYTES

    def hold(self, rows: int, nbytes: int) -> bool:
        """Whether a queue may hold ``rows`` rows and ``nbytes`` bytes in all."""
        return rows <= self.rows and nbytes <= self.nbytes


@dataclass(frozen=True)
class Compute:
    """The CPU threads of a model's forwards: ``threads`` compute threads sharing ``cores``
    intra-op threads (None: torch's own setting, left alone)."""

    threads: int = 1
    cores: int | None = None

    def __post_init__(self) -> None:
        if self.threads < 1 or (self.cores is not None and self.cores < 1):
            raise ValueError(
                f"compute threads and cores must be at least 1, got {self.threads}, {self.cores}"
            )


@dataclass(frozen=True)
class Batching:
    """How one model's requests are merged: at most ``max_rows`` rows in a batch, and a
    short batch waits at most ``delay`` seconds for other callers (0: never merge)."""

    max_rows: int = DEFAULT_MAX_MERGE_ROWS
    delay: float = DEFAULT_QUEUE_DELAY

    @classmethod
    def from_handler(cls, max_batch_size: int | None, max_batch_duration_secs: float | None) -> Batching:
        """From a handler's Beam batching arguments; None takes the server's default."""
        return cls(
            DEFAULT_MAX_MERGE_ROWS if max_batch_size is None else max_batch_size,
            DEFAULT_QUEUE_DELAY if max_batch_duration_secs is None else max_batch_duration_secs,
        )

    @property
    def merges(self) -> bool:
        return self.delay > 0 and self.max_rows > 1


class Batcher:
    """Runs one loaded model's requests on its own thread. Thread-safe ``submit``."""

    def __init__(
        self,
        name: str,
        model: loaders.LoadedModel,
        *,
        on_idle: Callable[[], None] | None = None,
        on_oom: Callable[[], None] | None = None,
        stats: BatchStats | None = None,
        limits: QueueLimits | None = None,
        merge: bool = True,
        batching: Batching | None = None,
        compute: Compute | None = None,
    ):
        """``merge=False`` (the deterministic mode) never merges, whatever ``batching``
        says, and computes on one thread with torch's threads as they are."""
        self.name = name
        self.model: loaders.LoadedModel = model
        self.model_id = model.model_id
        self.device = model.device
        self.nbytes = model.nbytes
        self._on_idle = on_idle
        self._on_oom = on_oom
        self.batching = batching or Batching()
        self.stats = stats if stats is not None else BatchStats()
        self.limits = limits or QueueLimits()
        self.merge = merge
        self._queue: deque[Work] = deque()
        self._queued_rows = 0
        self._queued_bytes = 0
        lock = threading.RLock()
        self._cond = threading.Condition(lock)  # idle compute threads wait on it (and drain)
        self._more = threading.Condition(lock)  # the thread gathering a batch waits on it
        compute = compute or Compute()
        cpu = str(model.device) == "cpu"
        self._threads_n = compute.threads if merge and cpu else 1
        self._cores = compute.cores if merge and cpu else None
        self._running = 0  # batches being computed (or gathered) now
        self._running_rows = 0  # their rows: taken from the queue, not yet answered
        self._gathering = False  # a thread is gathering a batch: the others wait
        self._callers: dict[int, float] = {}  # caller -> when it last sent a request
        self._pins = 0
        self._stopping = False
        self._threads = [
            threading.Thread(target=self._loop, name=f"batcher-{name}-{i}", daemon=True)
            for i in range(self._threads_n)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def busy(self) -> bool:
        """True while a batch runs, requests wait, or a request is on its way in (pinned):
        the model is in use and must not be evicted."""
        with self._cond:
            return self._running > 0 or bool(self._queue) or self._pins > 0

    def pin(self) -> None:
        """Hold the model in use between looking it up and submitting to it."""
        with self._cond:
            self._pins += 1

    def unpin(self) -> None:
        with self._cond:
            self._pins -= 1
            idle = not (self._running or self._queue or self._pins)
        if idle and self._on_idle is not None:
            self._on_idle()

    @property
    def rows_in_flight(self) -> int:
        """Rows queued or being computed: how busy the model is (``copies`` routes by it)."""
        with self._cond:
            return self._queued_rows + self._running_rows

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    def queue_state(self) -> dict[str, int]:
        with self._cond:
            return {
                "queued": len(self._queue),
                "queued_rows": self._queued_rows,
                "queued_bytes": self._queued_bytes,
                "running": self._running,
                "in_flight": len(self._queue) + self._running,
                "compute_threads": self._threads_n,
            }

    def configure(self, batching: Batching) -> None:
        """Take new batching settings (a handler registered the model again)."""
        with self._cond:
            self.batching = batching
            self._more.notify()

    def submit(self, work: Work) -> None:
        """Queue a request for the batcher thread, or refuse it with Overloaded when the
        queue is full. When the model is idle, wait until the request has been answered
        (the caller is a connection's reader: see the module's docstring)."""
        with self._cond:
            if self._stopping:
                raise InternalError(f"model {self.name} is being unloaded")
            work.model_id = self.model_id
            if self._running < self._threads_n and not self._queue:
                work.done = threading.Event()
            self._admit(work)
            self._queue.append(work)
            self._queued_rows += work.rows
            self._queued_bytes += work.nbytes
            self._callers[work.caller] = work.enqueued
            self._wake()
        if work.done is not None:
            while not work.done.wait(1.0):
                if not any(t.is_alive() for t in self._threads):
                    return  # drained or unloaded meanwhile: nothing will run it now

    def _admit(self, work: Work) -> None:
        """Under the condition's lock: Overloaded when ``work`` does not fit the queue's
        limits (an empty queue takes any request)."""
        if self._queue and not self.limits.hold(
            self._queued_rows + work.rows, self._queued_bytes + work.nbytes
        ):
            self.stats.add(overloaded=1)
            raise Overloaded(
                f"model {self.name} is overloaded: {self._queued_rows} rows ({self._queued_bytes} bytes) "
                f"queued, limits {self.limits.rows} rows, {self.limits.nbytes} bytes (serve --max-queue-rows, "
                "--max-queue-bytes); retry later",
                retry_after=self.stats.retry_after(self._queued_rows),
            )

    def _run_timed(self, batch: list[Work]) -> None:
        taken = time.monotonic()
        try:
            self._run(batch, taken)
        finally:
            with self._cond:
                self._running -= 1
                self._running_rows -= sum(work.rows for work in batch)
                self.stats.add(busy_seconds=time.monotonic() - taken)
                idle = not self._queue and not self._running
                for work in batch:  # after _running: a reader that waited finds a thread free
                    if work.done is not None:
                        work.done.set()
            if idle and self._on_idle is not None:
                self._on_idle()

    def drain(self, timeout: float | None = None) -> bool:
        """Stop taking work, finish what is queued, and end the thread. True when done."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            self._more.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in self._threads):
            return False
        self.__dict__.pop("model", None)  # the model's memory goes with the last reference
        return True

    def _loop(self) -> None:
        intra_op: int | None = None  # this thread's torch threads, as last set
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if self._cores is not None:
                with self._cond:
                    want = max(1, self._cores // self._running)
                if want != intra_op:
                    _set_torch_threads(want)
                    intra_op = want
            self._run_timed(batch)
            # Drop the batch before waiting for the next: its requests' inputs may be views
            # of a client's shared memory, which must go with the client.
            del batch

    def _next_batch(self) -> list[Work] | None:
        """Wait for work and take the next batch (None: drained, stop)."""
        with self._cond:
            while not ((self._queue and not self._gathering) or (self._stopping and not self._queue)):
                self._cond.wait()
            if not self._queue:
                return None
            first = self._queue.popleft()
            self._dequeued(first)
            batch = [first]
            self._running += 1  # from here on the model is in use, waiting included
            if self.merge and self.batching.merges and first.signature is not None:
                self._gathering = True
                try:
                    self._fill(batch)
                finally:
                    self._gathering = False
                    if self._queue:
                        self._cond.notify()  # what did not fit is another thread's
            return batch

    def _wake(self) -> None:
        """Under the lock: a request has come. The thread gathering a batch may take it;
        else one idle thread (not all: on a small machine every needless wake-up costs
        the forward that runs meanwhile)."""
        if self._gathering:
            self._more.notify()
        else:
            self._cond.notify()

    def _dequeued(self, work: Work) -> None:
        self._queued_rows -= work.rows
        self._queued_bytes -= work.nbytes
        self._running_rows += work.rows

    def _fill(self, batch: list[Work]) -> None:
        """Under the lock: merge queued requests that fit into ``batch``; while it is short
        of ``max_rows`` and some recently active caller has no request in it, wait for
        more, until ``delay`` after its oldest request arrived."""
        first = batch[0]
        assert first.signature is not None
        rows = first.signature[0]
        deadline = first.enqueued + self.batching.delay
        while True:
            rows = self._merge_queued(batch, rows)
            if rows >= self.batching.max_rows or self._stopping:
                return
            now = time.monotonic()
            remaining = deadline - now
            if remaining <= 0 or not self._callers_missing(batch, now):
                return
            self._more.wait(remaining)

    def _merge_queued(self, batch: list[Work], rows: int) -> int:
        """Under the lock: move every queued request that fits into ``batch``."""
        sig = batch[0].signature
        assert sig is not None
        kept: deque[Work] = deque()
        while self._queue:
            work = self._queue.popleft()
            other = work.signature
            if other is not None and other[1:] == sig[1:] and rows + other[0] <= self.batching.max_rows:
                batch.append(work)
                self._dequeued(work)
                rows += other[0]
            else:
                kept.append(work)
        self._queue.extendleft(reversed(kept))
        return rows

    def _callers_missing(self, batch: list[Work], now: float) -> bool:
        """Under the lock: whether a caller active in the last ``ACTIVE_WINDOW`` seconds
        has no request in ``batch`` (it may send one any moment)."""
        stale = [c for c, seen in self._callers.items() if now - seen > ACTIVE_WINDOW]
        for caller in stale:
            del self._callers[caller]
        return bool(self._callers.keys() - {w.caller for w in batch})

    def _run(self, batch: list[Work], taken: float) -> None:
        """Run ``batch`` (taken from the queue at ``taken``) and answer each request."""
        assemble = 0.0
        if len(batch) > 1:
            started = time.monotonic()
            try:
                merged = _concat([w.inputs for w in batch])
                called = time.monotonic()
                outputs = loaders.run(self.model, merged, batch[0].kwargs, batch[0].method)
                returned = time.monotonic()
                parts = _split(outputs, [rows_of(w.inputs) for w in batch])
            except Exception as exc:
                log.debug("merged batch of %d failed (%s); running each alone", len(batch), exc)
                parts = None
            ended = time.monotonic()
            if parts is not None:
                rows = self._account(batch)
                times = (called - started + ended - returned, returned - called)
                self._answer(batch, parts, None, rows, taken, *times)
                return
            assemble = ended - started  # the failed merge: spent before each ran alone
        for work in batch:
            rows = self._account([work])
            started = time.monotonic()
            error = None
            try:
                out = self._run_one(work)
            except Exception as exc:
                self.stats.add(errors=1)
                out, error = None, _as_error(exc, self.name)
            self._answer([work], [out], error, rows, taken, assemble, time.monotonic() - started)

    def _answer(
        self,
        batch: list[Work],
        outputs: list[Any],
        error: BeamletError | None,
        rows: int,
        taken: float,
        assemble: float,
        forward: float,
    ) -> None:
        """Reply to each request of a forward batch of ``rows`` rows (``error`` to every
        one, else its outputs); for timed requests, their stage times and histograms."""
        if not batch[0].timed:  # one server, one setting: every request in a batch alike
            for work, out in zip(batch, outputs):
                work.finish(out, error)
            return
        waits = [taken - work.enqueued for work in batch]
        replies = []
        ended = time.monotonic()
        for work, out, wait in zip(batch, outputs, waits):
            work.stages = {"queue": wait, "assemble": assemble, "forward": forward}
            work.finish(out, error)
            replies.append(time.monotonic() - ended)
        self.stats.record_batch(rows, forward, waits, replies)

    def _run_one(self, work: Work) -> Any:
        """One request; after a CUDA out-of-memory, free what can be freed and retry once."""
        try:
            return loaders.run(self.model, work.inputs, work.kwargs, work.method)
        except Exception as exc:
            if not memory.is_cuda_oom(exc) or self._on_oom is None:
                raise
        self._on_oom()
        return loaders.run(self.model, work.inputs, work.kwargs, work.method)

    def _account(self, batch: list[Work]) -> int:
        """Count one forward batch; its rows."""
        rows = sum(rows_of(w.inputs) or 0 for w in batch)
        self.stats.add(batches=1, requests=len(batch), rows=rows)
        return rows


def _set_torch_threads(n: int) -> None:
    """torch's intra-op threads for the calling thread (OpenMP's setting is per thread)."""
    import torch

    torch.set_num_threads(n)


def _as_error(exc: BaseException, name: str) -> BeamletError:
    if isinstance(exc, BeamletError):
        return exc
    if memory.is_cuda_oom(exc):
        return OutOfMemory(f"model {name} ran out of GPU memory on this batch: {exc}")
    if isinstance(exc, MemoryError):
        return OutOfMemory(f"model {name} ran out of host memory on this batch")
    log.exception("model %s failed on a batch", name)
    return InternalError(f"model {name} failed: {type(exc).__name__}: {exc}")


def _concat(inputs: list[Any]) -> Any:
    import torch

    if isinstance(inputs[0], dict):
        return {k: torch.cat([x[k] for x in inputs]) for k in inputs[0]}
    return torch.cat(inputs)


def _split(outputs: Any, rows: list[int | None]) -> list[Any] | None:
    """Split merged outputs by request; None when some output is not batch-shaped."""
    import torch

    total = sum(r or 0 for r in rows)
    sizes = [r or 0 for r in rows]
    if isinstance(outputs, torch.Tensor):
        if not outputs.dim() or outputs.shape[0] != total:
            return None
        return list(torch.split(outputs, sizes))
    if isinstance(outputs, dict):
        pieces = {k: _split(v, rows) for k, v in outputs.items()}
        if any(p is None for p in pieces.values()):
            return None
        return [{k: p[i] for k, p in pieces.items()} for i in range(len(rows))]  # type: ignore[index]
    if isinstance(outputs, (list, tuple)):
        columns = [_split(v, rows) for v in outputs]
        if any(c is None for c in columns):
            return None
        return [type(outputs)(c[i] for c in columns) for i in range(len(rows))]  # type: ignore[index]
    return None
