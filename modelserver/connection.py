"""One client connection inside the server: a reader thread and a non-blocking reply path.

The reader thread reads frames and hands each request to the server's dispatcher. When
the model is idle it runs a request itself (the batcher's low-load path); a busy model
only queues the request, and an evicted one is reloaded on another thread, so neither a
slow model nor a slow load holds up this connection's other requests. Replies are
written by whichever thread produced them (usually a model's batcher) with a
non-blocking send; if the client is slow to read and the socket buffer fills, the rest
goes to a writer thread started for this connection, so a slow reader can only ever
stall itself. A client that reads nothing for ``SEND_TIMEOUT`` seconds, or stalls inside
a frame for ``RECV_TIMEOUT``, is dropped.

The replies waiting for a slow reader (the backlog) are bounded: while they hold more
than ``max_backlog`` bytes the reader thread reads no further requests from that client
(its sends then block in its own socket), so the backlog grows at most by the replies
to requests already taken. A client that does not read them within ``SEND_TIMEOUT`` is
dropped.

While a client has requests in flight (taken, not yet answered), the server sends it a
heartbeat frame (``{"id": None, "ok": True, "heartbeat": True}``) whenever it has sent it
nothing for ``HEARTBEAT_INTERVAL`` seconds (``heartbeat``, called from the server's accept
loop): a long forward or a slow load keeps the client's silence deadline from expiring,
while a stopped or wedged server process sends nothing and is caught by it.

Shared memory (``modelserver.shm``): right after ``hello`` a client may send
``shm_attach`` with its request region's descriptor; the connection then borrows request
arrays as views of that region and writes big reply arrays into a reply region of its
own, whose descriptor goes back with the reply (a reply array that lies in the request
region, an input handed back, is named by its place there instead). The reply region is rewound when a frame
flagged ``FLAG_REWIND`` arrives while nothing is in flight. Both are unmapped when the
reader thread ends (a view still lent to a batch keeps its mapping until it goes).
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from modelserver import shm, wire
from modelserver.errors import BadRequest, BeamletError, ProtocolError

log = logging.getLogger("beamlet.connection")

RECV_TIMEOUT = 30.0
SEND_TIMEOUT = 60.0
DEFAULT_MAX_BACKLOG = 64 << 20
HEARTBEAT_INTERVAL = 5.0
HEARTBEAT = {"id": None, "ok": True, "heartbeat": True}


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
        max_backlog: int = DEFAULT_MAX_BACKLOG,
    ):
        self.sock = sock
        self.peer_pid = peer_pid
        self.max_body = max_body
        self.max_backlog = max_backlog
        self._frames = wire.FrameReader(sock, max_body)
        self._frames.accept_fds = True  # until the first request after hello (shm_attach)
        self._reply_shm: shm.Region | None = None
        self._dispatch = dispatch
        self._on_close = on_close
        self._send_lock = threading.Lock()
        self._backlog: deque[tuple[list[memoryview], int]] = deque()  # (parts, bytes)
        self._backlog_bytes = 0
        self._writer: threading.Thread | None = None
        # Notified when the backlog shrinks or grows and when the connection closes: the
        # writer waits for work, the reader for room.
        self._backlog_changed = threading.Condition(self._send_lock)
        self._closed = threading.Event()
        self._inflight = 0  # requests taken and not yet answered (under the send lock)
        self._last_sent = time.monotonic()
        _set_timeouts(sock)
        self._reader = threading.Thread(
            target=self._read_loop, name=f"conn-{peer_pid}-{sock.fileno()}", daemon=True
        )

    def start(self) -> None:
        self._reader.start()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    @property
    def shm_bytes(self) -> int | None:
        """Bytes of the reply region written and held, or None without shared memory."""
        region = self._reply_shm
        return None if region is None else region.written

    @property
    def backlog_bytes(self) -> int:
        """Reply bytes waiting for this client to read them."""
        with self._send_lock:
            return self._backlog_bytes

    def send(self, message: Any, stages: dict[str, float] | None = None) -> None:
        """Queue a reply; written now if the socket takes it, else by the writer thread.
        ``stages``: the reply's stage times (``wire.encode`` adds its encode time)."""
        if self._closed.is_set():
            return
        try:
            head, buffers = wire.encode(message, shm=self._reply_shm, peer=self._frames.shm, stages=stages)
        except (TypeError, BeamletError) as exc:
            rid = message.get("id") if isinstance(message, dict) else None
            head, buffers = wire.encode(
                {"id": rid, "ok": False, "error": {"code": "internal", "message": f"unsendable reply: {exc}"}}
            )
        parts = [memoryview(head), *buffers]
        answers = isinstance(message, dict) and "ok" in message and not message.get("heartbeat")
        with self._send_lock:
            if self._closed.is_set():
                return
            if answers and self._inflight:
                self._inflight -= 1
            self._last_sent = time.monotonic()
            if self._backlog:
                self._queue(parts)
                return
            try:
                rest = self._send_nonblocking(parts)
            except OSError as exc:
                failure = f"send failed: {exc}"
            else:
                if rest:
                    self._queue(rest)
                    self._start_writer()
                return
        self._fail(failure)  # after the lock: it logs

    def attach_shm(self, rid: int, request_bytes: int, reply_bytes: int, limit: int) -> None:
        """Answer ``shm_attach``: map the client's request region (the descriptor its frame
        carried) and reply with a reply region of our own (at most ``limit`` bytes, as the
        request region). BadRequest, and nothing shared, when the request comes too late
        (after another request, or with others in flight), twice, or with anything but one
        sealed memfd of ``request_bytes`` (at most ``limit``)."""
        fds = self._frames.take_fds()
        self._frames.accept_fds = False
        try:
            if self._frames.shm is not None:
                raise BadRequest("this connection already shares memory")
            with self._send_lock:
                busy = self._inflight > 1
            if busy:
                raise BadRequest("shm_attach must come with no other request in flight")
            if len(fds) != 1:
                raise BadRequest(f"shm_attach must carry one file descriptor, not {len(fds)} (SCM_RIGHTS)")
            if reply_bytes <= 0:
                raise BadRequest(f"shm_attach asks for a reply region of {reply_bytes} bytes")
            requests = shm.Region.adopt(fds.pop(), request_bytes, limit=limit, writable=True)
        finally:
            for fd in fds:
                os.close(fd)
        try:
            replies = shm.Region.create(shm.REPLY_NAME.format(pid=self.peer_pid), min(reply_bytes, limit))
        except BaseException:
            requests.close()
            raise
        self._frames.shm, self._frames.borrow = requests, True
        self._reply_shm = replies
        head, buffers = wire.encode({"id": rid, "ok": True, "reply_bytes": replies.size})
        fd = replies.take_fd()
        failure = None
        try:
            with self._send_lock:
                self._inflight -= 1
                self._last_sent = time.monotonic()
                # Blocking, under the lock: nothing else is in flight, and the frame is tiny.
                wire.sendmsg_all(self.sock, [memoryview(head), *buffers], fds=[fd])
        except OSError as exc:
            failure = f"send failed: {exc}"
        finally:
            os.close(fd)
        if failure:
            self._fail(failure)

    def _rewind_replies(self) -> None:
        """A frame flagged FLAG_REWIND: with nothing in flight the client has read every
        earlier reply, so the reply region may be reused from the start."""
        region = self._reply_shm
        if region is None:
            return
        with self._send_lock:
            idle = self._inflight == 0
        if idle:
            region.rewind()

    def _release_shm(self) -> None:
        """The reader is done: unmap both regions (a view still lent out keeps its mapping
        until it goes) and close descriptors nobody claimed."""
        self._frames.close_fds()
        requests, self._frames.shm = self._frames.shm, None
        replies, self._reply_shm = self._reply_shm, None
        for region in (requests, replies):
            if region is not None:
                region.close()

    def heartbeat(self, now: float, interval: float = HEARTBEAT_INTERVAL) -> bool:
        """Send a heartbeat if requests are in flight and nothing was sent for ``interval``
        seconds (a reply already waiting in the backlog says as much: none then). True
        when one was sent."""
        with self._send_lock:
            due = (
                self._inflight > 0
                and not self._backlog
                and not self._closed.is_set()
                and now - self._last_sent >= interval
            )
        if due:
            self.send(HEARTBEAT)
        return due

    def _queue(self, parts: list[memoryview]) -> None:
        """Under the send lock: add a reply to the backlog."""
        nbytes = sum(p.nbytes for p in parts)
        self._backlog.append((parts, nbytes))
        self._backlog_bytes += nbytes
        self._backlog_changed.notify_all()

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._drop_backlog()

    def _drop_backlog(self) -> None:
        """Closed: the unsent replies go, and every wait on the backlog ends."""
        with self._send_lock:
            self._backlog.clear()
            self._backlog_bytes = 0
            self._backlog_changed.notify_all()

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

    def _write_loop(self) -> None:
        while True:
            with self._send_lock:
                while not self._backlog and not self._closed.is_set():
                    self._backlog_changed.wait()
                if self._closed.is_set():
                    return
                parts, nbytes = self._backlog[0]
            try:
                # Blocking send outside the lock, so producers can keep appending; the
                # kernel's SO_SNDTIMEO bounds how long a client that reads nothing holds us.
                wire.sendmsg_all(self.sock, parts)
            except OSError as exc:
                self._fail(f"client stopped reading ({exc})")
                return
            with self._send_lock:
                if self._closed.is_set():
                    return  # the backlog was dropped with the connection
                self._backlog.popleft()
                self._backlog_bytes -= nbytes
                self._backlog_changed.notify_all()

    def _wait_for_room(self) -> bool:
        """Before reading the next request: wait while this client's unread replies hold
        more than ``max_backlog`` bytes. False when it does not read them within
        ``SEND_TIMEOUT`` (the connection is then dropped) or the connection closed."""
        deadline = time.monotonic() + SEND_TIMEOUT
        with self._send_lock:
            while self._backlog_bytes > self.max_backlog and not self._closed.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._backlog_changed.wait(remaining)
            stuck = self._backlog_bytes > self.max_backlog and not self._closed.is_set()
        if stuck:
            self._fail(f"client left {self.max_backlog}+ bytes of replies unread for {SEND_TIMEOUT:.0f}s")
        return not self._closed.is_set()

    def _read_loop(self) -> None:
        try:
            while self._wait_for_room():
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
                if self._frames.accept_fds and _op(message) not in ("hello", "shm_attach"):
                    self._frames.accept_fds = False
                    self._frames.close_fds()
                if self._frames.flags & wire.FLAG_REWIND:
                    self._rewind_replies()
                with self._send_lock:
                    self._inflight += 1
                self._dispatch(self, message)
        finally:
            self.close()
            self._release_shm()
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
        """Drop the connection (outside the send lock: it logs)."""
        self._closed.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._drop_backlog()
        log.warning("dropping connection from pid %d: %s", self.peer_pid, why)


def _op(message: Any) -> Any:
    return message.get("op") if isinstance(message, dict) else None
