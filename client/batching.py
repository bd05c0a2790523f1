"""Cutting a stream of examples into batches (Beam's BatchElements, for in-process use).

``BatchSizer`` is the policy, a pure object fed with measured batch latencies: it starts
at ``min_batch_size`` and doubles while a batch takes less than ``target_batch_seconds``,
never passing ``max_batch_size``; with min == max the size is fixed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from modelserver import config

T = TypeVar("T")

DEFAULT_MIN_BATCH = 1
DEFAULT_MAX_BATCH = 1024
DEFAULT_TARGET_SECONDS = 0.5


class BatchSizer:
    """Chooses the next batch size from the latencies of earlier batches."""

    def __init__(
        self,
        min_batch_size: int | None = None,
        max_batch_size: int | None = None,
        target_batch_seconds: float = DEFAULT_TARGET_SECONDS,
    ):
        self.min = max(1, int(min_batch_size or DEFAULT_MIN_BATCH))
        self.max = int(max_batch_size or max(self.min, DEFAULT_MAX_BATCH))
        if self.max < self.min:
            raise ValueError(f"max_batch_size {self.max} is below min_batch_size {self.min}")
        self.target = target_batch_seconds
        self.size = self.min

    def record(self, size: int, seconds: float) -> None:
        """Feed back how long a batch of ``size`` took."""
        if size < self.size:
            return  # a short final batch says nothing about the model
        if seconds < self.target / 2 and self.size < self.max:
            self.size = min(self.max, self.size * 2)
        elif seconds > self.target and self.size > self.min:
            self.size = max(self.min, self.size // 2)


DEFAULT_DETERMINISTIC_BATCH = 32


def from_kwargs(kwargs: dict[str, Any]) -> BatchSizer:
    """The sizer for a handler's batching arguments. In the deterministic mode the size
    is fixed (``max_batch_size``, else ``min_batch_size``, else 32): batches are cut the
    same way on every run, whatever the timing."""
    if config.deterministic():
        size = kwargs.get("max_batch_size") or kwargs.get("min_batch_size") or DEFAULT_DETERMINISTIC_BATCH
        return BatchSizer(size, size)
    return BatchSizer(
        kwargs.get("min_batch_size"),
        kwargs.get("max_batch_size"),
        kwargs.get("target_batch_duration_secs", DEFAULT_TARGET_SECONDS),
    )


def batches(items: Iterable[T], sizer: BatchSizer) -> Iterator[list[T]]:
    """Batches of the sizer's current size; the last one may be short."""
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) >= sizer.size:
            yield batch
            batch = []
    if batch:
        yield batch
