"""One client connection inside the server: a reader thread and a non-blocking reply path.

The reader thread reads frames and hands each request to the server's dispatcher. When
the model is idle it runs a request itself (the batcher's low-load path), and it reloads
an evicted model on demand; a busy model only queues the request, so a slow model never
holds up other connections. Replies are written by whichever thread produced them
(usually a model's batcher) with a non-blocking send; if the client is slow to read and
the socket buffer fills, the rest goes to a writer thread started for this connection,
so a slow reader can only ever stall itself. A client that reads nothing for
``SEND_TIMEOUT`` seconds, or stalls inside a frame for ``RECV_TIMEOUT``, is dropped.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from modelserver import wire
from modelserver.errors import BeamletError, ProtocolError

log = logging.getLogger("beamlet.connection")

RECV_TIMEOUT = 30.0
SEND_TIMEOUT = 60.0


def _set_timeouts(sock: socket.socket) -> None:
    for opt, seconds in ((socket.SO_RCVTIMEO, RECV_TIMEOUT), (socket.SO_SNDTIMEO, SEND_TIMEOUT)):
        whole = int(seconds)
        sock.setsockopt(socket.SOL_SOCKET, opt, struct.pack("ll", whole, int((seconds - whole) * 1e6)))


class Connection:
    """A client connection. ``send`` is thread-safe and never blocks on a slow client."""

    def __init__(
        self,
        sock: socket.socket,
        peer_pid: int,
        dispatch: Callable[[Connection, Any], None],
        on_close: Callable[[Connection], None],
        max_body: int,
    ):
        self.sock = sock
        self.peer_pid = peer_pid
        self.max_body = max_body
        self._frames = wire.FrameReader(sock, max_body)
        self._dispatch = dispatch
        self._on_close = on_close
        self._send_lock = threading.Lock()
        self._backlog: deque[list[memoryview]] = deque()
        self._writer: threading.Thread | None = None
        self._writer_wake = threading.Condition(self._send_lock)
        self._closed = threading.Event()
        _set_timeouts(sock)
        self._reader = threading.Thread(
            target=self._read_loop, name=f"conn-{peer_pid}-{sock.fileno()}", daemon=True
        )

    def start(self) -> None:
        self._reader.start()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def send(self, message: Any) -> None:
        """Queue a reply; written now if the socket takes it, else by the writer thread."""
        if self._closed.is_set():
            return
        try:
            head, buffers = wire.encode(message)
        except (TypeError, BeamletError) as exc:
            rid = message.get("id") if isinstance(message, dict) else None
            head, buffers = wire.encode(
                {"id": rid, "ok": False, "error": {"code": "internal", "message": f"unsendable reply: {exc}"}}
            )
        parts = [memoryview(head), *buffers]
        with self._send_lock:
            if self._backlog:
                self._backlog.append(parts)
                return
            try:
                rest = self._send_nonblocking(parts)
            except OSError as exc:
                failure = f"send failed: {exc}"
            else:
                if rest:
                    self._backlog.append(rest)
                    self._start_writer()
                return
        self._fail(failure)  # after the lock: it logs

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        with self._send_lock:
            self._writer_wake.notify_all()

    def _send_nonblocking(self, parts: list[memoryview]) -> list[memoryview]:
        parts = [p for p in parts if p.nbytes]
        while parts:
            try:
                sent = self.sock.sendmsg(parts[:512], [], socket.MSG_DONTWAIT)
            except BlockingIOError:
                return parts
            parts = wire.advance(parts, sent)
        return parts

    def _start_writer(self) -> None:
        if self._writer is None:
            self._writer = threading.Thread(
                target=self._write_loop, name=f"writer-{self.peer_pid}", daemon=True
            )
            self._writer.start()
        else:
            self._writer_wake.notify()

    def _write_loop(self) -> None:
        while True:
            with self._send_lock:
                while not self._backlog and not self._closed.is_set():
                    self._writer_wake.wait()
                if self._closed.is_set():
                    return
                parts = self._backlog[0]
            try:
                # Blocking send outside the lock, so producers can keep appending; the
                # kernel's SO_SNDTIMEO bounds how long a client that reads nothing holds us.
                wire.sendmsg_all(self.sock, parts)
            except OSError as exc:
                self._fail(f"client stopped reading ({exc})")
                return
            with self._send_lock:
                self._backlog.popleft()

    def _read_loop(self) -> None:
        try:
            while not self._closed.is_set():
                try:
                    message = self._frames.read()
                except ProtocolError as exc:
                    log.warning("closing connection from pid %d: %s", self.peer_pid, exc)
                    self._send_final_error(exc)
                    return
                except OSError as exc:
                    if not self._closed.is_set():
                        log.debug("connection from pid %d failed: %s", self.peer_pid, exc)
                    return
                if message is None:
                    return
                self._dispatch(self, message)
        finally:
            self.close()
            self._on_close(self)

    def _send_final_error(self, exc: BeamletError) -> None:
        """Tell the client why its connection is about to close, if it still listens."""
        try:
            head, buffers = wire.encode({"id": None, "ok": False, "error": exc.to_wire()})
            with self._send_lock:
                self._send_nonblocking([memoryview(head), *buffers])
        except OSError:
            pass

    def _fail(self, why: str) -> None:
        log.warning("dropping connection from pid %d: %s", self.peer_pid, why)
        self._closed.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
