"""RunInference: run a model handler over examples, Beam style.

Applied to a plain iterable it runs in this process, as Beam allows for lists::

    results = list(examples | RunInference(handler))

and yields one ``PredictionResult`` per example, in input order. The model is loaded
once per process (``models``) and shared by every thread; with ``large_model=True`` the
process holds only a ``RemoteModel`` and the model lives in the model server.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from client import batching, refresh
from client.handlers import ModelHandler
from client.refresh import ModelUpdateSource, Update
from client.results import ModelMetadata

log = logging.getLogger("beamlet.inference")
PIPELINE_DEPTH = 2  # batches in flight to the model server per RunInference.run


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
                    metrics.load_model_latency_milli_secs.extend(slot.load_ms)
                    metrics.model_byte_size.extend(slot.nbytes)
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
                metrics.load_model_latency_milli_secs.append(ms)
                metrics.model_byte_size.append(_model_bytes(model))
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
    model_name: str = ""  # after a named model update: Beam prefixes the names with it

    def named(self) -> dict[str, Any]:
        """Beam's metric names (``<model_name>_num_inferences`` after a named update),
        with each distribution summarised as count, mean, p50, p99 and max."""
        prefix = f"{self.model_name}_" if self.model_name else ""
        out: dict[str, Any] = {
            f"{prefix}num_inferences": self.num_inferences,
            f"{prefix}failed_batches_counter": self.failed_batches_counter,
        }
        for name in _DISTRIBUTIONS:
            values = sorted(getattr(self, name))
            out[f"{prefix}{name}"] = {
                "count": len(values),
                "mean": round(sum(values) / len(values), 2) if values else 0.0,
                "p50": _percentile(values, 50),
                "p99": _percentile(values, 99),
                "max": values[-1] if values else 0,
            }
        return out

    def merge(self, other: InferenceMetrics) -> None:
        self.num_inferences += other.num_inferences
        self.failed_batches_counter += other.failed_batches_counter
        self.model_name = self.model_name or other.model_name
        for name in _DISTRIBUTIONS:
            getattr(self, name).extend(getattr(other, name))

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> InferenceMetrics:
        return cls(**data)


_DISTRIBUTIONS = (
    "inference_request_batch_size",
    "inference_request_batch_byte_size",
    "inference_batch_latency_micro_secs",
    "load_model_latency_milli_secs",
    "model_byte_size",
)


def _percentile(ordered: list[int], q: float) -> float:
    if not ordered:
        return 0.0
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return float(ordered[k])


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

    def update_model(self, update: Update) -> None:
        """Apply one model update: a ModelMetadata (the handler loads ``model_id``), or a
        list of KeyModelPathMapping for a keyed handler. The swap happens at the next batch."""
        update = refresh.check(update)
        if isinstance(update, ModelMetadata):
            self.handler.update_model_path(update.model_id)
            self.model_name = update.model_name or ""
        else:
            update_paths = getattr(self.handler, "update_model_paths", None)
            if update_paths is None:
                raise TypeError(
                    f"{type(self.handler).__name__} takes ModelMetadata updates, not KeyModelPathMapping"
                )
            update_paths(None, update)
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
                self._poll_updates()
                results, failed = self._run_batch(batch, sizer, self._current_metrics())
                self.failed.extend(failed)
                yield from results
            return
        # The model is in the server: keep the next batch in flight while this thread
        # makes and unpacks the others, so the client's work overlaps the server's.
        with ThreadPoolExecutor(PIPELINE_DEPTH, thread_name_prefix="runinference") as pool:
            in_flight: deque[Future[tuple[list[Any], list[tuple[Any, str]]]]] = deque()
            for batch in batching.batches(items, sizer):
                self._poll_updates()
                in_flight.append(pool.submit(self._run_batch, batch, sizer, self._current_metrics()))
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
