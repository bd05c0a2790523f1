"""Swapping a key to a new version of its model, and retiring the old one.

A key registered again with a different spec (a new checkpoint, a file rewritten in
place) swaps, under the manager's load lock:

Beside: when the budget holds both (after evicting idle models of other keys), the new
version loads while the old one serves, then becomes current atomically; the old one
finishes its queued batches on a ``retire-<key>`` thread and is freed. Its footprints
stay charged to its devices until then, so other loads cannot overrun a budget.

Drain first: when it does not, the new version is checked (its checkpoint read
memory-mapped against its class), the old one is taken out of service, finishes its
in-flight batches and is freed, and the new one loads. Requests that arrive meanwhile
wait for the load (their reload queues behind the same lock), so none fails. If the new
version still fails to load, the old one is loaded back, unless its file now holds
something else (the new version was written over it).

A version that fails to load is rejected with a logged error; the old one keeps serving.
Either way ``stats.failed_swaps`` counts it.

Versions only move forward (``replaces``): a load may carry its version's sequence,
(epoch, n), which the harness gives each update of a run (a later run's epoch is
larger). A swap to a version older than the one the key serves is refused: the load
attaches to the served version. Loads without a sequence keep the older rule, the last
one swaps, and leave the key's version without an order.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from modelserver import accounting, loaders
from modelserver.copies import Copies
from modelserver.errors import BadRequest
from modelserver.measure import estimate_bytes
from modelserver.serverlog import DeferredLog

if TYPE_CHECKING:
    from modelserver.manager import ModelManager
    from modelserver.slot import ModelSlot

log = logging.getLogger("beamlet.manager")


def replaces(
    slot: ModelSlot,
    spec: loaders.ModelSpec,
    replace: bool,
    sequence: tuple[int, int] | None,
    notes: DeferredLog,
) -> bool:
    """Under the registry lock: whether a load of ``spec`` at ``sequence`` swaps the
    version ``slot`` serves (False: the load attaches to it). The same spec never swaps,
    and under a newer sequence moves the served one on (a version between the two is
    older too); nor does anything with ``replace`` False, or older than what serves (a
    late load: noted in ``notes``). Another spec under the served sequence is BadRequest:
    one update cannot be two versions."""
    if slot.spec == spec:
        if sequence is not None and (slot.sequence is None or sequence > slot.sequence):
            slot.sequence = sequence
        return False
    if not replace:
        return False
    if sequence is None or slot.sequence is None:
        return True  # no order to keep: the last load swaps
    if sequence == slot.sequence:
        raise BadRequest(
            f"model {slot.key!r}: {spec.model_id} comes with sequence {list(sequence)}, under "
            f"which {slot.spec.model_id} already serves; one update cannot be two versions"
        )
    if sequence < slot.sequence:
        notes.info(
            log,
            "%s: not swapping to %s (sequence %s), older than %s (sequence %s), which keeps serving",
            slot.key, spec.model_id, list(sequence), slot.spec.model_id, list(slot.sequence),
        )  # fmt: skip
        return False
    return True


def swap(
    manager: ModelManager,
    key: str,
    spec: loaders.ModelSpec,
    sequence: tuple[int, int] | None,
    old: ModelSlot,
    notes: DeferredLog,
) -> ModelSlot:
    """Under the load lock: replace ``key``'s loaded version (``old``) with ``spec``, the
    version at ``sequence``."""
    try:
        what = f"model {key!r}"
        on_cpu = loaders.resolve_device(spec.device, notes, fallback=spec.cpu_fallback, what=what) == "cpu"
        per_copy = max(estimate_bytes(spec), old.copy_footprint if on_cpu == (old.device == "cpu") else 0)
        # the new version's copies, all of them, where they would go beside the old ones
        devices = manager.place(key, spec, per_copy, manager.copies_of(key), notes)
        expected = accounting.planned(devices, per_copy)
        # evict for the new version only when every device it goes to can hold it beside the old
        beside = manager.room_at_once(key, expected) and all(
            manager.make_room(key, d, share, notes, wait=False) for d, share in expected.items()
        )
        if beside:
            return manager.load(key, spec, sequence, old, notes)
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
    where = ", ".join(expected)
    notes.info(log, "swapping %s: %s cannot hold both versions; draining the old one first", key, where)
    old_spec, old_sequence = old.spec, old.sequence
    manager.release([manager.take_out_of_service(old)])
    try:
        return manager.load(key, spec, sequence, old, notes)
    except Exception as exc:
        old.stats.failed_swaps += 1
        _restore(manager, key, (old_spec, old_sequence), old, (spec, sequence), exc, notes)
        raise


def _restore(
    manager: ModelManager,
    key: str,
    old_version: tuple[loaders.ModelSpec, tuple[int, int] | None],
    old: ModelSlot,
    version: tuple[loaders.ModelSpec, tuple[int, int] | None],
    exc: Exception,
    notes: DeferredLog,
) -> None:
    """After a drained swap whose new version (spec, sequence) failed to load: load the
    old one back, if its file still holds it (not when the new version was written over
    it)."""
    old_spec, spec = old_version[0], version[0]
    replaced = old_spec.revision and loaders.file_revision(old_spec.path) != old_spec.revision
    if old_spec.path == spec.path or replaced:
        notes.error(
            log,
            "new version of %s (%s) failed to load after the old one was drained, and the old "
            "one's file now holds something else: %s serves nothing until a loadable version "
            "is registered: %s",
            key, spec.model_id, key, exc,
        )  # fmt: skip
        manager.set_spec(old, *version)  # what the file holds; a later request retries it
        return
    try:
        manager.load(key, *old_version, old, notes)
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
    batcher: Copies, key: str, release: Callable[[list[Copies]], None], done: Callable[[], None]
) -> None:
    """Let a swapped-out version (every copy of it) finish its queued batches on a
    ``retire-<key>`` thread, then free it (``release``) and call ``done`` (which uncharges its footprint)."""

    def run() -> None:
        try:
            release([batcher])
        finally:
            done()

    threading.Thread(target=run, name=f"retire-{key}", daemon=True).start()
