"""The error hierarchy shared by server and client.

Every error that crosses the wire is sent as ``{"code": ..., "message": ...}`` and
comes back on the client as the same class (``from_wire``). ``ServerUnavailable``
never crosses the wire: it is the client's word for "the server is gone", which is
different from "this request failed".
"""

from __future__ import annotations

from typing import Any


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
    """The model rejected the input (wrong dtype, wrong shape, wrong arguments)."""

    code = "bad_input"


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
    """The server is shutting down or cannot take more work now; retry later."""

    code = "overloaded"


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
    return cls(str(error.get("message", "")))
