"""A real redis-server per test, on a private Unix socket, always killed and reaped.

``redis_server`` yields a RedisServer that a test may ``stop()`` and ``start()`` again on
the same socket: ``stop(keep_data=True)`` (the default) saves the data set first
(SHUTDOWN SAVE into the private directory) and the next start loads it, as a server with
persistence comes back; ``keep_data=False`` kills it and its data with it. Tests skip
when redis-server is not installed (``make test`` installs it when run as root).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest

REDIS_SERVER = shutil.which("redis-server")
START_TIMEOUT = 10.0


def _ask(path: str, command: bytes, timeout: float = 1.0) -> bytes:
    """Send one inline command on a fresh connection and return the first reply bytes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        conn.connect(path)
        conn.sendall(command + b"\r\n")
        return conn.recv(64)


class RedisServer:
    """One redis-server process on ``socket`` (``url``: ``unix://...``), no persistence
    but what ``stop(keep_data=True)`` writes."""

    def __init__(self, directory: str):
        assert REDIS_SERVER is not None
        self.directory = directory
        self.socket = os.path.join(directory, "redis.sock")
        self.url = f"unix://{self.socket}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert self.proc is None, "already running"
        log = open(os.path.join(self.directory, "redis.log"), "ab")
        args = ["--port", "0", "--unixsocket", self.socket, "--unixsocketperm", "700"]
        args += ["--save", "", "--appendonly", "no", "--dir", self.directory, "--dbfilename", "dump.rdb"]
        with log:
            self.proc = subprocess.Popen([str(REDIS_SERVER), *args], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                if _ask(self.socket, b"PING").startswith(b"+PONG"):
                    return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                with open(os.path.join(self.directory, "redis.log"), errors="replace") as f:
                    raise RuntimeError(f"redis-server did not start:\n{f.read()[-2000:]}")
            time.sleep(0.01)

    def stop(self, keep_data: bool = True) -> None:
        """Stop the server; with ``keep_data`` its data set is saved for the next start."""
        if self.proc is None:
            return
        if keep_data:
            try:
                _ask(self.socket, b"SHUTDOWN SAVE", timeout=5.0)
            except OSError:
                pass  # the server closes the connection as it exits
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
        if proc is not None:
            proc.wait(10)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; make test does as root)")
    directory = tempfile.mkdtemp(prefix="bl-redis-")
    os.chmod(directory, 0o700)
    server = RedisServer(directory)
    try:
        server.start()
        yield server
    finally:
        server.kill()
        shutil.rmtree(directory, ignore_errors=True)
