"""What a run reports at its end: counts, throughput, dead letters, per-model metrics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from client.inference import InferenceMetrics


def _percentile(values: list[int], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return float(ordered[k])


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
    dead_letters: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    interrupted: str | None = None
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        return self.elements_in / self.seconds if self.seconds else 0.0

    def set_metrics(self, metrics: dict[str, InferenceMetrics]) -> None:
        """Aggregate each RunInference step's metrics (Beam's names) over all workers."""
        for label, m in metrics.items():
            lat = m.inference_batch_latency_micro_secs
            self.metrics[label] = {
                "num_inferences": m.num_inferences,
                "failed_batches_counter": m.failed_batches_counter,
                "inference_request_batch_size_mean": (
                    sum(m.inference_request_batch_size) / len(m.inference_request_batch_size)
                    if m.inference_request_batch_size
                    else 0.0
                ),
                "inference_batch_latency_micro_secs_p50": _percentile(lat, 50),
                "inference_batch_latency_micro_secs_p99": _percentile(lat, 99),
                "load_model_latency_milli_secs_max": max(m.load_model_latency_milli_secs, default=0),
                "model_byte_size": max(m.model_byte_size, default=0),
                "batches": len(lat),
            }

    def to_dict(self) -> dict[str, Any]:
        return {
            "pipeline": self.pipeline,
            "workers": self.workers,
            "threads": self.threads,
            "elements_in": self.elements_in,
            "outputs": self.outputs,
            "dead_letters": len(self.dead_letters),
            "bundles": self.bundles,
            "bundle_retries": self.bundle_retries,
            "worker_restarts": self.worker_restarts,
            "server_restarts": self.server_restarts,
            "seconds": round(self.seconds, 3),
            "elements_per_second": round(self.throughput, 1),
            "interrupted": self.interrupted,
            "metrics": self.metrics,
        }

    def __str__(self) -> str:
        lines = [
            f"pipeline   {self.pipeline}",
            f"workers    {self.workers} x {self.threads} threads",
            f"elements   {self.elements_in} in, {self.outputs} out, {len(self.dead_letters)} dead letters",
            f"time       {self.seconds:.2f}s, {self.throughput:,.0f} elements/s",
            f"recovery   {self.bundle_retries} bundle retries, {self.worker_restarts} worker restarts, "
            f"{self.server_restarts} model-server restarts",
        ]
        if self.interrupted:
            lines.append(f"STOPPED    by {self.interrupted}; uncommitted bundles were abandoned")
        for label, m in self.metrics.items():
            lines.append(
                f"{label}: {m['num_inferences']} inferences in {m['batches']} batches "
                f"(mean {m['inference_request_batch_size_mean']:.1f}), batch latency p50 "
                f"{m['inference_batch_latency_micro_secs_p50'] / 1000:.1f} ms p99 "
                f"{m['inference_batch_latency_micro_secs_p99'] / 1000:.1f} ms, "
                f"{m['failed_batches_counter']} failed batches, model load "
                f"{m['load_model_latency_milli_secs_max']} ms, model {m['model_byte_size']} bytes"
            )
        return "\n".join(lines)
