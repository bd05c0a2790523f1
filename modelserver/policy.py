"""Which idle models to evict: a pure policy, fed with measurements and a clock.

GreedyDual-Size-Frequency (Cherkasova 1998), the cache policy that weighs what a plain
LRU ignores: each model carries a priority

    H = L + frequency * reload_cost / size

where ``reload_cost`` is its measured load time in seconds, ``size`` its measured
footprint in bytes and ``frequency`` how many requests it has served while loaded. The
model with the lowest H goes first, and evicting it raises the clock L to its H, so
models that have not been used for a while age out even if they were once popular
(recency). Cheap-to-reload, large, rarely used models go first; small, costly, popular
ones stay.

The policy knows nothing of torch, threads or memory readings: the manager tells it what
happened (``loaded``, ``hit``, ``evicted``) and asks it to choose (``choose_victims``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

MIN_COST_SECONDS = 1e-3


@dataclass
class _Entry:
    size: int
    cost: float
    frequency: int
    priority: float
    last_used: int


class GreedyDualSizeFrequency:
    """Eviction priorities for the models loaded on one device."""

    name = "gdsf"

    def __init__(self) -> None:
        self.clock = 0.0
        self._entries: dict[str, _Entry] = {}
        self._tick = 0

    def _priority(self, e: _Entry) -> float:
        return self.clock + e.frequency * max(e.cost, MIN_COST_SECONDS) / max(e.size, 1)

    def loaded(self, key: str, size: int, cost_seconds: float) -> None:
        self._tick += 1
        e = _Entry(size, cost_seconds, 1, 0.0, self._tick)
        e.priority = self._priority(e)
        self._entries[key] = e

    def hit(self, key: str) -> None:
        e = self._entries.get(key)
        if e is None:
            return
        self._tick += 1
        e.frequency += 1
        e.last_used = self._tick
        e.priority = self._priority(e)

    def evicted(self, key: str) -> None:
        e = self._entries.pop(key, None)
        if e is not None:
            self.clock = max(self.clock, e.priority)

    def priority(self, key: str) -> float | None:
        e = self._entries.get(key)
        return e.priority if e else None

    def choose_victims(self, candidates: Iterable[str], needed: int) -> list[str]:
        """Idle models to evict, lowest priority first, until ``needed`` bytes are freed;
        all candidates when even that is not enough (the caller then waits or fails)."""
        ranked = sorted(
            (k for k in candidates if k in self._entries),
            key=lambda k: (self._entries[k].priority, self._entries[k].last_used),
        )
        chosen: list[str] = []
        freed = 0
        for key in ranked:
            if freed >= needed:
                break
            chosen.append(key)
            freed += self._entries[key].size
        return chosen


class LeastRecentlyUsed(GreedyDualSizeFrequency):
    """Plain LRU by recency, for comparison (what a count-capped cache does)."""

    name = "lru"

    def _priority(self, e: _Entry) -> float:
        return float(e.last_used)


POLICIES = {p.name: p for p in (GreedyDualSizeFrequency, LeastRecentlyUsed)}
