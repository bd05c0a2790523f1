"""The harness: forks SDK workers, feeds them bundles, commits each bundle's output once.

The harness is an arbiter in gunicorn's manner. Its main loop (one thread) owns all the
state; reader threads only turn each worker's control frames into events on a queue, and
signal handlers only set a flag. Each turn of the loop it reads more input into bundles,
hands bundles to workers with free threads, handles events (results, failures,
heartbeats), reaps dead workers and spawns replacements, kills workers that hang, and
watches the model server.

Exactly once: a bundle's output is committed, in input order, only when the whole
bundle has come back; a bundle whose worker died or hung is re-run from the start on
another worker, and results of superseded attempts are ignored.

Restart policy: a worker that dies is replaced and its bundles re-run; a worker that
cannot boot (EXIT_BOOT_FAILED, or a ``boot_failed`` message) fails the run with its
error instead of being restarted; more than ``max_restarts`` restarts fail the run too
(a crash loop). A bundle whose user code raises is retried up to ``max_attempts`` times,
then fails the run, as in Beam; RunInference with exception handling turns failing
batches into dead letters instead.

Stopping (SIGINT/SIGTERM, or the end of input) runs in stages: stop taking input, let
in-flight bundles finish for up to ``grace_seconds``, ask workers to stop, SIGTERM, then
SIGKILL after a deadline, reap them all, stop the model server if this run started it,
and remove the control socket and its directory.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from client import batching, refresh
from client.inference import InferenceMetrics
from modelserver import config
from modelserver.errors import BeamletError
from runtime.control import EXIT_BOOT_FAILED, ControlChannel
from runtime.pipeline import Collect, Pipeline, Sink
from runtime.serverkeeper import ServerKeeper, ServerStartFailed
from runtime.summary import RunSummary
from runtime.updates import ModelUpdateFeed
from runtime.workerslot import WorkerSlot, exec_worker, fork_worker

log = logging.getLogger("beamlet.harness")


class PipelineError(RuntimeError):
    """The run cannot complete: a worker cannot boot, a bundle keeps failing, a crash loop."""


@dataclass
class BundleResult:
    """One bundle's committed output."""

    index: int
    outputs: list[Any]
    dead_letters: list[dict[str, Any]]


@dataclass
class _Bundle:
    index: int
    elements: list[Any]
    attempt: int = 0


class Harness:
    """Runs a pipeline on ``workers`` SDK-worker processes of ``threads`` threads each.

    ``run(pipeline)`` reads the pipeline's source and writes its sink. ``process(bundles,
    pipeline)`` is for custom runners: hand in bundles (iterables of elements), get a
    ``BundleResult`` per bundle back, in order.

    Workers are forked (the ``multiprocess`` package) and inherit the pipeline's steps as
    written; with ``pipeline_ref`` they are started as ``python -m runtime.worker`` and
    import the pipeline themselves.
    """

    def __init__(
        self,
        workers: int = 2,
        threads: int = 4,
        *,
        bundle_size: int = 256,
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
    ):
        if workers < 1 or threads < 1 or bundle_size < 1:
            raise ValueError("workers, threads and bundle_size must be at least 1")
        self.workers = workers
        self.threads = threads
        self.bundle_size = bundle_size
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
        self._stop_signal: int | None = None
        self.current: _Run | None = None

    def worker_pids(self) -> list[int]:
        """The pids of the running run's SDK workers (empty when idle)."""
        run = self.current
        return [slot.pid for slot in list(run.slots.values())] if run is not None else []

    def progress_bundles(self) -> int:
        """Bundles committed so far by the running run."""
        run = self.current
        return run.summary.bundles if run is not None else 0

    # -- the public entry points --------------------------------------------------------
    def run(self, pipeline: Pipeline) -> RunSummary:
        """Run a whole pipeline: source -> steps -> sink. Returns the run's summary."""
        if pipeline.source is None:
            raise ValueError("run() needs a pipeline that starts with a read step")
        sink = pipeline.sink or Collect()
        source = pipeline.source
        bundles = batching.batches(source.read(), batching.BatchSizer(self.bundle_size, self.bundle_size))
        run = _Run(self, pipeline, bundles, sink, total=source.count())
        return run.execute()

    def process(self, bundles: Iterable[Iterable[Any]], pipeline: Pipeline | Any) -> Iterator[BundleResult]:
        """Run the pipeline's steps over each bundle; yields results in bundle order once
        the run has finished (the run commits them in order as they complete)."""
        collected: list[BundleResult] = []

        class _Gather(Sink):
            def write(self, elements: list[Any]) -> None:  # unused: commit() sees bundles
                pass

        run = _Run(self, Pipeline.of(pipeline), (list(b) for b in bundles), _Gather(), total=None)
        run.on_commit = collected.append
        run.execute()
        return iter(collected)

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """Ask a running harness to stop (what SIGINT/SIGTERM do). Thread-safe."""
        self._stop_signal = signum


class _Run:
    """One execution: the arbiter's state and main loop."""

    def __init__(
        self,
        harness: Harness,
        pipeline: Pipeline,
        bundles: Iterator[list[Any]],
        sink: Sink,
        total: int | None,
    ):
        self.h = harness
        self.pipeline = pipeline
        self.bundles = bundles
        self.sink = sink
        self.total = total
        self.on_commit: Any = None
        self.events: queue.Queue[tuple[str, Any, Any]] = queue.Queue()
        self.slots: dict[int, WorkerSlot] = {}
        self.pending: deque[_Bundle] = deque()
        self.done: dict[int, tuple[list[Any], list[dict[str, Any]]]] = {}
        self._in_flight_elements: dict[int, list[Any]] = {}
        self.next_index = 0
        self.next_commit = 0
        self.input_exhausted = False
        self.window = harness.workers * harness.threads * 2
        self.summary = RunSummary(
            pipeline=pipeline.describe(), workers=harness.workers, threads=harness.threads
        )
        self.metrics: dict[str, InferenceMetrics] = {}
        self.failure: PipelineError | None = None
        self.restarts = 0
        self._ids = itertools.count()
        self.run_dir = tempfile.mkdtemp(prefix="beamlet-run-")
        os.chmod(self.run_dir, 0o700)
        self.control_path = os.path.join(self.run_dir, "control.sock")
        self.updates = ModelUpdateFeed(pipeline, self.events)
        self.listener: socket.socket | None = None
        self.server_path: str | None = None
        self.keeper: ServerKeeper | None = None
        self._bar: Any = None

    # -- lifecycle ----------------------------------------------------------------------
    def execute(self) -> RunSummary:
        started = time.monotonic()
        self.h.current = self
        self.h._stop_signal = None
        completed = False
        old_handlers = self._install_signal_handlers()
        try:
            self._listen()
            self._start_model_server()
            self.updates.start()
            self.sink.open()
            for _ in range(self.h.workers):
                self.spawn_worker()
            self._open_progress()
            self._loop()
            completed = self.failure is None and self.h._stop_signal is None
            if completed:
                self.sink.close()  # a signal from here on only hurries the clean-up
        finally:
            self.stop()
            self._restore_signal_handlers(old_handlers)
            self.h.current = None
            if self._bar is not None:
                self._bar.close()
        self.summary.seconds = time.monotonic() - started
        self.summary.worker_restarts = self.restarts
        self.summary.set_metrics(self.metrics)
        if self.failure is not None:
            _abort_sink(self.sink)
            raise self.failure
        if not completed and self.h._stop_signal is not None:
            _abort_sink(self.sink)
            self.summary.interrupted = signal.Signals(self.h._stop_signal).name
        return self.summary

    def _install_signal_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        old: dict[int, Any] = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, self._on_signal)
        return old

    def _restore_signal_handlers(self, old: dict[int, Any]) -> None:
        for sig, handler in old.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.h._stop_signal = signum  # the loop acts on it

    def _listen(self) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.control_path)
        os.chmod(self.control_path, 0o600)
        listener.listen(64)
        self.listener = listener
        threading.Thread(target=self._accept_loop, name="harness-accept", daemon=True).start()

    def _accept_loop(self) -> None:
        assert self.listener is not None
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            channel = ControlChannel(sock)
            threading.Thread(
                target=self._read_loop, args=(channel,), name="harness-reader", daemon=True
            ).start()

    def _read_loop(self, channel: ControlChannel) -> None:
        try:
            while True:
                message = channel.read()
                if message is None:
                    break
                self.events.put(("message", channel, message))
        except (OSError, BeamletError):
            pass
        self.events.put(("closed", channel, None))

    # -- workers --------------------------------------------------------------------------
    def spawn_worker(self) -> None:
        worker_id = next(self._ids)
        if self.h.pipeline_ref:
            process = exec_worker(
                self.control_path,
                worker_id,
                self.h.pipeline_ref,
                self.h.pipeline_args,
                self.h.threads,
                self.server_path,
            )
        else:
            process = fork_worker(
                self.control_path, worker_id, self.pipeline.steps, self.h.threads, self.server_path
            )
        self.slots[worker_id] = WorkerSlot(worker_id, process, threads=self.h.threads)
        log.info("spawned worker %d (pid %d)", worker_id, process.pid)

    def reap_workers(self) -> None:
        for slot in list(self.slots.values()):
            code = slot.exitcode()
            if code is None:
                continue
            del self.slots[slot.worker_id]
            slot.join(0)
            self._log_exit(slot, code)
            self._requeue(slot)
            if code == EXIT_BOOT_FAILED and self.failure is None:
                self.failure = PipelineError(
                    f"worker {slot.worker_id} could not boot (exit {code}); see its log"
                )
            if self.failure is None and not self._stopping():
                self.restarts += 1
                if self.restarts > self.h.max_restarts:
                    self.failure = PipelineError(
                        f"workers restarted {self.restarts} times; giving up (crash loop?)"
                    )
                else:
                    self.spawn_worker()

    def _log_exit(self, slot: WorkerSlot, code: int) -> None:
        if code < 0:
            name = signal.Signals(-code).name
            hint = " Perhaps out of memory?" if -code == signal.SIGKILL and not slot.killed_for else ""
            why = f" ({slot.killed_for})" if slot.killed_for else ""
            log.warning("worker %d (pid %d) was killed by %s%s.%s", slot.worker_id, slot.pid, name, why, hint)
        elif code != 0:
            log.warning("worker %d (pid %d) exited with code %d", slot.worker_id, slot.pid, code)
        else:
            log.info("worker %d (pid %d) exited", slot.worker_id, slot.pid)

    def _requeue(self, slot: WorkerSlot) -> None:
        for index, (attempt, _deadline) in sorted(slot.in_flight.items(), reverse=True):
            elements = self._in_flight_elements.pop(index)
            self.pending.appendleft(_Bundle(index, elements, attempt + 1))
            self.summary.bundle_retries += 1
        slot.in_flight.clear()
        if slot.channel is not None:
            slot.channel.close()

    def murder_workers(self) -> None:
        """Kill workers that hang: a bundle past its timeout, or no heartbeat."""
        now = time.monotonic()
        for slot in self.slots.values():
            if slot.killed_for:
                continue
            late = [i for i, (_a, deadline) in slot.in_flight.items() if deadline < now]
            if late:
                slot.killed_for = f"bundle {late[0]} ran past {self.h.bundle_timeout:.0f}s"
            elif slot.channel is not None and now - slot.last_seen > self.h.heartbeat_timeout:
                slot.killed_for = f"no heartbeat for {self.h.heartbeat_timeout:.0f}s"
            elif slot.channel is None and now - slot.started > self.h.heartbeat_timeout * 2:
                slot.killed_for = "never said hello"
            if slot.killed_for:
                log.warning("killing worker %d: %s", slot.worker_id, slot.killed_for)
                slot.signal(signal.SIGKILL)

    # -- the loop -------------------------------------------------------------------------
    def _stopping(self) -> bool:
        return self.h._stop_signal is not None or self.failure is not None

    def _finished(self) -> bool:
        return self.input_exhausted and not self.pending and not self._in_flight_elements and not self.done

    def _loop(self) -> None:
        while not self._finished():
            if self._stopping():
                self._drain()
                return
            self._read_input()
            self._assign()
            self._handle_events(timeout=0.05)
            self.reap_workers()
            self.murder_workers()
            self._watch_model_server()

    def _drain(self) -> None:
        """Let in-flight bundles finish (and commit) for up to grace_seconds."""
        if self.failure is not None:
            return
        log.info(
            "stopping: %d bundles in flight get %.0fs to finish",
            len(self._in_flight_elements),
            self.h.grace_seconds,
        )
        deadline = time.monotonic() + self.h.grace_seconds
        while self._in_flight_elements and time.monotonic() < deadline:
            self._handle_events(timeout=0.05)
            for slot in list(self.slots.values()):
                if slot.exitcode() is not None:
                    del self.slots[slot.worker_id]
                    self._log_exit(slot, slot.exitcode() or 0)
                    for index in slot.in_flight:
                        self._in_flight_elements.pop(index, None)
        abandoned = len(self._in_flight_elements) + len(self.pending)
        if abandoned:
            log.warning("abandoning %d uncommitted bundles", abandoned)

    def _read_input(self) -> None:
        # Completed bundles waiting for a slow predecessor count too: memory stays bounded.
        while (
            not self.input_exhausted
            and len(self.pending) + len(self._in_flight_elements) + len(self.done) < self.window
        ):
            try:
                elements = next(self.bundles)
            except StopIteration:
                self.input_exhausted = True
                return
            self.pending.append(_Bundle(self.next_index, elements))
            self.summary.elements_in += len(elements)
            self.next_index += 1

    def _assign(self) -> None:
        for slot in self.slots.values():
            while (
                self.pending
                and slot.channel is not None
                and not slot.killed_for
                and len(slot.in_flight) < slot.threads
            ):
                bundle = self.pending.popleft()
                if bundle.attempt >= self.h.max_attempts:
                    self.failure = PipelineError(
                        f"bundle {bundle.index} was lost {bundle.attempt} times with its worker"
                    )
                    return
                try:
                    slot.channel.send(
                        {
                            "op": "bundle",
                            "bundle": bundle.index,
                            "attempt": bundle.attempt,
                            "elements": bundle.elements,
                        }
                    )
                except TypeError as exc:
                    self.failure = PipelineError(f"bundle {bundle.index} cannot be sent to a worker: {exc}")
                    return
                except OSError:
                    self.pending.appendleft(bundle)
                    break  # the worker is dying; reap_workers will see it
                slot.in_flight[bundle.index] = (bundle.attempt, time.monotonic() + self.h.bundle_timeout)
                self._in_flight_elements[bundle.index] = bundle.elements

    def _handle_events(self, timeout: float) -> None:
        try:
            kind, channel, message = self.events.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            self._handle(kind, channel, message)
            try:
                kind, channel, message = self.events.get_nowait()
            except queue.Empty:
                return

    def _slot_of(self, channel: ControlChannel) -> WorkerSlot | None:
        for slot in self.slots.values():
            if slot.channel is channel:
                return slot
        return None

    def _handle(self, kind: str, channel: ControlChannel, message: Any) -> None:
        if kind == "closed":
            return  # the process exit is what counts; reap_workers handles it
        if kind == "model_update":
            self._send_update(*message)  # (step index, update)
            return
        if kind == "model_update_rejected":
            index, update, exc = message
            log.error(
                "model update %s for step %d rejected; the workers keep their version: %s", update, index, exc
            )
            self.summary.rejected_model_updates += 1
            return
        op = message.get("op")
        if op == "hello":
            slot = self.slots.get(int(message.get("worker", -1)))
            if slot is None:
                channel.close()
                return
            slot.channel = channel
            slot.threads = int(message.get("threads", slot.threads))
            slot.last_seen = time.monotonic()
            for update in self.updates.replay():  # before any bundle
                channel.send(update)
            return
        if op == "boot_failed":
            self.failure = PipelineError(
                f"worker {message.get('worker')} could not boot: {message.get('error')}\n{message.get('traceback', '')}"
            )
            return
        slot = self._slot_of(channel)
        if slot is None:
            return
        slot.last_seen = time.monotonic()
        if op == "heartbeat":
            return
        index = int(message.get("bundle", -1))
        current = slot.in_flight.get(index)
        if current is None or current[0] != message.get("attempt"):
            return  # a superseded attempt
        del slot.in_flight[index]
        elements = self._in_flight_elements.pop(index)
        if op == "result":
            self._complete(index, message)
        elif op == "bundle_failed":
            attempt = current[0] + 1
            log.warning("bundle %d failed (attempt %d): %s", index, attempt, message.get("error"))
            if attempt >= self.h.max_attempts:
                self.failure = PipelineError(
                    f"bundle {index} failed {attempt} times: {message.get('error')}\n{message.get('traceback', '')}"
                )
            else:
                self.summary.bundle_retries += 1
                self.pending.appendleft(_Bundle(index, elements, attempt))

    def _complete(self, index: int, message: dict[str, Any]) -> None:
        for label, data in (message.get("metrics") or {}).items():
            self.metrics.setdefault(label, InferenceMetrics()).merge(InferenceMetrics.from_wire(data))
        self.done[index] = (list(message.get("outputs") or []), list(message.get("dead_letters") or []))
        self.commit()

    def commit(self) -> None:
        """Write completed bundles to the sink in input order, each exactly once."""
        while self.next_commit in self.done:
            outputs, dead = self.done.pop(self.next_commit)
            self.sink.write(outputs)
            self.summary.outputs += len(outputs)
            self.summary.dead_letters.extend(dead)
            self.summary.bundles += 1
            if self.on_commit is not None:
                self.on_commit(BundleResult(self.next_commit, outputs, dead))
            if self._bar is not None:
                self._bar.update(len(outputs) + len(dead))
            self.next_commit += 1

    # -- model updates ----------------------------------------------------------------------
    def _send_update(self, index: int, update: refresh.Update) -> None:
        """Apply a checked update here and send it to every worker (runtime/updates.py)."""
        message = self.updates.apply(index, update)
        if message is None:
            return
        self.summary.model_updates += 1
        for slot in self.slots.values():
            if slot.channel is not None:
                try:
                    slot.channel.send(message)
                except OSError:
                    pass  # dying: its replacement gets the update at hello

    # -- the model server -----------------------------------------------------------------
    def _start_model_server(self) -> None:
        if not self.pipeline.needs_model_server():
            return
        paths: set[str | None] = set()
        for step in self.pipeline.inference_steps():
            handler = step.transform.handler
            if hasattr(handler, "socket_paths"):
                paths |= handler.socket_paths()
            else:
                paths.add(getattr(handler, "_socket_path", None))
        explicit = sorted(p for p in paths if p)
        self.server_path = config.socket_path(explicit[0] if explicit else self.h.socket_path)
        self.keeper = ServerKeeper(self.server_path, self.h.server_args)
        try:
            self.keeper.start()
            self.keeper.serve_versions(self.pipeline.inference_steps())
        except ServerStartFailed as exc:
            raise PipelineError(str(exc)) from None

    def _watch_model_server(self) -> None:
        if self.keeper is not None:
            try:
                self.keeper.watch()
            except ServerStartFailed as exc:
                self.failure = PipelineError(str(exc))
            self.summary.server_restarts = self.keeper.restarts

    # -- stopping -------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop workers in bounded stages, stop our model server, remove our files."""
        self.updates.stop()
        for slot in self.slots.values():
            if slot.channel is not None:
                try:
                    slot.channel.send({"op": "stop"})
                except OSError:
                    pass
            else:
                # Still booting: it holds no bundle and has no channel to be asked on; a
                # SIGTERM could land before it installs its own handlers, so SIGKILL.
                slot.killed_for = "the run ended before it booted"
                slot.signal(signal.SIGKILL)
        self._reap_until(time.monotonic() + 10)
        for slot in self.slots.values():
            slot.signal(signal.SIGTERM)
        self._reap_until(time.monotonic() + 5)
        for slot in self.slots.values():
            slot.signal(signal.SIGKILL)
        self._reap_until(time.monotonic() + 10)
        if self.listener is not None:
            self.listener.close()
        if self.keeper is not None:
            self.keeper.stop()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def _reap_until(self, deadline: float) -> None:
        while self.slots and time.monotonic() < deadline:
            for slot in list(self.slots.values()):
                code = slot.exitcode()
                if code is not None:
                    slot.join(0)
                    del self.slots[slot.worker_id]
                    if slot.channel is not None:
                        slot.channel.close()
            if self.slots:
                next(iter(self.slots.values())).join(0.05)

    def _open_progress(self) -> None:
        if not self.h.progress:
            return
        from tqdm import tqdm

        self._bar = tqdm(total=self.total, unit="el", desc="beamlet", dynamic_ncols=True, smoothing=0.1)


def _abort_sink(sink: Sink) -> None:
    abort = getattr(sink, "abort", None)
    if abort is not None:
        abort()
