"""The zygote: a process forked from the harness before the harness starts any thread,
which forks the run's workers, and its model server, on request.

Why not fork a worker straight from the harness: the child would inherit what the
harness's other threads held at that instant (a lock, the logging lock, a frame half
sent), the harness's sockets (the control listener, the other workers' connections, the
sink's file), and the OpenMP state of the forking thread (with GNU libgomp, a child whose
forking thread had run an OpenMP team hangs in its first parallel region). Why not exec:
each worker, and the model server, would import torch again (seconds each on a small
machine). The zygote is forked once per run, when the harness has imported the pipeline
(and so torch) and has neither started a thread nor opened a socket or file of the run;
it never computes and never starts a thread, so every process it forks, replacements
included, starts from that state, and none imports anything again.

The protocol, one msgpack map per SOCK_SEQPACKET packet (descriptors beside it):

    direction          op        fields                                  meaning
    harness -> zygote  worker    worker, control, threads, env, compute  fork a worker
    harness -> zygote  server    argv, env; and descriptors: its log,    fork a model server
                                 the start lock (if held)
    harness -> zygote  signal    pid, signal                             signal a child not yet reaped
    zygote -> harness  spawned   pid                                     a fork's reply
    zygote -> harness  failed    error                                   a fork's reply: it failed
    zygote -> harness  exited    pid, code                               a child ended (code as Popen's)

The zygote reaps its children and reports each end; signals go through it, so a pid is
signalled only while it is still its child's. It dies with the harness (parent-death
signal), its workers die with it, and the harness closing its end stops it; it and its
workers run in a process group of their own, as exec'd workers do. A model
server it forks runs in a session of its own, with the log as stdout and stderr, holding
no descriptor of the harness's or the zygote's but the start lock (every other inherited
one is pointed at /dev/null), and outlives the zygote as an exec'd server would.
"""

from __future__ import annotations

import gc
import logging
import os
import queue
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import msgpack

from modelserver.startlock import FD_ENV
from runtime.computethreads import ComputeThreads
from runtime.control import EXIT_BOOT_FAILED
from runtime.processes import die_with_parent, run_then_exit, set_process_name

log = logging.getLogger("beamlet.harness")

MAX_MESSAGE = 1 << 20  # an environment and a few names
REPLY_TIMEOUT = 30.0  # a fork takes milliseconds: only a wedged zygote reaches this


class ZygoteLost(RuntimeError):
    """The zygote has gone: nothing more can be forked from it."""


class ZygoteChild:
    """A process the zygote forked, as its harness sees it: ``subprocess.Popen``'s
    ``pid``, ``returncode``, ``poll``, ``wait``, ``send_signal``, ``kill``, ``terminate``.
    The zygote reaps it and reports its end. Thread-safe."""

    def __init__(self, zygote: Zygote, pid: int):
        self.zygote = zygote
        self.pid = pid
        self.returncode: int | None = None
        self._ended = threading.Event()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._ended.wait(timeout):
            raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0.0)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            self.zygote.signal(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def _end(self, code: int) -> None:
        if self.returncode is None:
            self.returncode = code
        self._ended.set()


class Zygote:
    """The run's zygote, from the harness's side. Construct it before this process starts
    a thread or opens a socket of the run: it forks the zygote, which holds ``steps`` (and
    everything imported so far) for the workers. ``spawn_worker`` and ``spawn_server``
    fork from it; ``close`` stops and reaps it."""

    def __init__(self, steps: list[Any]):
        self.lost: str | None = None  # why it is gone, when it went on its own
        self._children: dict[int, ZygoteChild] = {}
        self._replies: queue.Queue[ZygoteChild | BaseException] = queue.Queue()
        self._request_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._closing = False
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        parent = os.getpid()
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            self.pid = os.fork()
        except BaseException:
            self.sock.close()
            theirs.close()
            raise
        if self.pid == 0:  # never returns: the zygote's whole life
            run_then_exit(lambda: _ZygoteLoop(theirs, steps, parent, self.sock).run(), 1)
        theirs.close()
        try:
            self._reader = threading.Thread(target=self._read_loop, name="zygote-reader", daemon=True)
            self._reader.start()
        except BaseException:
            self.close()
            raise
        log.info("forked the zygote (pid %d)", self.pid)

    # -- requests ---------------------------------------------------------------------------
    def spawn_worker(
        self, worker_id: int, control_path: str, threads: int, env: Mapping[str, str], compute: ComputeThreads
    ) -> ZygoteChild:
        """Fork a worker that runs the zygote's steps with ``env`` as its whole environment."""
        return self._request(
            {
                "op": "worker",
                "worker": worker_id,
                "control": control_path,
                "threads": threads,
                "env": dict(env),
                "compute": compute.to_wire(),
            },
            [],
        )

    def spawn_server(
        self, argv: list[str], env: Mapping[str, str], log_fd: int, lock_fd: int | None
    ) -> ZygoteChild:
        """Fork ``python -m modelserver ARGV`` with ``env`` as its whole environment, the
        descriptor ``log_fd`` as its stdout and stderr, and the start lock ``lock_fd``
        handed over (the caller then detaches its own)."""
        fds = [log_fd] if lock_fd is None else [log_fd, lock_fd]
        return self._request({"op": "server", "argv": argv, "env": dict(env)}, fds)

    def signal(self, pid: int, sig: int) -> None:
        """Send ``sig`` to the child ``pid``, if the zygote has not reaped it yet."""
        try:
            self._send({"op": "signal", "pid": pid, "signal": int(sig)}, [])
        except OSError:
            pass  # gone: its children are marked ended (_on_lost)

    def _request(self, message: dict[str, Any], fds: list[int]) -> ZygoteChild:
        with self._request_lock:
            if self.lost or self._closing:
                raise ZygoteLost(self.lost or "the zygote is closed")
            try:
                self._send(message, fds)
                reply = self._replies.get(timeout=REPLY_TIMEOUT)
            except OSError as exc:
                raise ZygoteLost(f"the zygote (pid {self.pid}) cannot be reached: {exc}") from None
            except queue.Empty:
                self.lost = f"the zygote (pid {self.pid}) did not answer in {REPLY_TIMEOUT:g}s"
                raise ZygoteLost(self.lost) from None
            if isinstance(reply, BaseException):
                raise reply
            return reply

    def _send(self, message: dict[str, Any], fds: list[int]) -> None:
        with self._send_lock:
            socket.send_fds(self.sock, [msgpack.packb(message)], fds)

    # -- replies and ends -----------------------------------------------------------------
    def _read_loop(self) -> None:
        while True:
            try:
                data = self.sock.recv(MAX_MESSAGE)
            except OSError:
                data = b""
            if not data:
                break
            message = msgpack.unpackb(data)
            op = message.get("op")
            if op == "spawned":
                child = self._children[message["pid"]] = ZygoteChild(self, message["pid"])
                self._replies.put(child)
            elif op == "failed":
                self._replies.put(OSError(message.get("error")))
            elif op == "exited":
                ended = self._children.pop(message["pid"], None)
                if ended is not None:
                    ended._end(message["code"])
        if not self._closing:
            self._on_lost()

    def _on_lost(self) -> None:
        """The zygote went on its own (killed): its workers died with it (parent-death
        signal); kill what else it forked, mark every child ended, fail what waits."""
        code = _reap(self.pid, 5.0)
        how = (
            f"was killed by {signal.Signals(-code).name}"
            if code is not None and code < 0
            else f"exited ({code})"
        )
        self.lost = f"the zygote (pid {self.pid}) {how}; the workers it forked died with it"
        log.error("%s", self.lost)
        for child in list(self._children.values()):
            try:
                os.kill(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            child._end(-signal.SIGKILL)
        self._children.clear()
        self._replies.put(ZygoteLost(self.lost))

    def close(self, timeout: float = 5.0) -> None:
        """Stop the zygote and reap it (SIGKILL after ``timeout`` seconds). Its workers
        should have stopped: any left get SIGKILL from the kernel as it exits."""
        if self._closing:
            return
        self._closing = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self.lost is None and _reap(self.pid, timeout) is None:
            log.warning("the zygote (pid %d) did not stop; killing it", self.pid)
            os.kill(self.pid, signal.SIGKILL)
            _reap(self.pid, timeout)
        self.sock.close()


def _reap(pid: int, timeout: float) -> int | None:
    """Wait up to ``timeout`` seconds for our child ``pid`` to exit: its return code (as
    Popen's), or None while it runs."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # reaped already, by close() racing the reader's _on_lost
            return -signal.SIGKILL
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            return None
        time.sleep(0.005)


class _ZygoteLoop:
    """The zygote's side: serve fork requests until the harness closes its end."""

    def __init__(self, sock: socket.socket, steps: list[Any], parent: int, harness_end: socket.socket):
        harness_end.close()
        self.sock = sock
        self.steps = steps
        self.parent = parent
        self.children: set[int] = set()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def run(self) -> int:
        if not die_with_parent(self.parent):
            return 1
        set_process_name("beamlet-zygote")
        # A process group of its own, which its workers inherit: the terminal's signals
        # (Ctrl-C, Ctrl-Z, Ctrl-backslash) reach only the harness, which stops them in its own time.
        os.setpgid(0, 0)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake the select below
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        # Everything here lives as long as the children: keep the collector from touching
        # (and so copying) the pages they share with us.
        gc.freeze()
        while True:
            ready, _, _ = select.select([self.sock.fileno(), self.wake_r], [], [])
            if self.wake_r in ready:
                while os.read(self.wake_r, 512) == 512:
                    pass
            self._reap()
            if self.sock.fileno() in ready:
                data, fds, _flags, _addr = socket.recv_fds(self.sock, MAX_MESSAGE, 4)
                if not data:
                    return 0
                self._handle(msgpack.unpackb(data), fds)

    def _handle(self, message: dict[str, Any], fds: list[int]) -> None:
        op = message.get("op")
        if op == "signal":
            if message["pid"] in self.children:
                os.kill(message["pid"], message["signal"])
        elif op == "worker":
            zygote = os.getpid()  # here: the body runs in the child
            self._fork(lambda: _become_worker(message, self.steps, zygote), fds, failed=EXIT_BOOT_FAILED)
        elif op == "server":
            self._fork(lambda: _become_server(message, fds), fds, failed=1)

    def _fork(self, body: Callable[[], int], fds: list[int], failed: int) -> None:
        """Fork a child that runs ``body`` and exits with what it returns (``failed`` if
        it raises); reply with its pid."""
        try:
            pid = os.fork()
        except OSError as exc:
            self._send({"op": "failed", "error": f"fork: {exc}"})
        else:
            if pid == 0:  # never returns
                run_then_exit(lambda: self._in_child(body), failed)
            self.children.add(pid)
            self._send({"op": "spawned", "pid": pid})
        finally:
            for fd in fds:
                os.close(fd)

    def _in_child(self, body: Callable[[], int]) -> int:
        """In a child: drop what is the zygote's (its wake-up, its socket), then ``body``."""
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.close(self.wake_r)
        os.close(self.wake_w)
        self.sock.close()
        return body()

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.children.discard(pid)
            self._send({"op": "exited", "pid": pid, "code": os.waitstatus_to_exitcode(status)})

    def _send(self, message: dict[str, Any]) -> None:
        try:
            self.sock.send(msgpack.packb(message))
        except OSError:
            pass  # the harness closed its end: the loop sees it next


def _become_worker(request: dict[str, Any], steps: list[Any], zygote: int) -> int:
    """In a child of the zygote: the request's environment, compute threads, then the
    worker's body (which exits the process)."""
    from runtime import computethreads
    from runtime.worker import worker_main

    os.environ.clear()
    os.environ.update(request["env"])
    computethreads.apply(ComputeThreads.from_wire(request["compute"]))
    set_process_name("beamlet-worker")
    worker_main(request["control"], request["worker"], steps, request["threads"], parent=zygote)
    return 1  # not reached: worker_main exits


def _become_server(request: dict[str, Any], fds: list[int]) -> int:
    """In a child of the zygote: what ``autostart.spawn_server`` gives an exec'd server (a
    session of its own, the log as stdout and stderr, / as its directory, the start lock
    and no other descriptor of ours), then ``python -m modelserver ARGV``'s main."""
    log_fd, lock_fd = fds[0], (fds[1] if len(fds) > 1 else None)
    os.setsid()
    os.chdir("/")
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    # Inherited descriptors may belong to objects that close them one day: point them at
    # /dev/null (the number stays taken) instead of closing them under their owners.
    for fd in _open_fds():
        if fd > 2 and fd not in (lock_fd, null, log_fd):
            os.dup2(null, fd)
    os.close(null)
    os.close(log_fd)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the process's own streams
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ.pop(FD_ENV, None)
    if lock_fd is not None:
        os.environ[FD_ENV] = str(lock_fd)
    set_process_name("beamlet-server")
    from modelserver.__main__ import main

    return main(list(request["argv"]))


def _open_fds() -> list[int]:
    """This process's open descriptors."""
    try:
        names = os.listdir("/proc/self/fd")  # includes the one listing it, closed by now
    except OSError:
        names = [str(fd) for fd in range(256)]
    fds = []
    for fd in sorted(int(name) for name in names):
        try:
            os.fstat(fd)
        except OSError:
            continue
        fds.append(fd)
    return fds
