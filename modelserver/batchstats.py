"""What a model's batches did, for ``status``: counters and fixed-bucket histograms.

One ``BatchStats`` per copy of a loaded model (``copies``), each counting into its
model's totals too (``parent``), which outlive loads, evictions and swaps. The counters
(requests, rows, batches, errors, overloaded, busy seconds) are what ``status`` always
showed; the histograms (``modelserver.histogram.Histogram``: bounded memory, whatever
the server's uptime) are the distributions the Prometheus exporter and ``top`` read:

    queue_wait_us  per request: from its arrival to its batch being taken by a compute
                   thread (waiting for other callers' requests and for a reload included)
    batch_size     per forward batch: its rows (merged requests together)
    forward_us     per forward batch: the model call
    reply_us       per request: from the end of its batch's forward (outputs split) to
                   its reply being encoded and handed to its connection (sent, or queued
                   for a slow reader); a merged batch's later requests count the replies
                   ahead of them

Durations are recorded in microseconds (floats): the histogram's first bucket holds
everything up to 1, so seconds would lose all resolution. Requests the server records
no stage times for (``serve --no-metrics``) leave the histograms as they are.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from modelserver.errors import DEFAULT_RETRY_AFTER
from modelserver.histogram import Histogram

MIN_RETRY_AFTER = 0.005
MAX_RETRY_AFTER = 5.0
HISTOGRAMS = ("queue_wait_us", "batch_size", "forward_us", "reply_us")


@dataclass
class BatchStats:
    """A batcher's counters and histograms. ``parent``: a model's totals (across its
    copies and loads), which every ``add`` and ``record_batch`` counts too; each object
    has its own lock, so copies that share a parent never lose an update."""

    requests: int = 0
    rows: int = 0
    batches: int = 0
    errors: int = 0
    overloaded: int = 0  # requests refused because the queue was full
    busy_seconds: float = 0.0
    queue_wait_us: Histogram = field(default_factory=Histogram, repr=False, compare=False)
    batch_size: Histogram = field(default_factory=Histogram, repr=False, compare=False)
    forward_us: Histogram = field(default_factory=Histogram, repr=False, compare=False)
    reply_us: Histogram = field(default_factory=Histogram, repr=False, compare=False)
    parent: BatchStats | None = field(default=None, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: float) -> None:
        """Add to the named counters, here and in ``parent``."""
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)
        if self.parent is not None:
            self.parent.add(**counts)

    def record_batch(self, rows: int, forward: float, waits: list[float], replies: list[float]) -> None:
        """One forward batch of ``rows`` rows that took ``forward`` seconds; per request,
        its queue wait and reply time (seconds), here and in ``parent``."""
        with self._lock:
            self.batch_size.record(rows)
            self.forward_us.record(forward * 1e6)
            for seconds in waits:
                self.queue_wait_us.record(seconds * 1e6)
            for seconds in replies:
                self.reply_us.record(seconds * 1e6)
        if self.parent is not None:
            self.parent.record_batch(rows, forward, waits, replies)

    def histograms(self) -> dict[str, dict[str, Any]]:
        """Each histogram as ``Histogram.to_wire()``, by name (``HISTOGRAMS``)."""
        with self._lock:
            return {name: getattr(self, name).to_wire() for name in HISTOGRAMS}

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "rows": self.rows,
            "batches": self.batches,
            "errors": self.errors,
            "overloaded": self.overloaded,
            "busy_seconds": round(self.busy_seconds, 6),
        }

    def retry_after(self, rows: int) -> float:
        """Seconds the model needs for ``rows`` more rows, by its rows per second so far
        (before its first batch has finished: ``errors.DEFAULT_RETRY_AFTER``)."""
        if not self.rows:
            return DEFAULT_RETRY_AFTER
        per_row = self.busy_seconds / self.rows
        return round(min(max(rows * per_row, MIN_RETRY_AFTER), MAX_RETRY_AFTER), 4)
