"""The model manager: loads keyed models, measures them, keeps each device within budget.

Budgets: host RAM (``--memory-budget``, default 70% of the RAM available when the server
starts) and each GPU (``gpu_fraction`` of its NVML total). Every loaded model is charged
to its device with its measured footprint.

Measuring: loads are serialised, one at a time for the whole server, so the readings
taken around a load (process RSS for the host; torch's allocator and NVML for a GPU)
belong to that load. Inference on other models may still run meanwhile and move those
readings, so each reading is checked against the bytes of the model's tensors: the
footprint is the larger of the two, unless the reading exceeds the tensor bytes by more
than half again plus 64 MiB, in which case it is taken as polluted and the tensor bytes
plus 10% are charged. ``status`` shows all three numbers.

Making room: before a load, idle models on the same device are evicted, in the order the
eviction policy gives (``policy.GreedyDualSizeFrequency``: size, use and reload cost),
until the new model's expected footprint fits (its last measured footprint, else its
checkpoint's file size). A model serving a batch is never evicted. When only models in
use stand in the way, the load waits up to ``load_wait`` seconds for one to go idle,
then fails with OutOfMemory; a model larger than the whole budget is refused at once.
A watcher thread also evicts idle models when the machine itself runs short (host
available memory, GPU free memory), whoever caused it.

Registering a key again with a different spec swaps versions (``_swap``): beside the old
one when the budget holds both, else after draining and freeing the old one.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from modelserver import loaders, memory
from modelserver.batcher import Batcher, BatchStats
from modelserver.errors import ModelLoadError, ModelNotFound, OutOfMemory
from modelserver.policy import POLICIES, GreedyDualSizeFrequency

log = logging.getLogger("beamlet.manager")

DEFAULT_HOST_SHARE = 0.7
DEFAULT_GPU_FRACTION = 0.9
DEFAULT_LOAD_WAIT = 30.0
POLLUTION_SLACK = 64 << 20


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
    """A key's registration: its spec, and the loaded model while it is in memory."""

    key: str
    spec: loaders.ModelSpec
    device: str
    batcher: Batcher | None = None
    footprint: int = 0  # bytes charged to the device; kept after eviction as an estimate
    measured: int = 0  # the raw reading (RSS delta, or allocator delta on a GPU)
    nvml_delta: int = 0
    last_used: float = field(default_factory=time.monotonic)
    stats: ModelStats = field(default_factory=ModelStats)
    batch_stats: BatchStats = field(default_factory=BatchStats)  # across loads
    info: dict[str, Any] = field(default_factory=dict)  # what the last load produced; never cleared

    @property
    def loaded(self) -> bool:
        return self.batcher is not None


def charged_bytes(tensor_bytes: int, reading: int) -> int:
    """What a model costs its device, from its tensors and a reading around its load."""
    if reading > tensor_bytes * 1.5 + POLLUTION_SLACK:
        return int(tensor_bytes * 1.1)
    return max(tensor_bytes, reading)


def estimate_bytes(spec: loaders.ModelSpec) -> int:
    """A model's footprint before it was ever loaded: its checkpoint's size, else 0."""
    try:
        return os.path.getsize(spec.path) if spec.path else 0
    except OSError:
        return 0


class ModelManager:
    """Keyed models in one server, within per-device budgets. Thread-safe."""

    def __init__(
        self,
        budget_bytes: int | None = None,
        *,
        gpu_fraction: float = DEFAULT_GPU_FRACTION,
        load_wait: float = DEFAULT_LOAD_WAIT,
        policy: str = "gdsf",
        min_free_bytes: int | None = None,
        pressure_interval: float = 1.0,
        host: memory.HostMemory | None = None,
    ):
        self.host = host or memory.HostMemory()
        self.budget_bytes = budget_bytes
        self.gpu_fraction = gpu_fraction
        self.load_wait = load_wait
        self.policy_name = policy
        self.min_free_bytes = min_free_bytes if min_free_bytes is not None else self.host.total() // 20
        self._policy_class = POLICIES[policy]
        self._policies: dict[str, GreedyDualSizeFrequency] = {}
        self._gpu_budgets: dict[str, int | None] = {}
        self._slots: dict[str, ModelSlot] = {}
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._load_lock = threading.Lock()
        self._closed = threading.Event()
        self.pressure_evictions = 0
        self.waiting_loads = 0  # loads now waiting for models in use to go idle
        self.retiring = 0  # swapped-out versions still finishing their batches
        self._retiring_bytes: dict[str, int] = {}  # their footprints, still charged by device
        self._watcher = threading.Thread(
            target=self._watch_pressure, args=(pressure_interval,), name="memory-watch", daemon=True
        )
        self._watcher.start()

    # -- budgets ------------------------------------------------------------------------
    def budget(self, device: str) -> int | None:
        if device == "cpu":
            return self.budget_bytes
        if device not in self._gpu_budgets:
            reading = memory.Nvml.read(memory.device_index(device))
            if reading is None:
                import torch

                total = torch.cuda.get_device_properties(torch.device(device)).total_memory
            else:
                total = reading.total
            self._gpu_budgets[device] = int(total * self.gpu_fraction)
        return self._gpu_budgets[device]

    def _policy(self, device: str) -> GreedyDualSizeFrequency:
        if device not in self._policies:
            self._policies[device] = self._policy_class()
        return self._policies[device]

    def used(self, device: str) -> int:
        with self._lock:
            return self._used(device)

    def _used(self, device: str) -> int:
        loaded = sum(s.footprint for s in self._slots.values() if s.loaded and s.device == device)
        return loaded + self._retiring_bytes.get(device, 0)

    # -- the public verbs ---------------------------------------------------------------
    def register(self, key: str, spec: loaders.ModelSpec, *, replace: bool = True) -> ModelSlot:
        """Make ``key`` serve ``spec``, loading it now. A new spec for a known key swaps
        (``swap``); with ``replace=False`` a known key keeps the spec it serves."""
        with self._lock:
            slot = self._slots.get(key)
            if slot is not None and slot.loaded and (slot.spec == spec or not replace):
                return slot
        with self._load_lock:
            with self._lock:
                slot = self._slots.get(key)
                if slot is not None and slot.loaded and (slot.spec == spec or not replace):
                    return slot
                if slot is not None and not replace:
                    spec = slot.spec  # evicted: reload what the key serves, not the caller's
            if slot is not None and slot.loaded:
                return self._swap(key, spec, slot)
            return self._load(key, spec, slot)

    def get(self, key: str) -> Batcher:
        """The batcher serving ``key``, pinned (call ``unpin()`` once the request is
        submitted), reloading an evicted model on demand."""
        for _attempt in range(5):
            with self._lock:
                slot = self._slots.get(key)
                if slot is None:
                    raise ModelNotFound(f"no model registered under key {key!r}")
                slot.last_used = time.monotonic()
                if slot.batcher is not None:
                    slot.stats.hits += 1
                    self._policy(slot.device).hit(key)
                    slot.batcher.pin()  # under the lock: no eviction can slip in before submit
                    return slot.batcher
                slot.stats.misses += 1
            self._reload(key)
        raise OutOfMemory(
            f"model {key!r} was evicted again each time it was reloaded; the budget is too tight"
        )

    def _reload(self, key: str) -> None:
        """Load ``key``'s current spec unless someone else already has."""
        with self._load_lock:
            with self._lock:
                slot = self._slots.get(key)
                if slot is None:
                    raise ModelNotFound(f"no model registered under key {key!r}")
                if slot.batcher is not None:
                    return
                spec = slot.spec  # read under the load lock: a newer registration wins
            self._load(key, spec, slot)

    def evict(self, key: str) -> bool:
        """Unload ``key`` now if it is idle; True when it was unloaded."""
        with self._lock:
            slot = self._slots.get(key)
            if slot is None or slot.batcher is None or slot.batcher.busy:
                return False
            batcher = self._detach(slot)
        self._release([batcher])
        return True

    def relieve(self, device: str) -> int:
        """Evict every idle model on ``device`` (after CUDA ran out of memory)."""
        with self._lock:
            batchers = [self._detach(self._slots[k]) for k in self._idle_keys(device)]
        self._release(batchers)
        return len(batchers)

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
                    "device": s.device,
                    "requested_device": s.spec.device,
                    "nbytes": b.nbytes if b else 0,
                    "footprint": s.footprint,
                    "measured": s.measured,
                    "nvml_delta": s.nvml_delta,
                    "in_flight": b.queued + int(b.busy) if b else 0,
                    "idle_seconds": round(now - s.last_used, 3),
                    "priority": self._policy(s.device).priority(s.key),
                    "loads": s.stats.loads,
                    "evictions": s.stats.evictions,
                    "hits": s.stats.hits,
                    "misses": s.stats.misses,
                    "swaps": s.stats.swaps,
                    "failed_swaps": s.stats.failed_swaps,
                    "revision": s.spec.revision,
                    "load_seconds": round(s.stats.load_seconds, 4),
                    **s.batch_stats.as_dict(),
                }
            )
        return out

    def devices(self) -> dict[str, dict[str, Any]]:
        """Budget and use per device, with the machine's own readings."""
        with self._lock:
            devices = {s.device for s in self._slots.values()} | {"cpu"}
        out: dict[str, dict[str, Any]] = {}
        for d in sorted(devices):
            entry: dict[str, Any] = {"budget": self.budget(d), "used": self.used(d)}
            if d == "cpu":
                entry["available"] = self.host.available()
            else:
                reading = memory.Nvml.read(memory.device_index(d))
                if reading is not None:
                    entry.update(nvml_total=reading.total, nvml_used=reading.used, nvml_free=reading.free)
            out[d] = entry
        return out

    def loaded_bytes(self) -> int:
        with self._lock:
            return sum(s.footprint for s in self._slots.values() if s.loaded)

    def close(self, timeout: float = 30.0) -> None:
        """Finish queued batches and drop every model."""
        self._closed.set()
        with self._lock:
            slots = list(self._slots.values())
            self._slots.clear()
            self._idle.notify_all()
        deadline = time.monotonic() + timeout
        for s in slots:
            if s.batcher is not None:
                s.batcher.drain(max(0.0, deadline - time.monotonic()))

    # -- loading ------------------------------------------------------------------------
    def _load(self, key: str, spec: loaders.ModelSpec, old: ModelSlot | None) -> ModelSlot:
        """Under the load lock: make room, load, measure, install."""
        device = loaders.resolve_device(spec.device)
        budget = self.budget(device)
        same = old is not None and old.spec == spec and old.footprint
        expected = old.footprint if same and old is not None else estimate_bytes(spec)
        if budget is not None and expected > budget:
            raise OutOfMemory(
                f"model {key!r} needs about {expected} bytes, more than the whole {budget}-byte "
                f"budget of {device}"
            )
        self._make_room(key, device, expected)
        model, footprint, measured, nvml_delta, seconds = self._measured_load(key, spec, device)
        try:
            if budget is not None and footprint > budget:
                raise OutOfMemory(
                    f"model {key!r} takes {footprint} bytes, more than the whole {budget}-byte budget of {device}"
                )
            self._make_room(key, device, footprint)
        except OutOfMemory:
            del model
            self._collect()
            raise
        if self._closed.is_set():
            del model
            raise OutOfMemory("the server is stopping")
        with self._lock:
            old = self._slots.get(key)
            batch_stats = old.batch_stats if old is not None else BatchStats()
            batcher = Batcher(
                key, model, on_idle=self._notify_idle, on_oom=lambda: self._on_oom(device), stats=batch_stats
            )
            slot = ModelSlot(key, spec, device, batcher, footprint, measured, nvml_delta)
            slot.batch_stats = batch_stats
            slot.info = {
                "model_id": batcher.model_id,
                "device": batcher.device,
                "nbytes": batcher.nbytes,
                "footprint": footprint,
                "methods": sorted(model.methods),
                "spec": spec.to_wire(),
            }
            retired = None
            if old is not None:
                slot.stats = old.stats
                slot.stats.swaps += old.spec != spec
                if old.batcher is not None:
                    retired = self._detach(old, evicted=False)
                    retired_charge = (old.device, old.footprint)
                    self.retiring += 1
                    self._retiring_bytes[old.device] = self._retiring_bytes.get(old.device, 0) + old.footprint
            slot.stats.loads += 1
            slot.stats.load_seconds += seconds
            slot.stats.last_load_seconds = seconds
            self._slots[key] = slot
            self._policy(device).loaded(key, footprint, seconds)
        if retired is not None:
            threading.Thread(
                target=self._retire, args=(retired, *retired_charge), name=f"retire-{key}", daemon=True
            ).start()
        log.info(
            "loaded %s (%s) on %s in %.2fs: %d tensor bytes, reading %+d, charged %d",
            key, spec.model_id, device, seconds, model.nbytes, measured, footprint,
        )  # fmt: skip
        return slot

    def _swap(self, key: str, spec: loaders.ModelSpec, old: ModelSlot) -> ModelSlot:
        """Under the load lock: replace ``key``'s loaded version with ``spec``.

        Beside: when the budget holds both (after evicting idle models of other keys), the
        new version loads while the old one serves, then becomes current atomically; the
        old one finishes its queued batches on a retiring thread and is freed.

        Drain first: when it does not, the new version is checked (its checkpoint read
        memory-mapped against its class), the old one is taken out of service, finishes
        its in-flight batches and is freed, and the new one loads. Requests that arrive
        meanwhile wait for the load (``get`` reloads under the same lock), so none fails.
        If the new version still fails to load, the old one is loaded back.

        A version that fails to load is rejected with a logged error; the old one keeps
        serving. Either way ``stats.failed_swaps`` counts it."""
        device = loaders.resolve_device(spec.device)
        budget = self.budget(device)
        expected = max(estimate_bytes(spec), old.footprint if old.device == device else 0)
        beside = budget is None or self._make_room(key, device, expected, wait=False)
        try:
            if beside:
                return self._load(key, spec, old)
            loaders.check(spec)
        except Exception as exc:
            old.stats.failed_swaps += 1
            log.error(
                "new version of %s (%s) rejected, %s keeps serving: %s",
                key,
                spec.model_id,
                old.spec.model_id,
                exc,
            )
            raise
        log.info("swapping %s: %s cannot hold both versions; draining the old one first", key, device)
        with self._lock:
            old_spec = old.spec
            retired = self._detach(old, evicted=False)
        self._release([retired])
        try:
            return self._load(key, spec, old)
        except Exception as exc:
            old.stats.failed_swaps += 1
            self._restore(key, old_spec, old, spec, exc)
            raise

    def _restore(
        self, key: str, old_spec: loaders.ModelSpec, old: ModelSlot, spec: loaders.ModelSpec, exc: Exception
    ) -> None:
        """After a drained swap whose new version failed to load: load the old one back,
        if its file still holds it (not when the new version was written over it)."""
        replaced = old_spec.revision and loaders.file_revision(old_spec.path) != old_spec.revision
        if old_spec.path == spec.path or replaced:
            log.error(
                "new version of %s (%s) failed to load after the old one was drained, and the old "
                "one's file now holds something else: %s serves nothing until a loadable version "
                "is registered: %s",
                key, spec.model_id, key, exc,
            )  # fmt: skip
            with self._lock:
                old.spec = spec  # what the file holds; a later request retries it
            return
        try:
            self._load(key, old_spec, old)
        except Exception as again:
            log.error(
                "new version of %s rejected, and the old one failed to load back: %s; %s", key, exc, again
            )
            return
        log.error(
            "new version of %s (%s) rejected, %s serves again: %s", key, spec.model_id, old_spec.model_id, exc
        )

    def _measured_load(
        self, key: str, spec: loaders.ModelSpec, device: str
    ) -> tuple[Any, int, int, int, float]:
        """Load once (twice after a CUDA out-of-memory, with the device's idle models
        evicted in between) and measure what it took."""
        for attempt in (1, 2):
            self._collect()
            rss0 = self.host.rss()
            alloc0 = memory.torch_allocated(device)
            nvml0 = memory.Nvml.read(memory.device_index(device)) if device != "cpu" else None
            started = time.monotonic()
            try:
                model = loaders.load(spec, owner=key)
            except ModelLoadError:
                raise
            except MemoryError:
                raise OutOfMemory(f"loading {key!r} ran out of host memory") from None
            except Exception as exc:
                if _is_cuda_oom(exc) and attempt == 1:
                    log.warning("CUDA ran out of memory loading %s; evicting idle models and retrying", key)
                    self._on_oom(device)
                    continue
                if _is_cuda_oom(exc):
                    raise OutOfMemory(f"loading {key!r} ran out of memory on {device}: {exc}") from None
                log.exception("loading %s failed", key)
                raise ModelLoadError(f"loading {key!r} failed: {type(exc).__name__}: {exc}") from None
            seconds = time.monotonic() - started
            if device == "cpu":
                measured = max(0, self.host.rss() - rss0)
                nvml_delta = 0
            else:
                measured = max(0, memory.torch_allocated(device) - alloc0)
                nvml1 = memory.Nvml.read(memory.device_index(device))
                nvml_delta = (nvml1.used - nvml0.used) if nvml0 and nvml1 else 0
            return model, charged_bytes(model.nbytes, measured), measured, nvml_delta, seconds
        raise AssertionError("unreachable")

    # -- making room ----------------------------------------------------------------------
    def _make_room(self, key: str, device: str, needed: int, *, wait: bool = True) -> bool:
        """Evict idle models on ``device`` until ``needed`` more bytes fit its budget,
        waiting up to ``load_wait`` seconds for busy models to go idle (``wait=False``:
        return False at once instead of waiting or failing). True when it fits."""
        budget = self.budget(device)
        if budget is None:
            return True
        deadline = time.monotonic() + self.load_wait
        while True:
            with self._lock:
                used = self._used(device)
                if used + needed <= budget:
                    return True
                idle = [k for k in self._idle_keys(device) if k != key]
                chosen = self._policy(device).choose_victims(idle, used + needed - budget)
                if not wait and sum(self._slots[k].footprint for k in idle) < used + needed - budget:
                    return False  # evicting every idle model would not be enough: keep them
                victims = [self._detach(self._slots[k]) for k in chosen]
                if not victims:
                    if not wait:
                        return False
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or self._closed.is_set():
                        raise OutOfMemory(
                            f"model {key!r} needs {needed} bytes on {device}, but {used} of its "
                            f"{budget}-byte budget are held by models in use (waited {self.load_wait:.0f}s)"
                        )
                    self.waiting_loads += 1
                    try:
                        self._idle.wait(min(remaining, 1.0))
                    finally:
                        self.waiting_loads -= 1
                    continue
            log.info("evicting %s from %s to make room for %s", ", ".join(chosen), device, key)
            self._release(victims)

    def _idle_keys(self, device: str) -> list[str]:
        """Under the lock: the models on ``device`` that may be evicted now."""
        return [
            s.key
            for s in self._slots.values()
            if s.device == device and s.batcher is not None and not s.batcher.busy
        ]

    def _detach(self, slot: ModelSlot, evicted: bool = True) -> Batcher:
        """Under the lock: take the model out of service (its queued work still runs)."""
        batcher = slot.batcher
        assert batcher is not None
        slot.batcher = None
        if evicted:
            slot.stats.evictions += 1
        self._policy(slot.device).evicted(slot.key)
        return batcher

    def _retire(self, batcher: Batcher, device: str, footprint: int) -> None:
        """A swapped-out version: finish its queued batches, then free it. Its footprint
        stays charged to its device until then, so other loads cannot overrun the budget."""
        try:
            self._release([batcher])
        finally:
            with self._lock:
                self.retiring -= 1
                self._retiring_bytes[device] -= footprint
                self._idle.notify_all()  # loads waiting for room look again

    def _release(self, batchers: list[Batcher]) -> None:
        """Outside the lock: let detached models finish their queued batches, then free them."""
        for b in batchers:
            b.drain()  # also drops its reference to the model
        batchers.clear()  # and so does the caller's list
        self._collect()

    def _collect(self) -> None:
        gc.collect()
        memory.trim_heap()
        if any(s.device != "cpu" for s in list(self._slots.values())):
            import torch

            torch.cuda.empty_cache()

    def _notify_idle(self) -> None:
        with self._lock:
            self._idle.notify_all()

    def _on_oom(self, device: str) -> None:
        freed = self.relieve(device)
        log.warning("out of memory on %s: evicted %d idle models", device, freed)
        if device != "cpu":
            import torch

            torch.cuda.empty_cache()

    # -- pressure from outside ------------------------------------------------------------
    def _watch_pressure(self, interval: float) -> None:
        while not self._closed.wait(interval):
            try:
                self.check_pressure()
            except Exception:
                log.exception("memory watcher failed")

    def check_pressure(self) -> int:
        """Evict idle models on any device that the machine is running short on."""
        evicted = 0
        short = self.min_free_bytes - self.host.available()
        if short > 0:
            evicted += self._shed("cpu", short)
        for reading in memory.gpus():
            device = f"cuda:{reading.index}"
            gpu_short = int(reading.total * (1 - self.gpu_fraction)) - reading.free
            if gpu_short > 0:
                evicted += self._shed(device, gpu_short)
        return evicted

    def _shed(self, device: str, nbytes: int) -> int:
        with self._lock:
            idle = self._idle_keys(device)
            chosen = self._policy(device).choose_victims(idle, nbytes)
            victims = [self._detach(self._slots[k]) for k in chosen]
        if victims:
            log.warning(
                "memory pressure on %s (%d bytes short): evicting %s", device, nbytes, ", ".join(chosen)
            )
            self.pressure_evictions += len(victims)
            self._release(victims)
        return len(chosen)


def _is_cuda_oom(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError" or "CUDA out of memory" in str(exc)
