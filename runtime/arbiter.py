"""A run's arbiter: one execution of a pipeline by the harness (``Harness``).

The arbiter works in gunicorn's manner. Its main loop (one thread) owns all the state;
reader threads only turn each worker's control frames into events on a queue, and
signal handlers only set a flag. Each turn of the loop it reads more input into bundles,
hands bundles to workers with free threads, handles events (results, failures,
heartbeats), reaps dead workers and spawns replacements, kills workers that hang, and
watches the model server. Where each bundle is, and what may be committed, is the
ledger's business (runtime/ledger.py); the loop only tells it what happened.

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

import logging
import os
import queue
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from client import refresh
from client.inference import InferenceMetrics
from modelserver import config
from modelserver.exposition import MetricsError
from runtime import computethreads, devices, rows, startup
from runtime.checkpoint import Checkpoint
from runtime.control import EXIT_BOOT_FAILED, ControlChannel, ControlListener
from runtime.errors import CannotStart, PipelineError
from runtime.ledger import BundleExhausted, BundleLedger
from runtime.pipeline import Pipeline, Sink, SourceBundle
from runtime.reader import END, InputReader, ReadFailed
from runtime.serverkeeper import ServerKeeper, ServerStartFailed, server_path_for
from runtime.summary import RunSummary
from runtime.updates import ModelUpdateFeed
from runtime.workerpool import WorkerPool
from runtime.workerslot import WorkerSlot
from runtime.zygote import Zygote, ZygoteLost

if TYPE_CHECKING:
    from runtime.harness import Harness

log = logging.getLogger("beamlet.harness")


@dataclass
class BundleResult:
    """One bundle's committed output."""

    index: int
    outputs: list[Any]
    dead_letters: list[dict[str, Any]]


class Run:
    """One execution: the arbiter's main loop, wiring events to the ledger and workers."""

    def __init__(
        self,
        harness: Harness,
        pipeline: Pipeline,
        bundles: Iterator[Sequence[Any] | np.ndarray | SourceBundle],
        sink: Sink,
        total: int | None,
    ):
        self.h = harness
        self.pipeline = pipeline
        try:
            # grouping steps (CountPerKey, CombinePerKey) and what follows them run here
            self.worker_steps, self.harness_steps = pipeline.split()
        except ValueError as exc:
            raise CannotStart(str(exc)) from None
        devices.check_hints(pipeline.steps)  # CannotStart: the machine lacks what a step hints
        # per-worker CUDA_VISIBLE_DEVICES (round-robin), when workers keep a GPU model themselves
        self.gpu_plan = devices.worker_gpus(self.worker_steps, harness.workers)
        self.worker_gpu: dict[int, int] = {}  # worker id -> its place in gpu_plan
        self._advanced = 0.0
        self.sink = sink
        self.total = total
        self.on_commit: Any = None  # called with (BundleResult, ack) as each bundle commits
        self.events: queue.Queue[tuple[str, Any, Any]] = queue.Queue()
        self.reader = InputReader(
            bundles, harness.workers * harness.threads, lambda: self.events.put(("input", None, None))
        )
        self.ledger = BundleLedger(
            harness.workers * harness.threads * 2, harness.max_attempts, harness.bundle_timeout
        )
        self.summary = RunSummary(
            pipeline=pipeline.describe(),
            workers=harness.workers,
            threads=harness.threads,
            unbounded=bool(pipeline.source is not None and pipeline.source.unbounded),
        )
        self._latency_shown = 0.0
        self.checkpoint: Checkpoint | None = None
        self.metrics: dict[str, InferenceMetrics] = {}
        self.stats_lock = threading.Lock()  # metrics, commits' counts: the loop adds, scrapes copy
        self.failure: PipelineError | None = None
        self.restarts = 0
        self.env: dict[str, str] = {config.DETERMINISTIC_ENV: "1"} if harness.deterministic else {}
        self.run_dir: str | None = None
        self.zygote: Zygote | None = None
        compute = computethreads.for_workers(
            pipeline.steps, harness.workers, computethreads.process_threads()
        )
        self.pool = WorkerPool(
            "", harness.threads, compute, None, harness.pipeline_ref, harness.pipeline_args
        )
        self.updates = ModelUpdateFeed(pipeline, self.events)
        self.listener: ControlListener | None = None
        self.server_path: str | None = None
        self.keeper: ServerKeeper | None = None
        self._bar: Any = None
        self.started = time.monotonic()

    # -- lifecycle ----------------------------------------------------------------------
    def execute(self) -> RunSummary:
        """Start, run to the end of the input (or a stop), finish; the summary."""
        old_handlers = self._install_signal_handlers()
        try:
            self.start()
            return self.finish(self.loop())
        finally:
            self._restore_signal_handlers(old_handlers)

    def start(self) -> None:
        """Start the run's processes (the zygote first, before this run starts a thread),
        its model server and its workers; then its input reader. Raises, with everything
        stopped again, when it cannot start."""
        self.started = time.monotonic()
        self.h.current = self
        self.h._stop_signal = None
        try:
            if self.h.pipeline_ref is None:
                # First: before this run starts a thread or opens a socket or a file.
                self.zygote = self.pool.zygote = Zygote(self.worker_steps)
            self._serve_metrics()
            self.run_dir = tempfile.mkdtemp(prefix="beamlet-run-")
            os.chmod(self.run_dir, 0o700)
            self.pool.control_path = os.path.join(self.run_dir, "control.sock")
            self.listener = ControlListener(self.pool.control_path, self.events)
            self._start_model_server()
            self.updates.start()
            if self.checkpoint is not None and self.summary.resumed_bundles:
                self.checkpoint.resume_sink()
            else:
                self.sink.open()
            log.info(
                "workers compute with %s torch threads: %s",
                self.pool.compute.intra_op or "torch's",
                self.pool.compute.why,
            )
            for _ in range(self.h.workers):
                self.spawn_worker()
            self._model_server_ready()
            self._open_progress()
            self.reader.start()
        except BaseException:
            self.finish(False)
            raise

    def loop(self) -> bool:
        """Run until the input ends (or a stop); whether the sink may be closed as
        complete: the input ended, or an unbounded input was stopped cleanly."""
        completed = False
        try:
            self._loop()
            stopped = self.h._stop_signal is not None
            if self.failure is None and (not stopped or self.summary.unbounded):
                if self.harness_steps:  # the end of the input (or a drain): every open window
                    self._write(*self.harness_steps.finish())
                self.sink.close()  # a signal from here on only hurries the clean-up
                completed = True
                if self.checkpoint is not None:
                    self.checkpoint.done()
        except BaseException:
            self.finish(False)
            raise
        return completed

    def finish(self, completed: bool) -> RunSummary:
        """Stop everything, close or abort the sink; the summary (raises the run's failure)."""
        try:
            self.reader.stop()
            self.stop()
            if self.pipeline.source is not None:
                try:
                    self.pipeline.source.close()
                except Exception:
                    log.warning("closing the source failed", exc_info=True)
        finally:
            self.h.current = None
            if self.h.metrics is not None:
                self.h.metrics.stop()
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            if not completed:  # failed, stopped, or an error of our own: no half output
                _abort_sink(self.sink, keep=self.checkpoint is not None)
        self.summary.seconds = time.monotonic() - self.started
        self.summary.worker_restarts = self.restarts
        self.summary.bundle_retries = self.ledger.retries
        self.summary.set_metrics(self.metrics)
        if self.failure is not None:
            raise self.failure
        if self.h._stop_signal is not None and (not completed or self.summary.unbounded):
            self.summary.interrupted = signal.Signals(self.h._stop_signal).name
        return self.summary

    def _serve_metrics(self) -> None:
        """Serve the run's Prometheus metrics (after the zygote: a thread of its own)."""
        if self.h.metrics is None:
            return
        from runtime.metrics import RunCollector

        try:
            self.h.metrics.start(RunCollector(self))
        except MetricsError as exc:
            raise CannotStart(str(exc)) from None

    def _fail(self, message: str) -> None:
        if self.failure is None:  # the first reason is the one to report
            self.failure = PipelineError(message)

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

    # -- workers --------------------------------------------------------------------------
    def spawn_worker(self) -> None:
        env = dict(self.env)
        if self.server_path:
            env[config.SOCKET_ENV] = self.server_path
        place = self._free_gpu_place()
        if place is not None:
            env[devices.VISIBLE_ENV] = self.gpu_plan[place]
        try:
            slot = self.pool.spawn(env)
        except ZygoteLost as exc:
            self._fail(str(exc))
            return
        if place is not None:
            self.worker_gpu[slot.worker_id] = place

    def _free_gpu_place(self) -> int | None:
        """The place in ``gpu_plan`` no live worker holds (a replacement takes the GPU of
        the worker it replaces); None without a plan."""
        if not self.gpu_plan:
            return None
        held = {p for w, p in self.worker_gpu.items() if w in self.pool.slots}
        return next((i for i in range(len(self.gpu_plan)) if i not in held), 0)

    def reap_workers(self) -> None:
        """Re-run the bundles of each worker that ended, and replace it (restart policy)."""
        if self.zygote is not None and self.zygote.lost:
            self._fail(self.zygote.lost)
        for slot, code, end in self.pool.reap():
            try:
                self.ledger.lose(slot.worker_id, end)
            except BundleExhausted as exc:
                self._fail(str(exc))
            if code == EXIT_BOOT_FAILED:
                self._fail(f"worker {slot.worker_id} could not boot (exit {code}); see its log")
            if self.failure is None and not self._stopping():
                self.restarts += 1
                if self.restarts > self.h.max_restarts:
                    self._fail(f"workers restarted {self.restarts} times; giving up (crash loop?)")
                else:
                    self.spawn_worker()

    def murder_workers(self) -> None:
        """Kill workers that hang: a bundle past its timeout, or no heartbeat."""
        now = time.monotonic()
        for worker, index in self.ledger.overdue(now):
            self.ledger.time_out(index)
            slot = self.pool.slots.get(worker)
            if slot is not None and not slot.killed_for:
                self.pool.kill(slot, f"bundle {index} ran past {self.h.bundle_timeout:g}s")
        self.pool.kill_silent(now, self.h.heartbeat_timeout)

    # -- the loop -------------------------------------------------------------------------
    def _stopping(self) -> bool:
        return self.h._stop_signal is not None or self.failure is not None

    def _loop(self) -> None:
        while not self.ledger.finished():
            if self._stopping():
                self._drain()
                return
            self._read_input()
            self._assign()
            self._handle_events(timeout=0.05)
            self._advance_windows()
            self.reap_workers()
            self.murder_workers()
            self._watch_model_server()

    def _drain(self) -> None:
        """Let in-flight bundles finish (and commit) for up to grace_seconds."""
        if self.failure is not None:
            return
        log.info(
            "stopping: %d bundles in flight get %.0fs to finish",
            len(self.ledger.running),
            self.h.grace_seconds,
        )
        deadline = time.monotonic() + self.h.grace_seconds
        while self.ledger.running and time.monotonic() < deadline:
            self._handle_events(timeout=0.05)
            for slot, _code, _end in self.pool.reap():
                self.ledger.abandon(slot.worker_id)
        abandoned = self.ledger.uncommitted()
        if abandoned:
            log.warning("abandoning %d uncommitted bundles", abandoned)

    def _read_input(self) -> None:
        while self.ledger.has_room():
            bundle = self.reader.take()
            if bundle is None:
                return
            if bundle is END:
                self.ledger.end_of_input()
                return
            if isinstance(bundle, ReadFailed):
                exc = bundle.exc
                self._fail(f"reading the input failed: {type(exc).__name__}: {exc}")
                return
            if isinstance(bundle, SourceBundle):
                if bundle.ack is None and not len(bundle.elements):
                    continue  # an unbounded source with nothing new: it only lets us look up
                self.ledger.admit(bundle.elements, bundle.ack, bundle.arrived)
                self.summary.elements_in += len(bundle.elements)
            else:
                self.ledger.admit(bundle)
                self.summary.elements_in += len(bundle)

    def _assign(self) -> None:
        for slot in self.pool.slots.values():
            if slot.channel is None or slot.killed_for:
                continue
            while self.ledger.running_on(slot.worker_id) < slot.threads:
                bundle = self.ledger.take()
                if bundle is None:
                    return
                message = {
                    "op": "bundle",
                    "bundle": bundle.index,
                    "attempt": bundle.attempt,
                    "elements": rows.pack(bundle.elements),
                }
                try:
                    slot.channel.send(message)
                except TypeError as exc:
                    self.ledger.put_back(bundle)
                    self._fail(f"bundle {bundle.index} cannot be sent to a worker: {exc}")
                    return
                except OSError:
                    self.ledger.put_back(bundle)
                    break  # the worker is dying; reap_workers will see it
                self.ledger.assign(bundle, slot.worker_id, time.monotonic())

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

    def _handle(self, kind: str, channel: ControlChannel, message: Any) -> None:
        if kind in ("closed", "input"):
            return  # closed: the process exit is what counts (reap_workers); input: the loop reads it
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
            self._hello(channel, message)
            return
        if op == "boot_failed":
            self._fail(
                f"worker {message.get('worker')} could not boot: {message.get('error')}\n{message.get('traceback', '')}"
            )
            return
        slot = self.pool.of_channel(channel)
        if slot is None:
            return
        slot.last_seen = time.monotonic()
        if op == "result":
            self._complete(slot, message)
        elif op == "bundle_failed":
            self._bundle_failed(slot, message)
        elif op != "heartbeat":
            log.warning("worker %d sent an unknown control message %r; ignored", slot.worker_id, op)

    def _hello(self, channel: ControlChannel, message: dict[str, Any]) -> None:
        """A worker has booted: replay the run's model updates to it, before any bundle."""
        slot = self.pool.slots.get(int(message.get("worker", -1)))
        if slot is None:
            channel.close()
            return
        try:
            for update in self.updates.replay():
                channel.send(update)
        except OSError as exc:
            # Dead already (it cannot take a bundle): kill what may be left of it, and
            # reap_workers replaces it like any worker that dies.
            channel.close()
            self.pool.kill(
                slot, f"its control connection broke at hello, while model updates were replayed: {exc}"
            )
            return
        slot.channel = channel
        slot.threads = int(message.get("threads", slot.threads))
        slot.last_seen = time.monotonic()
        startup.step(
            f"worker {slot.worker_id}",
            slot.last_seen - slot.started,
            f"from spawn to hello; pid {slot.pid}, {slot.start_method}",
        )

    def _complete(self, slot: WorkerSlot, message: dict[str, Any]) -> None:
        index = int(message.get("bundle", -1))
        outputs = rows.unpack(message.get("outputs") or [])
        dead = list(message.get("dead_letters") or [])
        if not self.ledger.complete(slot.worker_id, index, message.get("attempt"), outputs, dead):
            return  # a superseded attempt
        bundle_metrics = [
            (k, InferenceMetrics.from_wire(v)) for k, v in (message.get("metrics") or {}).items()
        ]
        with self.stats_lock:
            for label, m in bundle_metrics:
                self.metrics.setdefault(label, InferenceMetrics()).merge(m)
        self.commit()

    def _bundle_failed(self, slot: WorkerSlot, message: dict[str, Any]) -> None:
        index, error = int(message.get("bundle", -1)), message.get("error")
        try:
            if self.ledger.fail(slot.worker_id, index, message.get("attempt"), str(error)):
                log.warning(
                    "bundle %d failed (attempt %d): %s", index, int(message.get("attempt", 0)) + 1, error
                )
        except BundleExhausted as exc:
            self._fail(f"{exc}\n{message.get('traceback', '')}")

    def commit(self) -> None:
        """Write completed bundles to the sink in input order, each exactly once, with
        their dead letters, and acknowledge their input."""
        for index, outputs, dead, ack, arrived in self.ledger.commit():
            if self.harness_steps:
                outputs, more = self.harness_steps.process(outputs, arrived)
                dead = dead + more
            self.sink.commit(outputs, dead, [ack] if ack is not None else [], self.pipeline.source)
            with self.stats_lock:  # a metrics scrape sees whole bundles
                self._count(outputs, dead)
                self.summary.bundles += 1
                if arrived is not None:
                    self.summary.latency.add(time.time() - arrived, len(outputs) + len(dead))
            if self.checkpoint is not None:
                self.checkpoint.record(self.summary.resumed_bundles + self.summary.bundles)
            if self.summary.bundles == 1:
                startup.step(
                    "first bundle committed",
                    startup.process_age(),
                    f"after the process started; {time.monotonic() - self.started:.2f}s after the run started",
                )
            if self.on_commit is not None:
                self.on_commit(BundleResult(index, outputs, dead), ack)
            if self._bar is not None:
                self._bar.update(len(outputs) + len(dead))
                self._show_latency()

    def _write(self, outputs: list[Any], dead: list[dict[str, Any]]) -> None:
        """Outputs of the harness's own steps that belong to no bundle (windows closed by
        time or by the end of the input)."""
        if outputs or dead:
            self.sink.commit(outputs, dead, [], None)
            with self.stats_lock:
                self._count(outputs, dead)

    def _count(self, outputs: list[Any], dead: list[dict[str, Any]]) -> None:
        """Under ``stats_lock``: committed outputs and dead letters, in the summary."""
        self.summary.outputs += len(outputs)
        self.summary.add_dead_letters(dead)

    def _advance_windows(self) -> None:
        """On a stream windowed by arrival time, close the windows whose end has passed
        even when nothing arrives (at most once a second)."""
        now = time.time()
        if not self.harness_steps or not self.summary.unbounded or now - self._advanced < 1.0:
            return
        grouping = self.harness_steps.grouping
        if grouping is None or grouping.timestamp_fn is not None:
            return  # event time comes from the elements: only they move the watermark
        self._advanced = now
        self._write(*self.harness_steps.advance(now))

    def _show_latency(self) -> None:
        """The progress line's end-to-end latency, at most once a second."""
        now = time.monotonic()
        if self._bar is None or not self.summary.latency or now - self._latency_shown < 1.0:
            return
        self._latency_shown = now
        lat = self.summary.latency
        self._bar.set_postfix_str(
            f"latency p50 {lat.percentile(50) * 1000:.0f} ms p99 {lat.percentile(99) * 1000:.0f} ms",
            refresh=False,
        )

    # -- model updates ----------------------------------------------------------------------
    def _send_update(self, index: int, update: refresh.Update) -> None:
        """Apply a checked update here and send it to every worker (runtime/updates.py)."""
        message = self.updates.apply(index, update)
        if message is None:
            return
        self.summary.model_updates += 1
        for slot in self.pool.slots.values():
            if slot.channel is not None:
                try:
                    slot.channel.send(message)
                except OSError:
                    pass  # dying: its replacement gets the update at hello

    # -- the model server -----------------------------------------------------------------
    def _start_model_server(self) -> None:
        if not self.pipeline.needs_model_server():
            return
        self.server_path = server_path_for(self.pipeline.inference_steps(), self.h.socket_path)
        self.keeper = ServerKeeper(self.server_path, self.h.server_args, self.env, self.zygote)
        try:
            self.keeper.start()
            if not self.keeper.owned:  # it may serve another version: before a worker attaches
                self.keeper.serve_versions(self.pipeline.inference_steps())
        except ServerStartFailed as exc:
            raise PipelineError(str(exc)) from None

    def _model_server_ready(self) -> None:
        """Once the workers are starting: wait for the server this run started (it
        started at the same time) and make it serve the run's versions."""
        if self.keeper is None or not self.keeper.owned:
            return
        try:
            self.keeper.wait_until_serving()
            self.keeper.serve_versions(self.pipeline.inference_steps())
        except ServerStartFailed as exc:
            raise PipelineError(str(exc)) from None

    def _watch_model_server(self) -> None:
        if self.keeper is not None:
            try:
                self.keeper.watch()
            except ServerStartFailed as exc:
                self._fail(str(exc))
            self.summary.server_restarts = self.keeper.restarts

    # -- stopping -------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop workers in bounded stages, stop our model server, remove our files."""
        began = time.monotonic()
        self.updates.stop()
        self.pool.stop()
        workers = time.monotonic()
        if self.listener is not None:
            self.listener.close()
        if self.keeper is not None:
            self.keeper.stop()
        if self.zygote is not None:
            self.zygote.close()
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        log.info(
            "stopped in %.2fs: workers %.2fs, then the rest (model server, files) %.2fs",
            time.monotonic() - began,
            workers - began,
            time.monotonic() - workers,
        )

    def _open_progress(self) -> None:
        if not self.h.progress:
            return
        from tqdm import tqdm

        self._bar = tqdm(total=self.total, unit="el", desc="beamlet", dynamic_ncols=True, smoothing=0.1)


def _abort_sink(sink: Sink, keep: bool = False) -> None:
    """Remove a failed run's partial output (``keep``: leave it for a resume)."""
    abort = getattr(sink, "abort", None)
    if abort is not None:
        if keep:
            abort(keep=True)
        else:
            abort()
