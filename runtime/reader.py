"""The harness's input reader: takes bundles from a source on a thread of its own.

The harness loop never blocks on its input: a bounded source's file, an unbounded
source's stream (which waits for data) and a custom runner's iterable are all read here,
at most ``ahead`` bundles ahead of what the loop has taken, so a slow consumer slows the
reading and nothing piles up. Each bundle taken wakes the loop (``on_item``)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

END = object()  # the input has ended


class ReadFailed:
    """The source raised: the run fails with this."""

    def __init__(self, exc: BaseException):
        self.exc = exc


class InputReader:
    """``take()`` gives the next bundle, ``END``, a ``ReadFailed``, or None (nothing yet)."""

    def __init__(self, bundles: Iterator[Any], ahead: int, on_item: Callable[[], None] | None = None):
        self._bundles = bundles
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, ahead))
        self._stop = threading.Event()
        self._on_item = on_item
        self._thread = threading.Thread(target=self._run, name="harness-input", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Read no more (a bundle being read is dropped; the source's iterator is left to
        end with the process if it blocks)."""
        self._stop.set()

    def take(self) -> Any:
        try:
            return self._queue.get_nowait()
        except queue.Empty:
            return None

    def _run(self) -> None:
        try:
            for bundle in self._bundles:
                if not self._put(bundle):
                    return
        except Exception as exc:  # the source itself: a line that is not JSON, a lost file
            self._put(ReadFailed(exc))
        else:
            self._put(END)

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
            except queue.Full:
                continue
            if self._on_item is not None:
                self._on_item()
            return True
        return False
