"""The long-lived harness of ``with Harness(...) as h:``: workers kept for a custom
runner's bundles, fed by ``submit`` and ``process`` (runtime/harness.py), each bundle's
result delivered through a future as it commits."""

from __future__ import annotations

import queue
import signal
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import numpy as np

from runtime.arbiter import BundleResult, Run
from runtime.errors import PipelineError
from runtime.harness import Harness
from runtime.pipeline import Pipeline, Sink, SourceBundle


class _Gather(Sink):
    """The sink of a custom runner's bundles: results go to their futures (on_commit)."""

    def write(self, elements: list[Any]) -> None:
        pass

    def write_dead_letters(self, dead_letters: list[dict[str, Any]]) -> None:
        pass


class Session:
    """Workers kept for a custom runner's bundles: a run whose input is a bounded inbox
    that ``submit`` fills, whose loop runs on a thread of its own, and whose commits
    resolve each bundle's future."""

    def __init__(self, harness: Harness, pipeline: Pipeline | Any):
        self.key = pipeline
        self.window = harness.workers * harness.threads * 2
        self._inbox: queue.Queue[Any] = queue.Queue(maxsize=self.window)
        self._closing = threading.Event()
        self._futures: set[Future[BundleResult]] = set()
        self._lock = threading.Lock()
        self.run = Run(harness, Pipeline.of(pipeline), self._bundles(), _Gather(), total=None)
        if self.run.harness_steps:
            raise ValueError(
                "process() and submit() take element-wise steps; a grouping step (CountPerKey, "
                "CombinePerKey) needs run() with a sink"
            )
        self.run.on_commit = self._committed
        self.failure: BaseException | None = None
        self.run.start()  # on the caller's thread: a run that cannot start raises here
        self._thread = threading.Thread(target=self._loop, name="harness-session", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closing.is_set()

    def submit(self, bundle: Iterable[Any]) -> Future[BundleResult]:
        elements = bundle if isinstance(bundle, np.ndarray) else list(bundle)
        future: Future[BundleResult] = Future()
        with self._lock:
            self._futures.add(future)
        while True:
            if self.failure is not None or not self._thread.is_alive():
                self._fail_pending()
                return future
            try:
                self._inbox.put(SourceBundle(elements, ack=future), timeout=0.1)
                return future
            except queue.Full:
                continue

    def wait(self, future: Future[BundleResult]) -> BundleResult:
        """The future's result; if the run ends without it, PipelineError."""
        while True:
            try:
                return future.result(timeout=0.5)
            except FutureTimeout:
                if not self._thread.is_alive():
                    self._fail_pending()

    def close(self, abandon: bool) -> None:
        """Finish what was submitted (``abandon``: stop now instead) and stop the workers."""
        self._closing.set()
        if abandon:
            self.run.h.request_stop(signal.SIGTERM)
        while self._thread.is_alive():
            self._thread.join(0.5)
        self._fail_pending()
        if self.failure is not None and not abandon:
            raise self.failure

    def _bundles(self) -> Iterator[SourceBundle]:
        while True:
            try:
                item = self._inbox.get(timeout=0.1)
            except queue.Empty:
                if self._closing.is_set():
                    return
                continue
            yield item

    def _loop(self) -> None:
        try:
            self.run.finish(self.run.loop())
        except BaseException as exc:
            self.failure = exc
        finally:
            self._fail_pending()

    def _committed(self, result: BundleResult, ack: Any) -> None:
        if isinstance(ack, Future):
            with self._lock:
                self._futures.discard(ack)
            ack.set_result(result)

    def _fail_pending(self) -> None:
        """Every future not resolved when the run has ended gets the run's failure."""
        if self._thread.is_alive():
            return
        with self._lock:
            pending, self._futures = self._futures, set()
        error = self.failure or PipelineError("the harness stopped before this bundle was committed")
        for future in pending:
            if not future.done():
                future.set_exception(error)
