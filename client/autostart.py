"""Start the per-machine model server when none answers on the socket.

Any number of processes may call ``ensure_server`` at once. Each that finds no server
spawns ``python -m modelserver serve``; the servers race for the server lock (see
``modelserver.server``), one wins, the others exit with EXIT_ALREADY_RUNNING, and every
caller waits until the winner answers. An auto-started server runs in its own session
(a Ctrl-C meant for the job does not reach it), logs to ``modelserver.log`` beside its
socket, and exits after ``BEAMLET_SERVER_IDLE_TIMEOUT`` seconds (default 120) with no
client connected, so it never outlives its jobs by much.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from typing import Any

import modelserver
from modelserver import config
from modelserver.channel import Channel
from modelserver.errors import ServerUnavailable

log = logging.getLogger("beamlet.autostart")

IDLE_TIMEOUT_ENV = "BEAMLET_SERVER_IDLE_TIMEOUT"
DEFAULT_IDLE_TIMEOUT = 120.0
START_TIMEOUT = 60.0
EXIT_ALREADY_RUNNING = 3  # modelserver.server.EXIT_ALREADY_RUNNING, without importing torch


FROM_ENV: Any = object()  # "take the idle timeout from BEAMLET_SERVER_IDLE_TIMEOUT"


def server_alive(path: str) -> bool:
    try:
        Channel(path, connect_timeout=2.0).close()
        return True
    except ServerUnavailable:
        return False


def ensure_server(
    path: str,
    extra_args: list[str] | None = None,
    timeout: float = START_TIMEOUT,
    idle_timeout: Any = FROM_ENV,
) -> None:
    """Return once a server answers at ``path``, starting one if needed (with
    ``idle_timeout``, as ``spawn_server`` takes it, when given)."""
    if server_alive(path):
        return
    proc = spawn_server(path, extra_args, idle_timeout)
    try:
        wait_until_serving(path, proc, timeout)
    finally:
        # Reap it whenever it exits, so no zombie stays behind in a long-lived worker.
        threading.Thread(target=proc.wait, name=f"reap-modelserver-{proc.pid}", daemon=True).start()


def wait_until_serving(path: str, proc: subprocess.Popen[bytes], timeout: float = START_TIMEOUT) -> None:
    """Poll until a server answers at ``path``; fail early if ``proc`` died for a reason
    other than losing the start race."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while time.monotonic() < deadline:
        if server_alive(path):
            return
        code = proc.poll()
        if code is not None and code != EXIT_ALREADY_RUNNING:
            raise ServerUnavailable(
                f"the model server started for {path} exited with code {code}; "
                f"see {log_path(path)}:\n{_tail(log_path(path))}"
            )
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)
    raise ServerUnavailable(f"no model server answered at {path} within {timeout:.0f}s; see {log_path(path)}")


def log_path(path: str) -> str:
    return os.path.join(os.path.dirname(path), "modelserver.log")


def spawn_server(
    path: str, extra_args: list[str] | None = None, idle_timeout: Any = FROM_ENV
) -> subprocess.Popen[bytes]:
    """Start ``python -m modelserver serve`` for ``path`` in its own session. The idle
    timeout comes from BEAMLET_SERVER_IDLE_TIMEOUT unless given; None means none."""
    config.ensure_private_dir(os.path.dirname(path))
    if idle_timeout is FROM_ENV:
        idle_timeout = os.environ.get(IDLE_TIMEOUT_ENV, str(DEFAULT_IDLE_TIMEOUT))
    args = [sys.executable, "-m", "modelserver", "serve", "--socket", path]
    if idle_timeout is not None:
        args += ["--idle-timeout", str(idle_timeout)]
    args += extra_args or []
    env = dict(os.environ)
    # The server must import beamlet from wherever this process found it (a checkout or
    # a virtualenv), whatever its working directory.
    root = os.path.dirname(os.path.dirname(os.path.abspath(modelserver.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    fd = os.open(log_path(path), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=fd,
            env=env,
            cwd="/",
            start_new_session=True,
            close_fds=True,
        )
    finally:
        os.close(fd)
    log.info("started model server pid %d for %s", proc.pid, path)
    return proc


def _tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""
