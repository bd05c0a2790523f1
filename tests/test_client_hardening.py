"""Nothing freezes, nothing waits forever, no one else can block the server: the start
lock in the owner's private directory, request deadlines against a stopped server, the
retry policies, and fork safety. Real processes, real sockets, a real model server."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import signal
import socket
import time

import pytest
import torch

from client import ServerClient, autostart
from client.serverclient import OVERLOADED_DELAY, RECONNECT_DELAY, _retry_after, retry_delay
from modelserver import config, userclass
from modelserver.channel import Channel
from modelserver.errors import Overloaded, ServerUnavailable
from modelserver.loaders import ModelSpec
from modelserver.startlock import lock_path
from tests.conftest import server_processes, start_server
from tests.hardening_models import Slow

RACERS = 6


def race_to_start(sock: str, barrier, results) -> None:  # runs in a spawned process
    """Wait for every racer, then ensure_server; report the server's pid, whether this
    process spawned it, and how long it took."""
    barrier.wait()
    start = time.monotonic()
    spawned = autostart.ensure_server(sock) is not None
    elapsed = time.monotonic() - start
    with Channel(sock) as ch:
        results.put((ch.server_pid, spawned, elapsed))


def server_log(sock: str) -> str:
    with open(autostart.log_path(sock)) as f:
        return f.read()


def test_racing_clients_spawn_exactly_one_server(sock_path):
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(RACERS)
    results = ctx.Queue()
    procs = [ctx.Process(target=race_to_start, args=(sock_path, barrier, results)) for _ in range(RACERS)]
    for p in procs:
        p.start()
    try:
        got = [results.get(timeout=90) for _ in range(RACERS)]
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    pids = {pid for pid, _, _ in got}
    assert len(pids) == 1, got
    assert sum(spawned for _, spawned, _ in got) == 1, got
    log = server_log(sock_path)
    assert log.count("starting a model server") == 1 and log.count("listening on") == 1, log
    assert "already serves" not in log
    (server,) = server_processes(sock_path)
    assert server.pid == pids.pop()
    print(f"6-way race: slowest racer {max(e for _, _, e in got):.2f}s")


def test_an_abstract_socket_named_like_the_old_lock_cannot_block_the_start(sock_path):
    """Anyone could bind the old lock's name, ``\\0beamlet-<uid>-<hash of the path>``;
    holding it must change nothing now. And once the server exits, it leaves nothing."""
    digest = hashlib.sha256(os.path.realpath(sock_path).encode()).hexdigest()[:32]
    squatter = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    squatter.bind(f"\0beamlet-{os.getuid()}-{digest}".encode())
    try:
        start = time.monotonic()
        autostart.ensure_server(sock_path, timeout=30, idle_timeout=None)
        took = time.monotonic() - start
    finally:
        squatter.close()
    assert took < 20, f"the start took {took:.1f}s"
    assert os.path.exists(lock_path(sock_path))  # held by the server for its life
    with Channel(sock_path) as ch:
        pid = ch.server_pid
        ch.request({"op": "shutdown"})
    assert config.wait_for_exit(pid, 20)
    assert sorted(os.listdir(os.path.dirname(sock_path))) == ["modelserver.log"]
    assert "already serves" not in server_log(sock_path)


def test_the_start_is_refused_outside_a_directory_that_is_ours_and_private(private_dir):
    others = os.path.join(private_dir, "others")
    os.mkdir(others, 0o700)
    if os.geteuid() == 0:
        os.chown(others, 65534, 65534)
        with pytest.raises(PermissionError, match="belongs to uid 65534, not to us"):
            autostart.ensure_server(os.path.join(others, "s.sock"), timeout=5)
    open_dir = os.path.join(private_dir, "open")
    os.mkdir(open_dir)
    os.chmod(open_dir, 0o733)
    with pytest.raises(PermissionError, match="open to other users"):
        autostart.ensure_server(os.path.join(open_dir, "s.sock"), timeout=5)
    private = os.path.join(private_dir, "private")
    os.mkdir(private, 0o700)
    sock = os.path.join(private, "s.sock")
    os.symlink(os.path.join(private_dir, "elsewhere"), lock_path(sock))
    with pytest.raises(PermissionError, match="symbolic link"):
        autostart.ensure_server(sock, timeout=5)
    # Refused before anything was spawned or written.
    assert not os.path.exists(os.path.join(private_dir, "elsewhere"))
    assert os.listdir(open_dir) == [] and os.listdir(private) == ["s.sock.lock"]


def test_the_default_request_timeout_is_30s_and_configurable(monkeypatch):
    monkeypatch.delenv(config.REQUEST_TIMEOUT_ENV, raising=False)
    assert config.DEFAULT_REQUEST_TIMEOUT == 30.0
    assert ServerClient("/nowhere/s.sock").request_timeout == 30.0
    monkeypatch.setenv(config.REQUEST_TIMEOUT_ENV, "2.5")
    assert ServerClient("/nowhere/s.sock").request_timeout == 2.5
    assert ServerClient("/nowhere/s.sock", request_timeout=7).request_timeout == 7.0
    for bad in ("soon", "0", "-1", "inf", "nan"):
        monkeypatch.setenv(config.REQUEST_TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match="BEAMLET_REQUEST_TIMEOUT must be a positive number"):
            ServerClient("/nowhere/s.sock")


def test_a_stopped_server_fails_requests_within_their_deadline(server, sock_path, monkeypatch):
    monkeypatch.delenv(config.REQUEST_TIMEOUT_ENV, raising=False)
    with Channel(sock_path) as ch:  # the documented default is what the socket waits
        ch.request({"op": "status"})
        assert ch.request_timeout == 30.0 and ch.sock.gettimeout() == 30.0
    timeout, budget = 0.5, 1.0
    client = ServerClient(sock_path, request_timeout=timeout, retry_seconds=budget)
    assert client.call({"op": "status"})["status"]["pid"] == server.proc.pid  # a pooled connection
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        with pytest.raises(ServerUnavailable, match="did not answer for 0.5s"):
            Channel(sock_path, request_timeout=timeout)  # the hello has the deadline too
        assert time.monotonic() - start < timeout + 1.0

        start = time.monotonic()
        with pytest.raises(ServerUnavailable) as failed:
            client.call({"op": "status"})  # in flight on the pooled connection, then reconnects
        took = time.monotonic() - start
        # retry budget + one silence limit + the last connection probe (each <= timeout)
        assert timeout <= took < budget + 3 * timeout + 0.5, took
        assert "holds" in str(failed.value) and lock_path(sock_path) in str(failed.value)
        assert len(server_processes(sock_path)) == 1  # nobody started a second server
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    assert client.call({"op": "status"})["status"]["pid"] == server.proc.pid
    assert server_log_starts(sock_path) == 0
    client.close()


@pytest.mark.parametrize("heartbeat", [0.2, 0.0], ids=["heartbeats", "no heartbeats"])
def test_a_model_slower_than_the_deadline_is_kept_alive_by_heartbeats(sock_path, heartbeat):
    """A load and a forward that each take 1.5 s, against a 0.6 s silence deadline: the
    server's heartbeats keep both requests alive. Without heartbeats (``--heartbeat 0``)
    the same load fails at the deadline, so the deadline is real."""
    timeout = 0.6
    srv = start_server(sock_path, "--heartbeat", str(heartbeat))
    spec = ModelSpec(
        "pytorch_state_dict", None, userclass.describe(Slow), {"load_seconds": 1.5, "forward_seconds": 1.5}
    )
    try:
        with Channel(sock_path, request_timeout=timeout) as ch:
            start = time.monotonic()
            if not heartbeat:
                with pytest.raises(ServerUnavailable, match="did not answer for 0.6s"):
                    ch.request({"op": "load", "key": "slow", "spec": spec.to_wire()})
                assert time.monotonic() - start < 1.4
                return
            ch.request({"op": "load", "key": "slow", "spec": spec.to_wire()})
            reply = ch.request({"op": "infer", "key": "slow", "inputs": torch.ones(2, 3)})
            assert time.monotonic() - start >= 3.0
            assert torch.equal(torch.as_tensor(reply["outputs"]), torch.full((2, 3), 3.0))
    finally:
        srv.stop()


def server_log_starts(sock: str) -> int:
    try:
        return server_log(sock).count("starting a model server")
    except FileNotFoundError:
        return 0


def test_a_connection_is_never_used_from_a_forked_child(server, sock_path):
    ch = Channel(sock_path)
    pid = os.fork()
    if pid == 0:  # the child: the parent's socket must stay untouched
        try:
            ch.request({"op": "status"})
            code = 1
        except ServerUnavailable as exc:
            code = 0 if "belongs to process" in str(exc) else 2
        except BaseException:
            code = 3
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert ch.request({"op": "status"})["status"]["pid"] == server.proc.pid  # stream intact
    ch.close()


def test_retry_pauses_grow_with_jitter_and_follow_the_servers_retry_after():
    rng = random.Random(7)
    first, longest = RECONNECT_DELAY
    pauses = [retry_delay(n, first, longest, rng) for n in range(10)]
    for n, pause in enumerate(pauses):
        base = min(first * 2**n, longest)
        assert base <= pause <= base * 1.25
    assert pauses[-1] >= longest and len({round(p, 6) for p in pauses}) == len(pauses)
    busy = Overloaded("queue full")
    assert _retry_after(busy) == OVERLOADED_DELAY[0]  # before the server names a pause
    busy.retry_after = 0.3  # type: ignore[attr-defined]
    assert _retry_after(busy) == 0.3
    assert retry_delay(0, _retry_after(busy), OVERLOADED_DELAY[1], rng) >= 0.3
    assert retry_delay(9, _retry_after(busy), OVERLOADED_DELAY[1], rng) <= OVERLOADED_DELAY[1] * 1.25
    busy.retry_after = "soon"  # type: ignore[attr-defined]
    assert _retry_after(busy) == OVERLOADED_DELAY[0]
    busy.retry_after = 1e9  # type: ignore[attr-defined]
    assert _retry_after(busy) == 10.0
    busy.retry_after = float("nan")  # type: ignore[attr-defined]
    assert _retry_after(busy) == OVERLOADED_DELAY[0]
