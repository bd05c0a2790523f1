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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from client import batching
from client.handlers import ModelHandler


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

    def get(self, handler: ModelHandler[Any, Any, Any]) -> Any:
        key = handler.cache_key()
        with self._lock:
            if key in self._models:
                return self._models[key]
            lock = self._loading.setdefault(key, threading.Lock())
        with lock:
            with self._lock:
                if key in self._models:
                    return self._models[key]
            model = handler.load_model()
            with self._lock:
                self._models[key] = model
                self._loading.pop(key, None)
            return model

    def drop(self, handler: ModelHandler[Any, Any, Any]) -> None:
        with self._lock:
            self._models.pop(handler.cache_key(), None)


models = ModelCache()


@dataclass
class InferenceMetrics:
    """Counters with Beam's RunInference metric names."""

    num_inferences: int = 0
    inference_request_batch_size: list[int] = field(default_factory=list)
    inference_request_batch_byte_size: list[int] = field(default_factory=list)
    inference_batch_latency_micro_secs: list[int] = field(default_factory=list)
    load_model_latency_milli_secs: int = 0
    model_byte_size: int = 0
    failed_batches_counter: int = 0


class RunInference:
    """Runs ``model_handler`` over examples; yields PredictionResults (or what the
    handler's postprocess functions make of them) in input order."""

    def __init__(
        self, model_handler: ModelHandler[Any, Any, Any], inference_args: dict[str, Any] | None = None
    ):
        model_handler.validate_inference_args(inference_args)
        self._handler = model_handler
        self._inference_args = inference_args
        self.metrics = InferenceMetrics()

    def __ror__(self, examples: Iterable[Any]) -> Iterator[Any]:
        return self.run(examples)

    def run(self, examples: Iterable[Any]) -> Iterator[Any]:
        handler = self._handler
        started = time.monotonic()
        model = models.get(handler)
        if not self.metrics.load_model_latency_milli_secs:
            self.metrics.load_model_latency_milli_secs = int((time.monotonic() - started) * 1000)
        pre = handler.get_preprocess_fns()
        post = handler.get_postprocess_fns()
        sizer = batching.from_kwargs(dict(handler.batch_elements_kwargs()))
        items: Iterable[Any] = examples
        for fn in pre:
            items = map(fn, items)
        for batch in batching.batches(items, sizer):
            t0 = time.perf_counter()
            results = list(handler.run_inference(batch, model, self._inference_args))
            elapsed = time.perf_counter() - t0
            sizer.record(len(batch), elapsed)
            self._account(batch, elapsed)
            for result in results:
                for fn in post:
                    result = fn(result)
                yield result

    def _account(self, batch: list[Any], elapsed: float) -> None:
        m = self.metrics
        m.num_inferences += len(batch)
        m.inference_request_batch_size.append(len(batch))
        m.inference_request_batch_byte_size.append(self._handler.get_num_bytes(batch))
        m.inference_batch_latency_micro_secs.append(int(elapsed * 1e6))
