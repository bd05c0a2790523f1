"""The harness's hold on the model server: start it if the run needs one and none runs,
make it serve the run's model versions, start a new one if it dies, stop it at the end
if this run started it. The server it starts gets the run's environment on top of the
harness's own (deterministic mode).

A server it starts is forked from the run's zygote (runtime/zygote.py) when the run has
one, so it does not import torch again; else it is ``python -m modelserver serve``, as a
client starts one. Either way under the start lock, which the server then holds, and
either way ``start`` returns without waiting for it: the workers start meanwhile, and
``wait_until_serving`` waits before the first bundle."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from client import autostart
from modelserver import config
from modelserver.channel import Channel
from modelserver.errors import BeamletError, ServerUnavailable
from modelserver.startlock import StartLock
from runtime import startup
from runtime.zygote import Zygote, ZygoteChild, ZygoteLost

if TYPE_CHECKING:
    from runtime.pipeline import InferenceStep

log = logging.getLogger("beamlet.harness")


class ServerStartFailed(RuntimeError):
    pass


def server_path_for(steps: Iterable[InferenceStep], fallback: str | None) -> str:
    """The socket of the server a run's shared models use: a handler's own socket path
    (the first, sorted, when several name one), else ``fallback``, else the default."""
    paths: set[str | None] = set()
    for step in steps:
        paths |= step.transform.handler.socket_paths()
    explicit = sorted(p for p in paths if p)
    return config.socket_path(explicit[0] if explicit else fallback)


class ServerKeeper:
    """Keeps one model server alive at ``path`` for the length of a run."""

    CHECK_INTERVAL = 0.25

    def __init__(
        self,
        path: str,
        server_args: list[str],
        env: Mapping[str, str] | None = None,
        zygote: Zygote | None = None,
    ):
        self.path = path
        self.server_args = server_args
        self.env = dict(env or {})
        self.zygote = zygote
        self.owned = False
        self.restarts = 0
        self._proc: ZygoteChild | subprocess.Popen[bytes] | None = None
        self._spawned = 0.0  # when our server was spawned, until it serves
        self._last_check = 0.0

    def start(self) -> None:
        """Use a server already running at the path, or start one, which we then own and
        which may still be starting when this returns (``wait_until_serving``)."""
        began = time.monotonic()
        self._proc = self._spawn()
        if self._proc is None:
            startup.step("model server", time.monotonic() - began, f"already running at {self.path}")
            log.info("using the model server already running at %s", self.path)
            if self.env:
                log.warning(
                    "the model server already running at %s was not started by this run: "
                    "it runs with its own settings, not with %s",
                    self.path,
                    " ".join(f"{k}={v}" for k, v in sorted(self.env.items())),
                )
            return
        self.owned = True

    def wait_until_serving(self) -> None:
        """Return once the server we started answers; ServerStartFailed if it exits first
        or does not answer in time."""
        if self._proc is None or not self._spawned:
            return
        proc, self._spawned, spawned = self._proc, 0.0, self._spawned
        try:
            autostart.wait_until_serving(self.path, proc, autostart.START_TIMEOUT)
        except ServerUnavailable as exc:
            raise ServerStartFailed(f"cannot start the model server: {exc}") from None
        how = "forked" if isinstance(proc, ZygoteChild) else "exec'd"
        startup.step(
            "model server", time.monotonic() - spawned, f"from spawn to serving; pid {proc.pid}, {how}"
        )

    def serve_versions(self, steps: Iterable[InferenceStep]) -> None:
        """Make the server serve this run's version of each shared single model before
        any worker attaches to it (a server kept from an earlier run may hold a version
        that run swapped in)."""
        from client.serverclient import ServerClient

        with ServerClient(self.path, autostart=False, retry_seconds=5.0) as client:
            for step in steps:
                handler = step.transform.handler
                spec = handler.model_spec()
                if handler.share_model_across_processes() and spec is not None:
                    try:
                        client.load(handler.model_key(), spec, replace=True)
                    except BeamletError as exc:
                        raise ServerStartFailed(f"the model server cannot load {step.label}: {exc}") from None

    def _spawn(self) -> ZygoteChild | subprocess.Popen[bytes] | None:
        """Start a server at the path under the start lock (so a client racing us starts
        none), without waiting for it to serve: the process we started, or None when one
        was already running (or another was starting and now serves)."""
        try:
            lock = autostart.claim_start(self.path)
        except ServerUnavailable as exc:
            raise ServerStartFailed(f"cannot start the model server: {exc}") from None
        if lock is None:
            return None
        try:
            proc: ZygoteChild | subprocess.Popen[bytes] | None = self._fork(lock) if self.zygote else None
            if proc is None:
                exec_proc = autostart.spawn_server(self.path, self.server_args, None, lock=lock, env=self.env)
                autostart.reap_in_background(exec_proc)
                proc = exec_proc
        except BaseException:
            lock.release()
            raise
        lock.detach()  # the server holds it now
        self._spawned = time.monotonic()
        return proc

    def _fork(self, lock: StartLock) -> ZygoteChild | None:
        """Fork the server from the zygote; None when the zygote has gone."""
        assert self.zygote is not None
        config.ensure_private_dir(os.path.dirname(self.path))
        argv = autostart.serve_args(self.path, self.server_args, None)
        log_fd = autostart.open_log(self.path)
        try:
            proc = self.zygote.spawn_server(argv, autostart.server_env(self.env), log_fd, lock.fd)
        except ZygoteLost:
            return None
        finally:
            os.close(log_fd)
        log.info("forked model server pid %d for %s", proc.pid, self.path)
        return proc

    def watch(self) -> None:
        """Called every turn of the harness loop: replace our server if it died."""
        if not self.owned or self._proc is None:
            return
        now = time.monotonic()
        if now - self._last_check < self.CHECK_INTERVAL:
            return
        self._last_check = now
        code = self._proc.poll()
        if code is None or autostart.server_alive(self.path):
            return  # alive, or a client already started a new one
        log.warning("the model server exited (code %s); starting a new one", code)
        self.restarts += 1
        self._proc = self._spawn() or self._proc
        self.wait_until_serving()

    def stop(self) -> None:
        """Stop the server if we own it, and wait until its process has gone."""
        if not self.owned:
            return
        # The server answering may not be the one we spawned (a client may have started a
        # replacement first after a crash): stop whoever answers, and wait for that pid.
        server_pid = None
        try:
            with Channel(self.path, connect_timeout=2.0, shm_bytes=0) as ch:
                server_pid = ch.server_pid
                ch.request({"op": "shutdown"})
        except (ServerUnavailable, BeamletError, OSError):
            pass
        if self._proc is not None:
            try:
                self._proc.wait(30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
        if server_pid is not None and not config.wait_for_exit(server_pid, 30):
            log.warning("the model server (pid %d) did not stop; killing it", server_pid)
            os.kill(server_pid, signal.SIGKILL)
