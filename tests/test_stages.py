"""Where each millisecond goes: the stage times a real server sends with each reply, the
client's own, the per-model (and per-copy) histograms in ``status``, the switch that
turns recording off, and a histogram's memory over a million samples."""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator

import pytest
import torch

from client.serverclient import ServerClient
from client.stages import STAGES
from modelserver import userclass
from modelserver.batchstats import HISTOGRAMS
from modelserver.histogram import MAX_BUCKET, Histogram
from modelserver.loaders import ModelSpec
from tests.conftest import RunningServer, kill_servers, start_server
from tests.hardening_models import Slow
from tests.workers import run_threads

FORWARD_SECONDS = 0.005  # the forward dominates the round trip, so 10% is robust on a busy machine
SERVER_STAGES = ("queue", "assemble", "forward", "encode")


def slow_spec() -> ModelSpec:
    return ModelSpec(
        "pytorch_state_dict", None, userclass.describe(Slow), {"forward_seconds": FORWARD_SECONDS}
    )


@pytest.fixture(scope="module")
def metrics_server() -> Iterator[RunningServer]:
    """A server with recording on (the default), shared by the tests that read it."""
    with tempfile.TemporaryDirectory(prefix="bl-st-") as directory:  # private: mkdtemp makes it 0700
        path = os.path.join(directory, "on.sock")
        srv = start_server(path)
        try:
            yield srv
        finally:
            srv.stop()
            kill_servers(path)


def test_every_reply_carries_the_servers_four_stages(metrics_server):
    with ServerClient(metrics_server.path, autostart=False) as client:
        client.load("a", slow_spec())
        for rows in (1, 3, 8):
            reply = client.infer("a", torch.ones(rows, 4))
            stages = reply["stages"]
            assert set(stages) == set(SERVER_STAGES), stages
            assert all(isinstance(v, float) and v >= 0 for v in stages.values()), stages
            assert stages["forward"] >= FORWARD_SECONDS * 0.9  # the model's sleep, measured
            last = client.last_stages()
            assert set(last) == set(STAGES)
            assert all(last[f"server_{s}"] == stages[s] for s in SERVER_STAGES)
        summary = client.stage_times()
        assert set(summary) == {f"{s}_us" for s in STAGES}
        assert all(h["count"] == 3 for h in summary.values())
        assert summary["server_forward_us"]["p50"] >= FORWARD_SECONDS * 1e6 * 0.9


def test_stage_times_add_up_to_the_round_trip(metrics_server):
    off_by, slack = [], []
    with ServerClient(metrics_server.path, autostart=False) as client:
        client.load("b", slow_spec())
        x = torch.randn(16, 4)
        client.infer("b", x)  # the connection and the model warm
        for _ in range(20):
            t0 = time.monotonic()
            client.infer("b", x)
            round_trip = time.monotonic() - t0
            last = client.last_stages()
            client_sum = last["encode"] + last["send"] + last["wait"] + last["decode"]
            server_sum = sum(last[f"server_{s}"] for s in SERVER_STAGES)
            off_by.append(abs(client_sum - round_trip) / round_trip)
            slack.append(last["wait"] - server_sum)
            assert client_sum <= round_trip  # the client's stages lie inside the call
    assert statistics.median(off_by) <= 0.10, off_by
    assert statistics.median(slack) >= 0, slack  # the server's stages lie inside the client's wait


def test_status_histograms_count_every_batch_and_the_copies_add_up(metrics_server):
    rows = (3, 5)
    per_thread = 10
    errors: list[BaseException] = []
    with ServerClient(metrics_server.path, autostart=False) as client:
        client.load("c", slow_spec(), copies=2)

        def send(t: int) -> None:
            try:
                for i in range(per_thread):
                    client.infer("c", torch.ones(rows[(i + t) % 2], 4))
            except BaseException as exc:
                errors.append(exc)

        run_threads(send, 2, errors)
        model = next(m for m in client.status()["models"] if m["key"] == "c")
    sent_rows = per_thread * sum(rows)  # two threads, each sending rows[0] and rows[1] by turns
    h = {name: Histogram.from_wire(model["histograms"][name]) for name in HISTOGRAMS}
    assert model["rows"] == sent_rows and model["requests"] == 2 * per_thread
    assert h["batch_size"].count == model["batches"] and h["batch_size"].total == sent_rows
    assert h["forward_us"].count == model["batches"]
    assert h["forward_us"].min >= FORWARD_SECONDS * 1e6 * 0.9
    assert h["queue_wait_us"].count == h["reply_us"].count == 2 * per_thread
    assert len(model["copies"]) == 2
    assert all(copy["histograms"]["batch_size"]["count"] > 0 for copy in model["copies"])  # both served
    for name in HISTOGRAMS:
        together = Histogram()
        for copy in model["copies"]:
            together.merge(Histogram.from_wire(copy["histograms"][name]))
        assert together.counts == h[name].counts, name
        assert together.count == h[name].count
        assert together.total == pytest.approx(h[name].total, rel=1e-9)


def test_no_metrics_sends_no_stages_and_records_nothing(sock_path):
    srv = start_server(sock_path, "--no-metrics")
    try:
        with ServerClient(sock_path, autostart=False) as client:
            client.load("d", slow_spec())
            for _ in range(3):
                assert "stages" not in client.infer("d", torch.ones(2, 4))
            assert set(client.last_stages()) == {"encode", "send", "wait", "decode"}
            status = client.status()
        assert status["metrics"] is False
        model = status["models"][0]
        assert model["requests"] == 3  # the counters still count
        for histograms in (model["histograms"], *(c["histograms"] for c in model["copies"])):
            assert set(histograms) == set(HISTOGRAMS)
            assert all(h["count"] == 0 and h["counts"] == [] for h in histograms.values())
    finally:
        srv.stop()


def test_a_client_shared_by_threads_counts_every_request(metrics_server):
    errors: list[BaseException] = []
    seen: dict[int, float] = {}
    with ServerClient(metrics_server.path, autostart=False) as client:
        client.load("e", slow_spec())

        def send(t: int) -> None:
            try:
                for _ in range(5):
                    client.infer("e", torch.ones(t + 1, 4))
                seen[t] = client.last_stages()["server_forward"]  # this thread's own last request
            except BaseException as exc:
                errors.append(exc)

        run_threads(send, 4, errors)
        summary = client.stage_times()
    assert len(seen) == 4 and all(v >= FORWARD_SECONDS * 0.9 for v in seen.values())
    assert all(h["count"] == 20 for h in summary.values()), summary


def test_a_million_samples_keep_a_histograms_memory_flat():
    h = Histogram()
    # every bucket, beyond the last, and values between bucket edges
    spread = [2 ** (i / 4) * f for i in range(MAX_BUCKET + 8) for f in (0.5, 1.0, 1.01)]
    for v in spread:
        h.record(v)
    size = sys.getsizeof(h.counts)
    buckets = len(h.counts)
    record = h.record
    for i in range(1_000_000 - len(spread)):
        record(spread[i % len(spread)])
    assert h.count == 1_000_000
    assert len(h.counts) == buckets <= MAX_BUCKET + 1
    assert sys.getsizeof(h.counts) == size
    assert len(h.to_wire()["counts"]) == buckets
