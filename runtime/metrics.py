"""The harness's Prometheus metrics (``python -m runtime run --metrics-address``).

Beam's RunInference metrics keep Beam's bare names, so a Beam user finds them as they
know them: ``num_inferences``, ``failed_batches_counter`` (counters: Prometheus shows them
with ``_total``), ``inference_batch_latency_micro_secs``, ``inference_request_batch_size``,
``inference_request_batch_byte_size``, ``load_model_latency_milli_secs``,
``model_byte_size`` (histograms, in Beam's units: the name says which). Labels: ``step``
(the RunInference step) and ``model`` (Beam's ``model_name`` after a named model update,
which Beam puts in front of the metric's name instead; empty before). They are the
workers' metrics, merged by the harness as each bundle commits.

The run's own are ``beamlet_run_*``: elements in and out, dead letters, bundles committed
and retried, worker and model-server restarts, model updates, and on a stream the
end-to-end latency (arrival at the source to commit, once per element). docs/runtime.md
lists them all.

A scrape copies the histograms and the commits' counts under the run's ``stats_lock``
(which the loop holds only to merge a bundle's metrics, and to count a commit: a scrape
sees whole bundles), and reads the other counters (ints) as they are.

Imports prometheus-client: only imported once an endpoint is asked for.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from client.metrics import InferenceMetrics
from modelserver.histogram import Histogram
from modelserver.metrics import US, histogram_family

if TYPE_CHECKING:
    from runtime.arbiter import Run

INFERENCE_LABELS = ["step", "model"]
# Beam's distributions: (name, help, bucket bounds as powers of two, in Beam's unit)
BEAM_HISTOGRAMS = (
    ("inference_batch_latency_micro_secs", "Time of each batch's inference, microseconds", range(4, 31)),
    ("inference_request_batch_size", "Elements per batch", range(0, 17)),
    ("inference_request_batch_byte_size", "Bytes per batch", range(6, 37)),
    ("load_model_latency_milli_secs", "Time of each model load, milliseconds", range(0, 21)),
    ("model_byte_size", "Bytes of each loaded model", range(10, 41)),
)
LATENCY_BOUNDS = range(7, 33)  # 128 us to 71 min, recorded in microseconds


class RunCollector(Collector):
    """What a scrape of the harness's ``/metrics`` gets, read from the running run."""

    def __init__(self, run: Run):
        self.run = run

    def collect(self) -> Iterable[Metric]:
        run = self.run
        s = run.summary
        with run.stats_lock:  # copies: a few hundred numbers at most
            steps = {label: InferenceMetrics.from_wire(m.to_wire()) for label, m in run.metrics.items()}
            latency = Histogram.from_wire(s.latency.histogram.to_wire())
            committed = (s.outputs, s.dead_letter_count, s.bundles)
        outputs, dead_letters, bundles = committed
        out: list[Metric] = []
        for name, doc, value in (
            ("beamlet_run_elements_in", "Elements read from the source", s.elements_in),
            ("beamlet_run_elements_out", "Elements written to the sink", outputs),
            ("beamlet_run_dead_letters", "Elements that left by the dead-letter output", dead_letters),
            ("beamlet_run_bundles_committed", "Bundles committed", bundles),
            ("beamlet_run_bundles_retried", "Bundle attempts after the first", run.ledger.retries),
            ("beamlet_run_worker_restarts", "SDK workers restarted", run.restarts),
            ("beamlet_run_model_server_restarts", "Model servers restarted", s.server_restarts),
            ("beamlet_run_model_updates", "Model updates sent to the workers", s.model_updates),
        ):
            out.append(CounterMetricFamily(name, doc, value=value))
        out.append(GaugeMetricFamily("beamlet_run_workers", "SDK workers running", value=len(run.pool.slots)))
        if s.unbounded:
            out.append(
                histogram_family(
                    "beamlet_run_end_to_end_latency_seconds",
                    "Arrival at the source to commit, once per element",
                    [],
                    [((), latency)],
                    LATENCY_BOUNDS,
                    US,
                )
            )

        rows = [(_labels(label, m), m) for label, m in steps.items()]
        inferences = CounterMetricFamily(
            "num_inferences", "Elements inferred (Beam)", labels=INFERENCE_LABELS
        )
        failed = CounterMetricFamily(
            "failed_batches_counter", "Batches whose inference failed (Beam)", labels=INFERENCE_LABELS
        )
        for labels, m in rows:
            inferences.add_metric(labels, m.num_inferences)
            failed.add_metric(labels, m.failed_batches_counter)
        out += [inferences, failed]
        for name, doc, bounds in BEAM_HISTOGRAMS:
            hists = [(labels, getattr(m, name)) for labels, m in rows]
            out.append(histogram_family(name, f"{doc} (Beam)", INFERENCE_LABELS, hists, bounds))
        return out


def _labels(label: str, m: InferenceMetrics) -> list[str]:
    """(step, model) from a step's metrics label (``Step [model_name]`` after a named update)."""
    suffix = f" [{m.model_name}]"
    step = label[: -len(suffix)] if m.model_name and label.endswith(suffix) else label
    return [step, m.model_name]
