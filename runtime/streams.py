"""Redis Streams in and out: ``ReadFromRedisStream`` (an unbounded source over a consumer
group) and ``WriteToRedisStream`` (a sink that appends one entry per output).

    pipeline = (
        ReadFromRedisStream("redis://queue:6379/0", "requests", group="classify")
        | Map(predict)                      # each element: the entry's fields, dict[str, str]
        | WriteToRedisStream("redis://queue:6379/0", "predictions")
    )

Exactly once, end to end: when the sink writes to the server its source reads from, each
bundle's outputs, its dead letters and the XACK of its input entries go in one MULTI/EXEC
transaction. A process killed anywhere either committed the bundle (its entries are no
longer pending) or did not (they are still pending, and the consumer re-reads them when it
starts again under the same name). Elsewhere a bundle is written, then acknowledged: at
least once.

A lost connection is retried with backoff (0.1 s doubling to 2 s), with one WARNING line
when it is lost and one INFO line when it is back, for up to ``reconnect_timeout`` seconds;
then ``RedisUnavailable``. redis-py's own retries are off: a transaction it re-sent after a
lost EXEC reply would write its outputs twice, so every retry is decided here.

Only this module imports redis (the ``stream`` extra), and only when a stream is first used.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from runtime.errors import CannotStart, PipelineError
from runtime.pipeline import Sink, Source, SourceBundle, to_jsonable

log = logging.getLogger("beamlet.streams")

T = TypeVar("T")

FIRST_BACKOFF = 0.1
MAX_BACKOFF = 2.0
DEAD_LETTER_FIELD = "dead_letter"


class RedisUnavailable(PipelineError):
    """A Redis server stayed unreachable past ``reconnect_timeout``."""


class ConnectionLost(Exception):
    """The connection to Redis failed under a call (retried by the caller)."""


def import_redis() -> Any:
    """The redis package, or an ImportError that says which extra brings it."""
    try:
        import redis
    except ImportError as exc:
        raise ImportError(
            "Redis streams need the redis package (redis-py): pip install 'beamlet[stream]'"
        ) from exc
    return redis


def default_consumer(stream: str, group: str) -> str:
    """The consumer name a reader takes unless given one: the same for the same job on the
    same machine, so a restarted job re-reads the entries it had read but not committed."""
    return f"{socket.gethostname()}/{stream}/{group}"


def _refused(redis: Any) -> tuple[type[Exception], ...]:
    """The connection errors that retrying cannot cure (credentials, permissions)."""
    names = ("AuthenticationError", "AuthorizationError")
    return tuple(getattr(redis.exceptions, n) for n in names if hasattr(redis.exceptions, n))


def _redacted(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _text(value: bytes | str) -> str:
    return value if isinstance(value, str) else value.decode("utf-8", "backslashreplace")


def _entry_ids(acks: list[Any]) -> list[str]:
    """The entry ids of the bundles' acks (each a list of ids), in order."""
    return list(itertools.chain.from_iterable(a if isinstance(a, (list, tuple)) else [a] for a in acks))


class _Link:
    """One Redis server as a stream reader or writer uses it: a client made on first use,
    and calls retried across a lost connection. Thread-safe: the client's pool hands each
    thread its own connection, and ``_lock`` guards only the lost/back state."""

    def __init__(self, url: str, what: str, socket_timeout: float, reconnect_timeout: float | None):
        self.url = url
        self.what = what
        self.socket_timeout = socket_timeout
        self.reconnect_timeout = reconnect_timeout
        self._client: Any = None
        self._lock = threading.Lock()
        self._lost_since: float | None = None

    @property
    def client(self) -> Any:
        """The client, made on first use (it connects on its first command)."""
        client = self._client
        if client is None:
            redis = import_redis()
            from redis.backoff import NoBackoff
            from redis.retry import Retry

            with self._lock:  # two threads' first calls make one client
                if self._client is None:
                    self._client = redis.Redis.from_url(
                        self.url,
                        socket_timeout=self.socket_timeout,
                        socket_connect_timeout=min(self.socket_timeout, 5.0),
                        retry=Retry(NoBackoff(), 0),
                    )
                client = self._client
        return client

    def identity(self) -> tuple[Any, ...]:
        """Where the client connects: two links with the same identity reach one server
        (and one database) as the same user, so one transaction can span both."""
        kwargs = self.client.connection_pool.connection_kwargs
        address = kwargs.get("path") or (kwargs.get("host", "localhost"), kwargs.get("port", 6379))
        return (
            self.client.connection_pool.connection_class.__name__,
            address,
            kwargs.get("db", 0),
            kwargs.get("username"),
        )

    def ping(self) -> None:
        """CannotStart, in one line, when the server cannot be reached."""
        try:
            self.client.ping()
        except ImportError as exc:
            raise CannotStart(str(exc)) from None
        except Exception as exc:
            raise CannotStart(f"cannot reach Redis at {_redacted(self.url)} ({self.what}): {exc}") from None

    def attempt(self, op: Callable[[Any], T]) -> T:
        """``op(client)`` once. A lost connection is logged (once per outage) and raised as
        ConnectionLost; any other error as it is."""
        redis = import_redis()
        try:
            result = op(self.client)
        except _refused(redis):
            raise  # a connection refused for its credentials: waiting will not help
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            self._lost(exc)
            raise ConnectionLost(str(exc)) from exc
        self._back()
        return result

    def call(self, op: Callable[[Any], T]) -> T:
        """``op(client)``, retried with backoff across a lost connection until it succeeds
        or ``reconnect_timeout`` has passed since the connection was lost. ``op`` must be
        safe to run again after a connection error (see ``WriteToRedisStream.commit``)."""
        backoff = FIRST_BACKOFF
        while True:
            try:
                return self.attempt(op)
            except ConnectionLost:
                self.give_up_if_overdue()
                time.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)

    def give_up_if_overdue(self) -> None:
        lost = self._lost_since
        if lost is not None and self.reconnect_timeout is not None:
            if time.monotonic() - lost > self.reconnect_timeout:
                raise RedisUnavailable(
                    f"Redis at {_redacted(self.url)} ({self.what}) unreachable for "
                    f"{self.reconnect_timeout:g}s; giving up"
                )

    def _lost(self, exc: Exception) -> None:
        with self._lock:
            first = self._lost_since is None
            if first:
                self._lost_since = time.monotonic()
        if first:
            reason = str(exc).rstrip(".")
            log.warning("Redis at %s unreachable (%s): %s; retrying", _redacted(self.url), self.what, reason)

    def _back(self) -> None:
        if self._lost_since is None:  # the common case: no lock taken
            return
        with self._lock:
            lost, self._lost_since = self._lost_since, None
        if lost is not None:
            log.info(
                "Redis at %s reachable again (%s) after %.1fs",
                _redacted(self.url),
                self.what,
                time.monotonic() - lost,
            )

    def check_stream_key(self, key: str) -> None:
        """CannotStart if ``key`` exists and is not a stream."""
        kind = _text(self.client.type(key))
        if kind not in ("none", "stream"):
            raise CannotStart(f"the Redis key {key!r} at {_redacted(self.url)} is a {kind}, not a stream")

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()


class ReadFromRedisStream(Source):
    """The entries of a Redis stream, read through a consumer group (XREADGROUP): each
    element is an entry's fields as ``dict[str, str]`` (bytes that are not UTF-8 appear as
    ``\\xNN`` escapes). Unbounded: it runs until the run is stopped.

    The group is created if missing, at id ``0`` (entries already in the stream are read).
    On start, and after a lost connection, the consumer first re-reads its own pending
    entries (read before, never acknowledged: a restarted job finishes them), then claims
    other consumers' entries pending longer than ``claim_idle`` seconds (XAUTOCLAIM, again
    every ``claim_idle / 2`` seconds; None: never), then reads new ones. ``claim_idle`` must
    exceed the longest time from read to commit, or a slow consumer's entries are taken
    from it while it works on them (they would be written twice).

    ``consumer`` defaults to ``default_consumer(stream, group)``: hostname, stream, group,
    the same for every restart of the job on this machine. Two jobs that read one group on
    one machine each need a name of their own.

    ``bundles(size, max_wait)`` yields ``SourceBundle(elements, ack=entry ids, arrived=
    time.time() of the first entry)``: a bundle closes when full or ``max_wait`` seconds
    after its first entry arrived; with nothing arriving, an empty bundle at least every
    ``max_wait`` seconds (``max_wait`` None: the ``max_wait`` given here). ``ack(acks)``
    acknowledges (XACK) the given bundles' entries; the harness calls it once they are
    committed, or ``WriteToRedisStream`` acknowledges them inside its commit.

    Thread-safety: ``bundles()`` runs on one thread (the harness's reader) while ``ack``
    and the sink's commit run on another; the set of entries in flight is locked."""

    unbounded = True

    def __init__(
        self,
        url: str,
        stream: str,
        group: str,
        consumer: str | None = None,
        claim_idle: float | None = 30.0,
        max_wait: float = 1.0,
        socket_timeout: float = 10.0,
        reconnect_timeout: float | None = 300.0,
    ):
        if max_wait <= 0:
            raise ValueError(f"max_wait must be positive, not {max_wait}")
        self.url = url
        self.stream = stream
        self.group = group
        self.consumer = consumer or default_consumer(stream, group)
        self.claim_idle = claim_idle
        self.max_wait = max_wait
        self.link = _Link(url, f"reading {stream!r}", socket_timeout, reconnect_timeout)
        self._inflight: set[str] = set()  # yielded, neither acknowledged nor committed
        self._inflight_lock = threading.Lock()
        self._group_ready = False
        self._replay_from: str | None = "0"
        self._claim_from = "0-0"
        self._next_claim = 0.0

    def describe(self) -> str:
        return f"ReadFromRedisStream({_redacted(self.url)}, {self.stream!r}, group={self.group!r})"

    def check(self) -> None:
        self.link.ping()
        self.link.check_stream_key(self.stream)

    def read(self) -> Iterator[dict[str, str]]:
        """The elements one by one, never acknowledged (the harness reads ``bundles()``)."""
        for bundle in self.bundles(100):
            yield from bundle.elements

    def bundles(self, size: int, max_wait: float | None = None) -> Iterator[SourceBundle]:
        wait = self.max_wait if max_wait is None else max_wait
        with self._inflight_lock:
            self._inflight.clear()  # a previous run's bundles were abandoned: read them again
        self._restart_reading()
        backoff = FIRST_BACKOFF
        while True:
            elements: list[dict[str, str]] = []
            ids: list[str] = []
            arrived: float | None = None
            deadline = time.monotonic() + wait
            while len(ids) < size and (now := time.monotonic()) < deadline:
                count, left = size - len(ids), deadline - now
                try:
                    entries = self.link.attempt(functools.partial(self._fetch, count=count, wait=left))
                except ConnectionLost:
                    # A reply lost with the connection may have delivered entries to us:
                    # they are in our pending list now, and only a re-read finds them.
                    self._restart_reading()
                    self.link.give_up_if_overdue()
                    time.sleep(min(backoff, max(0.0, deadline - time.monotonic())))
                    backoff = min(backoff * 2, MAX_BACKOFF)
                    continue
                backoff = FIRST_BACKOFF
                if entries and arrived is None:
                    arrived = time.time()
                    deadline = time.monotonic() + wait
                with self._inflight_lock:  # in flight from now: a re-read must not repeat them
                    self._inflight.update(entry_id for entry_id, _fields in entries)
                for entry_id, fields in entries:
                    ids.append(entry_id)
                    elements.append(fields)
            yield SourceBundle(elements, ack=ids or None, arrived=arrived)

    def ack(self, acks: list[Any]) -> None:
        ids = _entry_ids(acks)
        if ids:
            self.link.call(lambda r: r.xack(self.stream, self.group, *ids))
        self.settled(ids)

    def settled(self, ids: list[str]) -> None:
        """``ids`` are acknowledged (by ``ack`` or inside a sink's transaction): no longer
        in flight."""
        with self._inflight_lock:
            self._inflight.difference_update(ids)

    def close(self) -> None:
        self.link.close()

    # -- reading ----------------------------------------------------------------------------
    def _restart_reading(self) -> None:
        """From the top: make sure of the group, re-read our pending entries, claim others'."""
        self._group_ready = False
        self._replay_from = "0"
        self._claim_from = "0-0"
        self._next_claim = 0.0

    def _fetch(self, r: Any, count: int, wait: float) -> list[tuple[str, dict[str, str]]]:
        """One step of reading: our own pending entries first, then a claim sweep when one
        is due, then new entries (blocking up to ``wait`` seconds)."""
        redis = import_redis()
        if not self._group_ready:
            self._create_group(r)
        try:
            if self._replay_from is not None:
                return self._replay(r, count)
            if self.claim_idle is not None and time.monotonic() >= self._next_claim:
                return self._claim(r, count)
            block_ms = max(1, int(min(wait, self.link.socket_timeout / 2) * 1000))
            reply = r.xreadgroup(self.group, self.consumer, {self.stream: ">"}, count=count, block=block_ms)
        except redis.ResponseError as exc:
            if not str(exc).startswith("NOGROUP"):
                raise
            log.warning(
                "the consumer group %r of %r at %s is gone (a server restarted without its data?); "
                "creating it again",
                self.group,
                self.stream,
                _redacted(self.url),
            )
            self._restart_reading()
            return []
        return [(_text(i), self._element(f)) for i, f in self._stream_entries(reply)]

    def _create_group(self, r: Any) -> None:
        redis = import_redis()
        try:
            r.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if not str(exc).startswith("BUSYGROUP"):
                raise
        self._group_ready = True

    def _replay(self, r: Any, count: int) -> list[tuple[str, dict[str, str]]]:
        reply = r.xreadgroup(self.group, self.consumer, {self.stream: self._replay_from}, count=count)
        entries = self._stream_entries(reply)
        if not entries:
            self._replay_from = None
            return []
        self._replay_from = _text(entries[-1][0])
        with self._inflight_lock:  # one in flight is settled by its commit
            deleted = [i for i in (_text(i) for i, f in entries if not f) if i not in self._inflight]
        if deleted:  # trimmed or XDEL'd before we committed it: nothing left to process
            log.warning(
                "%d pending entries of %r were deleted from the stream before they were processed; "
                "acknowledging them",
                len(deleted),
                self.stream,
            )
            r.xack(self.stream, self.group, *deleted)
        return self._fresh([(_text(i), self._element(f)) for i, f in entries if f])

    def _claim(self, r: Any, count: int) -> list[tuple[str, dict[str, str]]]:
        assert self.claim_idle is not None
        reply = r.xautoclaim(
            self.stream, self.group, self.consumer, int(self.claim_idle * 1000), self._claim_from, count=count
        )
        self._claim_from = _text(reply[0])
        if self._claim_from == "0-0":  # the sweep went through the whole pending list
            self._next_claim = time.monotonic() + max(self.claim_idle / 2, 0.1)
        claimed = [(_text(i), self._element(f)) for i, f in reply[1] if i is not None]
        if claimed:
            log.info(
                "claimed %d entries of %r pending longer than %gs", len(claimed), self.stream, self.claim_idle
            )
        return self._fresh(claimed)

    def _fresh(self, entries: list[tuple[str, dict[str, str]]]) -> list[tuple[str, dict[str, str]]]:
        """Leave out entries this reader has in flight already: pending, but not lost."""
        with self._inflight_lock:
            return [e for e in entries if e[0] not in self._inflight]

    def _stream_entries(self, reply: Any) -> list[tuple[Any, Any]]:
        if not reply:
            return []
        if isinstance(reply, dict):  # RESP3
            return list(itertools.chain.from_iterable(reply.values()))
        return list(itertools.chain.from_iterable(entries for _name, entries in reply))

    @staticmethod
    def _element(fields: Mapping[Any, Any]) -> dict[str, str]:
        return {_text(k): _text(v) for k, v in fields.items()}


class WriteToRedisStream(Sink):
    """Each output, a ``dict`` of str to str, int or float, becomes one entry of ``stream``
    (XADD; ``maxlen``: trimmed to about that many entries, ``MAXLEN ~``). Dead letters go
    to ``<stream>:dead_letters``, one entry each, the dead letter as JSON text in its field
    ``dead_letter``. Anything else as an output is a TypeError naming its type and field,
    raised before any of the bundle is written.

    ``commit`` after a ``ReadFromRedisStream`` on the same server (same address, database
    and user): the outputs, the dead letters and the XACK of the bundle's entries in one
    MULTI/EXEC transaction. Otherwise: the outputs and dead letters in one transaction,
    then ``source.ack``."""

    def __init__(
        self,
        url: str,
        stream: str,
        maxlen: int | None = None,
        socket_timeout: float = 10.0,
        reconnect_timeout: float | None = 300.0,
    ):
        self.url = url
        self.stream = stream
        self.maxlen = maxlen
        self.dead_letters_stream = f"{stream}:dead_letters"
        self.link = _Link(url, f"writing {stream!r}", socket_timeout, reconnect_timeout)

    def check(self) -> None:
        self.link.ping()
        self.link.check_stream_key(self.stream)
        self.link.check_stream_key(self.dead_letters_stream)

    def write(self, elements: list[Any]) -> None:
        self._write_at_least_once([self._entry(e) for e in elements], [])

    def write_dead_letters(self, dead_letters: list[dict[str, Any]]) -> None:
        self._write_at_least_once([], [self._dead_letter(d) for d in dead_letters])

    def commit(
        self, outputs: list[Any], dead_letters: list[dict[str, Any]], acks: list[Any], source: Source | None
    ) -> None:
        entries = [self._entry(e) for e in outputs]  # every TypeError before anything is written
        dead = [self._dead_letter(d) for d in dead_letters]
        ids = _entry_ids(acks)
        if not (ids and isinstance(source, ReadFromRedisStream) and self.shares_server(source)):
            self._write_at_least_once(entries, dead)
            if acks and source is not None:
                source.ack(acks)
            return
        reader: ReadFromRedisStream = source
        ran = False

        def commit_once(r: Any) -> list[Any] | None:
            nonlocal ran
            # After a connection error EXEC may have run with its reply lost: it acknowledged
            # every input entry, so none still pending means done, and any means not run.
            if ran and not self._any_pending(r, reader, ids):
                return None
            ran = True
            return self._transaction(r, entries, dead, (reader, ids))

        replies = self.link.call(commit_once)
        reader.settled(ids)
        if replies is not None and replies[-1] < len(ids):
            log.warning(
                "%d of %d entries of %r were acknowledged already (claimed by another consumer "
                "after claim_idle?): their outputs may be written twice",
                len(ids) - replies[-1],
                len(ids),
                reader.stream,
            )

    def shares_server(self, source: ReadFromRedisStream) -> bool:
        """True when one transaction can write here and acknowledge ``source``'s entries."""
        return self.link.identity() == source.link.identity()

    def close(self) -> None:
        self.link.close()

    # -- writing ----------------------------------------------------------------------------
    def _write_at_least_once(self, entries: list[dict[str, Any]], dead: list[dict[str, str]]) -> None:
        """One transaction, run again after a connection error: without an acknowledgement
        in it nothing tells whether a lost EXEC reply ran, so a retry may write it twice."""
        if entries or dead:
            self.link.call(lambda r: self._transaction(r, entries, dead, None))

    def _transaction(
        self,
        r: Any,
        entries: list[dict[str, Any]],
        dead: list[dict[str, str]],
        ack: tuple[ReadFromRedisStream, list[str]] | None,
    ) -> list[Any]:
        pipe = r.pipeline(transaction=True)
        for fields in entries:
            pipe.xadd(self.stream, fields, maxlen=self.maxlen, approximate=True)
        for fields in dead:
            pipe.xadd(self.dead_letters_stream, fields)
        if ack is not None:
            source, ids = ack
            pipe.xack(source.stream, source.group, *ids)
        return list(pipe.execute())

    @staticmethod
    def _any_pending(r: Any, source: ReadFromRedisStream, ids: list[str]) -> bool:
        pipe = r.pipeline(transaction=False)
        for entry_id in ids:
            pipe.xpending_range(source.stream, source.group, min=entry_id, max=entry_id, count=1)
        return any(pipe.execute())

    def _entry(self, element: Any) -> dict[str, Any]:
        if not isinstance(element, Mapping):
            raise TypeError(
                f"WriteToRedisStream({self.stream!r}) writes each output as one stream entry, a dict "
                f"of str to str, int or float; got a {_type_name(element)}"
            )
        if not element:
            raise TypeError(f"WriteToRedisStream({self.stream!r}): an empty dict cannot be a stream entry")
        for name, value in element.items():
            if not isinstance(name, str):
                raise TypeError(
                    f"WriteToRedisStream({self.stream!r}): field names must be str; got the "
                    f"{_type_name(name)} {name!r}"
                )
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise TypeError(
                    f"WriteToRedisStream({self.stream!r}): the field {name!r} of an output is a "
                    f"{_type_name(value)}; a stream entry holds str, int or float values"
                )
        return dict(element)

    @staticmethod
    def _dead_letter(dead_letter: dict[str, Any]) -> dict[str, str]:
        return {DEAD_LETTER_FIELD: json.dumps(to_jsonable(dead_letter), default=repr)}


def _type_name(value: Any) -> str:
    kind = type(value)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
