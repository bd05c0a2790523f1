"""Fixtures that start real model servers and always kill and reap what they started."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import psutil
import pytest

from client import autostart
from modelserver import config
from modelserver.channel import Channel
from modelserver.startlock import lock_path
from tests.redis_fixtures import redis_server  # noqa: F401  (a fixture, for tests/test_streams.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def private_dir() -> Iterator[str]:
    """A short private (0700) directory: AF_UNIX paths must stay under 108 bytes."""
    path = tempfile.mkdtemp(prefix="bl-")
    os.chmod(path, 0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sock_path(private_dir: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A socket path for this test; BEAMLET_SOCKET points at it so auto-start uses it too.
    Any server left on it at the end is stopped."""
    path = os.path.join(private_dir, "ms.sock")
    monkeypatch.setenv("BEAMLET_SOCKET", path)
    yield path
    kill_servers(path)


def server_env() -> dict[str, str]:
    return config.child_env()


def wait_for_server(path: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 60.0) -> None:
    """Until a server answers at ``path``; ServerUnavailable if ``proc`` exits first."""
    autostart.wait_until_serving(path, proc, timeout)


def server_processes(path: str) -> list[psutil.Process]:
    """The model servers of ``path``: ``python -m modelserver serve --socket PATH``, or a
    server forked from a harness's zygote (named ``beamlet-server``, its command line the
    harness's) that holds the path's start lock, as a server does for its whole life."""
    lock = lock_path(path)
    found = []
    for p in psutil.process_iter(["cmdline", "name"]):
        cmd = p.info["cmdline"] or []
        if "modelserver" in cmd and "serve" in cmd and path in cmd:
            found.append(p)
        elif p.info["name"] == "beamlet-server":
            try:
                if any(f.path == lock for f in p.open_files()):
                    found.append(p)
            except psutil.Error:
                pass
    return found


def kill_servers(path: str) -> None:
    procs = server_processes(path)
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


@dataclass
class RunningServer:
    path: str
    proc: subprocess.Popen[bytes]

    def channel(self) -> Channel:
        return Channel(self.path)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def start_server(path: str, *args: str) -> RunningServer:
    proc = subprocess.Popen(
        [sys.executable, "-m", "modelserver", "serve", "--socket", path, "--log-level", "WARNING", *args],
        env=server_env(),
        cwd=ROOT,
    )
    try:
        wait_for_server(path, proc)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return RunningServer(path, proc)


@pytest.fixture
def server(sock_path: str) -> Iterator[RunningServer]:
    srv = start_server(sock_path)
    yield srv
    srv.stop()
