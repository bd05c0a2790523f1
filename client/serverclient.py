"""What a worker uses to reach the per-machine model server.

``ServerClient`` keeps a pool of connections (``modelserver.channel.Channel``), one per
thread in use at a time, so threads never wait on each other's requests. It is
fork-safe: it remembers the pid that built the pool, and a forked child starts a fresh
pool instead of sharing its parent's sockets. When the server is gone it reconnects,
starting a server if none runs (``autostart``), and retries: inference is idempotent.
When the server does not know a model (it restarted, or evicted the registration), the
client registers the model's spec again and retries.

``shared_client(path)`` is the process-wide client for a socket path.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from client import autostart
from modelserver import config
from modelserver.channel import Channel
from modelserver.errors import ModelNotFound, ServerUnavailable
from modelserver.loaders import ModelSpec

log = logging.getLogger("beamlet.client")

DEFAULT_RETRY_SECONDS = 60.0
MAX_IDLE_CHANNELS = 32


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
    ):
        self.socket_path = config.socket_path(socket_path)
        self.autostart = autostart
        self.retry_seconds = retry_seconds
        self.server_args = list(server_args or [])  # for a server this client starts
        self.idle_timeout = idle_timeout  # likewise (default: BEAMLET_SERVER_IDLE_TIMEOUT)
        self._specs: dict[str, ModelSpec] = {}
        self._reset_pool()

    def _reset_pool(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._idle: list[Channel] = []

    # -- the pool --------------------------------------------------------------------
    @contextmanager
    def channel(self) -> Iterator[Channel]:
        """A connection for this thread's exclusive use while the block runs."""
        if self._pid != os.getpid():
            # Forked: the inherited sockets belong to the parent's conversations.
            for ch in self._idle:
                ch.sock.close()
            self._reset_pool()
        with self._lock:
            pooled = self._idle.pop() if self._idle else None
        ch = pooled if pooled is not None else self._connect()
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

    def _connect(self) -> Channel:
        if self.autostart:
            autostart.ensure_server(self.socket_path, self.server_args, idle_timeout=self.idle_timeout)
        return Channel(self.socket_path)

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
    def call(self, message: dict[str, Any], *, retry: bool = True) -> dict[str, Any]:
        """One request with reconnect-and-retry while the server is unavailable."""
        deadline = time.monotonic() + (self.retry_seconds if retry else 0.0)
        delay = 0.05
        while True:
            try:
                with self.channel() as ch:
                    return ch.request(message)
            except ServerUnavailable as exc:
                if time.monotonic() + delay > deadline:
                    raise ServerUnavailable(
                        f"model server at {self.socket_path} unavailable: {exc}"
                    ) from None
                log.info("model server unavailable (%s); retrying in %.2fs", exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def load(self, key: str, spec: ModelSpec, *, replace: bool = True) -> dict[str, Any]:
        """Register ``spec`` under ``key`` and load it now; returns model_id, device, nbytes
        and the spec the key serves. ``replace=False`` attaches to whatever version the key
        already serves (a worker joining a running job); ``replace=True`` swaps to ``spec``."""
        reply = self.call({"op": "load", "key": key, "spec": spec.to_wire(), "replace": replace})
        served = reply.get("spec")
        self._specs[key] = ModelSpec.from_wire(served) if isinstance(served, dict) else spec
        return reply

    def infer(
        self, key: str, inputs: Any, kwargs: dict[str, Any] | None = None, method: str = "forward"
    ) -> dict[str, Any]:
        """Run one batch on the model registered under ``key``: {outputs, model_id}.
        ``inputs`` is the batch; ``kwargs`` the side arguments (never merged with another
        request's); ``method`` one of the model's public methods.

        If the server has forgotten the model (restart, new server), the spec the key last
        served for this client is registered again and the batch retried once."""
        message: dict[str, Any] = {"op": "infer", "key": key, "inputs": inputs, "kwargs": kwargs or {}}
        if method != "forward":
            message["method"] = method
        try:
            return self.call(message)
        except ModelNotFound:
            spec = self._specs.get(key)
            if spec is None:
                raise
            self.load(key, spec, replace=False)
            return self.call(message)

    def status(self) -> dict[str, Any]:
        return self.call({"op": "status"}, retry=False)["status"]

    def shutdown(self) -> None:
        self.call({"op": "shutdown"}, retry=False)


_shared: dict[str, ServerClient] = {}
_shared_lock = threading.Lock()


def shared_client(socket_path: str | None = None) -> ServerClient:
    """The process-wide client for a socket path (default: ``config.default_socket_path``)."""
    path = config.socket_path(socket_path)
    with _shared_lock:
        client = _shared.get(path)
        if client is None:
            client = _shared[path] = ServerClient(path)
        return client
