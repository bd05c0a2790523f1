"""Where a client's infer requests spend their time: its own stages and the server's.

Each infer request a ``ServerClient`` makes is cut into stages, in seconds:

    encode           packing the request (its arrays into shared memory included)
    send             writing it to the socket
    wait             from the last byte sent until the reply's first bytes were read
    decode           decoding the reply (its arrays read or copied out)
    server_queue     the server's stages, from the reply's ``stages`` (docs/protocol.md):
    server_assemble  waiting for a compute thread and for other callers' requests,
    server_forward   merging the batch, the model call, encoding the reply
    server_encode
    transport        what the server's stages leave of ``wait``: the socket both ways,
                     the server reading and dispatching the request, scheduling

``encode + send + wait + decode`` is the whole exchange on the connection. A server
that records no stage times (``serve --no-metrics``, or an older server) leaves out the
``server_*`` stages and ``transport``.

``StageTimes`` keeps the last request's stages per thread and a ``Histogram`` per stage
over every request (microseconds: bounded memory, whatever the run's length).
"""

from __future__ import annotations

import math
import threading
from typing import Any

from modelserver.histogram import Histogram

CLIENT_STAGES = ("encode", "send", "wait", "decode")
SERVER_STAGES = ("queue", "assemble", "forward", "encode")
STAGES = (*CLIENT_STAGES, *(f"server_{s}" for s in SERVER_STAGES), "transport")


class StageTimes:
    """Per-stage histograms of a client's infer requests, and each thread's last
    request. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._local = threading.local()
        self._histograms = {name: Histogram() for name in STAGES}

    def record(self, client: tuple[float, float, float, float], server: Any) -> None:
        """One request: the client's (encode, send, wait, decode) seconds and the reply's
        ``stages`` (a map of the server's, or None)."""
        last = dict(zip(CLIENT_STAGES, client))
        theirs = _server_stages(server)
        if theirs is not None:
            last.update(zip(STAGES[4:8], theirs))
            last["transport"] = max(0.0, last["wait"] - sum(theirs))
        self._local.last = last
        with self._lock:
            for name, seconds in last.items():
                self._histograms[name].record(seconds * 1e6)

    def last(self) -> dict[str, float]:
        """The stages of this thread's last infer request, in seconds (empty before one)."""
        return dict(getattr(self._local, "last", {}))

    def summary(self) -> dict[str, dict[str, Any]]:
        """Every stage recorded so far, as ``<stage>_us``: ``Histogram.summary()`` (count,
        mean, p50, p99, max) in microseconds."""
        with self._lock:
            return {f"{name}_us": h.summary() for name, h in self._histograms.items() if h.count}


def _server_stages(stages: Any) -> tuple[float, ...] | None:
    """The server's four stage times from a reply's ``stages``; None when it has none
    (or something this client does not read)."""
    if not isinstance(stages, dict):
        return None
    try:
        values = tuple(float(stages[name]) for name in SERVER_STAGES)
    except (KeyError, TypeError, ValueError):
        return None
    return values if all(math.isfinite(v) and v >= 0 for v in values) else None
