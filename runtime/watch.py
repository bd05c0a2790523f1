"""WatchFilePattern: emit a ModelMetadata whenever a newer model file appears (Beam's
``apache_beam.ml.inference.utils.WatchFilePattern``).

Every ``interval`` seconds the watcher lists the files that match ``file_pattern`` and
takes the newest (by modification time). It emits ``ModelMetadata(model_id=path,
model_name=file name without extension)``, as Beam does, when that file differs from
the one it emitted last: a new path, or, unlike Beam, the same path rewritten in place
(its size or modification time changed). A file is emitted only once it is complete:
its size and modification time must be the same in two listings at least ``settle``
seconds apart (the watcher looks again after ``settle`` rather than a whole interval).
A pattern that matches nothing yet simply waits.

Files are listed through a ``FileStore`` (``match(pattern)`` returning ``FileInfo``s), so
another store (an object store, say) plugs in by implementing that one method.
"""

from __future__ import annotations

import glob
import logging
import os
import stat
import time
from collections.abc import Callable
from typing import NamedTuple, Protocol

from client.results import ModelMetadata

log = logging.getLogger("beamlet.watch")

DEFAULT_INTERVAL = 360.0  # Beam's default
DEFAULT_SETTLE = 1.0


class FileInfo(NamedTuple):
    path: str
    size: int
    mtime_ns: int


class FileStore(Protocol):
    """Where model files live. ``match`` lists what matches a pattern, now."""

    def match(self, pattern: str) -> list[FileInfo]: ...


class LocalFiles:
    """Local (or mounted) files, by glob pattern (``*``, ``?``, ``[...]``, ``**``)."""

    def match(self, pattern: str) -> list[FileInfo]:
        return [FileInfo(path, st.st_size, st.st_mtime_ns) for path, st in stat_files(pattern)]


def stat_files(pattern: str) -> list[tuple[str, os.stat_result]]:
    """The regular files matching a glob pattern now, each by absolute path with its stat.
    A file removed between the listing and its stat is left out."""
    out = []
    for path in glob.glob(pattern, recursive=True):
        try:
            st = os.stat(path)
        except OSError:
            continue  # removed since listed
        if stat.S_ISREG(st.st_mode):
            out.append((os.path.abspath(path), st))
    return out


class WatchFilePattern:
    """A source of model updates (``client.refresh.ModelUpdateSource``) that watches files.

    ``RunInference(handler, model_metadata_pcoll=WatchFilePattern("/models/*.pt", 60))``.
    ``poll()`` lists the files when a listing is due and returns the new ModelMetadata, or
    None; it never blocks beyond one listing."""

    def __init__(
        self,
        file_pattern: str,
        interval: float = DEFAULT_INTERVAL,
        *,
        settle: float = DEFAULT_SETTLE,
        store: FileStore | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if interval <= 0 or settle < 0:
            raise ValueError("interval must be positive and settle not negative")
        self.file_pattern = file_pattern
        self.interval = min(interval, settle) if settle else interval  # how often poll() is worth calling
        self.scan_interval = interval
        self.settle = settle
        self.store = store or LocalFiles()
        self._clock = clock
        self._due = 0.0  # list at the first poll
        self._emitted: FileInfo | None = None
        self._candidate: tuple[FileInfo, float] | None = None  # (file, when first seen so)

    def poll(self) -> ModelMetadata | None:
        now = self._clock()
        if now < self._due:
            return None
        self._due = now + self.scan_interval
        newest = self.newest()
        if newest is None or newest == self._emitted:
            self._candidate = None
            return None
        if self._candidate is None or self._candidate[0] != newest:
            self._candidate = (newest, now)  # new or still changing: look again after settle
        if now - self._candidate[1] < self.settle:
            self._due = min(self._due, self._candidate[1] + self.settle)
            return None
        self._emitted, self._candidate = newest, None
        name = os.path.splitext(os.path.basename(newest.path))[0]
        log.info("new model file %s (%d bytes)", newest.path, newest.size)
        return ModelMetadata(model_id=newest.path, model_name=name)

    def newest(self) -> FileInfo | None:
        """The newest matching file now (ties broken by path), or None."""
        files = self.store.match(self.file_pattern)
        return max(files, key=lambda f: (f.mtime_ns, f.path)) if files else None
