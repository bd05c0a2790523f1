"""RunInference: run a model handler over examples, Beam style.

Applied to a plain iterable it runs in this process, as Beam allows for lists::

    results = list(examples | RunInference(handler))

and yields one ``PredictionResult`` per example, in input order. The model is loaded
once per process (``models``) and shared by every thread; with ``large_model=True`` the
process holds only a ``RemoteModel`` and the model lives in the model server.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from client import batching
from client.handlers import ModelHandler

PIPELINE_DEPTH = 2  # batches in flight to the model server per RunInference.run


class ModelCache:
    """Models loaded in this process, by the handler's cache key; one load per key even
    when many threads ask at once."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._after_fork)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self._models: dict[str, Any] = {}

    def _after_fork(self) -> None:
        # Models stay (copy-on-write); locks another thread held at fork time must not.
        models = self._models
        self._reset()
        self._models = models

    def get(self, handler: ModelHandler[Any, Any, Any], metrics: InferenceMetrics | None = None) -> Any:
        """The handler's model, loading it on first use (the load is timed into ``metrics``)."""
        key = handler.cache_key()
        with self._lock:
            if key in self._models:
                return self._models[key]
            lock = self._loading.setdefault(key, threading.Lock())
        with lock:
            with self._lock:
                if key in self._models:
                    return self._models[key]
            started = time.perf_counter()
            model = handler.load_model()
            if metrics is not None:
                metrics.load_model_latency_milli_secs.append(int((time.perf_counter() - started) * 1000))
                metrics.model_byte_size.append(_model_bytes(model))
            with self._lock:
                self._models[key] = model
                self._loading.pop(key, None)
            return model

    def drop(self, handler: ModelHandler[Any, Any, Any]) -> None:
        with self._lock:
            self._models.pop(handler.cache_key(), None)


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


@dataclass
class InferenceMetrics:
    """Counters and distributions with Beam's RunInference metric names."""

    num_inferences: int = 0
    inference_request_batch_size: list[int] = field(default_factory=list)
    inference_request_batch_byte_size: list[int] = field(default_factory=list)
    inference_batch_latency_micro_secs: list[int] = field(default_factory=list)
    load_model_latency_milli_secs: list[int] = field(default_factory=list)
    model_byte_size: list[int] = field(default_factory=list)
    failed_batches_counter: int = 0

    def merge(self, other: InferenceMetrics) -> None:
        self.num_inferences += other.num_inferences
        self.failed_batches_counter += other.failed_batches_counter
        for name in (
            "inference_request_batch_size",
            "inference_request_batch_byte_size",
            "inference_batch_latency_micro_secs",
            "load_model_latency_milli_secs",
            "model_byte_size",
        ):
            getattr(self, name).extend(getattr(other, name))

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> InferenceMetrics:
        return cls(**data)


class RunInference:
    """Runs ``model_handler`` over examples; yields PredictionResults (or what the
    handler's postprocess functions make of them) in input order.

    ``with_exception_handling()``: a batch whose inference raises does not stop the run;
    its examples go to the failed output with the exception's text (Beam's dead letters).
    """

    def __init__(
        self,
        model_handler: ModelHandler[Any, Any, Any],
        inference_args: dict[str, Any] | None = None,
    ):
        model_handler.validate_inference_args(inference_args)
        self.handler = model_handler
        self._inference_args = inference_args
        self.exception_handling = False
        self.metrics = InferenceMetrics()
        self.failed: list[tuple[Any, str]] = []
        self._sizer: batching.BatchSizer | None = None

    def with_exception_handling(self) -> RunInference:
        self.exception_handling = True
        return self

    def __ror__(self, examples: Iterable[Any]) -> Iterator[Any]:
        return self.run(examples)

    def run(self, examples: Iterable[Any]) -> Iterator[Any]:
        """Lazily run over any iterable, batching as the handler asks. Failed examples
        (with exception handling on) collect in ``self.failed``."""
        sizer = batching.from_kwargs(dict(self.handler.batch_elements_kwargs()))
        items: Iterable[Any] = examples
        for fn in self.handler.get_preprocess_fns():
            items = map(fn, items)
        if not self.handler.share_model_across_processes():
            for batch in batching.batches(items, sizer):
                results, failed = self._run_batch(batch, sizer, self.metrics)
                self.failed.extend(failed)
                yield from results
            return
        # The model is in the server: keep the next batch in flight while this thread
        # makes and unpacks the others, so the client's work overlaps the server's.
        with ThreadPoolExecutor(PIPELINE_DEPTH, thread_name_prefix="runinference") as pool:
            in_flight: deque[Future[tuple[list[Any], list[tuple[Any, str]]]]] = deque()
            for batch in batching.batches(items, sizer):
                in_flight.append(pool.submit(self._run_batch, batch, sizer, self.metrics))
                if len(in_flight) > PIPELINE_DEPTH:
                    yield from self._collect(in_flight.popleft())
            while in_flight:
                yield from self._collect(in_flight.popleft())

    def _collect(self, future: Future[tuple[list[Any], list[tuple[Any, str]]]]) -> list[Any]:
        results, failed = future.result()
        self.failed.extend(failed)
        return results

    def process_bundle(
        self, elements: list[Any], metrics: InferenceMetrics
    ) -> tuple[list[Any], list[tuple[Any, str]]]:
        """Run over one bundle (a worker's unit of work): (results, failed examples)."""
        if self._sizer is None:  # one sizer per process, learning across bundles
            self._sizer = batching.from_kwargs(dict(self.handler.batch_elements_kwargs()))
        sizer = self._sizer
        for fn in self.handler.get_preprocess_fns():
            elements = [fn(x) for x in elements]
        results: list[Any] = []
        failed: list[tuple[Any, str]] = []
        for batch in batching.batches(elements, sizer):
            ok, bad = self._run_batch(batch, sizer, metrics)
            results.extend(ok)
            failed.extend(bad)
        return results, failed

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
        metrics.num_inferences += len(batch)
        metrics.inference_request_batch_size.append(len(batch))
        metrics.inference_request_batch_byte_size.append(handler.get_num_bytes(batch))
        metrics.inference_batch_latency_micro_secs.append(int(elapsed * 1e6))
        return results, []
