"""Making room: where a load's copies go and which idle models leave for them. The part of
``ModelManager`` (a mixin it inherits) that turns a load's charges into placements and
evictions, under the load lock, within ``load_wait``.

- ``place``: the device of each copy (``placement.place``, fed the manager's accounting:
  what each GPU has free now, and what it could free at once by evicting idle models).
- ``make_room_for`` / ``make_room``: evict idle models, by the device's eviction policy,
  until a load's share fits each device's budget, waiting for models in use to go idle;
  over several devices nothing is evicted until every device can make room, and the wait
  is one ``load_wait`` in all.
- ``room_at_once``: whether a load fits everywhere now with evictions alone (a swap asks,
  to decide between loading beside the old version and draining it first).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from modelserver import accounting, copies, loaders, placement
from modelserver.errors import ModelLoadError, OutOfMemory
from modelserver.serverlog import DeferredLog

if TYPE_CHECKING:
    from modelserver.copies import Copies
    from modelserver.policy import GreedyDualSizeFrequency
    from modelserver.slot import ModelSlot

log = logging.getLogger("beamlet.manager")


class RoomMaking:
    """Placement and eviction for ``ModelManager``, over its registry (the attributes
    below are the manager's)."""

    _lock: threading.Lock
    _idle: threading.Condition
    _closed: threading.Event
    _slots: dict[str, ModelSlot]
    _retiring_bytes: dict[str, int]
    load_wait: float
    waiting_loads: int

    def budget(self, device: str) -> int | None:
        raise NotImplementedError  # the manager's

    def _used(self, device: str) -> int:
        raise NotImplementedError  # the manager's

    def _idle_keys(self, device: str) -> list[str]:
        raise NotImplementedError  # the manager's

    def _policy(self, device: str) -> GreedyDualSizeFrequency:
        raise NotImplementedError  # the manager's

    def _detach(self, slot: ModelSlot, evicted: bool = True) -> Copies:
        raise NotImplementedError  # the manager's

    def release(self, batchers: list[Copies]) -> None:
        raise NotImplementedError  # the manager's

    def place(
        self, key: str, spec: loaders.ModelSpec, per_copy: int, copies: int, notes: DeferredLog
    ) -> list[str]:
        """Under the load lock: the device of each of ``copies`` copies of ``key``'s model
        of ``per_copy`` bytes. "CPU" (or a GPU request without usable CUDA, when the spec
        allows the fallback): the CPU for all; otherwise ``placement.place`` over the
        GPUs' free budgets. ModelLoadError (no such GPU, the fallback forbidden) or
        OutOfMemory (a copy that fits no GPU's whole budget)."""
        what = f"model {key!r}"
        device = loaders.resolve_device(spec.device, notes, fallback=spec.cpu_fallback, what=what)
        if device == "cpu":
            return ["cpu"] * copies
        import torch

        budgets = {d: self.budget(d) for d in (f"cuda:{i}" for i in range(torch.cuda.device_count()))}
        with self._lock:
            free = {d: None if b is None else b - self._used(d) for d, b in budgets.items()}
            reclaimable = {d: None if b is None else b - self._held(d, key) for d, b in budgets.items()}
        try:
            return placement.place(
                spec.device,
                free,
                per_copy,
                copies,
                budgets=budgets,
                reclaimable=reclaimable,
                fallback=spec.cpu_fallback,
                what=what,
                notes=notes,
            )
        except ValueError as exc:
            raise ModelLoadError(f"{what}: {exc}") from None

    def make_room_for(
        self, key: str, charges: accounting.Charges, devices: list[str], notes: DeferredLog, *, measured: bool
    ) -> None:
        """Under the load lock: ``make_room`` on every device ``charges`` names, for its
        share (``devices``: where each copy goes), within one ``load_wait`` in all.
        OutOfMemory at once when a share exceeds its device's whole budget (``measured``:
        the shares are readings, not estimates). Over several devices nothing is evicted
        until every device could make room (``room_at_once``): a device that cannot must
        not cost the others' idle models their place."""
        for device, share in charges.items():
            what = accounting.describe_share(devices.count(device), len(devices))
            verb = f"takes {share}" if measured else f"needs about {share}"
            where = f" on {device}" if len(charges) > 1 else ""
            copies.check_budget(
                f"model {key!r} {verb} bytes ({what}{where})", share, self.budget(device), device
            )
        deadline = time.monotonic() + self.load_wait
        if len(charges) > 1:
            self._wait_for_room(key, charges, deadline)
        for device, share in charges.items():
            self.make_room(key, device, share, notes, deadline=deadline)

    def room_at_once(self, key: str, charges: accounting.Charges) -> bool:
        """Whether every device ``charges`` names could hold its share now, evicting only
        idle models (other than ``key``'s); evicts nothing."""
        budgets = {d: self.budget(d) for d in charges}  # outside the lock: the first reads NVML
        with self._lock:
            return not self._short(key, charges, budgets)

    def _short(self, key: str, charges: accounting.Charges, budgets: dict[str, int | None]) -> list[str]:
        """Under the lock: the devices that cannot hold their share of ``charges`` even
        with every idle model (other than ``key``'s) evicted."""
        return [
            d
            for d, share in charges.items()
            if (b := budgets[d]) is not None and self._held(d, key) + share > b
        ]

    def _held(self, device: str, key: str) -> int:
        """Under the lock: the bytes on ``device`` that no eviction can free now: models in
        use (and ``key``'s own), and swapped-out versions finishing their batches."""
        busy = [
            s.charges
            for s in self._slots.values()
            if s.batcher is not None and (s.batcher.busy or s.key == key)
        ]
        return accounting.used(device, busy, self._retiring_bytes)

    def _wait_for_room(self, key: str, charges: accounting.Charges, deadline: float) -> None:
        """Under the load lock: wait (until ``deadline``) for models in use to go idle
        until every device could hold its share; OutOfMemory naming those that cannot."""
        budgets = {d: self.budget(d) for d in charges}
        with self._lock:
            while short := self._short(key, charges, budgets):
                if not self._wait_idle(deadline):
                    raise OutOfMemory(
                        f"model {key!r} needs "
                        + "; ".join(f"{charges[d]} bytes on {d} ({self._held(d, key)} held by models in use "
                                    f"of its {budgets[d]}-byte budget)" for d in short)
                        + f" (waited {self.load_wait:.0f}s)"
                    )  # fmt: skip

    def _wait_idle(self, deadline: float) -> bool:
        """Under the registry lock: wait (a second at most) for a model to go idle; False,
        at once, when ``deadline`` has passed or the server is stopping."""
        remaining = deadline - time.monotonic()
        if remaining <= 0 or self._closed.is_set():
            return False
        self.waiting_loads += 1
        try:
            self._idle.wait(min(remaining, 1.0))
        finally:
            self.waiting_loads -= 1
        return True

    def make_room(
        self,
        key: str,
        device: str,
        needed: int,
        notes: DeferredLog,
        *,
        wait: bool = True,
        deadline: float | None = None,
    ) -> bool:
        """Under the load lock: evict idle models with a copy on ``device`` until
        ``needed`` more bytes fit its budget, waiting until ``deadline`` (default
        ``load_wait`` seconds from now) for busy models to go idle (``wait=False``: return
        False at once instead of waiting or failing). True when it fits."""
        budget = self.budget(device)
        if budget is None:
            return True
        if deadline is None:
            deadline = time.monotonic() + self.load_wait
        while True:
            with self._lock:
                used = self._used(device)
                if used + needed <= budget:
                    return True
                idle = [k for k in self._idle_keys(device) if k != key]
                chosen = self._policy(device).choose_victims(idle, used + needed - budget)
                if not wait and sum(self._slots[k].charges[device] for k in idle) < used + needed - budget:
                    return False  # evicting every idle model would not be enough: keep them
                victims = [self._detach(self._slots[k]) for k in chosen]
                if not victims:
                    if not wait:
                        return False
                    if not self._wait_idle(deadline):
                        raise OutOfMemory(
                            f"model {key!r} needs {needed} bytes on {device}, but {used} of its "
                            f"{budget}-byte budget are held by models in use (waited {self.load_wait:.0f}s)"
                        )
                    continue
            notes.info(log, "evicting %s from %s to make room for %s", ", ".join(chosen), device, key)
            self.release(victims)
