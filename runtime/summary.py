"""What a run reports at its end: counts, throughput, dead letters, per-model metrics.

Its size does not grow with the run's length: dead letters are counted, and only the
first ``DEAD_LETTER_SAMPLE`` are kept here (all of them went to the sink as they were
committed); latency and per-model metrics are fixed-bucket histograms, summarised
(``InferenceMetrics.named()``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from client.inference import InferenceMetrics
from modelserver.histogram import Histogram

DEAD_LETTER_SAMPLE = 100


class Latency:
    """End-to-end latency, arrival at the source to commit, of every committed bundle of
    the run: each bundle counts once per element, at the latency of its first element (the
    one that waited longest). Kept in a fixed-bucket ``Histogram`` of microseconds, so its
    memory stays the same whatever the run's length; percentiles are to its buckets'
    precision (19%), and never outside the recorded min and max. Not thread-safe: the
    harness's loop records, and a metrics scrape reads under the run's ``stats_lock``."""

    def __init__(self) -> None:
        self.histogram = Histogram()  # microseconds

    def add(self, seconds: float, elements: int) -> None:
        self.histogram.record(max(0.0, seconds) * 1e6, elements)

    def __bool__(self) -> bool:
        return self.histogram.count > 0

    def percentile(self, q: float) -> float:
        """The ``q``-th percentile (0-100) in seconds; 0.0 with no samples."""
        return self.histogram.percentile(q) / 1e6

    def to_dict(self) -> dict[str, float]:
        return {
            "p50_ms": round(self.percentile(50) * 1000, 2),
            "p99_ms": round(self.percentile(99) * 1000, 2),
        }


@dataclass
class RunSummary:
    """The end-of-run report; ``str()`` renders it for a terminal."""

    pipeline: str = ""
    workers: int = 0
    threads: int = 0
    elements_in: int = 0
    outputs: int = 0
    bundles: int = 0
    bundle_retries: int = 0
    worker_restarts: int = 0
    server_restarts: int = 0
    model_updates: int = 0
    rejected_model_updates: int = 0
    dead_letters: list[dict[str, Any]] = field(default_factory=list)  # the first DEAD_LETTER_SAMPLE
    dead_letter_count: int = 0
    seconds: float = 0.0
    interrupted: str | None = None
    resumed_bundles: int = 0  # committed by an earlier run of this job (--checkpoint)
    unbounded: bool = False  # a stream: it ends when stopped, and reports latency
    latency: Latency = field(default_factory=Latency)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add_dead_letters(self, dead_letters: list[dict[str, Any]]) -> None:
        """Count a committed bundle's dead letters; keep the first few as a sample."""
        self.dead_letter_count += len(dead_letters)
        room = DEAD_LETTER_SAMPLE - len(self.dead_letters)
        if room > 0:
            self.dead_letters.extend(dead_letters[:room])

    @property
    def throughput(self) -> float:
        return self.elements_in / self.seconds if self.seconds else 0.0

    def set_metrics(self, metrics: dict[str, InferenceMetrics]) -> None:
        """Aggregate each RunInference step's metrics (Beam's names) over all workers.
        After a named model update a step reports under ``label [model_name]``, with
        Beam's ``<model_name>_`` prefix on each name."""
        for label, m in metrics.items():
            self.metrics[label] = m.named()

    def to_dict(self) -> dict[str, Any]:
        return {
            "pipeline": self.pipeline,
            "workers": self.workers,
            "threads": self.threads,
            "elements_in": self.elements_in,
            "outputs": self.outputs,
            "dead_letters": self.dead_letter_count,
            "bundles": self.bundles,
            "bundle_retries": self.bundle_retries,
            "worker_restarts": self.worker_restarts,
            "server_restarts": self.server_restarts,
            "model_updates": self.model_updates,
            "rejected_model_updates": self.rejected_model_updates,
            "seconds": round(self.seconds, 3),
            "elements_per_second": round(self.throughput, 1),
            "interrupted": self.interrupted,
            "resumed_bundles": self.resumed_bundles,
            "latency": self.latency.to_dict() if self.latency else None,
            "metrics": self.metrics,
        }

    def __str__(self) -> str:
        lines = [
            f"pipeline   {self.pipeline}",
            f"workers    {self.workers} x {self.threads} threads",
            f"elements   {self.elements_in} in, {self.outputs} out, {self.dead_letter_count} dead letters",
            f"time       {self.seconds:.2f}s, {self.throughput:,.0f} elements/s",
            f"recovery   {self.bundle_retries} bundle retries, {self.worker_restarts} worker restarts, "
            f"{self.server_restarts} model-server restarts",
        ]
        if self.model_updates or self.rejected_model_updates:
            lines.append(
                f"models     {self.model_updates} model updates sent to the workers, "
                f"{self.rejected_model_updates} rejected (see the log)"
            )
        if self.resumed_bundles:
            lines.append(
                f"resumed    after {self.resumed_bundles} bundles committed by an earlier run (--checkpoint)"
            )
        if self.latency:
            lines.append(
                f"latency    p50 {self.latency.percentile(50) * 1000:.1f} ms, "
                f"p99 {self.latency.percentile(99) * 1000:.1f} ms (arrival at the source to commit)"
            )
        if self.interrupted and self.unbounded:
            lines.append(
                f"STOPPED    by {self.interrupted}: reading stopped, what was in flight was committed"
            )
        elif self.interrupted:
            lines.append(f"STOPPED    by {self.interrupted}; uncommitted bundles were abandoned")
        for label, named in self.metrics.items():
            m = named
            prefix = next((k[: -len("num_inferences")] for k in m if k.endswith("num_inferences")), "")
            lat = m[f"{prefix}inference_batch_latency_micro_secs"]
            size = m[f"{prefix}inference_request_batch_size"]
            lines.append(
                f"{label}: {m[f'{prefix}num_inferences']} inferences in {size['count']} batches "
                f"(mean {size['mean']:.1f}), batch latency p50 {lat['p50'] / 1000:.1f} ms p99 "
                f"{lat['p99'] / 1000:.1f} ms, {m[f'{prefix}failed_batches_counter']} failed batches, "
                f"model load {m[f'{prefix}load_model_latency_milli_secs']['max']} ms, "
                f"model {m[f'{prefix}model_byte_size']['max']} bytes"
            )
        return "\n".join(lines)
