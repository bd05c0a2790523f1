"""The model server's Prometheus metrics (``serve --metrics-address``), and the conversion
of our fixed-bucket histograms to Prometheus ones that the harness's exporter uses too.

A scrape calls ``ServerCollector.collect``, which reads ``ModelServer.status()`` (the
same map ``python -m modelserver status --json`` prints: each lock it takes is held for
bookkeeping only) and turns it into metric families (``server_families``, a pure function
of that map). docs/operations.md lists every metric. Labels: ``model`` (the key),
``version`` (the served version's ``model_id``, what results name as their producer),
``device``; per copy also ``copy`` (0, 1, ...). A key's counters are its totals since the
server started, across loads and versions; ``version`` names the version serving now.

Histograms (``queue_wait_us`` and the others in a status entry's ``histograms``, each a
``Histogram.to_wire()``: four buckets per doubling) are exported with one bucket per
doubling over a fixed range per metric, so every scrape has the same series and stays
small; the coarsening is exact (no value changes side of a bucket bound).

Imports prometheus-client: only imported once an endpoint is asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from modelserver.histogram import BUCKETS_PER_DOUBLING, Histogram

MODEL_LABELS = ["model", "version", "device"]
COPY_LABELS = [*MODEL_LABELS, "copy"]
US = 1e-6  # microseconds, as recorded, to seconds, as Prometheus names them

# (status field, metric name, help); counters get Prometheus's ``_total`` suffix
SERVER_COUNTERS = (
    ("requests", "beamlet_server_requests", "Requests of every kind (infer, load, status, hello...)"),
    ("rejected_peers", "beamlet_server_rejected_peers", "Connections refused: the peer's uid is not ours"),
    ("overloaded", "beamlet_server_overloaded", "Infer requests refused with Overloaded, all models"),
    ("pressure_evictions", "beamlet_server_pressure_evictions", "Models evicted because RAM ran short"),
    ("log_records_dropped", "beamlet_server_log_records_dropped", "Log records dropped: the log was blocked"),
)
SERVER_GAUGES = (
    ("connections", "beamlet_server_connections", "Open client connections"),
    ("loaded_bytes", "beamlet_server_loaded_bytes", "Footprint of the loaded models, all devices"),
    ("reply_backlog_bytes", "beamlet_server_reply_backlog_bytes", "Reply bytes clients have not read yet"),
    ("waiting_loads", "beamlet_server_waiting_loads", "Loads waiting for models in use to go idle"),
    ("retiring_versions", "beamlet_server_retiring_versions", "Swapped-out versions finishing their batches"),
)
DEVICE_GAUGES = (
    ("budget", "beamlet_device_budget_bytes", "Bytes the models on the device may hold (absent: no limit)"),
    ("used", "beamlet_device_used_bytes", "Bytes charged to the models on the device"),
    ("available", "beamlet_device_available_bytes", "Bytes the machine has free (host RAM; NVML for a GPU)"),
    ("nvml_total", "beamlet_device_total_bytes", "The GPU's memory (NVML)"),
)
MODEL_COUNTERS = (
    ("requests", "beamlet_model_requests", "Infer requests the model ran"),
    ("rows", "beamlet_model_rows", "Rows (batch elements) the model ran"),
    ("batches", "beamlet_model_batches", "Forward passes (merged requests count once)"),
    ("errors", "beamlet_model_errors", "Infer requests that failed"),
    ("overloaded", "beamlet_model_overloaded", "Infer requests refused with Overloaded"),
    ("loads", "beamlet_model_loads", "Loads: the first, after evictions, new versions"),
    ("evictions", "beamlet_model_evictions", "Evictions"),
    ("swaps", "beamlet_model_swaps", "New versions swapped in"),
    ("failed_swaps", "beamlet_model_failed_swaps", "New versions refused"),
    ("hits", "beamlet_model_hits", "Infer requests that found the model loaded"),
    ("misses", "beamlet_model_misses", "Infer requests that waited for it to load again"),
    ("load_seconds", "beamlet_model_load_seconds", "Seconds spent loading the model, all its loads"),
    ("busy_seconds", "beamlet_model_busy_seconds", "Seconds of forward passes, summed over compute threads"),
)
MODEL_GAUGES = (
    ("loaded", "beamlet_model_loaded", "1 while the model is loaded, 0 while evicted"),
    ("footprint", "beamlet_model_footprint_bytes", "Bytes charged, all copies (0 while evicted)"),
    ("queued", "beamlet_model_queued_requests", "Requests queued"),
    ("queued_rows", "beamlet_model_queued_rows", "Rows queued"),
    ("running", "beamlet_model_running_batches", "Batches being computed"),
    ("waiting_for_load", "beamlet_model_waiting_for_load", "Requests waiting for the model to load again"),
)
COPY_COUNTERS = (
    ("requests", "beamlet_copy_requests", "Infer requests this copy ran since it was loaded"),
    ("rows", "beamlet_copy_rows", "Rows this copy ran since it was loaded"),
    ("batches", "beamlet_copy_batches", "Forward passes of this copy since it was loaded"),
    ("busy_seconds", "beamlet_copy_busy_seconds", "Seconds of forward passes of this copy"),
)
COPY_GAUGES = (
    ("footprint", "beamlet_copy_footprint_bytes", "Bytes charged for this copy"),
    ("queued_rows", "beamlet_copy_queued_rows", "Rows queued for this copy"),
    ("running", "beamlet_copy_running_batches", "Batches this copy is computing"),
)
# (field in "histograms", metric name, help, bucket bounds as powers of two (in the
# recorded unit), factor to the exported unit)
MODEL_HISTOGRAMS = (
    ("queue_wait_us", "beamlet_model_queue_wait_seconds", "Time requests waited queued", range(2, 27), US),
    ("batch_size", "beamlet_model_batch_size", "Rows per forward pass", range(0, 17), 1.0),
    ("forward_us", "beamlet_model_forward_seconds", "Time of each forward pass", range(2, 27), US),
    ("reply_us", "beamlet_model_reply_seconds", "Time to encode and send each reply", range(2, 27), US),
)


class ServerCollector(Collector):
    """What a scrape of the server's ``/metrics`` gets: ``status()`` read at that moment."""

    def __init__(self, status: Callable[[], dict[str, Any]]):
        self._status = status

    def collect(self) -> Iterable[Metric]:
        return server_families(self._status())


def server_families(s: dict[str, Any]) -> list[Metric]:
    """The metric families for one reading of the server's ``status`` map."""
    out: list[Metric] = []
    for field, name, doc in SERVER_COUNTERS:
        out.append(CounterMetricFamily(name, doc, value=s.get(field, 0)))
    for field, name, doc in SERVER_GAUGES:
        out.append(GaugeMetricFamily(name, doc, value=s.get(field, 0)))
    devices = s.get("devices") or {}
    for field, name, doc in DEVICE_GAUGES:
        family = GaugeMetricFamily(name, doc, labels=["device"])
        for device, d in devices.items():
            value = d.get(field)
            if field == "available" and value is None:
                value = d.get("nvml_free")
            if value is not None:
                family.add_metric([device], value)
        out.append(family)

    models = s.get("models") or []
    rows = [([m["key"], m.get("model_id", ""), str(m.get("device") or "")], m) for m in models]
    copies = [  # each copy under its own device (a model's copies may be on several GPUs)
        ([labels[0], labels[1], str(c.get("device") or labels[2]), str(i)], c)
        for labels, m in rows
        for i, c in enumerate(m.get("copies") or ())
    ]
    for field, name, doc in MODEL_COUNTERS:
        out.append(_family(CounterMetricFamily, name, doc, MODEL_LABELS, rows, field))
    for field, name, doc in MODEL_GAUGES:
        out.append(_family(GaugeMetricFamily, name, doc, MODEL_LABELS, rows, field))
    for field, name, doc in COPY_COUNTERS:
        out.append(_family(CounterMetricFamily, name, doc, COPY_LABELS, copies, field))
    for field, name, doc in COPY_GAUGES:
        out.append(_family(GaugeMetricFamily, name, doc, COPY_LABELS, copies, field))
    charged = GaugeMetricFamily(
        "beamlet_model_charged_bytes",
        "Bytes a loaded model's copies are charged on each device (a model spread over GPUs has one per GPU)",
        labels=MODEL_LABELS,
    )
    for (key, version, _first), m in rows:
        if m.get("loaded") is not False:
            for device, nbytes in sorted((m.get("charges") or {}).items()):
                charged.add_metric([key, version, str(device)], float(nbytes))
    out.append(charged)
    for field, name, doc, bounds, factor in MODEL_HISTOGRAMS:
        hists = [
            (labels, Histogram.from_wire(m["histograms"][field]))
            for labels, m in rows
            if field in (m.get("histograms") or {})
        ]
        out.append(histogram_family(name, doc, MODEL_LABELS, hists, bounds, factor))
    return out


def _family(
    kind: Any,
    name: str,
    doc: str,
    labels: list[str],
    rows: list[tuple[list[str], dict[str, Any]]],
    field: str,
) -> Metric:
    family = kind(name, doc, labels=labels)
    for values, entry in rows:
        value = entry.get(field, 0)
        if field == "footprint" and entry.get("loaded") is False:
            value = 0  # kept in status as the next load's estimate; charged to nothing now
        family.add_metric(values, float(value))
    return family


def histogram_family(
    name: str,
    doc: str,
    labels: list[str],
    hists: Iterable[tuple[Sequence[str], Histogram]],
    bounds: range,
    factor: float = 1.0,
) -> HistogramMetricFamily:
    """A Prometheus histogram family with a series per (label values, Histogram)."""
    family = HistogramMetricFamily(name, doc, labels=labels)
    for values, h in hists:
        family.add_metric(list(values), cumulative_buckets(h, bounds, factor), sum_value=h.total * factor)
    return family


def cumulative_buckets(h: Histogram, bounds: range, factor: float = 1.0) -> list[tuple[str, float]]:
    """``h``'s counts as Prometheus buckets: upper bounds ``2**k * factor`` for k in
    ``bounds`` (one per doubling; values above the last go to +Inf only), each with the
    count of values at or below it, then ``+Inf`` with every value. Exact: a value in our
    bucket i is above 2**((i-1)/4) and at most 2**(i/4), so at most 2**ceil(i/4) and above
    2**(ceil(i/4)-1): it belongs to exactly the bounds from ceil(i/4) up."""
    per_bound = [0] * len(bounds)
    for index, n in h.counts.items():
        k = max(bounds.start, -(-index // BUCKETS_PER_DOUBLING))  # ceil(index / 4)
        if k < bounds.stop:
            per_bound[k - bounds.start] += n
    out, seen = [], 0
    for k, n in zip(bounds, per_bound):
        seen += n
        out.append((_le(2.0**k * factor), float(seen)))
    out.append(("+Inf", float(h.count)))
    return out


def _le(bound: float) -> str:
    return repr(float(f"{bound:.12g}"))  # 2**4 us as 1.6e-05, not 1.6000000000000003e-05
