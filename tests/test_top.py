"""``python -m modelserver top``: its frame from hand-made statuses (pure), and the real
command under a pseudo terminal against a real server holding a real model."""

from __future__ import annotations

import fcntl
import os
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from client.serverclient import ServerClient
from modelserver import top, userclass
from modelserver.histogram import Histogram
from modelserver.loaders import ModelSpec
from tests.conftest import ROOT, RunningServer, server_env, start_server
from tests.models import MLP, make_checkpoint

KEY = "top-test-mlp"
MiB = 1 << 20


# -- the frame, from hand-made statuses -----------------------------------------------
def histogram(*values: float) -> dict[str, Any]:
    h = Histogram()
    for v in values:
        h.record(v)
    return h.to_wire()


def model(**fields: Any) -> dict[str, Any]:
    m = {
        "key": KEY,
        "loaded": True,
        "device": "cpu",
        "footprint": 3 * MiB,
        "requests": 0,
        "rows": 0,
        "batches": 0,
        "busy_seconds": 0.0,
        "compute_threads": 2,
        "copies": [{"device": "cpu"}],
    }
    m.update(fields)
    return m


def status(*models: dict[str, Any], pid: int = 100, **fields: Any) -> dict[str, Any]:
    s = {
        "pid": pid,
        "socket": "/run/ms.sock",
        "uptime_seconds": 3725,
        "rss": 200 * MiB,
        "connections": 2,
        "requests": 0,
        "devices": {"cpu": {"budget": 1024 * MiB, "used": 256 * MiB, "available": 4096 * MiB}},
        "models": list(models),
    }
    s.update(fields)
    return s


def row(frame: list[str], key: str = KEY) -> list[str]:
    """The columns of ``key``'s row (DEVICE may hold a space: ``cpu x2``)."""
    (line,) = [line for line in frame if line.startswith(key)]
    head, rest = line[: top.KEY_WIDTH + 15], line[top.KEY_WIDTH + 15 :]
    return [head[: top.KEY_WIDTH].strip(), head[top.KEY_WIDTH :].strip(), *rest.split()]


def test_rates_batch_size_busy_share_and_interval_percentiles_come_from_two_samples():
    slow = [4096.0] * 100  # this interval's forwards: 4 ms each; the earlier ones took 1 ms
    before = status(
        model(requests=100, rows=800, batches=50, busy_seconds=3.0,
              histograms={"forward_us": histogram(*[1024.0] * 100), "queue_wait_us": histogram(*[64.0] * 100)}),
        requests=500,
    )  # fmt: skip
    now = status(
        model(requests=300, rows=2400, batches=150, busy_seconds=4.0,
              histograms={"forward_us": histogram(*[1024.0] * 100, *slow),
                          "queue_wait_us": histogram(*[64.0] * 100, *[64.0] * 99, 32768.0)}),
        requests=900,
    )  # fmt: skip
    frame = top.render(now, before, 2.0)
    assert "200.0 requests/s" in frame[0] and "pid 100" in frame[0] and "up 1h02m" in frame[0]
    key, device, loaded, size, unit, req_s, batch, p50, p99, queue_p99, busy = row(frame)
    assert (key, device, loaded, f"{size} {unit}") == (KEY, "cpu", "yes", "3.0 MiB")
    assert float(req_s) == pytest.approx(100.0, abs=0.05)  # 200 requests in 2 s
    assert float(batch) == pytest.approx(16.0, abs=0.05)  # 1600 rows in 100 batches
    assert busy == "25%"  # 1 s busy of 2 s x 2 compute threads
    # the interval's own forwards (4 ms), not the run's mix (powers of two are exact bucket tops)
    assert (p50, p99) == ("4.1ms", "4.1ms")
    assert queue_p99 == "64us"  # one slow wait of the interval's 100 is above its p99
    cumulative = row(top.render(now, None, 0.0))
    assert cumulative[7] == "1.0ms"  # with no earlier sample, the whole run's p50


def test_a_first_sample_a_restarted_server_and_an_older_server_show_dashes():
    before = status(model(requests=10, batches=5, rows=10, busy_seconds=1.0))
    now = status(model(requests=30, batches=15, rows=30, busy_seconds=2.0))
    for frame in (
        top.render(now, None, 0.0),  # nothing to take a rate over yet
        top.render(status(*now["models"], pid=101), before, 1.0),  # a new server: its counters began again
    ):
        assert row(frame)[5:] == ["-"] * 6
        assert "- requests/s" in frame[0]
    # rates but no histograms (a server older than them): the percentiles alone are dashes
    cols = row(top.render(now, before, 1.0))
    assert cols[5:8] == ["20.0", "2.0", "-"] and cols[8:10] == ["-", "-"] and cols[10] == "50%"


def test_counters_that_went_back_count_from_zero_and_idle_models_show_no_busy_share():
    before = status(
        model(requests=500, rows=500, batches=500), model(key="other", loaded=False, compute_threads=0)
    )
    now = status(model(requests=40, rows=80, batches=20), model(key="other", loaded=False, compute_threads=0))
    assert row(top.render(now, before, 2.0))[5:7] == ["20.0", "4.0"]
    other = row(top.render(now, before, 2.0), "other")
    assert other[2] == "no" and other[-1] == "-"


def test_devices_show_budget_use_and_the_machines_readings_and_copies_show_their_count():
    gpu = {"budget": 8192 * MiB, "used": 2048 * MiB, "nvml_total": 16384 * MiB, "nvml_used": 3072 * MiB}
    s = status(
        model(copies=[{"device": "cuda:0"}, {"device": "cuda:1"}], device="cuda:0"),
        devices={"cpu": {"budget": None, "used": 0, "available": 1024 * MiB}, "cuda:0": gpu},
    )
    frame = top.render(s, None, 0.0)
    (cpu,) = [line for line in frame if line.startswith("cpu ")]
    (cuda,) = [line for line in frame if line.startswith("cuda:0 ")]
    assert cpu.split()[:4] == ["cpu", "none", "0", "B"] and "1.0 GiB available" in cpu
    assert cuda.split()[:6] == ["cuda:0", "8.0", "GiB", "2.0", "GiB", "25%"]
    assert "NVML 3.0 GiB used of 16.0 GiB" in cuda
    assert row(frame)[1] == "cuda:0,1 x2"
    assert top.render(status(), None, 0.0)[-1] == "(no models registered)"


# -- the real command ----------------------------------------------------------------
@pytest.fixture(scope="module")
def loaded_server() -> Iterator[RunningServer]:
    """A server holding ``KEY`` (a small MLP), which has answered one request."""
    directory = tempfile.mkdtemp(prefix="bl-top-")
    os.chmod(directory, 0o700)
    path = os.path.join(directory, "mlp.pt")
    make_checkpoint(path)
    srv = start_server(os.path.join(directory, "ms.sock"))
    try:
        with ServerClient(srv.path, autostart=False) as client:
            client.load(KEY, ModelSpec("pytorch_state_dict", path, userclass.describe(MLP), {}))
            client.infer(KEY, torch.randn(4, 8))
        yield srv
    finally:
        srv.stop()
        shutil.rmtree(directory, ignore_errors=True)


class Terminal:
    """``python -m modelserver top`` on a pseudo terminal of ``rows`` x ``cols``."""

    def __init__(self, socket_path: str, rows: int, cols: int, *args: str):
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        env = {**server_env(), "TERM": "xterm"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "modelserver", "top", "--socket", socket_path, *args],
            stdin=slave, stdout=slave, stderr=slave, env=env, cwd=ROOT, start_new_session=True,
        )  # fmt: skip
        os.close(slave)
        self.master = master
        self.output = b""

    def read_until(self, done: Any, timeout: float = 30.0) -> None:
        """Read what the command writes until ``done(output)`` holds (AssertionError after
        ``timeout`` seconds, or if the command exits first)."""
        deadline = time.monotonic() + timeout
        while not done(self.output):
            left = deadline - time.monotonic()
            assert left > 0, f"timed out; the terminal got: {self.output[-2000:]!r}"
            if select.select([self.master], [], [], left)[0]:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:  # EIO: the command has closed its terminal
                    chunk = b""
                assert chunk, f"top exited ({self.proc.poll()}): {self.output[-2000:]!r}"
                self.output += chunk

    def quit(self, timeout: float = 15.0) -> int:
        """Press ``q``; the exit code, reading its output meanwhile so it never blocks."""
        os.write(self.master, b"q")
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            if select.select([self.master], [], [], 0.1)[0]:
                try:
                    self.output += os.read(self.master, 65536)
                except OSError:
                    pass
        return self.proc.wait(max(0.1, deadline - time.monotonic()))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


def test_top_under_a_terminal_shows_the_loaded_model_at_every_refresh_and_quits_on_q(loaded_server):
    term = Terminal(loaded_server.path, 30, 150, "--interval", "0.2")
    try:
        # each refresh repaints the whole screen, so the key is written once per refresh
        term.read_until(lambda out: out.count(KEY.encode()) >= 3)
        assert b"FOOTPRINT" in term.output and b"server unavailable" not in term.output
        assert term.quit() == 0
    finally:
        term.close()


def test_top_says_the_server_is_unavailable_and_keeps_trying_in_a_tiny_terminal(tmp_path):
    term = Terminal(str(tmp_path / "nobody.sock"), 4, 20, "--interval", "0.1", "--timeout", "0.5")
    try:
        # lines cut to 19 columns; two refreshes each say so, and the command is still running
        term.read_until(lambda out: out.count(b"server unavailable") >= 2)
        assert term.proc.poll() is None
        assert term.quit() == 0
    finally:
        term.close()


def test_top_once_prints_one_plain_frame_with_rates(loaded_server):
    run = subprocess.run(
        [sys.executable, "-m", "modelserver", "top", "--socket", loaded_server.path, "--once",
         "--interval", "0.1"],
        env=server_env(), cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    frame = run.stdout.splitlines()
    assert "\x1b" not in run.stdout and frame[0].startswith("beamlet top - server pid")
    cols = row(frame)
    assert cols[1:3] == ["cpu", "yes"] and float(cols[5]) == 0.0  # a rate, not a dash: two samples
    assert any(line.startswith("cpu ") for line in frame)
    missing = subprocess.run(
        [sys.executable, "-m", "modelserver", "top", "--socket", loaded_server.path + ".none", "--once"],
        env=server_env(), cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert missing.returncode == 1 and "no server at" in missing.stderr
