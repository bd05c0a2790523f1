"""The client end of one connection to a model server.

A ``Channel`` connects, checks that the server runs as our own user (SO_PEERCRED),
says hello, and then sends requests and matches replies by id. Several requests may be
in flight at once (``request_many`` pipelines them). A channel is used by one thread at a
time; ``client.serverclient`` pools channels for threads and processes and adds
reconnects, retries and auto-start on top.

Failures come in two kinds: a typed ``BeamletError`` reply means "this request failed"
and the channel stays usable; ``ServerUnavailable`` means the connection is gone (the
server died, closed it, or never answered) and the channel is dead.

Every exchange has a deadline: while a request is in flight, the server must send
something at least every ``request_timeout`` seconds (default 30, or
$BEAMLET_REQUEST_TIMEOUT; ``modelserver.config.request_timeout``), else the request fails
with ``ServerUnavailable`` and the connection is closed (where its stream stands is
unknown). It measures silence, not the length of the request: while the server works on
a request (a long forward, a slow load) it sends a heartbeat frame every few seconds,
which the channel skips. A stopped (SIGSTOP) or wedged server process sends none, and so
costs a caller ``request_timeout`` seconds, never forever. Connecting is bounded
by ``connect_timeout`` and the hello by ``request_timeout``.

Big arrays go through shared memory (``modelserver.shm``): after hello the channel
attaches a request region of ``shm_bytes`` (default 1 GiB of virtual size, or
$BEAMLET_SHM_BYTES; at most the server's frame limit; 0 for none) and receives the
server's reply region. Arrays of at least ``shm.THRESHOLD`` bytes are then copied into
the request region and only their descriptors travel; reply arrays are copied out of
the reply region (or, for an input the server hands back, out of the request region)
while the reply is decoded, so nothing the caller gets refers to shared memory.
A server that refuses (an older one) leaves the channel on the socket path.

``timing`` holds where the last ``request``/``request_many`` spent its time, in seconds:
(encode, send, wait, decode): packing the requests, writing them to the socket, waiting
from the last byte sent until the last reply's first bytes were read (less decoding the
replies that came before it), and decoding the replies (their array bytes read or
copied out of shared memory included). The four add up to the whole call.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import time
from typing import Any

from modelserver import config, shm, wire
from modelserver.errors import (
    BadRequest,
    BeamletError,
    FrameTooLarge,
    ProtocolError,
    ServerUnavailable,
    from_wire,
)

log = logging.getLogger("beamlet.channel")

REPLY_MAX_BODY = 1 << 40  # replies come from our own server; requests are what is bounded


class Channel:
    """One connection to a model server. Not thread-safe: one user at a time."""

    def __init__(
        self,
        path: str,
        *,
        connect_timeout: float = 5.0,
        request_timeout: float | None = None,
        shm_bytes: int | None = None,
    ):
        """Connect to the server at ``path``, say hello and attach shared memory.
        ``request_timeout``: the default silence limit of this channel's requests (None:
        ``config.request_timeout``). ``shm_bytes``: the size of each shared-memory region
        (None: ``config.shm_bytes``; 0: none)."""
        self.path = path
        self.request_timeout = config.request_timeout(request_timeout)
        self._pid = os.getpid()
        self._ids = itertools.count(1)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._frames = wire.FrameReader(self.sock, REPLY_MAX_BODY)
        self.dead = False
        self.max_frame_bytes: int | None = None
        self.shm: shm.Region | None = None  # our request region, once attached
        self.timing: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # see the module
        try:
            self.sock.settimeout(connect_timeout)
            self.sock.connect(path)
            _pid, uid, _gid = wire.peer_credentials(self.sock)
            if uid != os.geteuid():
                raise ServerUnavailable(f"the server at {path} runs as uid {uid}, not as us; refusing it")
            info = self.request({"op": "hello", "version": wire.VERSION, "pid": os.getpid()})
            self.server_pid: int = info["server_pid"]
            self.max_frame_bytes = int(info["max_frame_bytes"])
            size = min(config.shm_bytes(shm_bytes), self.max_frame_bytes)
            if size > 0:
                self._attach_shm(size)
        except (OSError, BeamletError) as exc:
            self.close()
            if isinstance(exc, ServerUnavailable):
                raise
            raise ServerUnavailable(f"cannot connect to {path}: {exc}") from None
        except BaseException:
            self.close()
            raise

    def _attach_shm(self, size: int) -> None:
        """Send our request region, map the server's reply region. A server that says no
        (BadRequest: an older server, or one that will not share) leaves the channel on
        the socket path; so does a system without memfd."""
        try:
            requests = shm.Region.create(shm.REQUEST_NAME.format(pid=os.getpid()), size)
        except OSError as exc:
            log.info("no shared memory for %s (%s); arrays go through the socket", self.path, exc)
            return
        try:
            replies = self._exchange_regions(requests)
        except BaseException:
            requests.close()
            raise
        if replies is None:
            requests.close()
            return
        self.shm = requests
        self._frames.shm, self._frames.borrow, self._frames.own = replies, False, requests

    def _exchange_regions(self, requests: shm.Region) -> shm.Region | None:
        """The shm_attach exchange: our descriptor out, the server's in (None: refused)."""
        message = {"op": "shm_attach", "request_bytes": requests.size, "reply_bytes": requests.size}
        fd = requests.take_fd()
        self._frames.accept_fds = True
        reply: dict[str, Any] | None = None
        try:
            reply = self._exchange(message, fds=[fd])
        except BadRequest as exc:
            log.info("the server at %s shares no memory (%s); arrays go through the socket", self.path, exc)
        finally:
            os.close(fd)
            self._frames.accept_fds = False
            received = self._frames.take_fds()
            if reply is None or len(received) != 1:
                for extra in received:
                    os.close(extra)
        if reply is None:
            return None
        size = reply.get("reply_bytes")
        if len(received) != 1 or not isinstance(size, int):
            raise ProtocolError(
                f"the shm_attach reply carries {len(received)} file descriptors and size {size!r}"
            )
        try:
            return shm.Region.adopt(received[0], size, limit=REPLY_MAX_BODY, writable=False)
        except BadRequest as exc:
            raise ProtocolError(f"the server's reply region: {exc}") from None

    def request(self, message: dict[str, Any], *, timeout: float | None = None) -> dict[str, Any]:
        """Send one request and wait for its reply; raises the reply's typed error.
        ``timeout``: the silence limit for this request (None: the channel's)."""
        reply = self.request_many([message], timeout=timeout)[0]
        if isinstance(reply, BeamletError):
            raise reply
        return reply

    def request_many(
        self, messages: list[dict[str, Any]], *, timeout: float | None = None
    ) -> list[dict[str, Any] | BeamletError]:
        """Pipeline several requests on this connection: send all, then collect every reply
        (in any order) and return them in request order; failed ones as error objects.
        Raises ``ServerUnavailable`` when the server sends nothing for ``timeout`` seconds
        (None: the channel's ``request_timeout``) while replies are due.

        A request that cannot be encoded (an unsendable value, over the server's frame
        limit) raises before anything is sent, and the channel stays usable."""
        if self.dead:
            raise ServerUnavailable(f"connection to {self.path} is closed")
        if self._pid != os.getpid():
            # Forked: the socket is shared with the parent's conversation; never touch it.
            raise ServerUnavailable(f"this connection to {self.path} belongs to process {self._pid}")
        silence = self.request_timeout if timeout is None else timeout
        started = time.monotonic()
        ids = [next(self._ids) for _ in messages]
        region = self.shm
        if region is not None:
            region.rewind()  # every reply to the last call is in: the server holds no view of it
        frames = [
            wire.encode({**m, "id": rid}, shm=region, flags=wire.FLAG_REWIND if i == 0 and region else 0)
            for i, (m, rid) in enumerate(zip(messages, ids))
        ]
        for _head, buffers in frames:
            body = sum(b.nbytes for b in buffers)
            if self.max_frame_bytes is not None and body > self.max_frame_bytes:
                raise FrameTooLarge(
                    f"request body of {body} bytes is over the server's {self.max_frame_bytes}-byte "
                    "frame limit (python -m modelserver serve --max-frame-bytes)"
                )
        return self._collect(frames, ids, silence, started=started)

    def _exchange(self, message: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        """One request whose frame carries ``fds``; raises the reply's typed error."""
        rid = next(self._ids)
        frame = wire.encode({**message, "id": rid})
        reply = self._collect([frame], [rid], self.request_timeout, fds)[0]
        if isinstance(reply, BeamletError):
            raise reply
        return reply

    def _collect(
        self,
        frames: list[tuple[bytes, list[memoryview]]],
        ids: list[int],
        silence: float,
        fds: list[int] | None = None,
        started: float | None = None,
    ) -> list[dict[str, Any] | BeamletError]:
        """Send ``frames`` (the first carrying ``fds``) and gather every reply; ``timing``
        then says where the time went since ``started`` (when encoding began)."""
        try:
            self.sock.settimeout(silence)
            sending = time.monotonic()
            for head, buffers in frames:
                wire.sendmsg_all(self.sock, [memoryview(head), *buffers], fds=fds)
                fds = None
            sent = time.monotonic()
            decode = 0.0
            replies: dict[int, dict[str, Any] | BeamletError] = {}
            while len(replies) < len(ids):
                reply = self._frames.read()
                decode += time.monotonic() - self._frames.arrived
                if reply is None:
                    raise ServerUnavailable(f"the server at {self.path} closed the connection")
                if not isinstance(reply, dict):
                    raise ProtocolError(f"malformed reply: {reply!r:.80}")
                if reply.get("heartbeat"):
                    continue  # the server is alive and still working on our requests
                rid = reply.get("id")
                if rid is None:  # a connection-level error: the server is closing us
                    raise from_wire(reply.get("error"))
                if rid not in ids:
                    raise ProtocolError(f"reply to request {rid!r}, which this connection did not send now")
                replies[rid] = reply if reply.get("ok") else from_wire(reply.get("error"))
        except BeamletError:
            self.close()
            raise
        except TimeoutError:
            self.close()
            raise ServerUnavailable(
                f"the model server at {self.path} did not answer for {silence:g}s while a request "
                f"was in flight (stopped, wedged, or busy for longer than the request timeout: "
                f"ServerClient(request_timeout=...) or ${config.REQUEST_TIMEOUT_ENV}); connection closed"
            ) from None
        except OSError as exc:
            self.close()
            raise ServerUnavailable(f"connection to {self.path} failed: {exc}") from None
        except BaseException:  # interrupted mid-conversation: replies may still be on the way
            self.close()
            raise
        ended = time.monotonic()
        encode = 0.0 if started is None else sending - started
        self.timing = (encode, sent - sending, ended - sent - decode, decode)
        return [replies[rid] for rid in ids]

    def close(self) -> None:
        self.dead = True
        try:
            self.sock.close()
        except OSError:
            pass
        self._frames.close_fds()
        requests, self.shm, self._frames.own = self.shm, None, None
        replies, self._frames.shm = self._frames.shm, None
        for region in (requests, replies):
            if region is not None:
                region.close()

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
