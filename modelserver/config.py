"""Where the server's socket lives, how long a client waits for it, how sizes are written
on the command line, the deterministic mode's switch, and the environment of the
processes beamlet starts."""

from __future__ import annotations

import math
import os
import re
import stat
import tempfile
from collections.abc import Mapping

SOCKET_ENV = "BEAMLET_SOCKET"
SOCKET_NAME = "modelserver.sock"
REQUEST_TIMEOUT_ENV = "BEAMLET_REQUEST_TIMEOUT"
DEFAULT_REQUEST_TIMEOUT = 30.0
# Virtual size of each shared-memory region of a client connection (modelserver.shm);
# pages cost memory only once written. 0 turns shared memory off.
SHM_BYTES_ENV = "BEAMLET_SHM_BYTES"
DEFAULT_SHM_BYTES = 1 << 30
# The deterministic mode (``--deterministic``): the model server merges no requests of
# different callers and uses torch's deterministic algorithms; RunInference fixes its batch
# sizes. A run sets it for every process it starts.
DETERMINISTIC_ENV = "BEAMLET_DETERMINISTIC"
_TRUE = ("1", "true", "yes", "on")

# The checkout (or site-packages directory) beamlet is imported from.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def deterministic(environ: Mapping[str, str] = os.environ) -> bool:
    """True when ``BEAMLET_DETERMINISTIC`` is 1, true, yes or on (any case); anything else
    is off."""
    return environ.get(DETERMINISTIC_ENV, "").strip().lower() in _TRUE


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a child that imports beamlet (a worker, a model
    server, a benchmark's client), with ``extra`` set: the child must import beamlet from
    wherever this process found it, whatever its working directory, so beamlet's root goes
    first on ``PYTHONPATH``."""
    env = dict(os.environ)
    env.update(extra or {})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    return env


_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Bytes from "512MiB", "8GiB", "1.5GB" or a plain number of bytes."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (use bytes or a unit: 512MiB, 8GiB, 2GB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024:
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"


def default_socket_path() -> str:
    """BEAMLET_SOCKET if set; else ``$XDG_RUNTIME_DIR/beamlet/modelserver.sock``; else
    ``<tmp>/beamlet-<uid>/modelserver.sock``. The directory is private (0700)."""
    override = os.environ.get(SOCKET_ENV)
    if override:
        return os.path.abspath(override)
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR")
    if runtime_dir and os.path.isdir(runtime_dir):
        base = os.path.join(runtime_dir, "beamlet")
    else:
        base = os.path.join(tempfile.gettempdir(), f"beamlet-{os.getuid()}")
    return os.path.join(base, SOCKET_NAME)


def socket_path(explicit: str | None = None) -> str:
    return os.path.abspath(explicit) if explicit else default_socket_path()


def request_timeout(explicit: float | None = None) -> float:
    """How long a client waits for the server to send anything while a request of its is
    in flight, in seconds: ``explicit``, else $BEAMLET_REQUEST_TIMEOUT, else 30."""
    source = "request_timeout"
    value: float | str | None = explicit
    if value is None:
        value = os.environ.get(REQUEST_TIMEOUT_ENV) or None
        source = REQUEST_TIMEOUT_ENV
    if value is None:
        return DEFAULT_REQUEST_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"{source} must be a positive number of seconds, not {value!r}")
    return seconds


def shm_bytes(explicit: int | None = None) -> int:
    """The virtual size of a client connection's shared-memory regions, in bytes:
    ``explicit``, else $BEAMLET_SHM_BYTES (a size: 256MiB), else 1 GiB; 0 is none (arrays
    then travel through the socket). The server caps it at its ``--max-frame-bytes``."""
    if explicit is not None:
        value: int = explicit
    else:
        text = os.environ.get(SHM_BYTES_ENV, "").strip()
        try:
            value = parse_size(text) if text else DEFAULT_SHM_BYTES
        except ValueError:
            raise ValueError(
                f"{SHM_BYTES_ENV} must be a size (256MiB, 1GiB, 0 for none), not {text!r}"
            ) from None
    if value < 0:
        raise ValueError(f"a shared-memory size cannot be negative: {value}")
    return value


def ensure_private_dir(path: str) -> None:
    """Create the socket's directory 0700, or check that an existing one is ours and private.

    A directory someone else owns, or one others can write into, could let them swap the
    socket for their own: refuse it.
    """
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise PermissionError(f"socket directory {path} is not a directory")
    if st.st_uid != os.getuid():
        raise PermissionError(f"socket directory {path} belongs to uid {st.st_uid}, not to us")
    if st.st_mode & 0o077:
        raise PermissionError(
            f"socket directory {path} is open to other users (mode {stat.S_IMODE(st.st_mode):o}); "
            "put the socket in a private (0700) directory"
        )


def wait_for_exit(pid: int, timeout: float) -> bool:
    """Wait until process ``pid`` has exited (a zombie awaiting its parent counts as
    exited: it holds nothing). True when it is gone within ``timeout`` seconds."""
    import time

    import psutil

    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
