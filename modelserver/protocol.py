"""The model server's requests and replies: the allowed operations, typed.

Every request is a msgpack map with ``op`` and ``id`` (an int the client chooses; several
requests may be in flight on one connection and replies may come back in any order).
Every reply carries the request's ``id`` and ``ok``; a failed one carries
``error: {code, message}`` (see ``errors``; ``overloaded`` adds ``retry_after``, seconds).
A reply with ``id`` None reports a connection-level failure (a bad frame) just before the
server closes that connection, except the heartbeat ``{id: None, ok: true, heartbeat:
true}``, which the server sends while requests are in flight on a connection it has sent
nothing for 5 s (``connection.HEARTBEAT_INTERVAL``); clients skip it.

    op        request fields                        reply fields (ok)
    hello     version, pid                          version, server_pid, max_frame_bytes
    shm_attach request_bytes, reply_bytes, with     reply_bytes, with the server's reply
              the client's request region's memfd   region's memfd (SCM_RIGHTS); only
              (SCM_RIGHTS); see modelserver.shm     right after hello, once
    load      key, spec (a ModelSpec as a map),     model_id, device, nbytes, footprint,
              replace (bool, default true: a key    methods (the public methods a request
              serving another spec swaps to this    may name), spec (the spec the key
              one; false: the key keeps its spec),  serves now), sequence (the served
              sequence ([epoch, n], optional: the   version's, or null), stale (true when
              version's place in its key's order),  an older version attached instead),
              copies (int >= 1, default 1: copies   copies (how many the key holds)
              of the model the server holds, each
              with its own batcher; from the key's
              next load)
    infer     key, inputs, kwargs, method           outputs, model_id, stages
              (inputs: the batch, rows along dim 0, concatenated with other requests'
              when merged, never in the deterministic mode; kwargs: side arguments,
              equal in every merged request; method: a public method of the model,
              default "forward"; stages: {queue, assemble, forward, encode} seconds in
              the server, absent with serve --no-metrics: docs/protocol.md)
    status    -                                     status (see ModelServer.status)
    shutdown  -                                     - (the server then stops)

Errors of an ``infer``: unknown_model (no such key), bad_request (a method that is not
public), bad_input (arguments the method's signature does not take), model_error (the
model raised; its traceback in the message), overloaded (the model's queue is full:
retry after ``retry_after`` seconds), out_of_memory, internal. Of a ``load``:
load_failed, out_of_memory, bad_request (another version under the sequence the key's
version has). Of any request: bad_request (unknown op, missing or mistyped
field); of ``shm_attach``: bad_request (no or a bad descriptor, a size out of bounds,
already attached, other requests in flight: the client carries on without shared
memory).

Operations are dispatched from this table, never by name lookup on an object.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from modelserver.batcher import Batching
from modelserver.errors import BadRequest, BeamletError


@dataclass(frozen=True)
class Hello:
    id: int
    version: int
    pid: int


@dataclass(frozen=True)
class ShmAttach:
    """Share memory on this connection: the frame carries the client's request region
    (``request_bytes``, a sealed memfd); the reply carries the server's reply region of
    (at most) ``reply_bytes``."""

    id: int
    request_bytes: int
    reply_bytes: int


@dataclass(frozen=True)
class Load:
    """Register ``spec`` under ``key`` and load it. ``replace``: a key that already serves
    another spec swaps to this one; without it the key keeps what it serves (a worker
    joining a running job attaches to the job's current version). ``sequence``: the
    version's place in the key's order, (epoch, n); a swap to a version older than the
    served one is refused (None: no order, the last ``replace`` wins). ``copies``: how
    many copies of the model the server holds (Beam's ``model_copies``), from the key's
    next load (a first load, a swap, a reload after eviction)."""

    id: int
    key: str
    spec: dict[str, Any]
    replace: bool = True
    batching: Batching | None = None
    sequence: tuple[int, int] | None = None
    copies: int = 1


@dataclass(frozen=True)
class Infer:
    id: int
    key: str
    inputs: Any
    kwargs: dict[str, Any] = field(default_factory=dict)
    method: str = "forward"


@dataclass(frozen=True)
class Status:
    id: int


@dataclass(frozen=True)
class Shutdown:
    id: int


Request = Hello | ShmAttach | Load | Infer | Status | Shutdown


def _field(msg: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = msg.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise BadRequest(f"request field {name!r} must be {_kind_name(kind)}, got {value!r:.60}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return " or ".join(k.__name__ for k in kind)
    return kind.__name__


def parse_request(msg: Any) -> Request:
    """Turn a decoded frame into a typed request, or raise BadRequest naming what is wrong."""
    if not isinstance(msg, dict):
        raise BadRequest(f"a request must be a map, got {type(msg).__name__}")
    rid = _field(msg, "id", int)
    op = msg.get("op")
    if op == "infer":
        kwargs = msg.get("kwargs") or {}
        if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
            raise BadRequest("request field 'kwargs' must be a map of str to values")
        if "inputs" not in msg:
            raise BadRequest("infer request has no 'inputs'")
        method = msg.get("method", "forward")
        if not isinstance(method, str) or not method or method.startswith("_"):
            raise BadRequest(f"request field 'method' must name a public method, got {method!r:.60}")
        return Infer(rid, _field(msg, "key", str), msg["inputs"], kwargs, method)
    if op == "load":
        replace = msg.get("replace", True)
        if not isinstance(replace, bool):
            raise BadRequest(f"request field 'replace' must be bool, got {replace!r:.60}")
        copies = msg.get("copies", 1)
        if type(copies) is not int or copies < 1:
            raise BadRequest(f"request field 'copies' must be an int >= 1, got {copies!r:.40}")
        return Load(
            rid,
            _field(msg, "key", str),
            _field(msg, "spec", dict),
            replace,
            _batching(msg),
            _sequence(msg),
            copies,
        )
    if op == "hello":
        return Hello(rid, _field(msg, "version", int), _field(msg, "pid", int))
    if op == "shm_attach":
        return ShmAttach(rid, _field(msg, "request_bytes", int), _field(msg, "reply_bytes", int))
    if op == "status":
        return Status(rid)
    if op == "shutdown":
        return Shutdown(rid)
    raise BadRequest(f"unknown operation {op!r}; allowed: hello, shm_attach, load, infer, status, shutdown")


def request_id(msg: Any) -> int | None:
    """The id of a request that failed to parse, so its error can still be matched."""
    if isinstance(msg, dict) and isinstance(msg.get("id"), int):
        return int(msg["id"])
    return None


def ok_reply(rid: int | None, **fields: Any) -> dict[str, Any]:
    return {"id": rid, "ok": True, **fields}


def error_reply(rid: int | None, error: BeamletError) -> dict[str, Any]:
    return {"id": rid, "ok": False, "error": error.to_wire()}


def _batching(msg: dict[str, Any]) -> Batching | None:
    """A load's optional ``batching``: {max_batch_size: int >= 1 or None,
    max_batch_duration_secs: number >= 0 or None}."""
    data = msg.get("batching")
    if data is None:
        return None
    if not isinstance(data, dict) or set(data) - {"max_batch_size", "max_batch_duration_secs"}:
        raise BadRequest(
            "request field 'batching' must be a map with max_batch_size and max_batch_duration_secs, "
            f"got {data!r:.80}"
        )
    size = data.get("max_batch_size")
    if size is not None and (type(size) is not int or size < 1):
        raise BadRequest(f"batching.max_batch_size must be an int >= 1, got {size!r:.40}")
    delay = data.get("max_batch_duration_secs")
    if delay is not None and (
        isinstance(delay, bool) or not isinstance(delay, int | float) or not 0 <= delay < 3600
    ):
        raise BadRequest(f"batching.max_batch_duration_secs must be seconds in [0, 3600), got {delay!r:.40}")
    return Batching.from_handler(size, delay)


def _sequence(msg: dict[str, Any]) -> tuple[int, int] | None:
    """A load's optional ``sequence``: [epoch, n], two non-negative ints."""
    data = msg.get("sequence")
    if data is None:
        return None
    if (
        not isinstance(data, (list, tuple))
        or len(data) != 2
        or not all(type(v) is int and v >= 0 for v in data)
    ):
        raise BadRequest(f"request field 'sequence' must be [epoch, n], two ints >= 0, got {data!r:.60}")
    return (data[0], data[1])
