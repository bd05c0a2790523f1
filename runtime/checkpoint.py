"""Resume for bounded runs: ``python -m runtime run ... --checkpoint DIR``.

After each committed bundle the harness flushes the sink's partial files to disk and
records, in ``DIR/checkpoint.json`` (written to a temporary file, synced, renamed), how
many bundles are committed and how many bytes of output and dead letters they wrote.
The same command after the harness was killed finds the record, checks that it is the
same job (the same input file, unchanged; the same bundle size; the same output),
cuts the partial files back to the recorded sizes, skips the committed bundles of the
input (bounded sources cut bundles by count, the same way in every run) and continues:
the final output equals a clean run's, row for row. A run that completes removes the
record. Only file sinks (``WriteToJsonLines``, ``WriteToText``) and bounded sources can
be checkpointed; anything else is refused before the run starts.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from runtime.errors import CannotStart
from runtime.pipeline import Pipeline, WriteToJsonLines

log = logging.getLogger("beamlet.harness")

FILE = "checkpoint.json"
VERSION = 1


class Checkpoint:
    """The record of one bounded run's committed bundles, in ``directory``."""

    def __init__(self, directory: str, pipeline: Pipeline, bundle_size: int):
        source, sink = pipeline.source, pipeline.sink
        if not isinstance(sink, WriteToJsonLines):
            raise CannotStart(
                f"--checkpoint needs a file sink (WriteToJsonLines, WriteToText), not {type(sink).__name__}"
            )
        if source is None or source.unbounded:
            raise CannotStart("--checkpoint is for bounded inputs (an unbounded source acknowledges instead)")
        if os.path.exists(directory) and not os.path.isdir(directory):
            raise CannotStart(f"the checkpoint directory {directory} is a file")
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as exc:
            raise CannotStart(f"cannot create the checkpoint directory {directory}: {exc.strerror}") from None
        self.path = os.path.join(directory, FILE)
        self.sink = sink
        self.job = {
            "input": _identity(source),
            "bundle_size": bundle_size,
            "output": os.path.abspath(sink.path),
        }
        self.committed = 0  # bundles
        self.position = (0, 0)

    def load(self) -> int:
        """The bundles an earlier run of this job committed (0: start afresh); CannotStart
        when the record is of another job or unreadable."""
        if not os.path.exists(self.path):
            return 0
        try:
            with open(self.path, encoding="utf-8") as f:
                record = json.load(f)
            job, committed, position = record["job"], int(record["committed"]), record["position"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CannotStart(f"the checkpoint {self.path} cannot be read: {exc}") from None
        if record.get("version") != VERSION or job != self.job:
            raise CannotStart(
                f"the checkpoint {self.path} is of another job ({job}, now {self.job}): "
                "remove it to start afresh"
            )
        self.committed, self.position = committed, (int(position[0]), int(position[1]))
        return committed

    def resume_sink(self) -> None:
        self.sink.resume(self.position)

    def record(self, committed: int) -> None:
        """``committed`` bundles are written: make them durable, then say so."""
        self.sink.flush()
        for f in (self.sink._f, self.sink._dead):  # noqa: SLF001 - the sink's own files, synced
            if f is not None:
                os.fsync(f.fileno())
        self.committed, self.position = committed, self.sink.position()
        record = {
            "version": VERSION,
            "job": self.job,
            "committed": committed,
            "position": list(self.position),
        }
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def done(self) -> None:
        """The run completed: the record goes."""
        for path in (self.path, self.path + ".tmp"):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def _identity(source: Any) -> dict[str, Any]:
    """What makes an input the same input: its file's path, size and modification time,
    or for other sources their type and description."""
    path = getattr(source, "path", None)
    if isinstance(path, str) and os.path.isfile(path):
        st = os.stat(path)
        return {
            "source": type(source).__name__,
            "path": os.path.abspath(path),
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
        }
    return {"source": type(source).__name__}
