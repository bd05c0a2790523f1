"""The model manager: the registry of keyed models, and eviction to keep each device in budget.

Budgets: host RAM (``--memory-budget``, default 70% of the RAM available when the server
starts) and each GPU (``gpu_fraction`` of its NVML total). Every loaded model is charged
with its footprint, measured when it loads (``measure``), once per copy when a key holds
several (``copies``: each with its own batcher, least-busy routing): each device with
the footprints of the copies on it (``accounting``).

Placing: a load asking for "GPU" puts each copy on the GPU with the most free budget,
"cuda:N" on GPU N (``placement``); "CPU" (or a GPU request without usable CUDA, unless
the spec forbids the CPU fallback) on the CPU.

Making room: before a load, idle models on each device it uses are evicted, in the
order that device's eviction policy gives (``policy.GreedyDualSizeFrequency``: size, use
and reload cost), until the new model's expected share there fits (its last measured
footprint, else its checkpoint's file size, per copy). A model with a copy on a device
is a candidate there, and evicting it frees every device it holds. A model serving a
batch is never evicted. When only models in use stand in the way, the load waits up to
``load_wait`` seconds for one to go idle, then fails with OutOfMemory; a model larger
than a whole budget is refused at once. A watcher (``pressure``) also evicts idle models
when the machine itself runs short.

Registering a key again with a different spec swaps versions (``swap``), unless the
load's sequence says it is older than the version the key serves (``swap.replaces``).

Requests (``submit``) never load on the caller's thread (a connection's reader): a
request for an evicted model waits beside its slot while one ``reload-<key>`` thread
loads it, then goes to the model's batcher like any other. Those waiting requests count
against the same limits as a model's queue (``QueueLimits``); over them the request is
refused with ``Overloaded``, its ``retry_after`` the model's last load time.

Locks: ``_lock`` guards the registry and is held only for bookkeeping; ``_load_lock``
serialises loads (so measurements belong to one load) and is held for a whole load.
Nothing logs under either: records made under the load lock go into a ``DeferredLog``
written once it is released (a full stderr pipe must not freeze every load).
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

from modelserver import accounting, loaders, memory, swap
from modelserver.batcher import MIN_RETRY_AFTER, Batching, BatchStats, Compute, QueueLimits, Work
from modelserver.copies import Copies
from modelserver.errors import (
    BeamletError,
    InternalError,
    ModelNotFound,
    OutOfMemory,
    Overloaded,
)
from modelserver.measure import estimate_bytes, measured_load
from modelserver.policy import POLICIES, GreedyDualSizeFrequency
from modelserver.pressure import PressureWatcher
from modelserver.room import RoomMaking
from modelserver.serverlog import DeferredLog
from modelserver.slot import ModelSlot

log = logging.getLogger("beamlet.manager")

DEFAULT_GPU_FRACTION = 0.9
DEFAULT_LOAD_WAIT = 30.0
MAX_RELOADS = 5  # a request whose model is evicted again before it runs, this many times, fails


class ModelManager(RoomMaking):
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
        limits: QueueLimits | None = None,
        deterministic: bool = False,
    ):
        """``limits``: how much each model's queue may hold; ``deterministic``: never merge
        requests (each runs as its own batch)."""
        self.host = host or memory.HostMemory()
        self.limits = limits or QueueLimits()
        self.deterministic = deterministic
        self.compute = Compute()  # the server sets it as it warms up
        self._batching: dict[str, Batching] = {}  # per key, as its handlers last asked
        self._copies: dict[str, int] = {}  # likewise: copies of the model (from its next load)
        self.budget_bytes = budget_bytes
        self.gpu_fraction = gpu_fraction
        self.load_wait = load_wait
        self.policy_name = policy
        self._policy_class = POLICIES[policy]
        self._policies: dict[str, GreedyDualSizeFrequency] = {}
        self._gpu_budgets: dict[str, int | None] = {}
        self._slots: dict[str, ModelSlot] = {}
        self._waiting: dict[str, list[Work]] = {}  # requests for evicted models, by key, while they reload
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._load_lock = threading.Lock()
        self._closed = threading.Event()
        self.waiting_loads = 0  # loads now waiting for models in use to go idle
        self.retiring = 0  # swapped-out versions still finishing their batches
        self._retiring_bytes: dict[str, int] = {}  # their footprints, still charged by device
        self.pressure = PressureWatcher(
            self.shed,
            self.host,
            min_free_bytes=min_free_bytes if min_free_bytes is not None else self.host.total() // 20,
            gpu_fraction=gpu_fraction,
            interval=pressure_interval,
        )

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

    def copies_of(self, key: str) -> int:
        """How many copies of ``key``'s model its next load holds."""
        return self._copies.get(key, 1)

    def _policy(self, device: str) -> GreedyDualSizeFrequency:
        if device not in self._policies:
            self._policies[device] = self._policy_class()
        return self._policies[device]

    def used(self, device: str) -> int:
        with self._lock:
            return self._used(device)

    def _used(self, device: str) -> int:
        loaded = (s.charges for s in self._slots.values() if s.loaded)
        return accounting.used(device, loaded, self._retiring_bytes)

    # -- the public verbs ---------------------------------------------------------------
    def register(
        self,
        key: str,
        spec: loaders.ModelSpec,
        *,
        replace: bool = True,
        batching: Batching | None = None,
        sequence: tuple[int, int] | None = None,
        copies: int | None = None,
    ) -> ModelSlot:
        """Make ``key`` serve ``spec`` (at ``sequence``), loading it now; the slot serving
        the key. A new spec for a known key swaps (``swap``) unless it is older than the
        served one (``swap.replaces``) or ``replace`` is False. ``batching``: how the key's
        requests are merged from now on (None: as before, else the defaults); ``copies``:
        how many copies of the model to hold from its next load (None: as before, else 1)."""
        notes = DeferredLog()
        with self._lock:
            if copies is not None:
                self._copies[key] = copies
            if batching is not None:
                self._batching[key] = batching
                slot = self._slots.get(key)
                if slot is not None and slot.batcher is not None:
                    slot.batcher.configure(batching)
            slot = self._slots.get(key)
            kept = (
                slot is not None and slot.loaded and not swap.replaces(slot, spec, replace, sequence, notes)
            )
        notes.flush()  # what replaces() noted under the lock
        if kept and slot is not None:
            return slot
        with self._loading() as notes:
            with self._lock:
                slot = self._slots.get(key)
                if slot is not None and not swap.replaces(slot, spec, replace, sequence, notes):
                    if slot.loaded:
                        return slot
                    spec, sequence = slot.spec, slot.sequence  # evicted: reload what the key serves
            if slot is not None and slot.loaded:
                return swap.swap(self, key, spec, sequence, slot, notes)
            return self.load(key, spec, sequence, slot, notes)

    def submit(self, key: str, work: Work) -> None:
        """Run ``work`` on ``key``'s model: hand it to the model's batcher (which may run
        it at once on this thread, or queue it), or, when the model was evicted, park it
        while a ``reload-<key>`` thread loads the model again. Never loads on this thread.
        Raises ModelNotFound, or Overloaded when the queue (or the parked requests) are
        over their limits."""
        for _attempt in range(3):
            with self._lock:
                slot = self._slots.get(key)
                if slot is None:
                    raise ModelNotFound(f"no model registered under key {key!r}")
                slot.last_used = time.monotonic()
                batcher = slot.batcher
                if batcher is None:
                    slot.stats.misses += 1
                    self._park(slot, work)
                    return
                slot.stats.hits += 1
                for device in slot.charges:
                    self._policy(device).hit(key)
                batcher.pin()  # under the lock: no eviction can slip in before submit
            try:
                batcher.submit(work)
                return
            except InternalError:
                continue  # swapped for a new version between lookup and submit: look again
            finally:
                batcher.unpin()
        raise InternalError(f"model {key!r} kept being replaced; try again")

    def _park(self, slot: ModelSlot, work: Work) -> None:
        """Under the lock: hold ``work`` until ``slot``'s model is loaded again, starting
        the one reload thread for the key if it is not running."""
        waiting = self._waiting.get(slot.key)
        rows, nbytes = sum(w.rows for w in waiting or ()), sum(w.nbytes for w in waiting or ())
        if waiting and not self.limits.hold(rows + work.rows, nbytes + work.nbytes):
            slot.batch_stats.add(overloaded=1)
            raise Overloaded(
                f"model {slot.key} is loading and {len(waiting)} requests already wait for it; retry later",
                retry_after=round(max(slot.stats.last_load_seconds, MIN_RETRY_AFTER), 4),
            )
        if waiting is None:
            waiting = self._waiting[slot.key] = []
            threading.Thread(
                target=self._reload_waiting, args=(slot.key,), name=f"reload-{slot.key}", daemon=True
            ).start()
        waiting.append(work)

    def _reload_waiting(self, key: str) -> None:
        """The ``reload-<key>`` thread: load the model, then submit what waited for it
        (or fail it with the load's error)."""
        error: BeamletError | None = None
        try:
            self._reload(key)
        except BeamletError as exc:
            error = exc
        except Exception as exc:
            log.exception("reloading %s failed", key)
            error = InternalError(f"reloading {key!r} failed: {type(exc).__name__}: {exc}")
        with self._lock:
            waiting = self._waiting.pop(key, [])
        for work in waiting:
            work.reloads += 1
            if error is None and work.reloads > MAX_RELOADS:
                work.finish(
                    None,
                    OutOfMemory(
                        f"model {key!r} was evicted again each time it was reloaded; the budget is too tight"
                    ),
                )
                continue
            if error is not None:
                work.finish(None, error)
                continue
            try:
                self.submit(key, work)
            except BeamletError as exc:
                work.finish(None, exc)

    def _reload(self, key: str) -> None:
        """Load ``key``'s current spec unless someone else already has."""
        with self._loading() as notes:
            with self._lock:
                slot = self._slots.get(key)
                if slot is None:
                    raise ModelNotFound(f"no model registered under key {key!r}")
                if slot.batcher is not None:
                    return
                spec, sequence = slot.spec, slot.sequence  # under the load lock: a newer registration wins
            self.load(key, spec, sequence, slot, notes)

    def relieve(self, device: str) -> int:
        """Evict every idle model on ``device`` (after CUDA ran out of memory)."""
        with self._lock:
            batchers = [self._detach(self._slots[k]) for k in self._idle_keys(device)]
        evicted = len(batchers)
        self.release(batchers)  # which empties the list
        return evicted

    def shed(self, device: str, nbytes: int) -> int:
        """Evict idle models on ``device`` until ``nbytes`` are freed (the machine is short
        of memory); how many were evicted."""
        with self._lock:
            idle = self._idle_keys(device)
            chosen = self._policy(device).choose_victims(idle, nbytes)
            victims = [self._detach(self._slots[k]) for k in chosen]
        if victims:
            log.warning(
                "memory pressure on %s (%d bytes short): evicting %s", device, nbytes, ", ".join(chosen)
            )
            self.release(victims)
        return len(chosen)

    def check_pressure(self) -> int:
        """Evict idle models on any device that the machine is running short on now."""
        return self.pressure.check()

    @property
    def pressure_evictions(self) -> int:
        return self.pressure.evictions

    def status(self) -> list[dict[str, Any]]:
        """Each model's state and counters (docs/operations.md names every field)."""
        now = time.monotonic()
        with self._lock:
            slots = list(self._slots.values())
            waiting = {k: list(v) for k, v in self._waiting.items()}
        return [
            s.describe(now, len(waiting.get(s.key, ())), self._policy(s.device).priority(s.key))
            for s in slots
        ]

    def devices(self) -> dict[str, dict[str, Any]]:
        """Budget and use per device, with the machine's own readings."""
        with self._lock:
            devices = {d for s in self._slots.values() for d in s.charges} | {"cpu"}
            devices |= set(self._retiring_bytes)
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
        self.pressure.stop()
        with self._lock:
            slots = list(self._slots.values())
            self._slots.clear()
            self._idle.notify_all()
        deadline = time.monotonic() + timeout
        for s in slots:
            if s.batcher is not None:
                s.batcher.drain(max(0.0, deadline - time.monotonic()))

    # -- loading: under the load lock (also for swap.py) ---------------------------------
    @contextmanager
    def _loading(self) -> Iterator[DeferredLog]:
        """Hold the load lock; what is logged meanwhile is written once it is released."""
        notes = DeferredLog()
        try:
            with self._load_lock:
                yield notes
        finally:
            notes.flush()

    def load(
        self,
        key: str,
        spec: loaders.ModelSpec,
        sequence: tuple[int, int] | None,
        old: ModelSlot | None,
        notes: DeferredLog,
    ) -> ModelSlot:
        """Under the load lock: place, make room, load, measure, install ``spec`` as the
        version at ``sequence``. A loaded ``old`` version is retired (``swap.retire``)
        once the new one serves."""
        n = self.copies_of(key)
        same = old is not None and old.spec == spec and old.footprint
        per_copy = old.copy_footprint if same and old is not None else estimate_bytes(spec)
        devices = self.place(key, spec, per_copy, n, notes)
        self.make_room_for(key, accounting.planned(devices, per_copy), devices, notes, measured=False)
        load = partial(measured_load, key, spec, host=self.host, collect=self._collect, notes=notes)
        loads = [load(device=d, relieve=partial(self._on_oom, d, notes)) for d in devices]
        charges = accounting.charges(zip(devices, (m.footprint for m in loads)))
        try:
            self.make_room_for(key, charges, devices, notes, measured=True)
        except OutOfMemory:
            del loads
            self._collect()
            raise
        if self._closed.is_set():
            del loads
            raise OutOfMemory("the server is stopping")
        model, seconds = loads[0].model, sum(m.seconds for m in loads)
        footprint = sum(charges.values())
        with self._lock:
            old = self._slots.get(key)
            batch_stats = old.batch_stats if old is not None else BatchStats()
            batcher = Copies(
                key,
                [(m.model, d, m.footprint) for m, d in zip(loads, devices)],
                stats=batch_stats,
                compute=self.compute,
                on_idle=self._notify_idle,
                on_oom=lambda d: lambda: self._on_oom(d),
                limits=self.limits,
                merge=not self.deterministic,
                batching=self._batching.get(key),
            )
            measured, nvml_delta = sum(m.measured for m in loads), sum(m.nvml_delta for m in loads)
            slot = ModelSlot(key, spec, charges, batcher, measured, nvml_delta)
            slot.sequence, slot.copies = sequence, n
            slot.batch_stats = batch_stats
            slot.info = {
                "model_id": batcher.model_id,
                "device": batcher.device,
                "nbytes": batcher.nbytes,
                "footprint": footprint,
                "copies": n,
                "methods": sorted(model.methods),
                "spec": spec.to_wire(),
            }
            retired = None
            if old is not None:
                slot.stats = old.stats
                slot.stats.swaps += old.spec != spec
                if old.batcher is not None:
                    retired = self._detach(old, evicted=False)
                    retired_charges = dict(old.charges)
                    self.retiring += 1
                    accounting.add(self._retiring_bytes, retired_charges)
            slot.stats.loads += 1
            slot.stats.load_seconds += seconds
            slot.stats.last_load_seconds = seconds
            self._slots[key] = slot
            for d, charge in charges.items():
                self._policy(d).loaded(key, charge, seconds)
        if retired is not None:
            swap.retire(retired, key, self.release, lambda: self._retired(retired_charges))
        notes.info(
            log,
            "loaded %s (%s, %s) on %s in %.2fs: %d tensor bytes, reading %+d, charged %d",
            key, spec.model_id, accounting.describe_share(n, n), ", ".join(charges), seconds,
            model.nbytes * n, measured, footprint,
        )  # fmt: skip
        return slot

    def take_out_of_service(self, slot: ModelSlot) -> Copies:
        """Detach a loaded version that is being replaced (not an eviction)."""
        with self._lock:
            return self._detach(slot, evicted=False)

    def set_spec(self, slot: ModelSlot, spec: loaders.ModelSpec, sequence: tuple[int, int] | None) -> None:
        """Make an unloaded key serve ``spec`` (at ``sequence``) when it next loads."""
        with self._lock:
            slot.spec, slot.sequence = spec, sequence

    def release(self, batchers: list[Copies]) -> None:
        """Outside the registry lock: let detached models finish their queued batches,
        then free them."""
        for b in batchers:
            b.drain()  # also drops its reference to the model
        batchers.clear()  # and so does the caller's list
        self._collect()

    # -- bookkeeping under the registry lock ------------------------------------------------
    def _idle_keys(self, device: str) -> list[str]:
        """Under the lock: the models with a copy on ``device`` that may be evicted now."""
        return [
            s.key
            for s in self._slots.values()
            if device in s.charges and s.batcher is not None and not s.batcher.busy
        ]

    def _detach(self, slot: ModelSlot, evicted: bool = True) -> Copies:
        """Under the lock: take the model out of service (its queued work still runs)."""
        batcher = slot.batcher
        assert batcher is not None
        slot.batcher = None
        if evicted:
            slot.stats.evictions += 1
        for device in slot.charges:  # every device it held is freed
            self._policy(device).evicted(slot.key)
        return batcher

    def _retired(self, charges: accounting.Charges) -> None:
        """A retired version is freed: its charges are no longer counted."""
        with self._lock:
            self.retiring -= 1
            accounting.remove(self._retiring_bytes, charges)
            self._idle.notify_all()  # loads waiting for room look again

    def _collect(self) -> None:
        gc.collect()
        memory.trim_heap()
        if any(d != "cpu" for s in list(self._slots.values()) for d in s.charges):
            import torch

            torch.cuda.empty_cache()

    def _notify_idle(self) -> None:
        with self._lock:
            self._idle.notify_all()

    def _on_oom(self, device: str, notes: DeferredLog | None = None) -> None:
        """CUDA (or the host) ran out of memory: evict the device's idle models. ``notes``
        when called under the load lock."""
        freed = self.relieve(device)
        if notes is not None:
            notes.warning(log, "out of memory on %s: evicted %d idle models", device, freed)
        else:
            log.warning("out of memory on %s: evicted %d idle models", device, freed)
        if device != "cpu":
            import torch

            torch.cuda.empty_cache()
