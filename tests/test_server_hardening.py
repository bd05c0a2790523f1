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

import psutil
import pytest
import torch

from modelserver import loaders, serverlog, userclass, wire
from modelserver.__main__ import build_parser
from modelserver.channel import Channel
from modelserver.errors import BadInput, ModelError, ModelLoadError, Overloaded
from modelserver.loaders import ModelSpec
from tests.conftest import ROOT, RunningServer, kill_servers, server_env, start_server
from tests.hardening_models import Faulty, GatedMLP, SlowLoad, Wide
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


# -- 2: bounded queues, admission control, bounded reply backlog ------------------------------
QUEUE_ROWS, QUEUE_BYTES, BACKLOG = 64, 1 * MB, 4 * MB


@pytest.fixture(scope="module")
def bounded_server(workdir: str) -> Iterator[RunningServer]:
    path = os.path.join(workdir, "bounded.sock")
    srv = start_server(
        path,
        *("--max-queue-rows", str(QUEUE_ROWS), "--max-queue-bytes", str(QUEUE_BYTES)),
        *("--max-reply-backlog", str(BACKLOG)),
    )
    yield srv
    srv.stop()
    kill_servers(path)


class RssPeak:
    """Samples a process's RSS every 5 ms in a thread, keeping the peak."""

    def __init__(self, pid: int):
        self.process = psutil.Process(pid)
        self.baseline = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(10)
        return self.peak - self.baseline


def model_status(path: str, key: str) -> dict:
    with channel(path) as ch:
        return next(m for m in ch.request({"op": "status"})["status"]["models"] if m["key"] == key)


def poll(condition, timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_a_flood_is_refused_with_overloaded_and_every_request_gets_one_reply(bounded_server, workdir):
    """Four clients pipeline 150 requests each (128 KiB, 8 rows apiece: 75 MiB in all) at a
    model held busy (a request on each compute thread); its queue takes 8 (64 rows, 1 MiB),
    the rest are refused at once.
    Merging is off for the model (``max_batch_duration_secs`` 0): the batch the gate holds
    is then exactly the first request, not however many joined it before it closed."""
    gate = os.path.join(workdir, "flood-gate")
    d_in, n_each, clients = 4096, 150, 4
    spec = spec_of(GatedMLP, gate=gate, d_in=d_in, hidden=8, d_out=4)
    with channel(bounded_server.path) as ch:
        ch.request({**load_request("gated", spec), "batching": {"max_batch_duration_secs": 0}})
    compute_threads = model_status(bounded_server.path, "gated")["compute_threads"]
    assert 1 <= compute_threads < clients
    rss = RssPeak(bounded_server.proc.pid)
    xs = [[torch.randn(8, d_in) for _ in range(n_each)] for _ in range(clients)]
    replies: dict[int, list] = {}

    def flood(c: int) -> None:
        with channel(bounded_server.path) as ch:
            replies[c] = ch.request_many([{"op": "infer", "key": "gated", "inputs": x} for x in xs[c]])
            # a stray extra reply would come before this one and break the channel
            assert ch.request({"op": "status"})["status"]["pid"] == bounded_server.proc.pid

    threads = [threading.Thread(target=flood, args=(c,)) for c in range(clients)]
    try:
        for t in threads:
            t.start()
        # one request per compute thread runs (held by the gate) for the reader of the
        # connection it came on, which reads no further; the other connections are read
        # to the end
        refused = (clients - compute_threads) * n_each - QUEUE_ROWS // 8
        poll(lambda: model_status(bounded_server.path, "gated")["overloaded"] >= refused, what="the refusals")
        held = model_status(bounded_server.path, "gated")
        assert held["queued_rows"] == QUEUE_ROWS and held["queued_bytes"] == QUEUE_BYTES
        assert held["overloaded"] == refused
    finally:
        open(gate, "w").close()
        for t in threads:
            t.join(60)
    growth = rss.stop()
    assert all(not t.is_alive() for t in threads)
    reference = GatedMLP(gate=gate, d_in=d_in, hidden=8, d_out=4).eval()
    ok = overloaded = 0
    for c in range(clients):
        assert len(replies[c]) == n_each
        for x, reply in zip(xs[c], replies[c]):
            if isinstance(reply, Overloaded):
                assert 0 < reply.retry_after <= 5 and "--max-queue-rows" in str(reply)
                overloaded += 1
            else:
                with torch.inference_mode():
                    assert torch.allclose(reply["outputs"], reference(x), atol=1e-5)
                ok += 1
    assert ok + overloaded == clients * n_each and ok > QUEUE_ROWS // 8 and overloaded >= refused
    final = model_status(bounded_server.path, "gated")
    assert final["requests"] == ok and final["overloaded"] == overloaded and final["queued"] == 0
    print(f"flood: {ok} served, {overloaded} overloaded; server RSS +{growth / MB:.1f} MiB at peak")
    assert growth < 24 * MB, f"server RSS grew {growth / MB:.1f} MiB under a 75 MiB flood"


def test_a_client_that_reads_no_replies_stops_being_read(bounded_server):
    """A client pipelines 128 requests of 256 KiB to an identity model and reads nothing:
    once 4 MiB of replies wait for it, the server reads no more of its requests."""
    with channel(bounded_server.path) as ch:
        ch.request(
            load_request(
                "id", ModelSpec("pytorch_state_dict", None, {"name": "torch.nn:Identity", "source": None})
            )
        )
    rss = RssPeak(bounded_server.proc.pid)
    x = torch.ones(64, 1024)  # 256 KiB
    n, sent = 128, [0]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(bounded_server.path)
    s.settimeout(30)
    wire.send_frame(s, {"op": "hello", "id": 0, "version": wire.VERSION, "pid": os.getpid()})

    def send_all() -> None:
        try:
            for i in range(n):
                wire.send_frame(s, {"op": "infer", "id": i + 1, "key": "id", "inputs": x})
                sent[0] += 1
        except OSError:
            pass

    sender = threading.Thread(target=send_all)
    sender.start()
    try:
        with channel(bounded_server.path) as ch:
            poll(
                lambda: ch.request({"op": "status"})["status"]["reply_backlog_bytes"] >= BACKLOG,
                what="the backlog to fill",
            )
            sender.join(1.0)
            assert sender.is_alive(), "the server kept reading a client that reads no replies"
            assert sent[0] <= BACKLOG // x.nbytes + 8 < n  # the backlog, plus what socket buffers hold
            backlog = ch.request({"op": "status"})["status"]["reply_backlog_bytes"]
            assert backlog <= BACKLOG + 2 * x.nbytes
            growth = rss.stop()
            print(
                f"backlog: {sent[0]} of {n} requests read, {backlog / MB:.1f} MiB unread, RSS +{growth / MB:.1f} MiB"
            )
            assert growth < BACKLOG + 16 * MB
            s.shutdown(socket.SHUT_RDWR)  # the client goes: its replies are dropped with it
            sender.join(10)
            poll(lambda: ch.request({"op": "status"})["status"]["connections"] == 1, what="the drop")
            status = ch.request({"op": "status"})["status"]
            assert status["reply_backlog_bytes"] == 0
            assert torch.equal(ch.request({"op": "infer", "key": "id", "inputs": x})["outputs"], x)
    finally:
        s.close()
        sender.join(10)


# -- 3: a reload never holds up the connection's other requests -------------------------------
def test_a_held_reload_does_not_hold_up_other_models_on_the_same_connection(sock_path, private_dir):
    hold = os.path.join(private_dir, "hold")
    d = blob_side(24)
    tiny_path = os.path.join(private_dir, "tiny.pt")
    tiny = make_checkpoint(tiny_path)
    # LRU, so that which model goes is plain: the least recently used
    srv = start_server(sock_path, "--memory-budget", "40MiB", "--eviction-policy", "lru")
    try:
        with channel(sock_path) as ch:
            ch.request(load_request("slow", spec_of(SlowLoad, hold=hold, d=d)))
            ch.request(load_request("tiny", spec_of(MLP, tiny_path)))
            ch.request({"op": "infer", "key": "tiny", "inputs": torch.ones(1, 8)})
            ch.request(load_request("big", spec_of(Blob, d=d)))  # 24 + 24 MiB do not fit 40
            ch.request({"op": "infer", "key": "tiny", "inputs": torch.ones(1, 8)})  # big goes first
        assert not model_status(sock_path, "slow")["loaded"] and model_status(sock_path, "tiny")["loaded"]
        open(hold, "w").close()  # from now on, loading "slow" takes until the file goes
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(sock_path)
            s.settimeout(10)
            frames = wire.FrameReader(s)
            wire.send_frame(s, {"op": "hello", "id": 0, "version": wire.VERSION, "pid": os.getpid()})
            assert frames.read()["ok"]
            wire.send_frame(s, {"op": "infer", "id": 1, "key": "slow", "inputs": torch.ones(2, 1)})
            xs = {i: torch.randn(3, 8) for i in range(2, 12)}
            for i, x in xs.items():
                wire.send_frame(s, {"op": "infer", "id": i, "key": "tiny", "inputs": x})
            for _ in xs:  # all of tiny's replies come while slow's reload is held
                reply = frames.read()
                assert reply["ok"] and reply["id"] in xs, reply
                with torch.inference_mode():
                    assert torch.allclose(reply["outputs"], tiny(xs[reply["id"]]), atol=1e-6)
            waiting = model_status(sock_path, "slow")
            assert not waiting["loaded"] and waiting["waiting_for_load"] == 1
            os.unlink(hold)
            reply = frames.read()
            assert reply["id"] == 1 and torch.equal(reply["outputs"], torch.full((2, 1), 2.0))
        slow = model_status(sock_path, "slow")
        assert slow["loaded"] and slow["loads"] == 2 and slow["misses"] == 1
        assert model_status(sock_path, "tiny")["loaded"] and not model_status(sock_path, "big")["loaded"]
    finally:
        if os.path.exists(hold):
            os.unlink(hold)
        srv.stop()


# -- 6: the deterministic mode -----------------------------------------------------------------
def test_deterministic_mode_never_merges_and_matches_each_request_alone(sock_path, private_dir):
    gate = os.path.join(private_dir, "gate")
    log_file = os.path.join(private_dir, "server.log")
    srv = start_server(sock_path, "--deterministic", "--log-file", log_file, "--log-level", "INFO")
    k = 6
    xs = [[torch.randn(rows, 8) for rows in range(1, k + 1)] for _ in range(2)]
    out: dict[int, list] = {}
    try:
        with channel(sock_path) as ch:
            ch.request(load_request("g", spec_of(GatedMLP, gate=gate)))
            assert ch.request({"op": "status"})["status"]["deterministic"] is True

        def client(c: int) -> None:
            with channel(sock_path) as ch:
                out[c] = [
                    r["outputs"]
                    for r in ch.request_many([{"op": "infer", "key": "g", "inputs": x} for x in xs[c]])
                ]

        threads = [threading.Thread(target=client, args=(c,)) for c in range(2)]
        for t in threads:
            t.start()
        try:  # every request waits at once: without the mode they would share forward passes
            # one runs for the reader of the connection it came on (which reads no further
            # meanwhile); the other connection's all queue behind it
            poll(lambda: model_status(sock_path, "g")["in_flight"] == k + 1, what="the requests queued")
        finally:
            open(gate, "w").close()
            for t in threads:
                t.join(30)
        stats = model_status(sock_path, "g")
        assert stats["requests"] == stats["batches"] == 2 * k
        with channel(sock_path) as ch:
            for c in range(2):
                for x, y in zip(xs[c], out[c]):
                    assert torch.equal(ch.request({"op": "infer", "key": "g", "inputs": x})["outputs"], y)
    finally:
        srv.stop()
    with open(log_file) as f:
        text = f.read()
    assert "listening on" in text and "loaded g" in text


def test_the_deterministic_mode_comes_from_the_flag_or_the_environment(monkeypatch):
    monkeypatch.delenv("BEAMLET_DETERMINISTIC", raising=False)
    assert build_parser().parse_args(["serve"]).deterministic is False
    assert build_parser().parse_args(["serve", "--deterministic"]).deterministic is True
    monkeypatch.setenv("BEAMLET_DETERMINISTIC", "1")
    assert build_parser().parse_args(["serve"]).deterministic is True
    for off in ("0", "", "no"):
        monkeypatch.setenv("BEAMLET_DETERMINISTIC", off)
        assert build_parser().parse_args(["serve"]).deterministic is False
