"""Shared memory for big arrays between a client and the model server.

A connection that attaches (the ``shm_attach`` request, right after ``hello``) has two
regions, one per direction. Each is an anonymous ``memfd`` created by the side that
writes into it: the client's request region and the server's reply region. Nothing is
named in /dev/shm or on disk, so a process killed at any moment leaves nothing behind: a
region lives exactly as long as some process maps it or holds its descriptor. The
creator seals its size (``F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL``) before handing the
descriptor over once with SCM_RIGHTS, and the receiver checks the seals, so no peer can
shrink a region under the other's mapping and make it fault (SIGBUS) on a page past the
end. A region's size is virtual: memfd pages cost memory only once written.

The writer keeps a bump allocator over its region (``reserve``): an array of at least
``threshold`` bytes is copied in at a 64-byte aligned offset and the frame carries only
its descriptor (``wire.EXT_SHM_ARRAY``); an array that does not fit goes through the
socket as before. The reader checks every descriptor against the region's bounds
(``view``) and either borrows a zero-copy view (the server, for request inputs) or
copies the bytes out (the client, for replies).

Lifetime, the contract both ends keep (docs/protocol.md, "Shared memory"):

- The client's request region is rewound at the start of every ``Channel.request_many``:
  a channel has one user at a time and ``request_many`` returns only once every reply
  has arrived, so the server has answered everything that pointed into it. The server
  never uses a view into it after replying. An output that is (a piece of) its input,
  as with an Identity model, is handed back by place (``place_of``,
  ``wire.EXT_SHM_RETURN``): the reply names where it lies in the client's own request
  region, and the client copies it out while decoding, before ``request_many`` returns
  and so before it rewinds; the server copies nothing and touches nothing after.
- The server's reply region is rewound when a frame flagged ``wire.FLAG_REWIND`` arrives
  (the first request of each ``request_many``) while no request of that connection is in
  flight: the client has then read every earlier reply, and it copies arrays out of the
  reply region while decoding, before ``request_many`` returns.

Memory: a region keeps the pages it has written, so a steady stream of requests costs no
page faults. Its use is watched in windows of ``TRIM_SECONDS``: at the first rewind after
a window ends, the pages beyond twice the most that window used (and beyond
``TRIM_FLOOR``) are given back (``MADV_REMOVE``), so a burst does not hold memory for the
connection's whole life, only for one to two windows after it.

Thread safety: ``reserve`` and ``rewind`` take the region's lock (the server's batcher
threads encode replies for one connection concurrently); the copies happen outside it.
``close`` may race with them: a closed region reserves nothing and views nothing, and a
mapping still lent out is unmapped when the last view of it goes.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import stat
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from modelserver.errors import BadRequest, ProtocolError

ALIGN = 64
# Arrays of at least this many bytes go through shared memory. Measured (1-array Identity
# round trips, 2 vCPUs): no difference from the socket at 8-32 KiB, ahead from 64 KiB on
# (256 KiB: 365 against 555 us; 1 MiB: 0.45 against 2.0 ms).
THRESHOLD = 64 << 10
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
REQUIRED_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
TRIM_SECONDS = 30.0
TRIM_FLOOR = 16 << 20  # never trim a region below this many written bytes
PAGE = mmap.PAGESIZE
# memfd names, as /proc/<pid>/fd and /proc/<pid>/maps show them ("/memfd:NAME (deleted)"):
# each names the client's pid, so an operator can tell whose region a server maps.
REQUEST_NAME = "beamlet-request-{pid}"
REPLY_NAME = "beamlet-reply-{pid}"


def keep_bytes(written: int, recent_peak: int, floor: int = TRIM_FLOOR) -> int:
    """How many bytes of a region's written prefix to keep at a trim: twice the most one
    exchange used recently (``recent_peak``), at least ``floor``, rounded up to a page, and
    never more than was written."""
    keep = max(2 * recent_peak, floor)
    keep = -(-keep // PAGE) * PAGE
    return min(keep, written)


class Region:
    """One memfd region mapped into this process: the writer's allocator, the reader's
    window. Build with ``create`` (our own, to send) or ``adopt`` (the peer's, received)."""

    def __init__(
        self,
        fd: int,
        size: int,
        *,
        writable: bool,
        threshold: int = THRESHOLD,
        clock: Callable[[], float] = time.monotonic,
    ):
        """Map ``size`` bytes of ``fd`` (the mapping keeps its own duplicate of it)."""
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        self.size = size
        self.threshold = threshold
        self._mm: mmap.mmap | None = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=prot)
        self._address = int(np.frombuffer(self._mm, np.uint8, 1).__array_interface__["data"][0])
        self._fd: int | None = None  # our own region's descriptor, until it is handed over
        self._lock = threading.Lock()
        self._top = 0  # next free offset
        self._written = 0  # end of the furthest bytes handed out since the last trim
        self._clock = clock
        self._window_start = clock()
        self._window_peak = 0

    @classmethod
    def create(cls, name: str, size: int, **options: Any) -> Region:
        """A new sealed region of ``size`` bytes. ``take_fd`` hands its descriptor over."""
        if size <= 0:
            raise ValueError(f"a shared-memory region needs a positive size, not {size}")
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
            region = cls(fd, size, writable=True, **options)
        except BaseException:
            os.close(fd)
            raise
        region._fd = fd
        return region

    @classmethod
    def adopt(cls, fd: int, size: int, *, limit: int, writable: bool) -> Region:
        """Map the peer's region from a received descriptor, which is closed here whatever
        happens. BadRequest when it is not a sealed memfd of exactly ``size`` bytes, or
        ``size`` is not in 1..``limit``."""
        try:
            try:
                st = os.fstat(fd)
                seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            except OSError as exc:
                raise BadRequest(f"the shared-memory descriptor is not a memfd ({exc.strerror})") from None
            if not stat.S_ISREG(st.st_mode) or seals & REQUIRED_SEALS != REQUIRED_SEALS:
                raise BadRequest("the shared-memory descriptor is not a memfd sealed against resizing")
            if not 0 < size <= limit:
                raise BadRequest(f"a shared-memory region of {size} bytes is not in 1..{limit}")
            if st.st_size != size:
                raise BadRequest(
                    f"the shared-memory region holds {st.st_size} bytes, not the {size} announced"
                )
            try:
                return cls(fd, size, writable=writable)
            except (OSError, ValueError) as exc:  # a write seal, a read-only descriptor
                raise BadRequest(f"cannot map the shared-memory region: {exc}") from None
        finally:
            os.close(fd)

    def take_fd(self) -> int:
        """Our region's descriptor, to send; the caller closes it once sent."""
        fd, self._fd = self._fd, None
        if fd is None:
            raise ValueError("this region's descriptor was already handed over")
        return fd

    @property
    def closed(self) -> bool:
        return self._mm is None

    # -- the writer ------------------------------------------------------------------
    def reserve(self, nbytes: int) -> tuple[int, np.ndarray] | None:
        """(offset, writable uint8 view of ``nbytes`` bytes there), or None when the region
        is full (or closed): the array then goes through the socket."""
        with self._lock:
            mm = self._mm
            offset = self._top
            end = offset + nbytes
            if mm is None or end > self.size:
                return None
            self._top = min(-(-end // ALIGN) * ALIGN, self.size)
            self._written = max(self._written, end)
        return offset, np.frombuffer(mm, np.uint8, nbytes, offset)

    def rewind(self) -> None:
        """Reuse the region from the start: everything reserved so far is no longer read
        (see the lifetime rules above). Now and then give back pages long unused."""
        with self._lock:
            used, self._top = self._top, 0
            self._window_peak = max(self._window_peak, used)
            now = self._clock()
            if now - self._window_start < TRIM_SECONDS:
                return
            keep = keep_bytes(self._written, self._window_peak)
            self._window_start, self._window_peak = now, 0
            mm, written = self._mm, self._written
            if mm is None or keep >= written:
                return
            self._written = keep
        trimmed = -(-written // PAGE) * PAGE - keep
        mm.madvise(mmap.MADV_REMOVE, keep, min(trimmed, self.size - keep))

    @property
    def written(self) -> int:
        """Bytes of the region written to and still held (its committed high-water mark)."""
        with self._lock:
            return self._written

    # -- the reader ------------------------------------------------------------------
    def view(self, offset: int, nbytes: int) -> np.ndarray:
        """A uint8 view of ``nbytes`` bytes at ``offset``, after checking that they lie in
        the region at an aligned offset; ProtocolError for a descriptor that does not."""
        mm = self._mm
        if mm is None:
            raise ProtocolError("shared-memory region already closed")
        if offset % ALIGN or offset > self.size or nbytes > self.size - offset:
            raise ProtocolError(
                f"shared-memory array of {nbytes} bytes at offset {offset} lies outside the "
                f"{self.size}-byte region (or is not {ALIGN}-byte aligned)"
            )
        return np.frombuffer(mm, np.uint8, nbytes, offset)

    def place_of(self, arr: np.ndarray) -> int | None:
        """The offset at which ``arr``'s bytes lie in this region (C-contiguous, 64-byte
        aligned), or None when they do not: an output that is (a piece of) its request's
        input, which the server names by its place instead of copying it."""
        if self._mm is None or not arr.flags.c_contiguous:
            return None
        offset = int(arr.__array_interface__["data"][0]) - self._address
        if offset < 0 or offset % ALIGN or offset + arr.nbytes > self.size:
            return None
        return offset

    def close(self) -> None:
        """Unmap now, or, while views of it are still lent out, when the last one goes."""
        with self._lock:
            mm, self._mm = self._mm, None
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # borrowed views hold the mapping; it goes with the last of them
