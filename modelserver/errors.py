"""The error hierarchy shared by server and client.

Every error that crosses the wire is sent as ``{"code": ..., "message": ...}`` (plus
``retry_after`` for ``Overloaded``) and comes back on the client as the same class
(``from_wire``). ``ServerUnavailable`` never crosses the wire: it is the client's word
for "the server is gone", which is different from "this request failed".

Whose fault: ``BadRequest``/``BadInput`` say the request does not fit (an unknown
operation or method, arguments the method's signature does not take); ``ModelError``
says the model itself raised while running the batch (its traceback is in the message);
``Overloaded`` says "not now, retry after ``retry_after`` seconds".
"""

from __future__ import annotations

from typing import Any

DEFAULT_RETRY_AFTER = 0.05


class BeamletError(Exception):
    """Base of every beamlet error. ``code`` names it on the wire."""

    code = "internal"

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code, "message": str(self)}


class InternalError(BeamletError):
    """The server failed in a way that is not the request's fault."""

    code = "internal"


class ProtocolError(BeamletError):
    """A frame was malformed, truncated or spoke an unknown version; the connection closes."""

    code = "protocol"


class FrameTooLarge(ProtocolError):
    """A frame announced more bytes than the receiver accepts; the connection closes."""

    code = "frame_too_large"


class BadRequest(BeamletError):
    """The request itself is wrong: unknown operation, missing or mistyped field."""

    code = "bad_request"


class BadInput(BadRequest):
    """The input does not fit the model's method: arguments its signature does not take
    (checked before the model runs)."""

    code = "bad_input"


class ModelError(BeamletError):
    """The model raised while running the batch (whatever the cause: a shape or dtype its
    layers reject, a bug in its code). The message names the input and carries the
    model's traceback, bounded in length."""

    code = "model_error"


class ModelNotFound(BeamletError):
    """The server has no model registered under that key (the client registers it and retries)."""

    code = "unknown_model"


class ModelLoadError(BeamletError):
    """The model could not be loaded: missing or corrupt checkpoint, class that does not import."""

    code = "load_failed"


class OutOfMemory(BeamletError):
    """The model or batch does not fit in the memory budget of its device."""

    code = "out_of_memory"


class Overloaded(BeamletError):
    """The server cannot take this request now (the model's queue is full); retry after
    ``retry_after`` seconds, the server's estimate of when there will be room."""

    code = "overloaded"

    def __init__(self, message: str = "", retry_after: float = DEFAULT_RETRY_AFTER):
        super().__init__(message)
        self.retry_after = float(retry_after)

    def to_wire(self) -> dict[str, Any]:
        return {**super().to_wire(), "retry_after": self.retry_after}

    def __reduce__(self) -> tuple[Any, ...]:  # pickled (Beam's dead letters) with its hint
        return (type(self), (str(self), self.retry_after))


class ServerUnavailable(BeamletError):
    """The client cannot reach a server (not running, died, or would not start)."""

    code = "unavailable"


_BY_CODE: dict[str, type[BeamletError]] = {
    cls.code: cls
    for cls in (
        InternalError,
        ProtocolError,
        FrameTooLarge,
        BadRequest,
        BadInput,
        ModelError,
        ModelNotFound,
        ModelLoadError,
        OutOfMemory,
        Overloaded,
    )
}


def from_wire(error: Any) -> BeamletError:
    """Rebuild the typed error a server sent; unknown codes become ``InternalError``."""
    if not isinstance(error, dict):
        return ProtocolError(f"malformed error reply: {error!r}")
    cls = _BY_CODE.get(str(error.get("code")), InternalError)
    message = str(error.get("message", ""))
    if cls is Overloaded:
        hint = error.get("retry_after")
        if isinstance(hint, bool) or not isinstance(hint, (int, float)) or hint < 0:
            hint = DEFAULT_RETRY_AFTER
        return Overloaded(message, retry_after=float(hint))
    return cls(message)
