"""Unbounded file sources: a followed file (``tail -F``) and a directory that gains files.

    ReadFromJsonLinesTail("/var/log/requests.jsonl") | Map(parse) | ...
    ReadFromDirectory("/data/incoming/*.jsonl") | Map(load_file) | ...

Each is a ``Source`` with ``unbounded = True``: ``bundles(size, max_wait)`` yields
``SourceBundle``s until ``close()``; a bundle closes when it holds ``size`` elements or
``max_wait`` seconds after its first element arrived, and a bundle with no elements comes
at least every ``max_wait`` seconds while nothing arrives. ``read()`` yields the elements
one by one, endlessly (until ``close()``), for use outside a harness.

Threads: ``bundles()``/``read()`` run on one thread (the harness's reader); ``ack()`` and
``close()`` may come from another. File reads happen under a lock that only ``close()``
waits on; log lines are written after it is released.

Positions (for a later checkpoint): a tail bundle's ack is a ``TailPosition`` (the file's
``(st_dev, st_ino)`` and the byte offset after the bundle's last line), a directory
bundle's ack its paths. ``ack()`` keeps the latest acknowledged position in ``acked``
(acks come in input order, so the latest is the furthest); ``resume=`` starts a new
source from such a position. See docs/runtime.md, "Unbounded file sources".
"""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

from runtime.errors import CannotStart
from runtime.pipeline import Source, SourceBundle
from runtime.watch import stat_files

log = logging.getLogger("beamlet.filesources")

DEFAULT_MAX_WAIT = 1.0  # seconds a bundle waits for more elements when the caller gives no max_wait
_CHUNK = 1 << 16  # bytes read from a followed file at a time


class TailPosition(NamedTuple):
    """Where a followed file has been read to: the file (``(st_dev, st_ino)``, so a
    rotated file is not mistaken for its successor) and the byte offset after a line."""

    file: tuple[int, int]
    offset: int


class _Item(NamedTuple):
    element: Any
    ack: Any
    arrived: float  # time.time() the source read it
    seen: float  # time.monotonic() of the same moment: bundle deadlines count from it


class _StreamSource(Source):
    """What the three sources share: bundles cut by size and time, ``read()``, ``close()``.
    A subclass implements ``_take_locked(n)``: at most ``n`` items ready now, never
    blocking, called under ``_lock``; it queues log lines in ``_notes``."""

    unbounded = True

    def __init__(self, poll_interval: float):
        if poll_interval <= 0:
            raise ValueError("poll_interval must be positive")
        self.poll_interval = poll_interval
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._notes: list[tuple[int, str, tuple[Any, ...]]] = []

    def _take_locked(self, n: int) -> list[_Item]:
        raise NotImplementedError

    def _bundle_ack(self, items: list[_Item]) -> Any:
        """A bundle's ack, from its items' (by default the last one's)."""
        return items[-1].ack

    def _release_locked(self) -> None:
        """Close what is open (under the lock, once the source is closed)."""

    def _note(self, level: int, msg: str, *args: Any) -> None:
        self._notes.append((level, msg, args))

    def _take(self, n: int) -> list[_Item]:
        with self._lock:
            items = [] if self._closed.is_set() else self._take_locked(n)
            notes, self._notes = self._notes, []
        for level, msg, args in notes:
            log.log(level, msg, *args)
        return items

    def read(self) -> Iterator[Any]:
        """Every element, as it arrives; ends only when the source is closed."""
        while not self._closed.is_set():
            items = self._take(64)
            for item in items:
                yield item.element
            if not items:
                self._closed.wait(self.poll_interval)

    def bundles(self, size: int, max_wait: float | None = None) -> Iterator[SourceBundle]:
        """``SourceBundle``s of at most ``size`` elements: each closes when full or
        ``max_wait`` (default ``DEFAULT_MAX_WAIT``) seconds after its first element
        arrived; one with no elements (and no ack) when nothing arrived for ``max_wait``.
        Ends when the source is closed."""
        wait = DEFAULT_MAX_WAIT if max_wait is None else max_wait
        if size < 1 or wait <= 0:
            raise ValueError("a bundle needs a size of at least 1 and a positive max_wait")
        while not self._closed.is_set():
            started = time.monotonic()
            items: list[_Item] = []
            while len(items) < size:
                items += self._take(size - len(items))
                now = time.monotonic()
                deadline = (items[0].seen if items else started) + wait
                if len(items) >= size or now >= deadline:
                    break
                if self._closed.wait(min(self.poll_interval, deadline - now)):  # nothing more now
                    break
            if not items and self._closed.is_set():
                return
            if items:
                yield SourceBundle([i.element for i in items], self._bundle_ack(items), items[0].arrived)
            else:  # no ack: the harness commits an empty bundle at once, ahead of its elders
                yield SourceBundle([])

    def close(self) -> None:
        """Stop: ``bundles()`` and ``read()`` end at their next step; open files close."""
        self._closed.set()
        with self._lock:
            self._release_locked()


# -- a followed file --------------------------------------------------------------------
class _Line(NamedTuple):
    data: bytes  # without its newline
    end: TailPosition  # after its newline
    lineno: int  # counted from ``origin`` in its file
    origin: int  # the byte reading of its file started at (0 unless resumed or from the end)
    arrived: float
    seen: float


class ReadFromTextTail(_StreamSource):
    """Follow a growing file like ``tail -F``: one element per complete line, without its
    newline (nor a ``\\r`` before it), as lines are appended.

    - A line is complete when its newline is written; until then it waits.
    - Rotation: when another file appears at ``path`` (the old one renamed away, a new one
      created), the new one is opened at once (so it is read even if it is rotated away
      in turn); the old one is read to its end, then once more a poll later (its writer
      may not have moved yet), and then the new one is followed from its start. An
      unfinished last line of the old file is dropped with a warning. A file that stands
      at ``path`` for less than one poll may go unseen, as with ``tail -F``.
    - Truncation: when the file becomes shorter than what was read, it is read again from
      the start (a WARNING says so). A file truncated and rewritten past the old length
      between two polls cannot be told from one that grew.
    - While ``path`` does not exist the source polls for it every ``poll_interval``.
    - ``from_beginning=False``: start at the end of the file as it is at the first read
      (after the next newline if that end is in mid line); a file that appears later, or
      replaces it, is read from its start.
    - ``resume=TailPosition``: start where a previous source's ``acked`` says, if ``path``
      is still that file (and at least that long); otherwise from the start of the file
      at ``path`` (lines of a file rotated away in between are not read).

    A line that cannot be decoded (not UTF-8; not JSON for ``ReadFromJsonLinesTail``) is
    skipped with a WARNING naming ``path:line`` and counted in ``skipped``: an unbounded
    source has no dead-letter output, and one bad line must not end a stream. Dropped
    unfinished lines count there too.
    """

    def __init__(
        self,
        path: str,
        from_beginning: bool = True,
        poll_interval: float = 0.05,
        *,
        resume: TailPosition | None = None,
    ):
        super().__init__(poll_interval)
        self.path = path
        self.from_beginning = from_beginning
        self.acked: TailPosition | None = None  # the furthest position acknowledged (``ack``)
        self.skipped = 0  # lines skipped: undecodable, or unfinished when their file ended
        self._resume = resume
        self._first_attempt = True
        self._waiting_noted = False
        self._lines: deque[_Line] = deque()
        self._fd: int | None = None
        self._identity = (0, 0)
        self._line_start = 0  # the offset ``_partial`` starts at
        self._partial = b""  # read, but no newline yet
        self._lineno = 0
        self._origin = 0
        self._skip_fragment = False  # started in mid line: drop up to the first newline
        self._successor: tuple[int, os.stat_result] | None = None  # the file now at ``path``, once rotated

    def check(self) -> None:
        if os.path.isdir(self.path):
            raise CannotStart(f"the input {self.path} is a directory, not a file")
        if os.path.exists(self.path) and not os.access(self.path, os.R_OK):
            raise CannotStart(f"cannot read the input {self.path}")

    def ack(self, acks: list[Any]) -> None:
        for position in acks:
            if position is not None:
                self.acked = position

    def parse(self, data: bytes) -> Any:
        """One line's bytes as an element; ValueError to skip it (with a warning);
        ``SKIP`` to skip it silently."""
        return data.decode("utf-8").removesuffix("\r")

    def _take_locked(self, n: int) -> list[_Item]:
        out: list[_Item] = []
        while len(out) < n:
            if not self._lines and not self._poll():
                break
            while self._lines and len(out) < n:
                line = self._lines.popleft()
                try:
                    element = self.parse(line.data)
                except ValueError as exc:
                    self.skipped += 1
                    self._note(logging.WARNING, "%s: %s; skipped", self._where(line), exc)
                    continue
                if element is not SKIP:
                    out.append(_Item(element, line.end, line.arrived, line.seen))
        return out

    def _where(self, line: _Line) -> str:
        if line.origin == 0:
            return f"{self.path}:{line.lineno}"
        return f"{self.path}: line {line.lineno} after byte {line.origin}"

    def _poll(self) -> bool:
        """One step: read one chunk, or at the end of the file look for truncation and
        rotation, or look for the file. True if anything changed."""
        if self._fd is None:
            return self._open()
        data = os.read(self._fd, _CHUNK)
        if data:
            self._split(data)
            return True
        return self._at_end()

    def _split(self, data: bytes) -> None:
        arrived, seen = time.time(), time.monotonic()
        pieces = (self._partial + data).split(b"\n")
        self._partial = pieces.pop()
        start = self._line_start
        for piece in pieces:
            end = start + len(piece) + 1
            if self._skip_fragment:
                self._skip_fragment = False
            else:
                self._lineno += 1
                position = TailPosition(self._identity, end)
                self._lines.append(_Line(piece, position, self._lineno, self._origin, arrived, seen))
            start = end
        self._line_start = start

    def _at_end(self) -> bool:
        assert self._fd is not None
        read_to = self._line_start + len(self._partial)
        size = os.fstat(self._fd).st_size
        if size < read_to:
            self._note(
                logging.WARNING,
                "%s was truncated (%d bytes, %d read): reading it again from the start",
                self.path,
                size,
                read_to,
            )
            if self._partial:  # truncated in the middle of a line
                self.skipped += 1
            os.lseek(self._fd, 0, os.SEEK_SET)
            self._start_at(0)
            return True
        if self._successor is not None:  # the old file was read to its end once more: leave it
            self._leave_for_successor()
            return True
        try:
            st = os.stat(self.path)
        except OSError:
            return False  # renamed away and nothing in its place yet: the old one may still grow
        if (st.st_dev, st.st_ino) != self._identity:
            # Hold the new file open now, so that it is read even if it is rotated away in
            # turn; read the old one once more first (a writer may still be finishing it).
            opened = self._open_path()
            if opened is not None and (opened[1].st_dev, opened[1].st_ino) == self._identity:
                os.close(opened[0])
            else:
                self._successor = opened
        return False

    def _leave_for_successor(self) -> None:
        assert self._fd is not None and self._successor is not None
        if self._partial:
            self.skipped += 1
            self._note(
                logging.WARNING,
                "%s was rotated with an unfinished last line (%d bytes): dropped",
                self.path,
                len(self._partial),
            )
        self._note(logging.INFO, "%s was rotated: following the new file from its start", self.path)
        os.close(self._fd)
        (fd, st), self._successor = self._successor, None
        self._follow(fd, st, 0)

    def _open_path(self) -> tuple[int, os.stat_result] | None:
        """The regular file at ``path`` now, open, with its stat; None while there is none."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            if not self._waiting_noted:
                self._waiting_noted = True
                self._note(logging.INFO, "waiting for %s to appear", self.path)
            return None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            if not self._waiting_noted:
                self._waiting_noted = True
                self._note(logging.WARNING, "%s is not a regular file: waiting for one", self.path)
            return None
        self._waiting_noted = False
        return fd, st

    def _open(self) -> bool:
        """Open the first file this source follows, where ``resume`` or ``from_beginning``
        says; False while there is none."""
        first, self._first_attempt = self._first_attempt, False
        opened = self._open_path()
        if opened is None:
            return False
        fd, st = opened
        identity = (st.st_dev, st.st_ino)
        start, resume, self._resume = 0, self._resume, None
        if resume is not None and tuple(resume.file) == identity:
            if st.st_size >= resume.offset:
                start = resume.offset
            else:
                self._note(
                    logging.WARNING,
                    "%s is shorter (%d bytes) than the position to resume from (%d): reading it from the start",
                    self.path,
                    st.st_size,
                    resume.offset,
                )
        elif resume is not None:
            self._note(
                logging.INFO,
                "%s is not the file the resume position names: reading it from the start",
                self.path,
            )
        elif first and not self.from_beginning:
            start = st.st_size
        self._follow(fd, st, start)
        return True

    def _follow(self, fd: int, st: os.stat_result, start: int) -> None:
        os.lseek(fd, start, os.SEEK_SET)
        self._fd, self._identity = fd, (st.st_dev, st.st_ino)
        self._start_at(start)
        self._skip_fragment = start > 0 and os.pread(fd, 1, start - 1) != b"\n"  # mid line

    def _start_at(self, offset: int) -> None:
        self._line_start = self._origin = offset
        self._partial = b""
        self._lineno = 0
        self._skip_fragment = False

    def _release_locked(self) -> None:
        for fd in (self._fd, self._successor[0] if self._successor else None):
            if fd is not None:
                os.close(fd)
        self._fd = self._successor = None


class _Skip:
    def __repr__(self) -> str:
        return "SKIP"


SKIP: Any = _Skip()  # ``parse`` returns it for a line to leave out without a warning


class ReadFromJsonLinesTail(ReadFromTextTail):
    """``ReadFromTextTail`` with one JSON value per line; blank lines are skipped. A line
    that is not JSON is skipped with a WARNING naming ``path:line`` and counted in
    ``skipped`` (the bounded ``ReadFromJsonLines`` fails the run instead)."""

    def parse(self, data: bytes) -> Any:
        text = data.decode("utf-8")
        if not text.strip():
            return SKIP
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not JSON ({exc})") from None


# -- a directory ------------------------------------------------------------------------
class ReadFromDirectory(_StreamSource):
    """Each file matching the glob ``pattern`` (``*``, ``?``, ``[...]``, ``**``), once
    complete: one element per file, its absolute path (a str: the same in a worker as
    here, where a record would cross the wire as a map).

    Complete means: its size and modification time stayed the same for ``settle`` seconds
    (default two poll intervals), or it was moved in whole: its inode changed after its
    last write (ctime later than mtime, as a rename into the directory makes it) and it is
    not empty. Writers that write in place should not pause longer than ``settle``; a
    writer that renames a finished file into the directory (from a name the pattern does
    not match) is never read early.

    Files present at the start count as new (``existing=False``: they are ignored, even
    one still being written). Each path is yielded once per run, in order of modification
    time within one listing; a file replaced under the same name is not read again.
    ``resume=`` takes paths already done (a previous source's ``acked``).
    The directory is listed every ``poll_interval`` seconds; memory grows with the number
    of paths seen."""

    def __init__(
        self,
        pattern: str,
        poll_interval: float = 0.5,
        settle: float | None = None,
        *,
        existing: bool = True,
        resume: Iterable[str] = (),
    ):
        super().__init__(poll_interval)
        if settle is not None and settle < 0:
            raise ValueError("settle must not be negative")
        self.pattern = pattern
        self.settle = 2 * poll_interval if settle is None else settle
        self.existing = existing
        self.acked: list[str] = []  # the paths acknowledged (``ack``), in commit order
        self._seen: set[str] = {os.path.abspath(p) for p in resume}
        self._candidates: dict[str, tuple[tuple[int, int], float]] = {}  # path: (size, mtime), since
        self._ready: deque[_Item] = deque()
        self._first_scan = True
        self._next_scan = 0.0

    def base_directory(self) -> str:
        """The directory part of ``pattern`` before its first wildcard."""
        parts: list[str] = []
        for part in os.path.dirname(self.pattern).split(os.sep):
            if any(c in part for c in "*?["):
                break
            parts.append(part)
        return os.sep.join(parts) or ("/" if self.pattern.startswith(os.sep) else ".")

    def check(self) -> None:
        base = self.base_directory()
        if not os.path.isdir(base):
            what = "is not a directory" if os.path.exists(base) else "does not exist"
            raise CannotStart(f"the input directory {base} {what}")

    def ack(self, acks: list[Any]) -> None:
        for paths in acks:
            if paths is not None:
                self.acked.extend(paths)

    def _take_locked(self, n: int) -> list[_Item]:
        if not self._ready and time.monotonic() >= self._next_scan:
            self._scan()
        return [self._ready.popleft() for _ in range(min(n, len(self._ready)))]

    def _scan(self) -> None:
        arrived, now = time.time(), time.monotonic()
        self._next_scan = now + self.poll_interval
        listed = [(path, st) for path, st in stat_files(self.pattern) if path not in self._seen]
        if self._first_scan and not self.existing:
            self._seen.update(path for path, _ in listed)
        self._first_scan = False
        complete = []
        candidates = {}
        for path, st in listed:
            if path in self._seen:
                continue
            state = (st.st_size, st.st_mtime_ns)
            known = self._candidates.get(path)
            since = known[1] if known is not None and known[0] == state else now
            whole = st.st_ctime_ns > st.st_mtime_ns and st.st_size > 0
            if whole or now - since >= self.settle:
                complete.append((st.st_mtime_ns, path))
            else:
                candidates[path] = (state, since)
        self._candidates = candidates  # a file removed before it was complete is forgotten
        for _, path in sorted(complete):
            self._seen.add(path)
            self._ready.append(_Item(path, path, arrived, now))

    def _bundle_ack(self, items: list[_Item]) -> list[str]:
        return [item.element for item in items]
