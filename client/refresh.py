"""Model updates: what tells a running job that a new model version exists.

An update is Beam's ``ModelMetadata(model_id, model_name)`` for a single model (its
``model_id`` is the new file's path), or a list of ``KeyModelPathMapping`` for a keyed
handler (these keys now use that file). ``RunInference(handler,
model_metadata_pcoll=source)`` takes any *source* of updates: an object with ``poll()``,
which returns the newest update not yet returned (or None), and ``interval``, how often
it wants to be polled. ``runtime.WatchFilePattern`` watches files; ``ModelUpdates`` is
fed by hand (or by your own notification system).

Updates cross process boundaries as plain maps (``to_wire`` / ``from_wire``): the harness
polls the source once and sends each update to every SDK worker.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from client.keyed import KeyModelPathMapping, keyed_handler_of
from client.results import ModelMetadata
from modelserver import loaders

Update = ModelMetadata | list[KeyModelPathMapping]


@runtime_checkable
class ModelUpdateSource(Protocol):
    """Where model updates come from (``RunInference``'s ``model_metadata_pcoll``).

    ``poll()`` may be called often (RunInference calls it before every batch): a source
    that lists a store does so only when its own schedule says so. ``interval`` is how
    often a poller with nothing else to do (the harness's thread) should call it."""

    interval: float

    def poll(self) -> Update | None:
        """The newest update not returned before, or None. Must not block for long."""
        ...


class ModelUpdates:
    """Updates pushed by hand: ``put`` one, and the job picks up the newest at its next
    poll (earlier ones not yet polled are superseded). Thread-safe."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self._lock = threading.Lock()
        self._next: Update | None = None

    def put(self, update: ModelMetadata | Sequence[KeyModelPathMapping]) -> None:
        checked = check(update)
        with self._lock:
            self._next = checked

    def poll(self) -> Update | None:
        with self._lock:
            update, self._next = self._next, None
        return update


def check(update: Any) -> Update:
    """The update, validated; TypeError naming what is wrong otherwise."""
    if isinstance(update, ModelMetadata):
        # An empty model_id is allowed: the handler keeps its current model, as in Beam.
        if not isinstance(update.model_id, str):
            raise TypeError(f"ModelMetadata.model_id must be a path, got {update.model_id!r}")
        return update
    if (
        isinstance(update, (list, tuple))
        and update
        and all(isinstance(m, KeyModelPathMapping) for m in update)
    ):
        return list(update)
    raise TypeError(
        f"a model update is a ModelMetadata or a list of KeyModelPathMapping, got {type(update).__name__}"
    )


def to_wire(update: Update) -> dict[str, Any]:
    if isinstance(update, ModelMetadata):
        return {"model_id": update.model_id, "model_name": update.model_name}
    return {
        "keyed": [
            {"keys": list(m.keys), "update_path": m.update_path, "model_id": m.model_id} for m in update
        ]
    }


def from_wire(data: dict[str, Any]) -> Update:
    if "keyed" in data:
        return [
            KeyModelPathMapping(list(m["keys"]), m["update_path"], m.get("model_id", ""))
            for m in data["keyed"]
        ]
    return ModelMetadata(data["model_id"], data.get("model_name", ""))


def candidate_specs(handler: Any, update: Update) -> list[loaders.ModelSpec]:
    """The specs ``update`` would make ``handler`` load, without changing the handler
    (for checking a new version with ``loaders.check`` before anyone switches to it).
    Empty for handlers that do not describe their model as a spec."""
    keyed = keyed_handler_of(handler)
    if keyed is None:
        spec = handler.model_spec()
        if spec is None or not isinstance(update, ModelMetadata) or not update.model_id:
            return []
        return [_moved(spec, update.model_id)]
    if isinstance(update, ModelMetadata):
        moves = [(0, update.model_id)] if len(keyed.mappings) == 1 and update.model_id else []
    else:
        moves = [(keyed.model_index(m.keys[0]), m.update_path) for m in update]
    specs = []
    for index, path in moves:
        spec = keyed.mappings[index].mh.model_spec()
        if spec is not None:
            specs.append(_moved(spec, path))
    return specs


def _moved(spec: loaders.ModelSpec, path: str) -> loaders.ModelSpec:
    path = os.path.abspath(path)
    return dataclasses.replace(spec, path=path, revision=loaders.file_revision(path))
