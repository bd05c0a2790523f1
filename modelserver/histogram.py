"""A distribution in bounded memory: fixed, log-spaced buckets (four per doubling, so a
percentile is within 19% of the true value) plus the exact count, sum, min and max.

Whatever a run's length, a histogram holds at most a few hundred numbers; two merge by
adding counts (workers' metrics add up in the harness, copies' in the server). The
client's RunInference metrics, the server's per-model stage times and the harness's
latency all record into one, and the Prometheus exporters (``modelserver.metrics``)
read their buckets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

BUCKETS_PER_DOUBLING = 4
MAX_BUCKET = 64 * BUCKETS_PER_DOUBLING  # values up to 2**64 have a bucket of their own


def bucket_of(value: float) -> int:
    """The bucket holding ``value``: 0 for values up to 1, then one per quarter doubling."""
    if value <= 1:
        return 0
    return min(MAX_BUCKET, math.ceil(math.log2(value) * BUCKETS_PER_DOUBLING))


def bucket_top(index: int) -> float:
    """The largest value bucket ``index`` holds."""
    return 2 ** (index / BUCKETS_PER_DOUBLING)


@dataclass
class Histogram:
    """A distribution of non-negative numbers in fixed buckets. Not thread-safe: one
    RunInference thread records into it, or the caller holds a lock."""

    counts: dict[int, int] = field(default_factory=dict)
    count: int = 0
    total: float = 0
    min: float = 0
    max: float = 0

    def record(self, value: float, n: int = 1) -> None:
        """Record ``value`` ``n`` times (a bundle's latency, once per element in it).
        A value that is not a finite number is not a measurement: it is dropped."""
        if n <= 0 or not math.isfinite(value):
            return
        b = bucket_of(value)
        self.counts[b] = self.counts.get(b, 0) + n
        self.min = value if self.count == 0 else min(self.min, value)
        self.max = value if self.count == 0 else max(self.max, value)
        self.count += n
        self.total += value * n

    def merge(self, other: Histogram) -> None:
        if not other.count:
            return
        for b, n in other.counts.items():
            self.counts[b] = self.counts.get(b, 0) + n
        self.min = other.min if self.count == 0 else min(self.min, other.min)
        self.max = other.max if self.count == 0 else max(self.max, other.max)
        self.count += other.count
        self.total += other.total

    def percentile(self, q: float) -> float:
        """The value below which ``q`` percent of the recorded ones lie (to its bucket's
        precision, and never outside the recorded min and max)."""
        if not self.count:
            return 0.0
        rank = max(1, math.ceil(q / 100 * self.count))
        seen = 0
        for b in sorted(self.counts):
            seen += self.counts[b]
            if seen >= rank:
                return float(min(self.max, max(self.min, bucket_top(b))))
        return float(self.max)

    def summary(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "mean": round(self.total / self.count, 2) if self.count else 0.0,
            "p50": self.percentile(50),
            "p99": self.percentile(99),
            "max": self.max,
        }

    def to_wire(self) -> dict[str, Any]:
        return {
            "counts": [[b, n] for b, n in sorted(self.counts.items())],
            "count": self.count,
            "total": self.total,
            "min": self.min,
            "max": self.max,
        }

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Histogram:
        return cls(
            {int(b): int(n) for b, n in data.get("counts", [])},
            int(data.get("count", 0)),
            data.get("total", 0),
            data.get("min", 0),
            data.get("max", 0),
        )
