"""Memory pressure from outside the server: evict idle models when the machine runs short.

The budgets keep the server's own models in bounds; other processes can still use up the
machine. A watcher thread (``memory-watch``) reads the host's available memory and each
GPU's free memory every ``interval`` seconds, and when a device is short of its reserve
(``min_free_bytes`` of host RAM; ``1 - gpu_fraction`` of a GPU), asks the manager to shed
that many bytes of idle models, whoever caused the shortage.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from modelserver import memory

log = logging.getLogger("beamlet.manager")


class PressureWatcher:
    """Watches the machine's memory and calls ``shed(device, nbytes)`` (which returns how
    many models it evicted) for each device that is short."""

    def __init__(
        self,
        shed: Callable[[str, int], int],
        host: memory.HostMemory,
        *,
        min_free_bytes: int,
        gpu_fraction: float,
        interval: float,
    ):
        self._shed = shed
        self.host = host
        self.min_free_bytes = min_free_bytes
        self.gpu_fraction = gpu_fraction
        self.evictions = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._watch, args=(interval,), name="memory-watch", daemon=True
        )
        self._thread.start()

    def shortfalls(self) -> dict[str, int]:
        """Bytes each device is short of its reserve now (only devices that are short)."""
        short: dict[str, int] = {}
        host_short = self.min_free_bytes - self.host.available()
        if host_short > 0:
            short["cpu"] = host_short
        for reading in memory.gpus():
            gpu_short = int(reading.total * (1 - self.gpu_fraction)) - reading.free
            if gpu_short > 0:
                short[f"cuda:{reading.index}"] = gpu_short
        return short

    def check(self) -> int:
        """Shed idle models on every device that is short now; how many were evicted."""
        evicted = 0
        for device, nbytes in self.shortfalls().items():
            evicted += self._shed(device, nbytes)
        self.evictions += evicted
        return evicted

    def stop(self) -> None:
        self._stop.set()

    def _watch(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.check()
            except Exception:
                log.exception("memory watcher failed")
