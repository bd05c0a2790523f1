"""The harness: forks SDK workers, feeds them bundles, commits each bundle's output once.

``Harness`` is the front door: ``run(pipeline)`` for a whole job, or a long-lived
harness (``with Harness(...)``) that takes bundles from a custom runner (``process``,
``submit``; runtime/session.py). Each execution is a ``Run`` (runtime/arbiter.py): the
arbiter's loop, exactly once, the restart policy and stopping are written there.

Before anything starts, the pipeline's source and sink are checked (a missing input, an
output directory that cannot be written), and so is the machine against every step's
resource hints (runtime/devices.py): the run then fails at once with CannotStart. Workers
that keep a GPU model in-process get a GPU each (``CUDA_VISIBLE_DEVICES``, round-robin).
"""

from __future__ import annotations

import itertools
import logging
import signal
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from modelserver.exposition import MetricsEndpoint
from runtime.arbiter import BundleResult, Run
from runtime.checkpoint import Checkpoint
from runtime.errors import CannotStart, PipelineError
from runtime.pipeline import Collect, Pipeline
from runtime.summary import RunSummary

if TYPE_CHECKING:
    from runtime.session import Session

log = logging.getLogger("beamlet.harness")

__all__ = ["BundleResult", "CannotStart", "Harness", "PipelineError"]


class Harness:
    """Runs a pipeline on ``workers`` SDK-worker processes of ``threads`` threads each.

    ``run(pipeline)`` reads the pipeline's source and writes its sink. ``process(bundles,
    pipeline)`` is for custom runners: hand in bundles (iterables of elements), get a
    ``BundleResult`` per bundle back, in order.

    Workers are forked from the run's zygote (runtime/zygote.py), a process forked from
    this one when the run starts, before the harness starts a thread of its own: they
    inherit the pipeline's steps as written and import nothing again. With
    ``pipeline_ref`` they are started as ``python -m runtime.worker`` and import the
    pipeline themselves. A worker whose models all live in the model server computes with
    one torch thread; others share this process's torch threads (runtime/computethreads.py).

    ``metrics``: a Prometheus endpoint each run serves while it runs (runtime/metrics.py).

    ``deterministic=True``: the same input gives bitwise the same output in every run.
    Bundles are cut by count (as always), and every process the run starts (its workers,
    the model server it starts) gets ``BEAMLET_DETERMINISTIC=1``: the server then merges
    no requests of different callers into one batch, and RunInference fixes its batch
    sizes. A model server already running at the socket keeps its own settings.
    """

    def __init__(
        self,
        workers: int = 2,
        threads: int = 4,
        *,
        bundle_size: int = 256,
        max_bundle_wait: float = 0.1,
        bundle_timeout: float = 600.0,
        heartbeat_timeout: float = 60.0,
        max_attempts: int = 3,
        max_restarts: int = 20,
        grace_seconds: float = 30.0,
        socket_path: str | None = None,
        server_args: list[str] | None = None,
        progress: bool | None = None,
        pipeline_ref: str | None = None,
        pipeline_args: tuple[str | None, str | None] = (None, None),
        deterministic: bool = False,
        checkpoint: str | None = None,
        metrics: MetricsEndpoint | None = None,
    ):
        if workers < 1 or threads < 1 or bundle_size < 1:
            raise ValueError("workers, threads and bundle_size must be at least 1")
        if not max_bundle_wait > 0:
            raise ValueError(f"max_bundle_wait must be a positive number of seconds, got {max_bundle_wait!r}")
        self.workers = workers
        self.threads = threads
        self.bundle_size = bundle_size
        self.max_bundle_wait = max_bundle_wait
        self.bundle_timeout = bundle_timeout
        self.heartbeat_timeout = heartbeat_timeout
        self.max_attempts = max_attempts
        self.max_restarts = max_restarts
        self.grace_seconds = grace_seconds
        self.socket_path = socket_path
        self.server_args = list(server_args or [])
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.pipeline_ref = pipeline_ref
        self.pipeline_args = pipeline_args
        self.deterministic = deterministic
        self.checkpoint = checkpoint
        self.metrics = metrics
        self._stop_signal: int | None = None
        self.current: Run | None = None
        self._open = False  # inside `with`: the workers outlive a process() call
        self._session: Session | None = None

    def worker_pids(self) -> list[int]:
        """The pids of the running run's SDK workers (empty when idle)."""
        run = self.current
        return [slot.pid for slot in list(run.pool.slots.values())] if run is not None else []

    def progress_bundles(self) -> int:
        """Bundles committed so far by the running run."""
        run = self.current
        return run.summary.bundles if run is not None else 0

    # -- the public entry points --------------------------------------------------------
    def run(self, pipeline: Pipeline) -> RunSummary:
        """Run a whole pipeline: source -> steps -> sink. Returns the run's summary.
        CannotStart, before any process starts, if the source or the sink cannot work."""
        if pipeline.source is None:
            raise ValueError("run() needs a pipeline that starts with a read step")
        sink = pipeline.sink or Collect()
        source = pipeline.source
        source.check()
        sink.check()
        bundles: Iterator[Any] = source.bundles(self.bundle_size, self.max_bundle_wait)
        checkpoint, resumed = None, 0
        if self.checkpoint is not None:
            if pipeline.split()[1]:
                raise CannotStart("--checkpoint cannot resume a grouping step's open windows: run without it")
            checkpoint = Checkpoint(self.checkpoint, Pipeline(source, pipeline.steps, sink), self.bundle_size)
            resumed = checkpoint.load()
            if resumed:
                log.warning(
                    "resuming from the checkpoint in %s: %d bundles committed before",
                    self.checkpoint,
                    resumed,
                )
                bundles = itertools.islice(bundles, resumed, None)
        total = source.count()
        if total is not None:
            total = max(0, total - resumed * self.bundle_size)
        run = Run(self, pipeline, bundles, sink, total=total)
        run.checkpoint, run.summary.resumed_bundles = checkpoint, resumed
        return run.execute()

    # -- a long-lived harness for custom runners ------------------------------------------
    def __enter__(self) -> Harness:
        self._open = True
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._open = False
        session, self._session = self._session, None
        if session is not None:
            session.close(abandon=exc_type is not None)

    def submit(self, bundle: Iterable[Any], pipeline: Pipeline | Any) -> Future[BundleResult]:
        """Hand one bundle to the running workers; its ``BundleResult`` once committed
        (bundles commit in the order they were submitted). Inside ``with Harness(...)``:
        the first call starts the workers (and the model server, when a step needs it)
        for ``pipeline``'s steps, and they stay until the block ends; a call with other
        steps first finishes what runs and starts workers for those. Blocks while the
        harness holds its window of bundles (a slow run slows its callers). A run that
        fails fails every bundle not yet committed, with PipelineError."""
        if not self._open:
            raise RuntimeError("submit() needs a harness opened with `with Harness(...) as h:`")
        return self._session_for(pipeline).submit(bundle)

    def process(self, bundles: Iterable[Iterable[Any]], pipeline: Pipeline | Any) -> Iterator[BundleResult]:
        """Run the pipeline's steps over each bundle (any iterable of them, finite or
        not); yields each ``BundleResult``, in bundle order, as soon as it is committed.
        At most a window of bundles is read ahead of what the caller has taken, so memory
        stays bounded and a slow caller slows the reading. Inside ``with Harness(...)`` the
        workers stay for the next call; outside, they live for this call only."""
        if self._open:
            return self._process(bundles, pipeline)
        return self._process_once(bundles, pipeline)

    def _process_once(
        self, bundles: Iterable[Iterable[Any]], pipeline: Pipeline | Any
    ) -> Iterator[BundleResult]:
        with self:
            yield from self._process(bundles, pipeline)

    def _process(self, bundles: Iterable[Iterable[Any]], pipeline: Pipeline | Any) -> Iterator[BundleResult]:
        session = self._session_for(pipeline)
        window: deque[Future[BundleResult]] = deque()
        it = iter(bundles)
        exhausted = False
        while True:
            while not exhausted and len(window) < session.window:
                try:
                    bundle = next(it)
                except StopIteration:
                    exhausted = True
                    break
                window.append(session.submit(bundle))
            if not window:
                return
            yield session.wait(window.popleft())

    def _session_for(self, pipeline: Pipeline | Any) -> Session:
        from runtime.session import Session  # it builds on Run, below

        session = self._session
        if session is not None and session.key is not pipeline:
            log.info("other steps than the running workers': finishing, then starting workers for them")
            self._session = None
            session.close(abandon=False)
            session = None
        if session is None or not session.alive():
            if session is not None:
                session.close(abandon=True)
            session = self._session = Session(self, pipeline)
        return session

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """Ask a running harness to stop (what SIGINT/SIGTERM do). Thread-safe."""
        self._stop_signal = signum
