"""RunInference: run a model handler over examples, Beam style.

Applied to a plain iterable it runs in this process, as Beam allows for lists::

    results = list(examples | RunInference(handler))

and yields one ``PredictionResult`` per example, in input order. The model is loaded
once per process (``models``) and shared by every thread; with ``large_model=True`` the
process holds only a ``RemoteModel`` and the model lives in the model server.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from client import batching, refresh
from client.base import with_sequence
from client.cache import ModelCache, models
from client.handlers import ModelHandler
from client.metrics import InferenceMetrics
from client.refresh import ModelUpdateSource, Update
from client.resources import ResourceHints
from client.results import ModelMetadata

__all__ = ["InferenceMetrics", "ModelCache", "RunInference", "models"]

log = logging.getLogger("beamlet.inference")
PIPELINE_DEPTH = 2  # batches in flight to the model server per RunInference.run


class RunInference:
    """Runs ``model_handler`` over examples; yields PredictionResults (or what the
    handler's postprocess functions make of them) in input order.

    ``with_exception_handling()``: a batch whose inference raises does not stop the run;
    its examples go to the failed output with the exception's text (Beam's dead letters).

    ``model_metadata_pcoll``: a source of model updates (``client.refresh``), such as
    ``runtime.WatchFilePattern``. Each update swaps the model without stopping: batches
    keep running on the current version while the new one loads, then use the new one;
    each PredictionResult's ``model_id`` names the version that produced it. After an
    update with a ``model_name``, metrics go under that name (``metrics_by_model``), as
    Beam prefixes them. In a pipeline run by the harness, the harness polls the source
    once and sends every update to every SDK worker.

    ``with_resource_hints(accelerator=..., min_ram=...)``: what the step needs of the
    machine, in Beam's names and syntax (``client.resources``); the harness checks them
    before a run starts and refuses to start on a machine that does not meet them.
    """

    def __init__(
        self,
        model_handler: ModelHandler[Any, Any, Any],
        inference_args: dict[str, Any] | None = None,
        *,
        model_metadata_pcoll: ModelUpdateSource | None = None,
    ):
        model_handler.validate_inference_args(inference_args)
        if model_metadata_pcoll is not None and not isinstance(model_metadata_pcoll, ModelUpdateSource):
            raise TypeError(
                "model_metadata_pcoll must be a source of model updates (poll() and interval), "
                f"such as runtime.WatchFilePattern; got {type(model_metadata_pcoll).__name__}"
            )
        self.handler = model_handler
        self._inference_args = inference_args
        self.exception_handling = False
        self.model_updates = model_metadata_pcoll
        self.model_name = ""
        self.metrics = InferenceMetrics()  # before any named update (Beam: no prefix)
        self.metrics_by_model: dict[str, InferenceMetrics] = {"": self.metrics}
        self.failed: list[tuple[Any, str]] = []
        self._sizer: batching.BatchSizer | None = None
        self.resource_hints = ResourceHints()

    def update_model(self, update: Update, *, sequence: tuple[int, int] | None = None) -> None:
        """Apply one model update: a ModelMetadata (the handler loads ``model_id``), or a
        list of KeyModelPathMapping for a keyed handler. The swap happens at the next batch.
        ``sequence``: the update's place in the run's order of versions (the harness's;
        ``client.base.with_sequence``): a large model's server never swaps back to an
        older one."""
        update = refresh.check(update)
        if isinstance(update, ModelMetadata):
            with_sequence(self.handler.update_model_path, update.model_id, sequence=sequence)
            self.model_name = update.model_name or ""
        else:
            update_paths = getattr(self.handler, "update_model_paths", None)
            if update_paths is None:
                raise TypeError(
                    f"{type(self.handler).__name__} takes ModelMetadata updates, not KeyModelPathMapping"
                )
            with_sequence(update_paths, None, update, sequence=sequence)
        log.info("model update: %s", update)

    def _poll_updates(self) -> None:
        # Every batch: a source lists its store only when that is due (its own interval).
        if self.model_updates is not None:
            update = self.model_updates.poll()
            if update is not None:
                self.update_model(update)

    def _current_metrics(self) -> InferenceMetrics:
        return self.metrics_by_model.setdefault(self.model_name, InferenceMetrics(model_name=self.model_name))

    def beam_metrics(self) -> dict[str, Any]:
        """Every metric under Beam's names, prefixed per model name after named updates."""
        out: dict[str, Any] = {}
        for m in self.metrics_by_model.values():
            out.update(m.named())
        return out

    def prefetch(self) -> None:
        """Start loading the handler's current version now, not at the next batch."""
        models.get(self.handler)

    def with_resource_hints(self, **hints: Any) -> RunInference:
        """Set resource hints (Beam's names: ``accelerator``, ``min_ram``); returns this
        transform. ValueError for a hint or value Beam would not accept."""
        self.resource_hints = self.resource_hints.updated(**hints)
        return self

    def get_resource_hints(self) -> dict[str, bytes]:
        """The hints as Beam gives them: URN -> bytes."""
        return self.resource_hints.to_beam()

    def with_exception_handling(self) -> RunInference:
        self.exception_handling = True
        return self

    def __ror__(self, examples: Iterable[Any]) -> Iterator[Any]:
        return self.run(examples)

    def run(self, examples: Iterable[Any]) -> Iterator[Any]:
        """Lazily run over any iterable, batching as the handler asks. Failed examples
        (with exception handling on) collect in ``self.failed``."""
        sizer = batching.from_kwargs(dict(self.handler.batch_elements_kwargs()))
        for results, failed in self._batches(examples, sizer, self._current_metrics, poll=True):
            self.failed.extend(failed)
            yield from results

    def process_bundle(
        self, elements: list[Any], metrics: InferenceMetrics
    ) -> tuple[list[Any], list[tuple[Any, str]]]:
        """Run over one bundle (a worker's unit of work): (results, failed examples)."""
        if self._sizer is None:  # one sizer per process, learning across bundles
            self._sizer = batching.from_kwargs(dict(self.handler.batch_elements_kwargs()))
        results: list[Any] = []
        failed: list[tuple[Any, str]] = []
        for ok, bad in self._batches(elements, self._sizer, lambda: metrics, poll=False):
            results.extend(ok)
            failed.extend(bad)
        return results, failed

    def _batches(
        self,
        examples: Iterable[Any],
        sizer: batching.BatchSizer,
        metrics: Callable[[], InferenceMetrics],
        *,
        poll: bool,
    ) -> Iterator[tuple[list[Any], list[tuple[Any, str]]]]:
        """The one run path: preprocess, batch, infer, postprocess; (results, failed) per
        batch, in order. ``poll``: look for model updates before each batch (a run that
        owns its source; under the harness, the harness polls). A model in the server
        keeps the next batches in flight (``PIPELINE_DEPTH``) while this thread makes
        and unpacks the others, so the client's work overlaps the server's."""
        items: Iterable[Any] = examples
        for fn in self.handler.get_preprocess_fns():
            items = map(fn, items)
        depth = PIPELINE_DEPTH if poll and self.handler.share_model_across_processes() else 0
        if not depth:
            for batch in batching.batches(items, sizer):
                if poll:
                    self._poll_updates()
                yield self._run_batch(batch, sizer, metrics())
            return
        with ThreadPoolExecutor(depth, thread_name_prefix="runinference") as pool:
            in_flight: deque[Future[tuple[list[Any], list[tuple[Any, str]]]]] = deque()
            for batch in batching.batches(items, sizer):
                self._poll_updates()
                in_flight.append(pool.submit(self._run_batch, batch, sizer, metrics()))
                if len(in_flight) > depth:
                    yield in_flight.popleft().result()
            while in_flight:
                yield in_flight.popleft().result()

    def _run_batch(
        self, batch: list[Any], sizer: batching.BatchSizer, metrics: InferenceMetrics
    ) -> tuple[list[Any], list[tuple[Any, str]]]:
        handler = self.handler
        model = models.get(handler, metrics)
        t1 = time.perf_counter()
        try:
            results = list(handler.run_inference(batch, model, self._inference_args))
            for fn in handler.get_postprocess_fns():
                results = [fn(r) for r in results]
        except Exception as exc:
            metrics.failed_batches_counter += 1
            if not self.exception_handling:
                raise
            error = f"{type(exc).__name__}: {exc}"
            return [], [(x, error) for x in batch]
        elapsed = time.perf_counter() - t1
        sizer.record(len(batch), elapsed)
        metrics.record_batch(len(batch), handler.get_num_bytes(batch), elapsed)
        return results, []
