"""The server's logging, which never blocks the thread that logs.

A log call is I/O: a parent that never reads the server's stderr pipe fills it, and the
next write blocks. Two rules keep that from freezing the server:

- Nothing logs while holding a lock that requests wait on. Code that runs under such a
  lock (the manager's load lock) collects its records in a ``DeferredLog`` and writes
  them once the lock is released.
- The server process logs through a ``LogPump``: every logger's records go into a
  bounded queue (``logging.handlers.QueueHandler``) and one ``log-writer`` thread
  (``QueueListener``) writes them out to stderr or a ``--log-file``. When the queue is
  full the record is dropped and counted (``dropped``; ``status`` shows it as
  ``log_records_dropped``), and a line saying how many were lost is written once there is
  room again. Only the writer thread ever waits on the output, and nothing waits on it:
  stopping gives it a bounded time to drain, then leaves it behind.

The writer formats each record as text or as a JSON line (``--log-format``,
``modelserver.logformat``); a record's traceback travels beside its message, so a JSON
line carries it as ``exc_info``.
"""

from __future__ import annotations

import copy
import logging
import logging.handlers
import os
import queue
import sys
import threading
import time
from types import TracebackType
from typing import Any

from modelserver import logformat

DEFAULT_CAPACITY = 4096

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None] | None


class DeferredLog:
    """Log records collected while a lock is held, written by ``flush`` after it is released."""

    def __init__(self) -> None:
        self._records: list[tuple[logging.Logger, int, str, tuple[Any, ...], ExcInfo]] = []

    def info(self, logger: logging.Logger, msg: str, *args: Any) -> None:
        self._records.append((logger, logging.INFO, msg, args, None))

    def warning(self, logger: logging.Logger, msg: str, *args: Any) -> None:
        self._records.append((logger, logging.WARNING, msg, args, None))

    def error(self, logger: logging.Logger, msg: str, *args: Any) -> None:
        self._records.append((logger, logging.ERROR, msg, args, None))

    def exception(self, logger: logging.Logger, msg: str, *args: Any) -> None:
        """An error with the exception being handled now, as ``Logger.exception``."""
        exc_type, exc, tb = sys.exc_info()
        info: ExcInfo = (exc_type, exc, tb) if exc_type is not None and exc is not None else None
        self._records.append((logger, logging.ERROR, msg, args, info))

    def flush(self) -> None:
        records, self._records = self._records, []
        for logger, level, msg, args, exc_info in records:
            logger.log(level, msg, *args, exc_info=exc_info)


class _NoLock:
    """The writer's handler runs on one thread only; a real lock would be held by that
    thread while it blocks on a full pipe, and ``logging.shutdown`` at exit would wait
    for it forever."""

    def acquire(self, *_args: Any) -> bool:
        return True

    def release(self) -> None:
        pass

    def __enter__(self) -> bool:
        return True

    def __exit__(self, *_exc: object) -> None:
        pass

    def _at_fork_reinit(self) -> None:
        pass


class FdHandler(logging.Handler):
    """Writes each record with ``os.write`` to a file descriptor: no Python file object,
    so no buffer lock that the interpreter would try to take at exit."""

    def __init__(self, fd: int):
        super().__init__()
        self.fd = fd

    def createLock(self) -> None:  # noqa: N802 - logging's name
        self.lock = _NoLock()  # type: ignore[assignment]

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = memoryview((self.format(record) + "\n").encode("utf-8", "replace"))
            while data:
                data = data[os.write(self.fd, data) :]
        except Exception:
            pass  # nowhere left to say it

    def close(self) -> None:
        pass  # the descriptor belongs to the pump; a blocked write may still hold it


class _DroppingQueueHandler(logging.handlers.QueueHandler):
    """Queues records without ever waiting: a full queue drops the record and counts it."""

    def __init__(self, q: queue.Queue[Any]):
        super().__init__(q)
        self.dropped = 0
        self._unreported = 0
        self._tracebacks = logging.Formatter()

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        """A copy that crosses to the writer thread: the message merged with its arguments
        now (they may change), the traceback as text beside it (``exc_text``, which every
        formatter appends or carries), no live exception or frame left on it."""
        record = copy.copy(record)
        record.message = record.getMessage()
        record.msg, record.args = record.message, None
        if record.exc_info and not record.exc_text:
            record.exc_text = self._tracebacks.formatException(record.exc_info)
        record.exc_info = None
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        # Called under the handler's own lock (Handler.handle), held only for a put_nowait.
        try:
            if self._unreported:
                self.queue.put_nowait(self._drop_note())
                self._unreported = 0
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1
            self._unreported += 1

    def _drop_note(self) -> logging.LogRecord:
        return logging.LogRecord(
            "beamlet.log", logging.WARNING, __file__, 0,
            "%d log records were dropped: the log output was not being read", (self._unreported,), None,
        )  # fmt: skip


class LogPump:
    """Every record of ``logger`` (the root logger by default) goes through a bounded
    queue to a writer thread that writes it to ``fd``. Build, then ``close`` at exit."""

    def __init__(
        self,
        fd: int,
        *,
        level: int | str = logging.INFO,
        capacity: int = DEFAULT_CAPACITY,
        logger: logging.Logger | None = None,
        formatter: logging.Formatter | None = None,
    ):
        if capacity < 1:
            raise ValueError(f"a log queue holds at least one record, not {capacity}")
        self.fd = fd
        self.logger = logger if logger is not None else logging.getLogger()
        self._queue: queue.Queue[Any] = queue.Queue(capacity)
        self.handler = _DroppingQueueHandler(self._queue)
        sink = FdHandler(fd)
        sink.setFormatter(formatter or logformat.formatter("text"))
        self._listener = logging.handlers.QueueListener(self._queue, sink)
        self._listener.start()
        thread = self._listener._thread  # noqa: SLF001 - to name it and to join it with a deadline
        assert thread is not None
        thread.name = "log-writer"
        self._thread: threading.Thread = thread
        self.logger.addHandler(self.handler)
        self.logger.setLevel(level)

    @property
    def dropped(self) -> int:
        return self.handler.dropped

    def close(self, timeout: float = 2.0) -> bool:
        """Stop taking records and give the writer ``timeout`` seconds to write what is
        queued. True when it finished; False when the output is blocked (the writer
        thread, a daemon, is then left behind)."""
        self.logger.removeHandler(self.handler)
        deadline = time.monotonic() + timeout
        try:
            self._queue.put(None, timeout=timeout)  # QueueListener's sentinel
        except queue.Full:
            return False
        self._thread.join(max(0.0, deadline - time.monotonic()))
        return not self._thread.is_alive()


_installed: LogPump | None = None


def install(
    level: int | str = logging.INFO,
    log_file: str | None = None,
    *,
    capacity: int = DEFAULT_CAPACITY,
    log_format: str = "text",
) -> LogPump:
    """Route this process's logging through a ``LogPump`` to stderr, or to ``log_file``
    (appended to, created 0600), as text or JSON lines (``log_format``). Python warnings
    and uncaught thread exceptions go through it too, instead of straight to stderr."""
    global _installed
    fd = 2
    if log_file:
        fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    pump = LogPump(fd, level=level, capacity=capacity, formatter=logformat.formatter(log_format))
    logging.captureWarnings(True)
    threading.excepthook = _log_thread_exception
    _installed = pump
    return pump


def dropped() -> int:
    """Records this process's pump has dropped (0 when none is installed)."""
    return _installed.dropped if _installed is not None else 0


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    name = args.thread.name if args.thread is not None else "?"
    info = (args.exc_type, args.exc_value, args.exc_traceback) if args.exc_value is not None else None
    logging.getLogger("beamlet.thread").error("thread %s died", name, exc_info=info)
