"""The per-machine model server: accepts clients on a Unix socket and runs their models.

Lifecycle: ``bind()`` takes the server lock and the socket (or raises ``AlreadyRunning``),
``serve_forever()`` accepts until ``stop()`` is asked for (a signal, a shutdown request,
or ``idle_timeout`` seconds with no client), then the server stops in stages: close the
listener and remove the socket file, close client connections, let every model finish
its queued batches, release the lock.

One server per socket path: the lock is ``modelserver.startlock``, an flock on
``<socket>.lock`` in the socket's private directory, held for the server's whole life
(handed over by the client that spawned it, or taken here). The kernel releases it when
the process dies, however it dies, so a stale socket file left by a killed server is
recognised and replaced, and two servers racing to start end with one.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import threading
import time
import weakref
from typing import Any

import psutil

from modelserver import config, loaders, memory, protocol, serverlog, wire
from modelserver.batcher import Compute, Work
from modelserver.connection import DEFAULT_MAX_BACKLOG, HEARTBEAT_INTERVAL, Connection
from modelserver.errors import BadRequest, BeamletError, InternalError
from modelserver.exposition import MetricsEndpoint
from modelserver.manager import ModelManager
from modelserver.startlock import StartLock, lock_path

log = logging.getLogger("beamlet.server")

EXIT_ALREADY_RUNNING = 3


class AlreadyRunning(RuntimeError):
    """Another live server owns this socket path."""


class ModelServer:
    """Serves models to clients on one Unix socket. Build, ``bind()``, ``serve_forever()``."""

    def __init__(
        self,
        socket_path: str | None = None,
        *,
        memory_budget: int | None = None,
        max_frame_bytes: int = wire.DEFAULT_MAX_BODY,
        idle_timeout: float | None = None,
        max_reply_backlog: int = DEFAULT_MAX_BACKLOG,
        heartbeat: float = HEARTBEAT_INTERVAL,
        record_metrics: bool = True,
        metrics: MetricsEndpoint | None = None,
        **manager_options: Any,
    ):
        """``memory_budget``: host bytes for models (None: no limit). ``max_reply_backlog``:
        reply bytes a client may leave unread before its connection stops reading requests.
        ``heartbeat``: seconds of silence after which a connection with requests in flight
        gets a heartbeat (0: none). ``record_metrics``: record each request's stage times
        (sent with its reply) and each model's histograms (False: ``serve --no-metrics``).
        ``metrics``: a Prometheus endpoint to serve while the server is bound
        (``modelserver.metrics``).
        ``manager_options`` go to ModelManager (gpu_fraction, load_wait, policy,
        min_free_bytes, limits, deterministic)."""
        self.socket_path = config.socket_path(socket_path)
        self.max_frame_bytes = max_frame_bytes
        self.max_reply_backlog = max_reply_backlog
        self.idle_timeout = idle_timeout
        self.heartbeat = heartbeat
        self.record_metrics = record_metrics
        memory.fix_mmap_threshold()
        self.manager = ModelManager(memory_budget, **manager_options)
        self.started = time.time()
        self._start_lock: StartLock | None = None
        self._listener: socket.socket | None = None
        self._connections: set[Connection] = set()
        self._conn_lock = threading.Lock()
        self._last_activity = time.monotonic()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self.metrics = metrics
        self._counts_lock = threading.Lock()  # the counters below: reader threads add to them
        self._requests = 0
        self._rejected_peers = 0

    # -- lifecycle -------------------------------------------------------------------
    def bind(self) -> None:
        """Take the server lock and listen on the socket path."""
        lock = StartLock.inherited(self.socket_path) or StartLock.try_acquire(self.socket_path)
        if lock is None:
            raise AlreadyRunning(
                f"a model server already serves {self.socket_path} (or is starting: "
                f"another process holds {lock_path(self.socket_path)})"
            )
        self._start_lock = lock
        try:
            if os.path.exists(self.socket_path):
                log.info("removing stale socket %s", self.socket_path)
                os.unlink(self.socket_path)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old_umask = os.umask(0o177)
            try:
                listener.bind(self.socket_path)
            finally:
                os.umask(old_umask)
            os.chmod(self.socket_path, 0o600)
            listener.listen(128)
            self._listener = listener
        except BaseException:
            self._release()
            raise
        if self.metrics is not None:
            from modelserver.metrics import ServerCollector

            try:
                self.metrics.start(ServerCollector(self.status))
            except BaseException:
                self._unbind()
                self._release()
                raise
        log.info(
            "model server pid %d listening on %s (budget %s)",
            os.getpid(),
            self.socket_path,
            config.format_size(self.manager.budget_bytes) if self.manager.budget_bytes else "none",
        )

    def warm_up(self, threads: int | None = None, compute_threads: int | None = None) -> None:
        """Import torch and run one tiny op before serving, so the first model's measured
        footprint is the model's and not torch's own start-up allocations; then freeze
        the collector's view of everything that exists so far. ``threads``: the intra-op
        threads all of a CPU model's forwards share (None: torch's default, one per core
        this process may use); ``compute_threads``: how many forwards of one CPU model
        may run at once (None: as many as ``threads``). See ``batcher.Compute``."""
        import gc

        import torch

        if threads is not None:
            torch.set_num_threads(threads)
        cores = torch.get_num_threads()
        self.manager.compute = Compute(compute_threads or cores, cores)
        log.info(
            "CPU forward passes share %d intra-op threads, at most %d forwards of a model at once",
            cores,
            self.manager.compute.threads,
        )

        memory.Nvml.module()  # NVML's one-time set-up (and its note) now, outside any lock
        if self.manager.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        with torch.inference_mode():
            torch.nn.Linear(4, 4)(torch.zeros(2, 4))
        # Everything alive now (torch's own hundreds of thousands of objects) lives as long
        # as the server: keep it out of the collections the manager runs after evictions,
        # which would otherwise cost ~80 ms each.
        gc.freeze()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT only wake the accept loop; the loop stops the server."""
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._stopping.set()

    def serve_forever(self) -> None:
        if self._listener is None:
            self.bind()
        assert self._listener is not None
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ, "accept")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self._stopping.is_set():
                for key, _ in sel.select(timeout=min(1.0, self.heartbeat / 2) if self.heartbeat else 1.0):
                    if key.data == "accept":
                        self._accept()
                    else:
                        os.read(self._wake_r, 4096)
                self._heartbeat()
                if self._idle_expired():
                    log.info("no clients for %.0fs; stopping", self.idle_timeout)
                    break
        finally:
            sel.close()
            self._shutdown()

    def stop(self) -> None:
        """Ask the accept loop to stop (thread-safe, returns at once)."""
        self._stopping.set()
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def wait_stopped(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    def _idle_expired(self) -> bool:
        if not self.idle_timeout:
            return False
        with self._conn_lock:
            if self._connections:
                return False
            return time.monotonic() - self._last_activity > self.idle_timeout

    def _shutdown(self) -> None:
        log.info("stopping: closing the listener and %d connections", len(self._connections))
        self._unbind()
        if self.metrics is not None:
            self.metrics.stop()
        with self._conn_lock:
            conns = list(self._connections)
        for conn in conns:
            conn.close()
        self.manager.close()
        self._release()
        self._stopped.set()
        log.info("model server stopped")

    def _unbind(self) -> None:
        """Close the listener and remove the socket file."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass

    def _release(self) -> None:
        if self._start_lock is not None:
            self._start_lock.release()
            self._start_lock = None
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1

    # -- connections -----------------------------------------------------------------
    def _accept(self) -> None:
        assert self._listener is not None
        try:
            sock, _ = self._listener.accept()
        except OSError:
            return
        pid, uid, _gid = wire.peer_credentials(sock)
        if uid != os.geteuid():
            self._rejected_peers += 1
            log.warning("refusing a connection from pid %d: uid %d is not ours", pid, uid)
            sock.close()
            return
        conn = Connection(
            sock, pid, self._dispatch, self._forget, self.max_frame_bytes, self.max_reply_backlog
        )
        with self._conn_lock:
            self._connections.add(conn)
            self._last_activity = time.monotonic()
        conn.start()

    def _heartbeat(self) -> None:
        """Tell each client with requests in flight that we are alive (see connection.py)."""
        if not self.heartbeat:
            return
        now = time.monotonic()
        with self._conn_lock:
            conns = list(self._connections)
        for conn in conns:
            conn.heartbeat(now, self.heartbeat)

    def _forget(self, conn: Connection) -> None:
        with self._conn_lock:
            self._connections.discard(conn)
            self._last_activity = time.monotonic()
        try:
            conn.sock.close()
        except OSError:
            pass

    # -- requests --------------------------------------------------------------------
    def _dispatch(self, conn: Connection, message: Any) -> None:
        """Handle one request on the connection's reader thread, never waiting on a model."""
        with self._counts_lock:
            self._requests += 1
        try:
            request = protocol.parse_request(message)
        except BadRequest as exc:
            conn.send(protocol.error_reply(protocol.request_id(message), exc))
            return
        try:
            if isinstance(request, protocol.Infer):
                self._infer(conn, request)
            elif isinstance(request, protocol.Load):
                self._load(conn, request)
            elif isinstance(request, protocol.Hello):
                conn.send(
                    protocol.ok_reply(
                        request.id,
                        version=wire.VERSION,
                        server_pid=os.getpid(),
                        max_frame_bytes=self.max_frame_bytes,
                    )
                )
            elif isinstance(request, protocol.ShmAttach):
                conn.attach_shm(request.id, request.request_bytes, request.reply_bytes, self.max_frame_bytes)
            elif isinstance(request, protocol.Status):
                conn.send(protocol.ok_reply(request.id, status=self.status()))
            elif isinstance(request, protocol.Shutdown):
                conn.send(protocol.ok_reply(request.id))
                self.stop()
        except BeamletError as exc:
            conn.send(protocol.error_reply(request.id, exc))
        except Exception as exc:
            log.exception("request %r failed", message.get("op"))
            conn.send(protocol.error_reply(request.id, InternalError(f"{type(exc).__name__}: {exc}")))

    def _infer(self, conn: Connection, request: protocol.Infer) -> None:
        rid = request.id
        # The reply reads the model_id the batcher stamps on the work through a weak
        # reference: a work -> reply -> work cycle would keep a refused request's inputs
        # alive until the next garbage collection, and a flood of them would pile up.
        this: list[weakref.ref[Work]] = []

        def reply(outputs: Any, error: BeamletError | None) -> None:
            if error is not None:
                conn.send(protocol.error_reply(rid, error))
                return
            work = this[0]()
            message = protocol.ok_reply(rid, outputs=outputs, model_id=work.model_id if work else "")
            conn.send(message, stages=work.stages if work is not None else None)

        work = Work(
            request.inputs, request.kwargs, reply, request.method, caller=id(conn), timed=self.record_metrics
        )
        this.append(weakref.ref(work))
        self.manager.submit(request.key, work)  # queues, runs now, or waits for a reload: never loads here

    def _load(self, conn: Connection, request: protocol.Load) -> None:
        # Loading can take long: do it off the reader thread so this connection's other
        # requests keep flowing.
        spec = loaders.ModelSpec.from_wire(request.spec)

        def run() -> None:
            try:
                slot = self.manager.register(
                    request.key,
                    spec,
                    replace=request.replace,
                    batching=request.batching,
                    sequence=request.sequence,
                    copies=request.copies,
                )
                served = slot.sequence
                conn.send(
                    protocol.ok_reply(
                        request.id,
                        **slot.info,
                        sequence=list(served) if served is not None else None,
                        # a swap left another version serving: refused, older than it
                        stale=request.replace and slot.spec != spec,
                    )
                )
            except BeamletError as exc:
                conn.send(protocol.error_reply(request.id, exc))
            except Exception as exc:
                log.exception("load of %s failed", request.key)
                conn.send(protocol.error_reply(request.id, InternalError(f"{type(exc).__name__}: {exc}")))

        threading.Thread(target=run, name=f"load-{request.key}", daemon=True).start()

    def status(self) -> dict[str, Any]:
        proc = psutil.Process()
        with self._conn_lock:
            conns = list(self._connections)
        clients = sorted({c.peer_pid for c in conns})
        shm_bytes = [c.shm_bytes for c in conns]
        limits = self.manager.limits
        models = self.manager.status()
        return {
            "pid": os.getpid(),
            "socket": self.socket_path,
            "uptime_seconds": round(time.time() - self.started, 3),
            "rss": proc.memory_info().rss,
            "memory_budget": self.manager.budget_bytes,
            "loaded_bytes": self.manager.loaded_bytes(),
            "eviction_policy": self.manager.policy_name,
            "load_wait_seconds": self.manager.load_wait,
            "pressure_evictions": self.manager.pressure_evictions,
            "waiting_loads": self.manager.waiting_loads,
            "retiring_versions": self.manager.retiring,
            "devices": self.manager.devices(),
            "max_frame_bytes": self.max_frame_bytes,
            "deterministic": self.manager.deterministic,
            "metrics": self.record_metrics,
            "max_queue_rows": limits.rows,
            "max_queue_bytes": limits.nbytes,
            "max_reply_backlog": self.max_reply_backlog,
            "reply_backlog_bytes": sum(c.backlog_bytes for c in conns),
            "shm_connections": sum(1 for shm in shm_bytes if shm is not None),
            "shm_reply_bytes": sum(shm for shm in shm_bytes if shm is not None),
            "connections": len(conns),
            "client_pids": clients,
            "requests": self._requests,
            # every refusal counts in its model's totals, which last as long as the server
            "overloaded": sum(m["overloaded"] for m in models),
            "rejected_peers": self._rejected_peers,
            "metrics_address": self.metrics.address if self.metrics is not None else None,
            "log_records_dropped": serverlog.dropped(),
            "models": models,
        }
