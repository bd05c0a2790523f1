"""The control protocol between the harness and its SDK workers.

Frames are ``modelserver.wire`` frames (msgpack header, arrays as raw buffers, no
pickle) over a Unix stream socket that the harness listens on. The worker connects.
Every message is a map with an ``op``; these are all of them (``MESSAGES`` below is the
same table as data, and tests keep it, this table, docs/runtime.md and the code that
sends each message in step):

    direction          op              fields
    worker -> harness  hello           worker, pid, threads   (booted; then the harness replays model updates)
    worker -> harness  boot_failed     worker, error, traceback   (then the worker exits with EXIT_BOOT_FAILED)
    harness -> worker  bundle          bundle, attempt, elements
    worker -> harness  result          bundle, attempt, outputs, dead_letters, metrics
    worker -> harness  bundle_failed   bundle, attempt, error, traceback   (user code raised)
    worker -> harness  heartbeat       -   (every HEARTBEAT_SECONDS, from its own thread)
    harness -> worker  update_model    step, update, sequence   (a new model version for RunInference step ``step``)
    harness -> worker  stop            -   (finish in-flight bundles, then exit 0)

Elements, outputs and dead letters are whatever msgpack and the wire's array encoding
carry: None, bools, numbers, strings, bytes, lists, maps, numpy arrays, torch tensors;
NamedTuples (PredictionResult) travel as maps. The worker's exit codes:

    0                  stopped when asked
    EXIT_BOOT_FAILED   could not start (bad pipeline, unimportable code): do not restart
    EXIT_LOST_HARNESS  its control connection closed: the harness is gone
    EXIT_CRASHED       failed after booting: restart it
"""

from __future__ import annotations

import os
import queue
import socket
import threading
from typing import Any

from modelserver import wire
from modelserver.errors import BeamletError, ProtocolError

EXIT_BOOT_FAILED = 4
EXIT_LOST_HARNESS = 5
EXIT_CRASHED = 6
HEARTBEAT_SECONDS = 1.0

TO_HARNESS = "worker -> harness"
TO_WORKER = "harness -> worker"

# op -> (direction, fields besides "op")
MESSAGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "hello": (TO_HARNESS, ("worker", "pid", "threads")),
    "boot_failed": (TO_HARNESS, ("worker", "error", "traceback")),
    "bundle": (TO_WORKER, ("bundle", "attempt", "elements")),
    "result": (TO_HARNESS, ("bundle", "attempt", "outputs", "dead_letters", "metrics")),
    "bundle_failed": (TO_HARNESS, ("bundle", "attempt", "error", "traceback")),
    "heartbeat": (TO_HARNESS, ()),
    "update_model": (TO_WORKER, ("step", "update", "sequence")),
    "stop": (TO_WORKER, ()),
}


class ControlChannel:
    """One end of a control connection: thread-safe ``send``, single-reader ``read``."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._reader = wire.FrameReader(sock, max_body=1 << 40)
        self._send_lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        with self._send_lock:
            wire.send_frame(self.sock, message)

    def read(self) -> dict[str, Any] | None:
        """The next message, or None when the other end closed the connection."""
        message = self._reader.read()
        if message is not None and not isinstance(message, dict):
            raise ProtocolError(f"control message must be a map, got {type(message).__name__}")
        return message

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class ControlListener:
    """The harness's end: listens at ``path`` (made 0600; its directory should be
    private) and gives each worker connection a reader thread, which turns the worker's
    messages into events ``("message", channel, message)`` on ``events`` and, once the
    connection ends, ``("closed", channel, None)``. Only the harness loop acts on them."""

    def __init__(self, path: str, events: queue.Queue[tuple[str, Any, Any]]):
        self.events = events
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.bind(path)
            os.chmod(path, 0o600)
            self.sock.listen(64)
        except BaseException:
            self.sock.close()
            raise
        threading.Thread(target=self._accept_loop, name="harness-accept", daemon=True).start()

    def close(self) -> None:
        self.sock.close()

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, _ = self.sock.accept()
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
