"""beamlet's per-machine model server: one copy of each large model, served to every
worker process on the machine over a Unix socket. See docs/architecture.md."""

from modelserver.config import default_socket_path, parse_size
from modelserver.errors import (
    BadInput,
    BadRequest,
    BeamletError,
    FrameTooLarge,
    InternalError,
    ModelError,
    ModelLoadError,
    ModelNotFound,
    OutOfMemory,
    Overloaded,
    ProtocolError,
    ServerUnavailable,
)
from modelserver.loaders import ModelSpec

__all__ = [
    "BadInput",
    "BadRequest",
    "BeamletError",
    "FrameTooLarge",
    "InternalError",
    "ModelError",
    "ModelLoadError",
    "ModelNotFound",
    "ModelSpec",
    "OutOfMemory",
    "Overloaded",
    "ProtocolError",
    "ServerUnavailable",
    "default_socket_path",
    "parse_size",
]
