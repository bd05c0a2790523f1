"""Start the per-machine model server when none answers on the socket.

Any number of processes may call ``ensure_server`` at once, and exactly one server is
spawned. The start is decided by the start lock (``modelserver.startlock``: an flock on
``<socket>.lock`` in the socket's private directory), which a live server holds for its
whole life. A caller that finds no server answering tries the lock: if it gets it, no
server runs (a stale socket file is just that), so it spawns one and hands the lock over
to it; if it does not, a server runs or is starting, and the caller waits for it to
answer. Only the directory's owner can take the lock, so no other user can block the
start or stand in for the server.

An auto-started server runs in its own session (a Ctrl-C meant for the job does not
reach it), logs to ``modelserver.log`` beside its socket (a line there records each
start, and who asked for it), and exits after ``BEAMLET_SERVER_IDLE_TIMEOUT`` seconds
(default 120) with no client connected, so it never outlives its jobs by much.

Every wait here has a deadline: a server that holds the lock but never answers (stopped
with SIGSTOP, wedged) makes ``ensure_server`` fail with ``ServerUnavailable`` after
``timeout`` seconds, and each probe of it is bounded by ``probe_timeout``.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any, Protocol

from modelserver import config, logformat
from modelserver.channel import Channel
from modelserver.errors import ServerUnavailable
from modelserver.startlock import FD_ENV, StartLock, lock_path

log = logging.getLogger("beamlet.autostart")

IDLE_TIMEOUT_ENV = "BEAMLET_SERVER_IDLE_TIMEOUT"
DEFAULT_IDLE_TIMEOUT = 120.0
START_TIMEOUT = 60.0
PROBE_TIMEOUT = 2.0  # a live server says hello in milliseconds, even while it computes
EXIT_ALREADY_RUNNING = 3  # modelserver.server.EXIT_ALREADY_RUNNING, without importing torch


FROM_ENV: Any = object()  # "take the idle timeout from BEAMLET_SERVER_IDLE_TIMEOUT"


class Process(Protocol):
    """A started server process: a ``subprocess.Popen``, or anything that polls like one."""

    pid: int

    def poll(self) -> int | None: ...


def server_alive(path: str, timeout: float = PROBE_TIMEOUT) -> bool:
    """True when a server at ``path`` answers a hello within ``timeout`` seconds."""
    try:
        Channel(path, connect_timeout=timeout, request_timeout=timeout, shm_bytes=0).close()
        return True
    except ServerUnavailable:
        return False


def ensure_server(
    path: str,
    extra_args: list[str] | None = None,
    timeout: float = START_TIMEOUT,
    idle_timeout: Any = FROM_ENV,
    *,
    probe_timeout: float = PROBE_TIMEOUT,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes] | None:
    """Return once a server answers at ``path``, starting one if none runs (with
    ``extra_args``, ``idle_timeout`` and ``env``, as ``spawn_server`` takes them): the process
    this call started (a thread reaps it when it exits), or None when a server was
    already running or being started. Raises ``ServerUnavailable`` when none answers
    within ``timeout`` seconds, PermissionError when the socket's directory is not
    private to us."""
    deadline = time.monotonic() + timeout
    lock = claim_start(path, timeout, probe_timeout)
    if lock is None:
        return None
    # We hold the lock, so no server runs: start one and hand the lock to it.
    try:
        proc = spawn_server(path, extra_args, idle_timeout, lock=lock, env=env)
    except BaseException:
        lock.release()
        raise
    lock.detach()
    try:
        wait_until_serving(path, proc, max(deadline - time.monotonic(), probe_timeout), probe_timeout)
    finally:
        reap_in_background(proc)
    return proc


def claim_start(
    path: str, timeout: float = START_TIMEOUT, probe_timeout: float = PROBE_TIMEOUT
) -> StartLock | None:
    """None once a server answers at ``path``; or the start lock, when none runs and it
    falls to the caller to start one (and hand the lock to it, or release it). Raises
    ``ServerUnavailable`` when someone holds the lock but no server answers within
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        if server_alive(path, probe_timeout):
            return None
        lock = StartLock.try_acquire(path)
        if lock is not None:
            return lock
        if time.monotonic() + delay > deadline:
            raise ServerUnavailable(
                f"no model server answered at {path} within {timeout:.0f}s, and one holds "
                f"{lock_path(path)} (starting, or stopped/wedged); see {log_path(path)}"
            )
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)


def reap_in_background(proc: subprocess.Popen[bytes]) -> None:
    """Reap ``proc`` whenever it exits, so no zombie stays behind in a long-lived process."""
    threading.Thread(target=proc.wait, name=f"reap-modelserver-{proc.pid}", daemon=True).start()


def wait_until_serving(
    path: str,
    proc: Process | None = None,
    timeout: float = START_TIMEOUT,
    probe_timeout: float = PROBE_TIMEOUT,
) -> None:
    """Poll until a server answers at ``path``, for up to ``timeout`` seconds; raise
    ``ServerUnavailable`` then, or as soon as ``proc`` (the server we started, if any)
    exits for a reason other than another server holding the path (code 3, then we wait
    for that one)."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        if server_alive(path, probe_timeout):
            return
        code = proc.poll() if proc is not None else None
        if code is not None and code != EXIT_ALREADY_RUNNING:
            raise ServerUnavailable(
                f"the model server started for {path} exited with code {code}; "
                f"see {log_path(path)}:\n{_tail(log_path(path))}"
            )
        if time.monotonic() + delay > deadline:
            raise ServerUnavailable(
                f"no model server answered at {path} within {timeout:.0f}s; see {log_path(path)}"
            )
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)


def log_path(path: str) -> str:
    return os.path.join(os.path.dirname(path), "modelserver.log")


def spawn_server(
    path: str,
    extra_args: list[str] | None = None,
    idle_timeout: Any = FROM_ENV,
    *,
    lock: StartLock | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``python -m modelserver serve`` for ``path`` in its own session, with this
    process's environment and ``env`` set. The idle timeout comes from
    BEAMLET_SERVER_IDLE_TIMEOUT unless given; None means none.

    With ``lock`` (the start lock, held), the server inherits it and keeps it: the caller
    then only ``detach``es its own copy. Without, the server takes the lock itself, or
    exits with code 3 when another server holds it."""
    config.ensure_private_dir(os.path.dirname(path))
    args = [sys.executable, "-m", "modelserver", *serve_args(path, extra_args, idle_timeout)]
    child = server_env(env)
    if lock is not None:
        child.update(lock.child_env())
    fd = open_log(path)
    try:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=fd,
            env=child,
            cwd="/",
            start_new_session=True,
            close_fds=True,
            pass_fds=(lock.fd,) if lock is not None else (),
        )
    finally:
        os.close(fd)
    log.info("started model server pid %d for %s", proc.pid, path)
    return proc


def serve_args(path: str, extra_args: list[str] | None = None, idle_timeout: Any = FROM_ENV) -> list[str]:
    """``serve --socket PATH [--idle-timeout S] EXTRA...``: the arguments of
    ``python -m modelserver`` for a server of ``path`` (the idle timeout as ``spawn_server``
    takes it)."""
    if idle_timeout is FROM_ENV:
        idle_timeout = os.environ.get(IDLE_TIMEOUT_ENV, str(DEFAULT_IDLE_TIMEOUT))
    args = ["serve", "--socket", path]
    if idle_timeout is not None:
        args += ["--idle-timeout", str(idle_timeout)]
    return args + list(extra_args or [])


def server_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """A server's environment: this process's, with ``env`` set, and no start lock named
    (the spawner adds the one it hands over)."""
    child = config.child_env(env)
    child.pop(FD_ENV, None)
    return child


def open_log(path: str) -> int:
    """The server's log (``modelserver.log`` beside the socket, appended to, 0600), with a
    line that says who is starting a server (in the ``BEAMLET_LOG_FORMAT`` the server will
    log in): a descriptor for its stdout and stderr."""
    fd = os.open(log_path(path), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        note = logformat.line(
            logformat.default_format(), log.name, logging.INFO, f"starting a model server for {path}"
        )
        os.write(fd, (note + "\n").encode())
    except BaseException:
        os.close(fd)
        raise
    return fd


def _tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""
