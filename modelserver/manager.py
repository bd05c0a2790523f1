"""The model manager: loads models by key, measures them, keeps them within a budget.

Loads are serialised (one at a time for the whole server), so the host-memory reading
taken around a load belongs to that model and no other. Each model's footprint is the
larger of its measured RSS growth and the bytes of its tensors. Before a load, idle
models are evicted, least recently used first, until the new one is expected to fit;
a model whose batcher is busy is never evicted.

Registering a key again with a different spec loads the new version beside the old one
and swaps it in atomically; the old version finishes its queued batches and is freed.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psutil

from modelserver import loaders
from modelserver.batcher import Batcher
from modelserver.errors import ModelLoadError, ModelNotFound, OutOfMemory

log = logging.getLogger("beamlet.manager")


@dataclass
class ModelStats:
    loads: int = 0
    evictions: int = 0
    swaps: int = 0
    load_seconds: float = 0.0


@dataclass
class ModelSlot:
    """A key's registration: its spec, and the loaded model when it is in memory."""

    key: str
    spec: loaders.ModelSpec
    batcher: Batcher | None = None
    footprint: int = 0
    rss_delta: int = 0
    last_used: float = field(default_factory=time.monotonic)
    stats: ModelStats = field(default_factory=ModelStats)

    @property
    def loaded(self) -> bool:
        return self.batcher is not None


class ModelManager:
    """Keyed models in one server. Thread-safe."""

    def __init__(self, budget_bytes: int | None = None):
        self.budget_bytes = budget_bytes
        self._slots: dict[str, ModelSlot] = {}
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._process = psutil.Process()

    def register(self, key: str, spec: loaders.ModelSpec) -> ModelSlot:
        """Make ``key`` serve ``spec``, loading it now. A new spec for a known key swaps."""
        with self._lock:
            slot = self._slots.get(key)
            if slot is not None and slot.spec == spec:
                if slot.loaded:
                    return slot
        with self._load_lock:
            with self._lock:
                slot = self._slots.get(key)
                if slot is not None and slot.spec == spec and slot.loaded:
                    return slot
            batcher, footprint, rss_delta, seconds = self._load(key, spec)
            with self._lock:
                old = self._slots.get(key)
                new = ModelSlot(key, spec, batcher, footprint, rss_delta)
                if old is not None:
                    new.stats = old.stats
                    if old.spec != spec and old.loaded:
                        new.stats.swaps += 1
                new.stats.loads += 1
                new.stats.load_seconds += seconds
                self._slots[key] = new
            if old is not None and old.batcher is not None and old.batcher is not batcher:
                self._retire(old)
            return new

    def get(self, key: str) -> Batcher:
        """The batcher serving ``key``, reloading an evicted model on demand."""
        with self._lock:
            slot = self._slots.get(key)
            if slot is None:
                raise ModelNotFound(f"no model registered under key {key!r}")
            slot.last_used = time.monotonic()
            if slot.batcher is not None:
                return slot.batcher
            spec = slot.spec
        return self._require(self.register(key, spec))

    def status(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        with self._lock:
            slots = list(self._slots.values())
        out = []
        for s in slots:
            b = s.batcher
            out.append(
                {
                    "key": s.key,
                    "model_id": s.spec.model_id,
                    "loaded": b is not None,
                    "device": b.model.device if b else None,
                    "requested_device": s.spec.device,
                    "nbytes": b.model.nbytes if b else 0,
                    "footprint": s.footprint if b else 0,
                    "rss_delta": s.rss_delta if b else 0,
                    "in_flight": b.queued + int(b.busy) if b else 0,
                    "idle_seconds": round(now - s.last_used, 3),
                    "loads": s.stats.loads,
                    "evictions": s.stats.evictions,
                    "swaps": s.stats.swaps,
                    "load_seconds": round(s.stats.load_seconds, 4),
                    **(b.stats.as_dict() if b else {}),
                }
            )
        return out

    def loaded_bytes(self) -> int:
        with self._lock:
            return sum(s.footprint for s in self._slots.values() if s.loaded)

    def close(self, timeout: float = 30.0) -> None:
        """Finish queued batches and drop every model."""
        with self._lock:
            slots = list(self._slots.values())
            self._slots.clear()
        deadline = time.monotonic() + timeout
        for s in slots:
            if s.batcher is not None:
                s.batcher.drain(max(0.0, deadline - time.monotonic()))

    def _require(self, slot: ModelSlot) -> Batcher:
        if slot.batcher is None:
            raise ModelNotFound(f"model {slot.key!r} is not loaded")
        return slot.batcher

    def _load(self, key: str, spec: loaders.ModelSpec) -> tuple[Batcher, int, int, float]:
        """Load under the load lock; returns (batcher, footprint, rss delta, seconds)."""
        self._make_room(key, 0)
        gc.collect()
        before = self._process.memory_info().rss
        started = time.monotonic()
        try:
            model = loaders.load(spec)
        except ModelLoadError:
            raise
        except MemoryError:
            raise OutOfMemory(f"loading {key!r} ran out of host memory") from None
        except Exception as exc:
            log.exception("loading %s failed", key)
            raise ModelLoadError(f"loading {key!r} failed: {type(exc).__name__}: {exc}") from None
        seconds = time.monotonic() - started
        rss_delta = max(0, self._process.memory_info().rss - before)
        footprint = max(rss_delta, model.nbytes) if model.device == "cpu" else model.nbytes
        if self.budget_bytes is not None and footprint > self.budget_bytes:
            del model
            gc.collect()
            raise OutOfMemory(
                f"model {key!r} needs {footprint} bytes, more than the whole {self.budget_bytes}-byte budget"
            )
        self._make_room(key, footprint)
        log.info(
            "loaded %s (%s) on %s: %d tensor bytes, RSS +%d, %.2fs",
            key,
            spec.model_id,
            model.device,
            model.nbytes,
            rss_delta,
            seconds,
        )
        batcher = Batcher(key, model)
        return batcher, footprint, rss_delta, seconds

    def _make_room(self, key: str, needed: int) -> None:
        """Evict idle models, least recently used first, until ``needed`` more bytes fit."""
        if self.budget_bytes is None:
            return
        while True:
            with self._lock:
                used = sum(s.footprint for s in self._slots.values() if s.loaded and s.key != key)
                if used + needed <= self.budget_bytes:
                    return
                idle = [
                    s
                    for s in self._slots.values()
                    if s.loaded and s.key != key and s.batcher is not None and not s.batcher.busy
                ]
                if not idle:
                    raise OutOfMemory(
                        f"model {key!r} needs {needed} bytes; {used} of the "
                        f"{self.budget_bytes}-byte budget are held by models in use"
                    )
                victim = min(idle, key=lambda s: s.last_used)
                batcher, victim.batcher = victim.batcher, None
                victim.stats.evictions += 1
            log.info("evicting %s (%d bytes) to make room for %s", victim.key, victim.footprint, key)
            if batcher is not None:
                batcher.drain()
            gc.collect()

    def _retire(self, old: ModelSlot) -> None:
        batcher = old.batcher
        old.batcher = None
        if batcher is not None:
            threading.Thread(target=batcher.drain, name=f"retire-{old.key}", daemon=True).start()
