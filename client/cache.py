"""The models loaded in this process: one per handler, shared by every thread.

``models`` is the process-wide cache RunInference uses; a keyed handler keeps a cache of
its own for its in-process models (``client.keyed``). A new version of a model loads
aside while the current one keeps serving (``ModelCache``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from client.handlers import ModelHandler

if TYPE_CHECKING:
    from client.metrics import InferenceMetrics

log = logging.getLogger("beamlet.inference")


@dataclass
class _Slot:
    """One model in this process across its versions."""

    version: str  # the handler's cache_key the model was loaded for
    model: Any
    loading: str | None = None  # the version now loading in the background
    rejected: set[str] = field(default_factory=set)  # versions that failed to load
    load_ms: list[int] = field(default_factory=list)  # background loads not yet reported
    nbytes: list[int] = field(default_factory=list)


class ModelCache:
    """Models loaded in this process, one per handler ``cache_slot``; one load per slot
    even when many threads ask at once.

    A new version (the handler's ``cache_key`` changed: ``update_model_path``) loads on a
    background thread while every thread keeps using the current one; once loaded it
    replaces it for the next batch, and the old one is freed when its last batch ends. A
    version that fails to load is rejected with a logged error and the current one keeps
    serving; it is not retried until the handler changes version again.
    """

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._after_fork)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._loading: dict[str, threading.Lock] = {}
        self._slots: dict[str, _Slot] = {}

    def _after_fork(self) -> None:
        # Models stay (copy-on-write); locks another thread held at fork time must not,
        # nor a background load that belonged to a thread the child does not have.
        slots = self._slots
        self._reset()
        for slot in slots.values():
            slot.loading = None
        self._slots = slots

    def get(self, handler: ModelHandler[Any, Any, Any], metrics: InferenceMetrics | None = None) -> Any:
        """The handler's model, loading it on first use (the load is timed into ``metrics``)."""
        name = handler.cache_slot()
        with self._lock:
            slot = self._slots.get(name)
            if slot is not None:
                # Read the version under the lock: a key read before an update whose load
                # has since finished would otherwise start a load "back" to it.
                want = handler.cache_key()
                if slot.version != want and want not in slot.rejected and slot.loading is None:
                    slot.loading = want
                    threading.Thread(
                        target=self._load_version,
                        args=(handler, name),
                        name="model-update",
                        daemon=True,
                    ).start()
                if metrics is not None and slot.load_ms:
                    for ms, nbytes in zip(slot.load_ms, slot.nbytes):
                        metrics.record_load(ms, nbytes)
                    slot.load_ms, slot.nbytes = [], []
                return slot.model
            lock = self._loading.setdefault(name, threading.Lock())
        with lock:
            with self._lock:
                if name in self._slots:
                    return self._slots[name].model
            want = handler.cache_key()
            model, ms = _timed_load(handler)
            if metrics is not None:
                metrics.record_load(ms, _model_bytes(model))
            with self._lock:
                self._slots[name] = _Slot(want, model)
                self._loading.pop(name, None)
            return model

    def _load_version(self, handler: ModelHandler[Any, Any, Any], name: str) -> None:
        # The version is read just before the load reads the handler's spec: if the
        # handler changes again meanwhile, the next get() sees the difference and loads.
        want = handler.cache_key()
        try:
            model, ms = _timed_load(handler)
        except Exception as exc:
            log.error(
                "model update rejected, the current version keeps serving: %s: %s", type(exc).__name__, exc
            )
            with self._lock:
                slot = self._slots[name]
                slot.rejected.add(want)
                slot.loading = None
                self._changed.notify_all()
            return
        with self._lock:
            slot = self._slots[name]
            slot.version, slot.model, slot.loading = want, model, None
            slot.load_ms.append(ms)
            slot.nbytes.append(_model_bytes(model))
            self._changed.notify_all()
        log.info("model %s updated to %s", name, getattr(model, "model_id", want))

    def wait_for(self, handler: ModelHandler[Any, Any, Any], timeout: float = 60.0) -> bool:
        """Wait until the handler's current version is loaded (or rejected); True when
        it serves. For tests and tools; a running job never waits."""
        deadline = time.monotonic() + timeout
        while True:
            self.get(handler)  # starts the load if none runs
            with self._changed:
                slot = self._slots.get(handler.cache_slot())
                want = handler.cache_key()
                if slot is not None and slot.loading is None:
                    if slot.version == want:
                        return True
                    if want in slot.rejected:
                        return False
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(min(remaining, 0.1))

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Wait until no new version is loading; True if none is."""
        with self._changed:
            return self._changed.wait_for(
                lambda: all(slot.loading is None for slot in self._slots.values()), timeout
            )

    def drop(self, handler: ModelHandler[Any, Any, Any]) -> None:
        with self._lock:
            self._slots.pop(handler.cache_slot(), None)


def _timed_load(handler: ModelHandler[Any, Any, Any]) -> tuple[Any, int]:
    started = time.perf_counter()
    model = handler.load_model()
    return model, int((time.perf_counter() - started) * 1000)


models = ModelCache()


def _model_bytes(model: Any) -> int:
    nbytes = getattr(model, "nbytes", None)  # a RemoteModel knows its size in the server
    if isinstance(nbytes, int):
        return nbytes
    try:
        from modelserver.loaders import tensor_bytes

        return tensor_bytes(model)
    except Exception:
        return 0
