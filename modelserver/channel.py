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
"""

from __future__ import annotations

import itertools
import os
import socket
from typing import Any

from modelserver import config, wire
from modelserver.errors import BeamletError, FrameTooLarge, ProtocolError, ServerUnavailable, from_wire

REPLY_MAX_BODY = 1 << 40  # replies come from our own server; requests are what is bounded


class Channel:
    """One connection to a model server. Not thread-safe: one user at a time."""

    def __init__(self, path: str, *, connect_timeout: float = 5.0, request_timeout: float | None = None):
        """Connect to the server at ``path`` and say hello. ``request_timeout``: the
        default silence limit of this channel's requests (None: ``config.request_timeout``)."""
        self.path = path
        self.request_timeout = config.request_timeout(request_timeout)
        self._pid = os.getpid()
        self._ids = itertools.count(1)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._frames = wire.FrameReader(self.sock, REPLY_MAX_BODY)
        self.dead = False
        self.max_frame_bytes: int | None = None
        try:
            self.sock.settimeout(connect_timeout)
            self.sock.connect(path)
            _pid, uid, _gid = wire.peer_credentials(self.sock)
            if uid != os.geteuid():
                raise ServerUnavailable(f"the server at {path} runs as uid {uid}, not as us; refusing it")
            info = self.request({"op": "hello", "version": wire.VERSION, "pid": os.getpid()})
        except (OSError, BeamletError) as exc:
            self.close()
            if isinstance(exc, ServerUnavailable):
                raise
            raise ServerUnavailable(f"cannot connect to {path}: {exc}") from None
        self.server_pid: int = info["server_pid"]
        self.max_frame_bytes = int(info["max_frame_bytes"])

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
        ids = [next(self._ids) for _ in messages]
        frames = [wire.encode({**m, "id": rid}) for m, rid in zip(messages, ids)]
        for _head, buffers in frames:
            body = sum(b.nbytes for b in buffers)
            if self.max_frame_bytes is not None and body > self.max_frame_bytes:
                raise FrameTooLarge(
                    f"request body of {body} bytes is over the server's {self.max_frame_bytes}-byte "
                    "frame limit (python -m modelserver serve --max-frame-bytes)"
                )
        try:
            self.sock.settimeout(silence)
            for head, buffers in frames:
                wire.sendmsg_all(self.sock, [memoryview(head), *buffers])
            replies: dict[int, dict[str, Any] | BeamletError] = {}
            while len(replies) < len(ids):
                reply = self._frames.read()
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
        return [replies[rid] for rid in ids]

    def close(self) -> None:
        self.dead = True
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
