"""Micro-benchmarks (pytest-benchmark): the wire codec, and one-row round trips.

    .venv/bin/python -m pytest bench/ --benchmark-only

Not tests: the suite's ``testpaths`` is ``tests``, so a plain ``pytest`` never collects
these. Each benchmark reports a distribution; compare within one run (``--benchmark-group-by
group``), since the absolute figures move with the machine's load.
"""

from __future__ import annotations

import queue
import socket
import threading
from collections.abc import Iterator

import pytest
import torch

from bench import common
from bench.echo import EchoClient
from client.serverclient import ServerClient
from modelserver import wire

pytest.importorskip("pytest_benchmark")

SMALL = {"op": "infer", "key": "identity", "id": 1, "inputs": torch.zeros(1, 4), "kwargs": {}}
LARGE = {"op": "infer", "key": "identity", "id": 1, "inputs": torch.zeros(256, 1024), "kwargs": {}}  # 1 MiB
ECHO = {"op": "infer", "key": "identity", "id": 1, "inputs": bytes(16), "kwargs": {}}


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


@pytest.fixture(scope="module")
def server() -> Iterator[common.ServerProcess]:
    with common.model_server() as srv:
        with srv.channel() as ch:
            ch.request({"op": "load", "key": "identity", "spec": common.identity_spec().to_wire()})
        yield srv


@pytest.fixture(scope="module")
def echo() -> Iterator[common.EchoProcess]:
    with common.echo_server() as proc:
        yield proc


# -- the codec ---------------------------------------------------------------------------
@pytest.mark.benchmark(group="wire-encode")
def test_encode_small(benchmark):
    head, buffers = benchmark(wire.encode, SMALL)
    assert not buffers  # a 16-byte array travels inline in the header


@pytest.mark.benchmark(group="wire-encode")
def test_encode_1mib(benchmark):
    head, buffers = benchmark(wire.encode, LARGE)
    assert sum(b.nbytes for b in buffers) == 1 << 20


@pytest.mark.benchmark(group="wire-frame")
def test_frame_small_over_socketpair(benchmark, pair):
    """encode + sendmsg + FrameReader.read of a 1-row request, one thread."""
    a, b = pair
    reader = wire.FrameReader(b)

    def once():
        wire.send_frame(a, SMALL)
        return reader.read()

    assert benchmark(once)["inputs"].shape == (1, 4)


@pytest.mark.benchmark(group="wire-frame")
def test_frame_1mib_over_socketpair(benchmark, pair):
    """encode + send of 1 MiB on a writer thread, FrameReader.read on this one (a 1 MiB
    frame does not fit a socket buffer, so one thread cannot do both). Includes one
    thread hand-off per frame."""
    a, b = pair
    reader = wire.FrameReader(b)
    go: queue.SimpleQueue[dict | None] = queue.SimpleQueue()

    def writer() -> None:
        while (message := go.get()) is not None:
            wire.send_frame(a, message)

    thread = threading.Thread(target=writer, name="bench-writer", daemon=True)
    thread.start()

    def once():
        go.put(LARGE)
        return reader.read()

    try:
        assert benchmark(once)["inputs"].shape == (256, 1024)
    finally:
        go.put(None)
        thread.join(10)


# -- round trips -------------------------------------------------------------------------
@pytest.mark.benchmark(group="round-trip")
def test_roundtrip_channel(benchmark, server):
    x = torch.zeros(1, 4)
    with server.channel() as ch:
        reply = benchmark(ch.request, {"op": "infer", "key": "identity", "inputs": x})
    assert torch.equal(reply["outputs"], x)


@pytest.mark.benchmark(group="round-trip")
def test_roundtrip_serverclient(benchmark, server):
    x = torch.zeros(1, 4)
    with ServerClient(server.path, autostart=False) as client:
        reply = benchmark(client.infer, "identity", x)
    assert torch.equal(reply["outputs"], x)


@pytest.mark.benchmark(group="round-trip")
def test_roundtrip_msgpack_echo_baseline(benchmark, echo):
    client = EchoClient(echo.path)
    try:
        assert benchmark(client.request, ECHO) == ECHO
    finally:
        client.close()
