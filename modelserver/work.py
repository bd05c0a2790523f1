"""One infer request on its way through the server (``Work``), and what decides which
requests may share a forward pass: the same method, the same input structure, dtypes and
trailing shapes, and side arguments equal by value (``Work.signature``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from modelserver import wire
from modelserver.errors import BeamletError

log = logging.getLogger("beamlet.batcher")


@dataclass
class Work:
    """One infer request waiting for the model. ``reply`` gets (outputs, None) or (None, error).

    ``inputs``: the batch (a tensor, or a map of named tensors, rows along dim 0);
    ``kwargs``: side arguments, passed as they are; ``method``: which of the model's
    public methods to call. ``signature``, ``rows`` and ``nbytes`` (what it counts
    against the queue's limits) are computed once, before the request queues;
    ``model_id`` is set by the batcher that takes it.

    ``timed``: record this request's stage times, and count its batch in the model's
    histograms (``batchstats``). The batcher then sets ``stages`` before it replies, the
    map a reply carries: ``queue``, ``assemble``, ``forward`` seconds, from ``enqueued`` to its batch being taken by a
    compute thread, concatenating the batch's inputs and splitting its outputs (and a
    merged forward that failed, when the request then ran alone), and the model call."""

    inputs: Any
    kwargs: dict[str, Any]
    reply: Callable[[Any, BeamletError | None], None]
    method: str = "forward"
    caller: int = 0  # who sent it (a connection): merging waits for callers not yet in the batch
    enqueued: float = field(default_factory=time.monotonic)
    timed: bool = True
    stages: dict[str, float] | None = field(default=None, init=False)
    signature: tuple[Any, ...] | None = field(default=None, init=False)
    rows: int = field(default=1, init=False)
    nbytes: int = field(default=0, init=False)
    model_id: str = field(default="", init=False)
    reloads: int = field(default=0, init=False)  # times it waited for its model to load
    done: threading.Event | None = field(default=None, init=False)  # set once its batch ended, if asked

    def __post_init__(self) -> None:
        self.signature = _signature(self)
        self.rows = rows_of(self.inputs) or 1
        self.nbytes = _nbytes(self.inputs) + _nbytes(self.kwargs)

    def finish(self, outputs: Any, error: BeamletError | None) -> None:
        """Reply; a reply to a connection that just closed must not kill the caller."""
        try:
            self.reply(outputs, error)
        except Exception:
            log.debug("could not deliver a reply", exc_info=True)


def rows_of(inputs: Any) -> int | None:
    """The rows of a request's inputs (dim 0), None when they have no one row count."""
    import torch

    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0]) if inputs.dim() else None
    if isinstance(inputs, dict) and inputs:
        counts = {rows_of(v) for v in inputs.values()}
        return counts.pop() if len(counts) == 1 else None
    return None


def _nbytes(value: Any) -> int:
    """Bytes of the tensors and arrays in a request's inputs or side arguments."""
    import numpy as np
    import torch

    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


def _signature(work: Work) -> tuple[Any, ...] | None:
    """(rows, method, side arguments, structure...) for mergeable work, None for work that
    must run alone. Two requests merge only when everything but the row count is equal:
    their side arguments are compared by value (tensors by dtype, shape and bytes)."""
    import torch

    side = _value_key(work.kwargs)
    if side is None:
        return None
    x = work.inputs
    if isinstance(x, torch.Tensor) and x.dim():
        return (x.shape[0], work.method, side, x.dtype, tuple(x.shape[1:]))
    if isinstance(x, dict) and x and all(isinstance(v, torch.Tensor) and v.dim() for v in x.values()):
        rows = rows_of(x)
        if rows is None:
            return None
        return (rows, work.method, side, *sorted((k, v.dtype, tuple(v.shape[1:])) for k, v in x.items()))
    return None


def _value_key(value: Any) -> Any:
    """A hashable, comparable stand-in for a side argument; None for one that cannot be
    compared (the request then runs alone)."""
    import numpy as np
    import torch

    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return (type(value).__name__, value)
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
        return ("tensor", str(t.dtype), tuple(t.shape), raw.numpy().tobytes())
    if isinstance(value, np.ndarray):
        return ("ndarray", str(value.dtype), value.shape, np.ascontiguousarray(value).tobytes())
    if isinstance(value, (torch.dtype, torch.device)):
        return (type(value).__name__, str(value))
    if isinstance(value, wire.DataclassValue):
        fields = _value_key(value.fields)
        return None if fields is None else ("dataclass", value.ref.get("name"), fields)
    if isinstance(value, dict):
        items = [(k, _value_key(v)) for k, v in value.items()]
        if any(v is None for _, v in items):
            return None
        return ("map", tuple(sorted(items, key=lambda kv: str(kv[0]))))
    if isinstance(value, (list, tuple)):
        keys = [_value_key(v) for v in value]
        return None if any(k is None for k in keys) else (type(value).__name__, tuple(keys))
    return None
