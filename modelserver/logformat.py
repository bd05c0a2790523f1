"""How a log record becomes a line: beamlet's text format, or one JSON object a line for
log collectors (``--log-format json`` of ``python -m modelserver serve`` and
``python -m runtime run``; ``BEAMLET_LOG_FORMAT`` in the environment sets the default,
so the workers and model server a run starts log the way the run does).

A JSON line holds ``time`` (ISO 8601, UTC, milliseconds), ``level``, ``logger``,
``message``, ``process``, ``thread`` (its name), ``exc_info`` (the formatted traceback)
and ``stack_info`` when the record has them, and the record's extra fields whose values
are plain (str, int, float, bool, None); other extras are left out rather than turned
into text nobody can parse.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from datetime import UTC, datetime
from typing import Any

LOG_FORMAT_ENV = "BEAMLET_LOG_FORMAT"
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"

# Every attribute logging itself puts on a record; anything else came in by ``extra=``.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def parse_format(text: str) -> str:
    """``text`` or ``json`` (any case); the argparse type of ``--log-format``."""
    kind = text.strip().lower()
    if kind not in FORMATS:
        raise argparse.ArgumentTypeError(f"log format is one of {', '.join(FORMATS)}, not {text!r}")
    return kind


def default_format() -> str:
    """The format named by ``BEAMLET_LOG_FORMAT`` (unset or empty: text), in lower case,
    otherwise unchecked: the command line's ``parse_format`` says what is wrong with it."""
    return (os.environ.get(LOG_FORMAT_ENV) or "text").strip().lower()


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in messages and tracebacks are
    escaped by the encoder)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")[:-6] + "Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
            "thread": record.threadName,
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc_info"] = record.exc_text
        if record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        for name, value in record.__dict__.items():
            if name not in _STANDARD and not name.startswith("_") and name not in out:
                if isinstance(value, float) and not math.isfinite(value):
                    out[name] = str(value)  # NaN and Infinity are not JSON
                elif value is None or isinstance(value, str | int | float | bool):
                    out[name] = value
        return json.dumps(out, ensure_ascii=False)


def formatter(kind: str) -> logging.Formatter:
    """The formatter of a ``--log-format``."""
    return JsonFormatter() if kind == "json" else logging.Formatter(TEXT_FORMAT)


def basic_config(level: int | str, kind: str) -> None:
    """``logging.basicConfig`` to stderr in ``kind``'s format (a no-op, as basicConfig is,
    when the root logger already has a handler)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(kind))
    logging.basicConfig(level=level, handlers=[handler])


def line(kind: str, logger: str, level: int, message: str) -> str:
    """One record as a line of ``kind``'s format, for a writer outside logging (the line a
    client writes into a server's log before the server starts)."""
    record = logging.LogRecord(logger, level, __file__, 0, message, (), None)
    return formatter(kind).format(record)
