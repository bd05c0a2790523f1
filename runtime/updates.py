"""A run's model updates: the harness's side of automatic model refresh (docs/refresh.md).

For each RunInference step with a source of updates (``model_metadata_pcoll``), one
thread polls the source and checks each new file without loading it
(``loaders.check``), so a corrupt or misfitting file never reaches a worker, nor one
started later. Checked updates, and rejections, go onto the harness's event queue; the
harness loop then ``apply``s each one to its own copy of the step and sends the message
to every worker, and ``replay``s the latest one per step to a worker that says hello
later (forked from the run's zygote, it holds the steps as the run began), before any
bundle.

Each update applied gets a sequence, (epoch, n): ``epoch`` is the feed's making time
(``time.time_ns()``), so a later run's updates order after an earlier one's on a model
server that outlives a run; ``n`` counts the run's updates from 1, across all its steps,
so two steps that share a model in the server are ordered too. The message carries it,
the handler records it, and the server never swaps a model back to an older version
(a worker that loads the previous version late attaches to the newer one).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

from client import refresh
from modelserver import loaders
from modelserver.errors import BeamletError
from runtime.pipeline import Pipeline

log = logging.getLogger("beamlet.harness")


class ModelUpdateFeed:
    """The model updates of one run. ``apply`` and ``replay`` belong to the harness loop."""

    def __init__(self, pipeline: Pipeline, events: queue.Queue[tuple[str, Any, Any]]):
        self.pipeline = pipeline
        self.events = events
        self.latest: dict[int, dict[str, Any]] = {}  # step index -> its latest update message
        self.epoch = time.time_ns()
        self.applied = 0  # the n of the last update's sequence
        self._stopped = threading.Event()

    def start(self) -> None:
        for index, step in enumerate(self.pipeline.steps):
            source = getattr(getattr(step, "transform", None), "model_updates", None)
            if source is not None:
                threading.Thread(
                    target=self._poll, args=(index, source), name="model-updates", daemon=True
                ).start()

    def stop(self) -> None:
        self._stopped.set()

    def _poll(self, index: int, source: refresh.ModelUpdateSource) -> None:
        handler = self.pipeline.steps[index].transform.handler  # type: ignore[attr-defined]
        while not self._stopped.wait(source.interval):
            try:
                update = source.poll()
            except Exception:
                log.exception("polling model updates for step %d failed; trying again", index)
                continue
            if update is None:
                continue
            try:
                for spec in refresh.candidate_specs(handler, update):
                    loaders.check(spec)
            except (BeamletError, ValueError, KeyError) as exc:
                self.events.put(("model_update_rejected", None, (index, update, exc)))
                continue
            self.events.put(("model_update", None, (index, update)))

    def apply(self, index: int, update: refresh.Update) -> dict[str, Any] | None:
        """Apply a checked update here; the message to send to every worker, or None when
        the step refuses it."""
        transform = self.pipeline.steps[index].transform  # type: ignore[attr-defined]
        sequence = (self.epoch, self.applied + 1)
        try:
            transform.update_model(update, sequence=sequence)
        except (TypeError, ValueError) as exc:
            log.error("model update %s for step %d rejected: %s", update, index, exc)
            return None
        self.applied += 1
        self.latest[index] = {
            "op": "update_model",
            "step": index,
            "update": refresh.to_wire(update),
            "sequence": list(sequence),
        }
        return self.latest[index]

    def replay(self) -> list[dict[str, Any]]:
        """What a worker that says hello now must receive before any bundle: each step's
        latest update, with its sequence as first sent."""
        return list(self.latest.values())
