"""RunInference metrics in bounded memory: fixed-bucket histograms under Beam's names."""

from __future__ import annotations

import random

from client import batching
from client.metrics import InferenceMetrics
from modelserver import config
from modelserver.histogram import BUCKETS_PER_DOUBLING, MAX_BUCKET, Histogram


def test_a_histogram_keeps_a_bounded_number_of_buckets_and_exact_count_sum_min_max():
    rng = random.Random(0)
    values = [rng.lognormvariate(8, 2) for _ in range(200_000)]
    h = Histogram()
    for v in values:
        h.record(v)
    assert len(h.counts) <= MAX_BUCKET + 1
    assert h.count == len(values) and abs(h.total - sum(values)) < 1e-6 * sum(values)
    assert (h.min, h.max) == (min(values), max(values))
    ordered = sorted(values)
    for q in (50, 90, 99):
        true = ordered[int(q / 100 * len(ordered)) - 1]
        # within one bucket: a quarter doubling, 19%
        assert (
            true / 2 ** (1 / BUCKETS_PER_DOUBLING)
            <= h.percentile(q)
            <= true * 2 ** (1 / BUCKETS_PER_DOUBLING)
        )


def test_metrics_merge_and_cross_the_wire_unchanged():
    a, b = InferenceMetrics(), InferenceMetrics(model_name="v2")
    for i in range(1, 50):
        a.record_batch(i, i * 100, i / 1000)
        b.record_batch(2 * i, i * 50, i / 500)
    a.record_load(120, 4096)
    merged = InferenceMetrics.from_wire(a.to_wire())
    merged.merge(InferenceMetrics.from_wire(b.to_wire()))
    named = merged.named()
    assert named["v2_num_inferences"] == sum(range(1, 50)) * 3
    assert named["v2_inference_request_batch_size"]["count"] == 98
    assert named["v2_inference_request_batch_size"]["max"] == 98
    assert named["v2_load_model_latency_milli_secs"] == {
        "count": 1,
        "mean": 120.0,
        "p50": 120,
        "p99": 120,
        "max": 120,
    }


def test_the_deterministic_mode_fixes_the_batch_size(monkeypatch):
    monkeypatch.setenv(config.DETERMINISTIC_ENV, "1")
    sizer = batching.from_kwargs({"min_batch_size": 2, "max_batch_size": 16})
    sizer.record(16, 0.0001)  # fast batches would grow an adaptive sizer
    assert sizer.size == 16 and [len(b) for b in batching.batches(range(40), sizer)] == [16, 16, 8]
    assert batching.from_kwargs({}).size == batching.DEFAULT_DETERMINISTIC_BATCH
    monkeypatch.setenv(config.DETERMINISTIC_ENV, "0")
    assert batching.from_kwargs({"min_batch_size": 2, "max_batch_size": 16}).size == 2
