"""RunInference's metrics under Beam's names, in bounded memory.

Counters are ints; each distribution is a ``modelserver.histogram.Histogram`` (fixed,
log-spaced buckets: bounded memory whatever the run's length; workers' metrics add up
in the harness by adding counts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from modelserver.histogram import Histogram, bucket_of, bucket_top

__all__ = ["DISTRIBUTIONS", "Histogram", "InferenceMetrics", "bucket_of", "bucket_top"]

DISTRIBUTIONS = (
    "inference_request_batch_size",
    "inference_request_batch_byte_size",
    "inference_batch_latency_micro_secs",
    "load_model_latency_milli_secs",
    "model_byte_size",
)


@dataclass
class InferenceMetrics:
    """Counters and distributions with Beam's RunInference metric names."""

    num_inferences: int = 0
    failed_batches_counter: int = 0
    model_name: str = ""  # after a named model update: Beam prefixes the names with it
    inference_request_batch_size: Histogram = field(default_factory=Histogram)
    inference_request_batch_byte_size: Histogram = field(default_factory=Histogram)
    inference_batch_latency_micro_secs: Histogram = field(default_factory=Histogram)
    load_model_latency_milli_secs: Histogram = field(default_factory=Histogram)
    model_byte_size: Histogram = field(default_factory=Histogram)

    def record_batch(self, size: int, nbytes: int, seconds: float) -> None:
        self.num_inferences += size
        self.inference_request_batch_size.record(size)
        self.inference_request_batch_byte_size.record(nbytes)
        self.inference_batch_latency_micro_secs.record(int(seconds * 1e6))

    def record_load(self, milliseconds: int, nbytes: int) -> None:
        self.load_model_latency_milli_secs.record(milliseconds)
        self.model_byte_size.record(nbytes)

    def named(self) -> dict[str, Any]:
        """Beam's metric names (``<model_name>_num_inferences`` after a named update),
        each distribution summarised as count, mean, p50, p99 and max."""
        prefix = f"{self.model_name}_" if self.model_name else ""
        out: dict[str, Any] = {
            f"{prefix}num_inferences": self.num_inferences,
            f"{prefix}failed_batches_counter": self.failed_batches_counter,
        }
        for name in DISTRIBUTIONS:
            out[f"{prefix}{name}"] = getattr(self, name).summary()
        return out

    def merge(self, other: InferenceMetrics) -> None:
        self.num_inferences += other.num_inferences
        self.failed_batches_counter += other.failed_batches_counter
        self.model_name = self.model_name or other.model_name
        for name in DISTRIBUTIONS:
            getattr(self, name).merge(getattr(other, name))

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "num_inferences": self.num_inferences,
            "failed_batches_counter": self.failed_batches_counter,
            "model_name": self.model_name,
        }
        out.update({name: getattr(self, name).to_wire() for name in DISTRIBUTIONS})
        return out

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> InferenceMetrics:
        m = cls(
            int(data.get("num_inferences", 0)),
            int(data.get("failed_batches_counter", 0)),
            str(data.get("model_name", "")),
        )
        for name in DISTRIBUTIONS:
            if name in data:
                setattr(m, name, Histogram.from_wire(data[name]))
        return m
