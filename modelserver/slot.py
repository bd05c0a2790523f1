"""A key's registration in the manager (``ModelSlot``): its spec, its loaded copies while
in memory, what they charge each device, its counters, and the row ``status`` shows.

The manager owns every slot and changes one only under its registry lock; a slot's
``charges`` map is replaced whole by a load, never changed in place, so a reader holding
it sees one load's charges.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from modelserver import accounting, loaders
from modelserver.batchstats import BatchStats
from modelserver.copies import QUEUE_FIELDS, Copies

_NO_QUEUE = dict.fromkeys(QUEUE_FIELDS, 0)


@dataclass
class ModelStats:
    loads: int = 0
    evictions: int = 0
    hits: int = 0
    misses: int = 0
    swaps: int = 0
    failed_swaps: int = 0
    load_seconds: float = 0.0
    last_load_seconds: float = 0.0


@dataclass
class ModelSlot:
    """A key's registration: its spec, and the loaded model (its copies) while it is in memory."""

    key: str
    spec: loaders.ModelSpec
    charges: accounting.Charges  # bytes per device its copies are on; kept after eviction as an estimate
    batcher: Copies | None = None
    measured: int = 0  # the raw reading (RSS delta, or allocator delta on a GPU)
    nvml_delta: int = 0
    last_used: float = field(default_factory=time.monotonic)
    stats: ModelStats = field(default_factory=ModelStats)
    batch_stats: BatchStats = field(default_factory=BatchStats)  # across loads
    info: dict[str, Any] = field(default_factory=dict)  # what the last load produced; never cleared
    sequence: tuple[int, int] | None = None  # the served version's place in the key's order
    copies: int = 1  # how many copies of the model were loaded last

    @property
    def device(self) -> str:
        """The device of the model's first copy."""
        return next(iter(self.charges))

    @property
    def footprint(self) -> int:
        """Bytes charged for every copy, on every device."""
        return sum(self.charges.values())

    @property
    def copy_footprint(self) -> int:
        return self.footprint // max(self.copies, 1)

    @property
    def loaded(self) -> bool:
        return self.batcher is not None

    def describe(self, now: float, waiting: int, priority: float | None) -> dict[str, Any]:
        """The slot's row in ``status`` (docs/operations.md names every field). ``now``:
        the monotonic clock; ``waiting``: requests parked for its reload; ``priority``:
        its eviction priority on its first copy's device."""
        b = self.batcher
        return {
            "key": self.key,
            "model_id": self.spec.model_id,
            "loaded": b is not None,
            "device": self.device,
            "requested_device": self.spec.device,
            "nbytes": b.nbytes if b else 0,
            "footprint": self.footprint,
            "charges": dict(self.charges),
            "measured": self.measured,
            "nvml_delta": self.nvml_delta,
            **(b.queue_state() if b else _NO_QUEUE),
            "copies": b.describe() if b else [],
            "waiting_for_load": waiting,
            "idle_seconds": round(now - self.last_used, 3),
            "priority": priority,
            "loads": self.stats.loads,
            "evictions": self.stats.evictions,
            "hits": self.stats.hits,
            "misses": self.stats.misses,
            "swaps": self.stats.swaps,
            "failed_swaps": self.stats.failed_swaps,
            "revision": self.spec.revision,
            "sequence": list(self.sequence) if self.sequence is not None else None,
            "load_seconds": round(self.stats.load_seconds, 4),
            **self.batch_stats.as_dict(),
            "histograms": self.batch_stats.histograms(),
        }
