"""Swapping a key to a new version of its model, and retiring the old one.

A key registered again with a different spec (a new checkpoint, a file rewritten in
place) swaps, under the manager's load lock:

Beside: when the budget holds both (after evicting idle models of other keys), the new
version loads while the old one serves, then becomes current atomically; the old one
finishes its queued batches on a ``retire-<key>`` thread and is freed. Its footprint
stays charged to its device until then, so other loads cannot overrun the budget.

Drain first: when it does not, the new version is checked (its checkpoint read
memory-mapped against its class), the old one is taken out of service, finishes its
in-flight batches and is freed, and the new one loads. Requests that arrive meanwhile
wait for the load (their reload queues behind the same lock), so none fails. If the new
version still fails to load, the old one is loaded back, unless its file now holds
something else (the new version was written over it).

A version that fails to load is rejected with a logged error; the old one keeps serving.
Either way ``stats.failed_swaps`` counts it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from modelserver import loaders
from modelserver.batcher import Batcher
from modelserver.measure import estimate_bytes
from modelserver.serverlog import DeferredLog

if TYPE_CHECKING:
    from modelserver.manager import ModelManager, ModelSlot

log = logging.getLogger("beamlet.manager")


def swap(
    manager: ModelManager, key: str, spec: loaders.ModelSpec, old: ModelSlot, notes: DeferredLog
) -> ModelSlot:
    """Under the load lock: replace ``key``'s loaded version (``old``) with ``spec``."""
    device = loaders.resolve_device(spec.device, notes)
    expected = max(estimate_bytes(spec), old.footprint if old.device == device else 0)
    beside = manager.budget(device) is None or manager.make_room(key, device, expected, notes, wait=False)
    try:
        if beside:
            return manager.load(key, spec, old, notes)
        loaders.check(spec)
    except Exception as exc:
        old.stats.failed_swaps += 1
        notes.error(
            log,
            "new version of %s (%s) rejected, %s keeps serving: %s",
            key,
            spec.model_id,
            old.spec.model_id,
            exc,
        )
        raise
    notes.info(log, "swapping %s: %s cannot hold both versions; draining the old one first", key, device)
    old_spec = old.spec
    manager.release([manager.take_out_of_service(old)])
    try:
        return manager.load(key, spec, old, notes)
    except Exception as exc:
        old.stats.failed_swaps += 1
        _restore(manager, key, old_spec, old, spec, exc, notes)
        raise


def _restore(
    manager: ModelManager,
    key: str,
    old_spec: loaders.ModelSpec,
    old: ModelSlot,
    spec: loaders.ModelSpec,
    exc: Exception,
    notes: DeferredLog,
) -> None:
    """After a drained swap whose new version failed to load: load the old one back,
    if its file still holds it (not when the new version was written over it)."""
    replaced = old_spec.revision and loaders.file_revision(old_spec.path) != old_spec.revision
    if old_spec.path == spec.path or replaced:
        notes.error(
            log,
            "new version of %s (%s) failed to load after the old one was drained, and the old "
            "one's file now holds something else: %s serves nothing until a loadable version "
            "is registered: %s",
            key, spec.model_id, key, exc,
        )  # fmt: skip
        manager.set_spec(old, spec)  # what the file holds; a later request retries it
        return
    try:
        manager.load(key, old_spec, old, notes)
    except Exception as again:
        notes.error(
            log, "new version of %s rejected, and the old one failed to load back: %s; %s", key, exc, again
        )
        return
    notes.error(
        log,
        "new version of %s (%s) rejected, %s serves again: %s",
        key,
        spec.model_id,
        old_spec.model_id,
        exc,
    )


def retire(
    batcher: Batcher, key: str, release: Callable[[list[Batcher]], None], done: Callable[[], None]
) -> None:
    """Let a swapped-out version finish its queued batches on a ``retire-<key>`` thread,
    then free it (``release``) and call ``done`` (which uncharges its footprint)."""

    def run() -> None:
        try:
            release([batcher])
        finally:
            done()

    threading.Thread(target=run, name=f"retire-{key}", daemon=True).start()
