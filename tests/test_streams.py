"""ReadFromRedisStream and WriteToRedisStream against a real redis-server (tests/redis_fixtures.py):
consumer groups, bundles cut by size and time, acknowledgements, restarted and dead
consumers, the one-transaction commit, and a server that goes away and comes back."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from runtime import CannotStart
from runtime.pipeline import SourceBundle
from runtime.streams import ReadFromRedisStream, WriteToRedisStream, default_consumer
from tests.redis_fixtures import RedisServer

redis = pytest.importorskip("redis")

DEADLINE = 10.0


def client(server: RedisServer) -> Any:
    return redis.Redis(unix_socket_path=server.socket, decode_responses=True)


def add(server: RedisServer, stream: str, n: int, start: int = 0) -> list[str]:
    r = client(server)
    return [r.xadd(stream, {"i": str(i), "text": f"row {i}"}) for i in range(start, start + n)]


def pending_ids(server: RedisServer, stream: str = "in", group: str = "g") -> list[str]:
    rows = client(server).xpending_range(stream, group, min="-", max="+", count=10_000)
    return [row["message_id"] for row in rows]


def take(bundles: Iterator[SourceBundle], n: int) -> list[SourceBundle]:
    """Bundles until they hold ``n`` elements, empty ones left out; fails past DEADLINE."""
    got: list[SourceBundle] = []
    deadline = time.monotonic() + DEADLINE
    while sum(len(b.elements) for b in got) < n:
        assert time.monotonic() < deadline, f"only {sum(len(b.elements) for b in got)} of {n} elements"
        bundle = next(bundles)
        if len(bundle.elements):
            got.append(bundle)
    return got


def wait_for(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def reader(server: RedisServer, **kwargs: Any) -> ReadFromRedisStream:
    kwargs.setdefault("consumer", "c1")
    kwargs.setdefault("max_wait", 0.2)
    return ReadFromRedisStream(server.url, "in", "g", **kwargs)


# -- reading ---------------------------------------------------------------------------
def test_the_group_is_created_at_0_and_elements_are_dicts_of_str(redis_server):
    ids = add(redis_server, "in", 3)  # before the group exists: read all the same
    source = reader(redis_server)
    source.check()
    [bundle] = take(source.bundles(10), 3)
    assert bundle.ack == ids
    assert bundle.elements == [{"i": str(i), "text": f"row {i}"} for i in range(3)]
    assert all(isinstance(k, str) and isinstance(v, str) for e in bundle.elements for k, v in e.items())
    assert bundle.arrived is not None and abs(bundle.arrived - time.time()) < 5
    assert [g["name"] for g in client(redis_server).xinfo_groups("in")] == ["g"]
    # a second reader of the same group: BUSYGROUP is no error, and nothing is read twice
    other = reader(redis_server, consumer="c2")
    assert len(next(other.bundles(10)).elements) == 0
    source.close()
    other.close()


def test_bundles_are_cut_by_size_then_by_max_wait_after_their_first_entry(redis_server):
    add(redis_server, "in", 25)
    source = reader(redis_server, max_wait=0.3)
    bundles = source.bundles(10)
    assert [len(next(bundles).elements) for _ in range(2)] == [10, 10]
    started = time.monotonic()
    last = next(bundles)  # 5 entries, then nothing: closed max_wait after its first one
    assert len(last.elements) == 5
    assert 0.25 <= time.monotonic() - started < 3.0
    source.close()


def test_a_bundle_closes_max_wait_after_its_first_entry_not_after_the_read_began(redis_server):
    source = reader(redis_server, max_wait=0.5)
    bundles = source.bundles(100)
    assert len(next(bundles).elements) == 0  # the group exists now; nothing has arrived
    done: list[SourceBundle] = []
    thread = threading.Thread(target=lambda: done.append(next(bundles)))
    thread.start()
    time.sleep(0.3)  # part of the way into an idle wait, so the first entry arrives late in it
    add(redis_server, "in", 1)
    added = time.monotonic()
    thread.join(DEADLINE)
    assert done and len(done[0].elements) == 1
    assert time.monotonic() - added >= 0.45  # held open max_wait for more entries
    source.close()


def test_an_idle_source_yields_an_empty_bundle_every_max_wait(redis_server):
    source = reader(redis_server, max_wait=0.2)
    bundles = source.bundles(10)
    next(bundles)  # creates the group
    for _ in range(3):
        started = time.monotonic()
        bundle = next(bundles)
        assert len(bundle.elements) == 0 and bundle.ack is None and bundle.arrived is None
        assert time.monotonic() - started < 2.0
    source.close()


def test_ack_acknowledges_only_the_bundles_it_is_given(redis_server):
    add(redis_server, "in", 6)
    source = reader(redis_server)
    first, second = take(source.bundles(3), 6)
    assert sorted(pending_ids(redis_server)) == sorted(first.ack + second.ack)
    source.ack([first.ack])
    assert pending_ids(redis_server) == second.ack
    source.ack([second.ack])
    assert pending_ids(redis_server) == []
    source.close()


def test_entries_whose_reply_was_lost_are_re_read_once(redis_server, monkeypatch):
    ids = add(redis_server, "in", 3)
    xreadgroup = redis.Redis.xreadgroup
    new_reads: list[int] = []

    def lose_replies(self: Any, group: str, consumer: str, streams: dict, **kwargs: Any) -> Any:
        if ">" in streams.values():
            new_reads.append(1)
            if len(new_reads) == 1:  # delivered to this consumer, the reply lost on the way
                xreadgroup(self, group, consumer, streams, **kwargs)
                raise redis.ConnectionError("connection reset by peer")
            if len(new_reads) == 2:  # lost again with the entries collected in the bundle
                raise redis.ConnectionError("connection reset by peer")
        return xreadgroup(self, group, consumer, streams, **kwargs)

    monkeypatch.setattr(redis.Redis, "xreadgroup", lose_replies)
    source = reader(redis_server, max_wait=1.0)
    [bundle] = take(source.bundles(10), 3)
    assert len(new_reads) >= 3
    assert bundle.ack == ids  # found by the re-read of the pending list, each once
    source.close()


def test_a_restarted_consumer_re_reads_its_pending_entries_first(redis_server):
    assert default_consumer("in", "g") == ReadFromRedisStream(redis_server.url, "in", "g").consumer
    ids = add(redis_server, "in", 4)
    crashed = ReadFromRedisStream(redis_server.url, "in", "g", max_wait=0.2)  # the default name
    [bundle] = take(crashed.bundles(10), 4)
    crashed.close()  # killed before its commit: nothing acknowledged
    new = add(redis_server, "in", 2, start=4)
    restarted = ReadFromRedisStream(redis_server.url, "in", "g", max_wait=0.2)
    bundles = restarted.bundles(4)
    assert next(bundles).ack == ids  # its own pending entries, before the new ones
    assert take(bundles, 2)[0].ack == new
    restarted.close()


def test_a_pending_entry_deleted_from_the_stream_is_acknowledged_not_read(redis_server, caplog):
    ids = add(redis_server, "in", 2)
    crashed = reader(redis_server)
    take(crashed.bundles(10), 2)
    crashed.close()
    client(redis_server).xdel("in", ids[0])  # trimmed away before it was committed
    restarted = reader(redis_server)
    assert next(restarted.bundles(10)).ack == [ids[1]]
    assert pending_ids(redis_server) == [ids[1]]
    assert any("deleted from the stream" in r.getMessage() for r in caplog.records)
    restarted.close()


def test_a_dead_consumers_entries_are_claimed_after_claim_idle(redis_server):
    ids = add(redis_server, "in", 3)
    r = client(redis_server)
    r.xgroup_create("in", "g", id="0")
    r.xreadgroup("g", "dead", {"in": ">"}, count=10)  # read, then never acknowledged
    source = reader(redis_server, claim_idle=0.5)
    bundles = source.bundles(10)
    started = time.monotonic()
    [bundle] = take(bundles, 3)
    assert time.monotonic() - started >= 0.3  # not before they were idle for claim_idle
    assert bundle.ack == ids
    owners = {row["consumer"] for row in r.xpending_range("in", "g", min="-", max="+", count=10)}
    assert owners == {"c1"}
    source.ack([bundle.ack])
    assert pending_ids(redis_server) == []
    source.close()


def test_claim_idle_none_never_claims(redis_server):
    add(redis_server, "in", 2)
    r = client(redis_server)
    r.xgroup_create("in", "g", id="0")
    r.xreadgroup("g", "dead", {"in": ">"}, count=10)
    source = reader(redis_server, claim_idle=None, max_wait=0.1)
    bundles = source.bundles(10)
    assert all(len(next(bundles).elements) == 0 for _ in range(3))
    source.close()


# -- writing -------------------------------------------------------------------------------
def test_commit_writes_outputs_and_dead_letters_and_acknowledges_in_one_transaction(redis_server):
    add(redis_server, "in", 3)
    source = reader(redis_server)
    sink = WriteToRedisStream(redis_server.url, "out")
    sink.check()
    sink.open()
    [bundle] = take(source.bundles(10), 3)
    outputs = [{"i": e["i"], "score": 0.5, "n": 7} for e in bundle.elements[:2]]
    dead = [{"step": "Map(f)", "element": bundle.elements[2], "error": "ValueError: no"}]
    sink.commit(outputs, dead, [bundle.ack], source)
    r = client(redis_server)
    assert [fields for _id, fields in r.xrange("out")] == [
        {"i": "0", "score": "0.5", "n": "7"},
        {"i": "1", "score": "0.5", "n": "7"},
    ]
    [(_id, fields)] = r.xrange("out:dead_letters")
    assert json.loads(fields["dead_letter"]) == dead[0]
    assert pending_ids(redis_server) == []
    assert source._inflight == set()
    sink.close()
    source.close()


def test_commit_elsewhere_writes_then_acknowledges(redis_server):
    add(redis_server, "in", 2)
    source = reader(redis_server)
    sink = WriteToRedisStream(redis_server.url + "?db=1", "out")  # another database: no shared transaction
    assert not sink.shares_server(source)
    [bundle] = take(source.bundles(10), 2)
    sink.commit([{"x": 1}, {"x": 2}], [], [bundle.ack], source)
    assert redis.Redis(unix_socket_path=redis_server.socket, db=1).xlen("out") == 2
    assert client(redis_server).xlen("out") == 0
    assert pending_ids(redis_server) == []


@pytest.mark.parametrize(
    "output, message",
    [
        ({"a": [1, 2]}, r"field 'a' of an output is a list"),
        ({"a": True}, r"field 'a' of an output is a bool"),
        ({"a": np.int64(1)}, r"field 'a' of an output is a numpy.int64"),
        (("a", "b"), r"got a tuple"),
        ({1: "a"}, r"field names must be str; got the int 1"),
        ({}, r"empty dict"),
    ],
)
def test_a_bad_output_is_a_type_error_naming_it_and_nothing_is_written(redis_server, output, message):
    add(redis_server, "in", 2)
    source = reader(redis_server)
    sink = WriteToRedisStream(redis_server.url, "out")
    [bundle] = take(source.bundles(10), 2)
    with pytest.raises(TypeError, match=message):
        sink.commit([{"ok": "1"}, output], [], [bundle.ack], source)
    assert client(redis_server).xlen("out") == 0
    assert pending_ids(redis_server) == bundle.ack


class Killed(BaseException):
    """The process dies here: nothing after it runs."""


def test_a_commit_killed_before_exec_writes_nothing_and_a_restart_commits_once(redis_server, monkeypatch):
    add(redis_server, "in", 3)
    source = reader(redis_server)
    sink = WriteToRedisStream(redis_server.url, "out")
    [bundle] = take(source.bundles(10), 3)
    send = redis.connection.AbstractConnection.send_packed_command
    exec_command = b"*1\r\n$4\r\nEXEC\r\n"

    def send_all_but_exec(self: Any, command: Any, check_health: bool = True) -> None:
        packed = b"".join(command) if isinstance(command, list) else command
        if packed.endswith(exec_command):  # MULTI, the XADDs and the XACK reach the server
            send(self, [packed[: -len(exec_command)]], check_health)
            self.disconnect()  # and the process dies before EXEC
            raise Killed
        send(self, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", send_all_but_exec)
    with pytest.raises(Killed):
        sink.commit([{"i": e["i"]} for e in bundle.elements], [], [bundle.ack], source)
    monkeypatch.undo()
    assert client(redis_server).exists("out") == 0
    assert pending_ids(redis_server) == bundle.ack

    restarted = reader(redis_server)  # same consumer name: its pending entries come back
    again = next(restarted.bundles(10))
    assert again.ack == bundle.ack
    WriteToRedisStream(redis_server.url, "out").commit(
        [{"i": e["i"]} for e in again.elements], [], [again.ack], restarted
    )
    assert [f["i"] for _id, f in client(redis_server).xrange("out")] == ["0", "1", "2"]
    assert pending_ids(redis_server) == []


@pytest.mark.parametrize("exec_ran", [False, True], ids=["lost-before-exec", "reply-lost-after-exec"])
def test_a_commit_whose_connection_drops_is_retried_exactly_once(redis_server, monkeypatch, caplog, exec_ran):
    add(redis_server, "in", 3)
    source = reader(redis_server)
    sink = WriteToRedisStream(redis_server.url, "out")
    [bundle] = take(source.bundles(10), 3)
    execute = redis.client.Pipeline.execute
    failed: list[bool] = []

    def drop_once(self: Any, raise_on_error: bool = True) -> Any:
        if self.transaction and not failed:
            failed.append(True)
            if exec_ran:
                execute(self, raise_on_error)  # the transaction ran; its reply never came
            else:
                self.reset()
            raise redis.ConnectionError("connection reset by peer")
        return execute(self, raise_on_error)

    monkeypatch.setattr(redis.client.Pipeline, "execute", drop_once)
    with caplog.at_level(logging.INFO, logger="beamlet.streams"):
        sink.commit([{"i": e["i"]} for e in bundle.elements], [], [bundle.ack], source)
    assert failed
    assert [f["i"] for _id, f in client(redis_server).xrange("out")] == ["0", "1", "2"]
    assert pending_ids(redis_server) == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "unreachable" in warnings[0] and "retrying" in warnings[0]
    assert any("reachable again" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)


# -- a server that goes away and comes back ---------------------------------------------------
def test_reading_goes_on_when_the_server_comes_back_and_nothing_is_lost(redis_server, caplog):
    first = add(redis_server, "in", 3)
    source = reader(redis_server, max_wait=0.2)
    bundles = source.bundles(10)
    [before] = take(bundles, 3)  # in flight while the server is away
    caplog.set_level(logging.INFO, logger="beamlet.streams")
    redis_server.stop()
    for _ in range(3):  # the reader keeps yielding (empty) bundles, so a stop is noticed
        started = time.monotonic()
        assert len(next(bundles).elements) == 0
        assert time.monotonic() - started < 3.0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"Redis at {redis_server.url} unreachable" in warnings[0]
    redis_server.start()
    later = add(redis_server, "in", 2, start=3)
    after = take(bundles, 2)
    assert [i for b in after for i in b.ack] == later  # the ones in flight are not read again
    assert any("reachable again" in r.getMessage() for r in caplog.records)
    assert sorted(pending_ids(redis_server)) == sorted(first + later)
    source.ack([before.ack, *[b.ack for b in after]])
    assert pending_ids(redis_server) == []
    source.close()


def test_a_commit_waits_for_the_server_to_come_back_and_commits_once(redis_server, caplog):
    add(redis_server, "in", 3)
    source = reader(redis_server)
    sink = WriteToRedisStream(redis_server.url, "out")
    sink.open()
    [bundle] = take(source.bundles(10), 3)
    caplog.set_level(logging.INFO, logger="beamlet.streams")
    redis_server.stop()
    errors: list[BaseException] = []

    def commit() -> None:
        try:
            sink.commit([{"i": e["i"]} for e in bundle.elements], [], [bundle.ack], source)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=commit)
    thread.start()
    wait_for(lambda: any(r.levelno == logging.WARNING for r in caplog.records), "the warning")
    redis_server.start()
    thread.join(DEADLINE)
    assert not thread.is_alive() and errors == []
    assert [f["i"] for _id, f in client(redis_server).xrange("out")] == ["0", "1", "2"]
    assert pending_ids(redis_server) == []
    assert any("reachable again" in r.getMessage() for r in caplog.records)
    sink.close()
    source.close()


def test_a_server_that_lost_its_data_gets_the_group_created_again(redis_server, caplog):
    add(redis_server, "in", 1)
    source = reader(redis_server, max_wait=0.1)
    bundles = source.bundles(10)
    take(bundles, 1)
    redis_server.stop(keep_data=False)
    redis_server.start()
    new = add(redis_server, "in", 2)
    assert [i for b in take(bundles, 2) for i in b.ack] == new
    source.close()


def test_the_reader_gives_up_after_reconnect_timeout(redis_server):
    source = reader(redis_server, max_wait=0.1, reconnect_timeout=0.3)
    bundles = source.bundles(10)
    next(bundles)
    redis_server.stop()
    with pytest.raises(Exception, match="unreachable for 0.3s"):
        for _ in range(100):
            next(bundles)


# -- before anything starts --------------------------------------------------------------------
def test_check_refuses_what_cannot_work(redis_server, private_dir, monkeypatch):
    gone = f"unix://{private_dir}/nothing.sock"
    with pytest.raises(CannotStart, match=f"cannot reach Redis at {gone}"):
        ReadFromRedisStream(gone, "in", "g").check()
    with pytest.raises(CannotStart, match="cannot reach Redis"):
        WriteToRedisStream(gone, "out").check()
    client(redis_server).set("plain", "x")
    with pytest.raises(CannotStart, match="'plain' .* is a string, not a stream"):
        ReadFromRedisStream(redis_server.url, "plain", "g").check()
    monkeypatch.setitem(sys.modules, "redis", None)  # as if the extra were not installed
    with pytest.raises(CannotStart, match=r"beamlet\[stream\]"):
        ReadFromRedisStream(redis_server.url, "in", "g").check()


def test_only_the_streams_module_imports_redis_and_only_on_use():
    code = "import sys, runtime, client, modelserver, runtime.streams; print('redis' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "False"
