"""The round-trip baseline: a plain msgpack echo over a Unix socket, in Python.

``python -m bench.echo PATH`` serves on PATH: one thread per connection reads a frame
(a 4-byte big-endian length, then msgpack), unpacks it, packs it again and sends it back.
``EchoClient`` is the other end. No torch here: the baseline is what a minimal Python
request/reply over the same kind of socket costs, with the same (de)serialiser.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import sys
import threading
from typing import Any

import msgpack

LENGTH = struct.Struct("!I")
BUFSIZE = 64 * 1024


class _Reader:
    """Length-prefixed frames from one socket, through a small look-ahead buffer."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray()

    def read(self) -> bytes | None:
        while len(self.buf) < LENGTH.size:
            if not self._more():
                return None
        (n,) = LENGTH.unpack_from(self.buf)
        while len(self.buf) < LENGTH.size + n:
            if not self._more():
                raise ConnectionError("connection closed inside a frame")
        frame = bytes(self.buf[LENGTH.size : LENGTH.size + n])
        del self.buf[: LENGTH.size + n]
        return frame

    def _more(self) -> bool:
        chunk = self.sock.recv(BUFSIZE)
        if not chunk:
            return False
        self.buf += chunk
        return True


def send(sock: socket.socket, message: Any) -> None:
    payload = msgpack.packb(message, use_bin_type=True)
    sock.sendall(LENGTH.pack(len(payload)) + payload)


class EchoClient:
    """A blocking client: ``request(message)`` sends it and returns the echoed message."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self._reader = _Reader(self.sock)

    def request(self, message: Any) -> Any:
        send(self.sock, message)
        frame = self._reader.read()
        if frame is None:
            raise ConnectionError("echo server closed the connection")
        return msgpack.unpackb(frame, raw=False)

    def close(self) -> None:
        self.sock.close()


def _serve_connection(sock: socket.socket) -> None:
    reader = _Reader(sock)
    with sock:
        try:
            while (frame := reader.read()) is not None:
                send(sock, msgpack.unpackb(frame, raw=False))
        except OSError:
            pass


def serve(path: str) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    while True:
        sock, _ = listener.accept()
        threading.Thread(target=_serve_connection, args=(sock,), name="echo-conn", daemon=True).start()


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python -m bench.echo SOCKET_PATH")
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    serve(sys.argv[1])


if __name__ == "__main__":
    main()
