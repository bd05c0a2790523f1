"""Issue 11, hardening: nothing freezes, nothing waits forever. Real servers on real
sockets, with small torch models made here (tests/hardening_models.py)."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest
import torch

from modelserver import loaders, serverlog, userclass, wire
from modelserver.channel import Channel
from modelserver.errors import BadInput, ModelError, ModelLoadError
from modelserver.loaders import ModelSpec
from tests.conftest import ROOT, RunningServer, kill_servers, server_env, start_server
from tests.hardening_models import Faulty, Wide
from tests.models import MLP, Blob, blob_side, make_blob, make_checkpoint

MB = 1 << 20


def spec_of(cls: type, path: str | None = None, **params) -> ModelSpec:
    return ModelSpec("pytorch_state_dict", path, userclass.describe(cls), params)


def load_request(key: str, spec: ModelSpec) -> dict:
    return {"op": "load", "key": key, "spec": spec.to_wire()}


def channel(path: str, timeout: float = 30.0) -> Channel:
    """A channel whose reads give up after ``timeout`` seconds: a hung server fails the
    test instead of hanging it."""
    ch = Channel(path)
    ch.sock.settimeout(timeout)
    return ch


def wait_ready(path: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Wait until the server answers a hello, each try bounded (conftest's wait_for_server
    would wait forever on a server that accepts but never answers)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited with {proc.returncode}"
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(2)
                s.connect(path)
                wire.send_frame(s, {"op": "hello", "id": 1, "version": wire.VERSION, "pid": os.getpid()})
                if wire.FrameReader(s).read()["ok"]:
                    return
        except OSError:
            time.sleep(0.02)
    raise AssertionError(f"no answer from the server at {path} within {timeout:.0f}s")


@pytest.fixture(scope="module")
def workdir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="bl-h-")
    os.chmod(path, 0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def plain_server(workdir: str) -> Iterator[RunningServer]:
    """One server with the default settings, shared by the tests that only send requests."""
    path = os.path.join(workdir, "plain.sock")
    srv = start_server(path)
    yield srv
    srv.stop()
    kill_servers(path)


# -- 4: whose fault a failure is -----------------------------------------------------------
def test_a_models_own_exception_is_a_model_error_with_its_traceback(plain_server):
    with channel(plain_server.path) as ch:
        ch.request(load_request("faulty", spec_of(Faulty, depth=3)))
        with pytest.raises(ModelError) as caught:
            ch.request({"op": "infer", "key": "faulty", "inputs": torch.ones(2, 4)})
        text = str(caught.value)
        assert text.startswith("model tests.hardening_models:Faulty")
        assert "ZeroDivisionError in forward on input float32[2, 4]: the model's own bug, on 2 rows" in text
        assert text.count("in _left") == 3 and text.count("in _right") == 2, text  # down to the raise
        assert "_call_impl" not in text  # torch's module-call wrappers are left out
        # hundreds of frames deep: the message stays bounded and keeps the innermost frames
        ch.request(load_request("deep", spec_of(Faulty, depth=400)))
        with pytest.raises(ModelError) as caught:
            ch.request({"op": "infer", "key": "deep", "inputs": torch.ones(1, 4)})
        text = str(caught.value)
        assert len(text) < loaders.MAX_ERROR_TEXT + 500
        assert "characters cut" in text and text.endswith("in _left"), text[-300:]


def test_arguments_the_signature_does_not_take_are_bad_input(plain_server):
    with channel(plain_server.path) as ch:
        ch.request(load_request("mlp", spec_of(MLP)))
        with pytest.raises(BadInput, match=r"forward\(x\) does not take input float32\[2, 8\] with bias"):
            ch.request({"op": "infer", "key": "mlp", "inputs": torch.ones(2, 8), "kwargs": {"bias": 1.0}})
        with pytest.raises(BadInput, match="unexpected keyword argument 'y'"):
            ch.request(
                {"op": "infer", "key": "mlp", "inputs": {"x": torch.ones(2, 8), "y": torch.ones(2, 8)}}
            )
        assert ch.request({"op": "infer", "key": "mlp", "inputs": torch.ones(2, 8)})["outputs"].shape == (
            2,
            3,
        )


# -- 5: a state_dict that does not fit says everything that does not fit --------------------
def test_a_misfitting_state_dict_is_reported_whole(plain_server, workdir):
    narrow = os.path.join(workdir, "narrow.pt")
    make_checkpoint(narrow, d_in=5)
    blob = os.path.join(workdir, "blob.pt")
    torch.save(Blob(4).state_dict(), blob)
    shapes = ("size mismatch for net.0.weight", "torch.Size([16, 5])", "torch.Size([16, 8])")
    keys = (
        'Missing key(s) in state_dict: "net.0.weight", "net.0.bias", "net.2.weight"',
        'Unexpected key(s) in state_dict: "lin.weight"',
    )
    for path, expected in ((narrow, shapes), (blob, keys)):
        for attempt in (loaders.load, loaders.check):  # a load, and the check before a drained swap
            with pytest.raises(ModelLoadError) as caught:
                attempt(spec_of(MLP, path))
            for part in expected:
                assert part in str(caught.value), (attempt.__name__, str(caught.value))
    with channel(plain_server.path) as ch:  # and over the wire, whole
        with pytest.raises(ModelLoadError) as caught:
            ch.request(load_request("blob-as-mlp", spec_of(MLP, blob)))
    assert all(part in str(caught.value) for part in keys), str(caught.value)
    # 600 misfits: bounded, and says how much it left out
    wide = os.path.join(workdir, "wide.pt")
    torch.save(Wide(300, 2).state_dict(), wide)
    with pytest.raises(ModelLoadError, match="size mismatch for layers.0.weight") as caught:
        loaders.load(spec_of(Wide, wide, n=300, d=3))
    assert len(str(caught.value)) < loaders.MAX_ERROR_TEXT + 300 and "characters cut" in str(caught.value)


# -- 1: logging never blocks serving or stopping --------------------------------------------
def full_pipe() -> tuple[int, int]:
    """A pipe whose buffer is full: the next write to ``w`` blocks until ``r`` is read."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    for chunk in (b"x" * 4096, b"x"):
        try:
            while True:
                os.write(w, chunk)
        except BlockingIOError:
            pass
    os.set_blocking(w, True)
    return r, w


def test_the_log_pump_drops_and_counts_instead_of_blocking():
    r, w = full_pipe()
    logger = logging.getLogger("beamlet.test-pump")
    logger.propagate = False
    pump = serverlog.LogPump(w, capacity=4, logger=logger)
    try:
        writer = threading.Thread(target=lambda: [logger.info("record %d", i) for i in range(50)])
        writer.start()
        writer.join(10)
        assert not writer.is_alive(), "logging blocked on a full pipe"
        # the writer thread holds one record, blocked on the pipe; four wait; the rest are gone
        assert 50 - 4 - 1 <= pump.dropped <= 50 - 4
        read: list[bytes] = []
        reader = threading.Thread(target=lambda: read.extend(iter(lambda: os.read(r, 65536), b"")))
        reader.start()  # now someone reads: what was queued is written
        deadline = time.monotonic() + 10
        while not pump._queue.empty():  # noqa: SLF001
            assert time.monotonic() < deadline, "the queue never drained"
            time.sleep(0.005)
        logger.warning("after")  # the next record says how many were lost, then itself
        assert pump.close(timeout=10)
    finally:
        os.close(w)
        reader.join(10)
        os.close(r)
    text = b"".join(read).decode()
    note = f"{pump.dropped} log records were dropped: the log output was not being read"
    assert note in text and text.index(note) < text.index("after")
    assert "record 0" in text and "record 49" not in text


def test_a_stderr_pipe_nobody_reads_blocks_no_load_eviction_or_sigterm(workdir):
    """The server logs every load and eviction at INFO into a pipe that is full from the
    start and never read: every request completes, the log queue (8 records) drops and
    counts, and SIGTERM stops the server within its deadline."""
    sizes = {"a": 6, "b": 6, "c": 6}  # MiB; the budget below holds two
    blobs = {}
    for i, (key, mb) in enumerate(sizes.items()):
        path = os.path.join(workdir, f"log-{key}.pt")
        blobs[key] = (make_blob(path, mb, seed=i), spec_of(Blob, path, d=blob_side(mb)))
    path = os.path.join(workdir, "log.sock")
    r, w = full_pipe()
    args = ["--memory-budget", "15MiB", "--log-level", "DEBUG", "--log-queue", "8"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "modelserver", "serve", "--socket", path, *args],
        stderr=w,
        env=server_env(),
        cwd=ROOT,
    )
    os.close(w)
    try:
        wait_ready(path, proc)
        with channel(path, timeout=20) as ch:
            for key, (_, spec) in blobs.items():
                ch.request(load_request(key, spec))
            for i in range(24):  # round robin over three models where two fit: loads and evictions
                key = "abc"[i % 3]
                x = torch.randn(2, blob_side(sizes[key]))
                out = ch.request({"op": "infer", "key": key, "inputs": x})["outputs"]
                with torch.inference_mode():
                    assert torch.allclose(out, blobs[key][0](x), atol=1e-5)
            status = ch.request({"op": "status"})["status"]
        evictions = sum(m["evictions"] for m in status["models"])
        assert evictions >= 8 and sum(m["loads"] for m in status["models"]) == evictions + 2  # two fit
        assert status["log_records_dropped"] > 0
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert time.monotonic() - started < 15
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(r)
