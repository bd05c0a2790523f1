"""What a worker uses to reach the per-machine model server.

``ServerClient`` keeps a pool of connections (``modelserver.channel.Channel``), one per
thread in use at a time, so threads never wait on each other's requests. It is
fork-safe: it remembers the pid that built the pool, and a forked child starts a fresh
pool instead of sharing its parent's sockets. When the server is gone it reconnects,
starting a server if none runs (``autostart``), and retries: inference is idempotent.
When the server does not know a model (it restarted, or evicted the registration), the
client registers the model's spec again and retries. When the server answers
``Overloaded``, the client backs off (the server's ``retry_after``, growing, with jitter)
and retries within the same budget.

Nothing waits forever. A request fails with ``ServerUnavailable`` when the server sends
nothing for ``request_timeout`` seconds while it is in flight (default 30 s, or
$BEAMLET_REQUEST_TIMEOUT); a server at work on it (a long forward, a slow load) sends a
heartbeat every few seconds, so the deadline catches a stopped or wedged server process,
never a slow model. ``call`` retries for
``retry_seconds`` (60); an attempt starts only before that budget is spent, and connecting
(or waiting for a server to start) stops there too, or after ``request_timeout`` when
that is longer. So a call to a server that stopped answering (SIGSTOP, wedged) ends
within ``retry_seconds`` + its silence limit, plus a few seconds of connection probes.

Where the time goes: every infer request's stages (the client's encode, send, wait and
decode, and the server's queue, assemble, forward and encode from the reply; see
``client.stages``) are kept as histograms: ``stage_times()`` summarises them and
``last_stages()`` gives this thread's last request's, in seconds.

``shared_client(path)`` is the process-wide client for a socket path.
"""

from __future__ import annotations

import logging
import math
import os
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from client import autostart
from client.stages import StageTimes
from modelserver import config
from modelserver.channel import Channel
from modelserver.errors import ModelNotFound, Overloaded, ServerUnavailable
from modelserver.loaders import ModelSpec

log = logging.getLogger("beamlet.client")

DEFAULT_RETRY_SECONDS = 60.0
MAX_IDLE_CHANNELS = 32
RECONNECT_DELAY = (0.05, 1.0)  # first and longest pause between reconnects
OVERLOADED_DELAY = (0.05, 2.0)  # first pause (when the server names none) and longest
MAX_RETRY_AFTER = 10.0  # the longest first pause a server may ask for


class ServerClient:
    """A pooled, fork-safe, reconnecting client of one model server. Thread-safe."""

    def __init__(
        self,
        socket_path: str | None = None,
        *,
        autostart: bool = True,
        retry_seconds: float = DEFAULT_RETRY_SECONDS,
        server_args: list[str] | None = None,
        idle_timeout: Any = autostart.FROM_ENV,
        request_timeout: float | None = None,
    ):
        """``retry_seconds``: how long ``call`` keeps retrying a server that is unavailable
        or overloaded. ``request_timeout``: the longest silence from the server while a
        request is in flight (None: $BEAMLET_REQUEST_TIMEOUT, else 30 s)."""
        self.socket_path = config.socket_path(socket_path)
        self.autostart = autostart
        self.retry_seconds = retry_seconds
        self.request_timeout = config.request_timeout(request_timeout)
        self.server_args = list(server_args or [])  # for a server this client starts
        self.idle_timeout = idle_timeout  # likewise (default: BEAMLET_SERVER_IDLE_TIMEOUT)
        self._specs: dict[str, tuple[ModelSpec, tuple[int, int] | None]] = {}  # served, with its sequence
        self._batching: dict[str, dict[str, int | float | None]] = {}
        self._copies: dict[str, int] = {}
        self._reset_pool()

    def _reset_pool(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._idle: list[Channel] = []
        self._stages = StageTimes()  # a forked child counts its own requests

    # -- the pool --------------------------------------------------------------------
    @contextmanager
    def channel(self, *, deadline: float | None = None) -> Iterator[Channel]:
        """A connection for this thread's exclusive use while the block runs. Connecting
        (and starting a server, if none runs) gives up at ``deadline`` (a
        ``time.monotonic()`` value) or after ``request_timeout``, whichever is later;
        without one, after ``autostart.START_TIMEOUT``."""
        if self._pid != os.getpid():
            # Forked: the inherited sockets belong to the parent's conversations.
            for ch in self._idle:
                ch.sock.close()
            self._reset_pool()
        with self._lock:
            pooled = self._idle.pop() if self._idle else None
        if pooled is None:
            budget = autostart.START_TIMEOUT
            if deadline is not None:
                budget = max(deadline - time.monotonic(), self.request_timeout)
            pooled = self._connect(budget)
        ch = pooled
        try:
            yield ch
        finally:
            kept = False
            if not ch.dead:
                with self._lock:
                    if len(self._idle) < MAX_IDLE_CHANNELS:
                        self._idle.append(ch)
                        kept = True
            if not kept:
                ch.close()

    def _connect(self, budget: float) -> Channel:
        probe = min(autostart.PROBE_TIMEOUT, self.request_timeout)
        if self.autostart:
            autostart.ensure_server(
                self.socket_path,
                self.server_args,
                timeout=budget,
                idle_timeout=self.idle_timeout,
                probe_timeout=probe,
            )
        return Channel(self.socket_path, connect_timeout=probe, request_timeout=self.request_timeout)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for ch in idle:
            ch.close()

    def __enter__(self) -> ServerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests --------------------------------------------------------------------
    def call(
        self, message: dict[str, Any], *, retry: bool = True, timeout: float | None = None
    ) -> dict[str, Any]:
        """One request. While the server is unavailable (reconnecting, and starting one if
        none runs) or overloaded (backing off), retry until ``retry_seconds`` have passed,
        then raise the last error; ``retry=False``: one attempt. ``timeout``: this
        request's silence limit (None: ``request_timeout``)."""
        deadline = time.monotonic() + (self.retry_seconds if retry else 0.0)
        unavailable = overloaded = 0
        while True:
            try:
                with self.channel(deadline=deadline) as ch:
                    reply = ch.request(message, timeout=timeout)
                    if message.get("op") == "infer":
                        self._stages.record(ch.timing, reply.get("stages"))
                    return reply
            except ServerUnavailable as exc:
                delay = retry_delay(unavailable, *RECONNECT_DELAY)
                unavailable += 1
                if time.monotonic() + delay > deadline:
                    raise ServerUnavailable(
                        f"model server at {self.socket_path} unavailable: {exc}"
                    ) from None
                log.info("model server unavailable (%s); retrying in %.2fs", exc, delay)
            except Overloaded as exc:
                delay = retry_delay(overloaded, _retry_after(exc), OVERLOADED_DELAY[1])
                overloaded += 1
                if time.monotonic() + delay > deadline:
                    raise
                log.debug("model server overloaded (%s); retrying in %.2fs", exc, delay)
            time.sleep(delay)

    def load(
        self,
        key: str,
        spec: ModelSpec,
        *,
        replace: bool = True,
        batching: dict[str, int | float | None] | None = None,
        sequence: tuple[int, int] | None = None,
        copies: int = 1,
    ) -> dict[str, Any]:
        """Register ``spec`` under ``key`` and load it now; returns model_id, device, nbytes,
        the spec the key serves and its ``sequence``. ``replace=False`` attaches to whatever
        version the key already serves (a worker joining a running job); ``replace=True``
        swaps to ``spec``, unless ``sequence`` (the version's place in the key's order,
        (epoch, n)) is older than the served version's: then the reply says ``stale`` and
        names the served one. ``batching``: how the server merges the key's requests from
        every caller (``max_batch_size``, ``max_batch_duration_secs``; None: the server's
        defaults). ``copies``: how many copies of the model the server holds (Beam's
        ``model_copies``; from the key's next load)."""
        message: dict[str, Any] = {"op": "load", "key": key, "spec": spec.to_wire(), "replace": replace}
        if batching is not None:
            message["batching"] = batching
            self._batching[key] = batching
        if sequence is not None:
            message["sequence"] = list(sequence)
        if copies != 1:
            message["copies"] = copies
        self._copies[key] = copies
        reply = self.call(message)
        served, order = reply.get("spec"), reply.get("sequence")
        self._specs[key] = (
            ModelSpec.from_wire(served) if isinstance(served, dict) else spec,
            (order[0], order[1]) if isinstance(order, list) else sequence,
        )
        return reply

    def infer(
        self, key: str, inputs: Any, kwargs: dict[str, Any] | None = None, method: str = "forward"
    ) -> dict[str, Any]:
        """Run one batch on the model registered under ``key``: {outputs, model_id, and
        the server's ``stages``}.
        ``inputs`` is the batch; ``kwargs`` the side arguments (never merged with another
        request's); ``method`` one of the model's public methods.

        If the server has forgotten the model (restart, new server), the spec the key last
        served for this client (with its sequence) is registered again and the batch
        retried once."""
        message: dict[str, Any] = {"op": "infer", "key": key, "inputs": inputs, "kwargs": kwargs or {}}
        if method != "forward":
            message["method"] = method
        try:
            return self.call(message)
        except ModelNotFound:
            served = self._specs.get(key)
            if served is None:
                raise
            spec, sequence = served
            self.load(
                key,
                spec,
                replace=False,
                batching=self._batching.get(key),
                sequence=sequence,
                copies=self._copies.get(key, 1),
            )
            return self.call(message)

    def stage_times(self) -> dict[str, dict[str, Any]]:
        """Where this client's infer requests spent their time, per stage (``client.stages``):
        ``{"<stage>_us": {count, mean, p50, p99, max}}`` in microseconds, since this client
        was made (or its process forked)."""
        return self._stages.summary()

    def last_stages(self) -> dict[str, float]:
        """The stages of this thread's last infer request, in seconds (``client.stages``)."""
        return self._stages.last()

    def status(self) -> dict[str, Any]:
        return self.call({"op": "status"}, retry=False)["status"]

    def shutdown(self) -> None:
        self.call({"op": "shutdown"}, retry=False)


def retry_delay(attempt: int, first: float, longest: float, rng: random.Random | None = None) -> float:
    """The pause before retry ``attempt`` (0, 1, ...): ``first``, doubling each time up to
    ``longest`` (never below ``first``), stretched by up to a quarter at random so that
    clients turned away together do not all come back together."""
    grown = min(first * 2 ** min(attempt, 32), max(longest, first))
    return grown * (rng or random).uniform(1.0, 1.25)


def _retry_after(exc: BaseException) -> float:
    """The pause an ``Overloaded`` reply asks for (``retry_after`` seconds), kept sane."""
    try:
        seconds = float(getattr(exc, "retry_after", None) or OVERLOADED_DELAY[0])
    except (TypeError, ValueError):
        return OVERLOADED_DELAY[0]
    if not math.isfinite(seconds):
        return OVERLOADED_DELAY[0]
    return min(max(seconds, 0.001), MAX_RETRY_AFTER)


_shared: dict[str, ServerClient] = {}
_shared_lock = threading.Lock()


def _after_fork_in_child() -> None:
    # Another thread may have held the lock at the fork; in the child nobody ever will
    # release it. (Each client notices the new pid itself and drops inherited sockets.)
    global _shared_lock
    _shared_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def shared_client(socket_path: str | None = None) -> ServerClient:
    """The process-wide client for a socket path (default: ``config.default_socket_path``)."""
    path = config.socket_path(socket_path)
    with _shared_lock:
        client = _shared.get(path)
        if client is None:
            client = _shared[path] = ServerClient(path)
        return client
