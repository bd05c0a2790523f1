"""Prometheus metrics: scraped over HTTP from a real model server and a real harness run,
the loopback rule, running without prometheus-client, and the bounded histograms behind
them."""

from __future__ import annotations

import json
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator

import psutil
import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from modelserver import userclass
from modelserver.channel import Channel
from modelserver.errors import ModelError, Overloaded
from modelserver.exposition import MetricsAddressError, MetricsEndpoint, parse_address
from modelserver.histogram import Histogram
from modelserver.loaders import ModelSpec
from modelserver.metrics import cumulative_buckets, server_families
from runtime.summary import Latency
from tests.conftest import ROOT, RunningServer, kill_servers, server_env, start_server
from tests.models import MLP, Gate, make_checkpoint

Samples = dict[str, list[tuple[dict[str, str], float]]]


def scrape(url: str) -> Samples:
    """Every sample at ``url``, by sample name: [(labels, value)]."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        return parse(reply.read().decode())


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """The one sample ``name`` whose labels include ``labels``."""
    found = [v for ls, v in samples.get(name, []) if labels.items() <= ls.items()]
    assert len(found) == 1, f"{name}{labels}: {found} among {samples.get(name)}"
    return found[0]


def eventually(read, want: float, what: str, timeout: float = 20.0) -> None:
    """Until ``read()`` gives ``want`` (a gauge the server updates on another thread)."""
    deadline = time.monotonic() + timeout
    while (got := read()) != want:
        assert time.monotonic() < deadline, f"{what}: {got}, expected {want}"
        time.sleep(0.01)


# -- the model server ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("prom"))  # private (0700), as the server's socket needs


@pytest.fixture(scope="module")
def metrics_server(workdir: str) -> Iterator[RunningServer]:
    """One compute thread and a 4-row queue, so a test can fill the queue with one held
    request and one queued one."""
    path = os.path.join(workdir, "ms.sock")
    srv = start_server(
        path, "--metrics-address", "127.0.0.1:0", "--compute-threads", "1", "--max-queue-rows", "4"
    )
    yield srv
    srv.stop()
    kill_servers(path)


def server_url(srv: RunningServer) -> str:
    with Channel(srv.path) as ch:
        address = ch.request({"op": "status"})["status"]["metrics_address"]
    assert re.fullmatch(r"127\.0\.0\.1:\d+", address) and not address.endswith(":0"), address
    return f"http://{address}/metrics"


def test_server_counters_match_the_requests_made(metrics_server, workdir):
    path = os.path.join(workdir, "mlp.pt")
    make_checkpoint(path)
    spec = ModelSpec("pytorch_state_dict", path, userclass.describe(MLP), {}).to_wire()
    sizes = [1, 2, 3, 4, 5, 6, 7]
    with Channel(metrics_server.path) as ch:
        ch.request({"op": "load", "key": "mlp", "spec": spec})
        for n in sizes:  # one at a time: each its own batch
            ch.request({"op": "infer", "key": "mlp", "inputs": torch.randn(n, 8)})
        with pytest.raises(ModelError):
            ch.request({"op": "infer", "key": "mlp", "inputs": torch.randn(2, 5)})
        status = ch.request({"op": "status"})["status"]
    m = scrape(server_url(metrics_server))
    model = {"model": "mlp", "version": path, "device": "cpu"}
    assert value(m, "beamlet_model_requests_total", **model) == len(sizes) + 1
    assert value(m, "beamlet_model_rows_total", **model) == sum(sizes) + 2
    assert value(m, "beamlet_model_batches_total", **model) == len(sizes) + 1
    assert value(m, "beamlet_model_errors_total", **model) == 1
    assert value(m, "beamlet_model_loads_total", **model) == 1
    assert value(m, "beamlet_model_evictions_total", **model) == 0
    assert value(m, "beamlet_model_swaps_total", **model) == 0
    assert value(m, "beamlet_model_loaded", **model) == 1
    (entry,) = [e for e in status["models"] if e["key"] == "mlp"]
    assert value(m, "beamlet_model_footprint_bytes", **model) == entry["footprint"] > 0
    assert value(m, "beamlet_model_load_seconds_total", **model) == pytest.approx(
        entry["load_seconds"], abs=1e-4
    )
    copy = {**model, "copy": "0"}
    assert value(m, "beamlet_copy_requests_total", **copy) == len(sizes) + 1
    assert value(m, "beamlet_copy_footprint_bytes", **copy) == entry["footprint"]
    # the host's budget and use: the models' footprints against the server's budget
    cpu = status["devices"]["cpu"]
    assert value(m, "beamlet_device_budget_bytes", device="cpu") == cpu["budget"] > 0
    assert value(m, "beamlet_device_used_bytes", device="cpu") == cpu["used"] >= entry["footprint"]
    assert value(m, "beamlet_device_available_bytes", device="cpu") > 0
    assert value(m, "beamlet_server_rejected_peers_total") == 0
    url = server_url(metrics_server)
    eventually(lambda: value(scrape(url), "beamlet_server_connections"), 0, "connections once all closed")
    assert value(m, "beamlet_server_requests_total") >= len(sizes) + 3
    assert value(m, "process_resident_memory_bytes") > 0
    # the server's stage histograms: one sample per forward batch (exact bucket totals)
    for name in ("beamlet_model_forward_seconds", "beamlet_model_batch_size"):
        assert value(m, f"{name}_count", **model) == len(sizes) + 1
    assert value(m, "beamlet_model_batch_size_sum", **model) == sum(sizes) + 2
    assert value(m, "beamlet_model_queue_wait_seconds_count", **model) == len(sizes) + 1
    assert value(m, "beamlet_model_reply_seconds_count", **model) == len(sizes) + 1


def test_overload_refusals_are_counted_per_model_and_server_wide(metrics_server, workdir):
    gate = os.path.join(workdir, "gate")
    spec = ModelSpec("pytorch_state_dict", None, userclass.describe(Gate), {"gate": gate}).to_wire()
    url = server_url(metrics_server)
    before = value(scrape(url), "beamlet_server_overloaded_total")
    with Channel(metrics_server.path) as ch:
        ch.request({"op": "load", "key": "gated", "spec": spec, "batching": {"max_batch_duration_secs": 0}})
    results: dict[str, list] = {}

    def send(name: str, sizes: list[int]) -> None:
        with Channel(metrics_server.path) as ch:
            results[name] = ch.request_many(
                [{"op": "infer", "key": "gated", "inputs": torch.ones(n, 1)} for n in sizes]
            )

    held = threading.Thread(target=send, args=("held", [1]))
    held.start()
    flood = None
    try:
        model = {"model": "gated"}
        deadline = time.monotonic() + 20
        while value(scrape(url), "beamlet_model_running_batches", **model) < 1:  # the gate holds it
            assert time.monotonic() < deadline, "the first request never ran"
            time.sleep(0.01)
        flood = threading.Thread(target=send, args=("flood", [4, 1]))  # queued (4 rows), refused
        flood.start()
        while value(scrape(url), "beamlet_model_overloaded_total", **model) < 1:
            assert time.monotonic() < deadline, "nothing was refused"
            time.sleep(0.01)
        m = scrape(url)
        assert value(m, "beamlet_model_queued_rows", **model) == 4
        assert value(m, "beamlet_model_queued_requests", **model) == 1
        assert value(m, "beamlet_server_overloaded_total") == before + 1
        eventually(lambda: value(scrape(url), "beamlet_server_connections"), 2, "the two open connections")
    finally:
        open(gate, "w").close()
        held.join(30)
        if flood is not None:
            flood.join(30)
    assert isinstance(results["flood"][1], Overloaded) and not isinstance(results["flood"][0], Exception)
    m = scrape(url)
    assert value(m, "beamlet_model_requests_total", model="gated") == 2
    assert value(m, "beamlet_model_overloaded_total", model="gated") == 1


# -- histograms: ours to Prometheus's ---------------------------------------------------------
def test_histograms_convert_exactly_to_cumulative_buckets_per_doubling():
    rng = random.Random(1)
    values = [rng.lognormvariate(6, 3) for _ in range(5000)] + [0, 1, 2, 4, 2**20, 2**40]
    h = Histogram()
    for v in values:
        h.record(v)
    buckets = cumulative_buckets(h, range(3, 25), 1e-6)
    assert [le for le, _ in buckets[:2]] == ["8e-06", "1.6e-05"] and buckets[-1] == ("+Inf", len(values))
    for le, count in buckets[:-1]:  # exactly the values at or below each bound
        bound = float(le) / 1e-6
        assert count == sum(1 for v in values if v <= bound * (1 + 1e-9)), le
    counts = [c for _, c in buckets]
    assert counts == sorted(counts)


def exported(status: dict) -> dict:
    """The parsed exposition of a ``status`` map, as a scrape of the server would give it."""

    class Fixed:
        def collect(self):
            return server_families(status)

    registry = CollectorRegistry()
    registry.register(Fixed())
    return parse(generate_latest(registry).decode())


def test_a_status_with_histograms_gives_prometheus_histograms_in_seconds():
    """What the server exports once each model's status entry carries its stage
    histograms (microseconds; batch sizes in rows)."""
    wait, forward, size = Histogram(), Histogram(), Histogram()
    for us in (5, 40, 300, 300, 9000):
        wait.record(us)
    for us in (1500, 2500, 1_000_000):
        forward.record(us)
    for rows in (1, 3, 8):
        size.record(rows)
    hists = {"queue_wait_us": wait.to_wire(), "forward_us": forward.to_wire(), "batch_size": size.to_wire()}
    status = {
        "connections": 3,
        "devices": {"cpu": {"budget": 1000, "used": 600, "available": 5000}},
        "models": [{"key": "k", "model_id": "/m.pt", "device": "cpu", "loaded": True, "requests": 3,
                    "footprint": 600, "histograms": hists, "copies": [{"device": "cpu", "requests": 3}]}],
    }  # fmt: skip

    m = exported(status)
    labels = {"model": "k", "version": "/m.pt", "device": "cpu"}
    assert value(m, "beamlet_model_queue_wait_seconds_count", **labels) == 5
    assert value(m, "beamlet_model_queue_wait_seconds_sum", **labels) == pytest.approx(9645e-6, rel=1e-9)
    assert value(m, "beamlet_model_queue_wait_seconds_bucket", le="6.4e-05", **labels) == 2
    assert value(m, "beamlet_model_queue_wait_seconds_bucket", le="+Inf", **labels) == 5
    assert value(m, "beamlet_model_forward_seconds_bucket", le="0.004096", **labels) == 2
    assert value(m, "beamlet_model_forward_seconds_sum", **labels) == pytest.approx(1.004, rel=1e-9)
    assert value(m, "beamlet_model_batch_size_bucket", le="4.0", **labels) == 2
    assert value(m, "beamlet_model_batch_size_sum", **labels) == 12
    assert "beamlet_model_reply_seconds_count" not in m  # absent from the status: no series
    assert value(m, "beamlet_copy_requests_total", copy="0", **labels) == 3
    assert value(m, "beamlet_device_budget_bytes", device="cpu") == 1000
    assert value(m, "beamlet_server_connections") == 3


def test_a_model_spread_over_two_gpus_is_exported_per_device():
    """Copies on cuda:0 and cuda:1: each copy's series names its own device, and the
    model's charge is split by device (a status map as a two-GPU server gives it)."""
    status = {
        "models": [{"key": "k", "model_id": "m", "device": "cuda:0", "loaded": True, "footprint": 200,
                    "charges": {"cuda:0": 100, "cuda:1": 100},
                    "copies": [{"device": "cuda:0", "requests": 2}, {"device": "cuda:1", "requests": 5}]}],
    }  # fmt: skip

    m = exported(status)
    assert value(m, "beamlet_copy_requests_total", model="k", version="m", device="cuda:1", copy="1") == 5
    assert value(m, "beamlet_copy_requests_total", model="k", version="m", device="cuda:0", copy="0") == 2
    for device in ("cuda:0", "cuda:1"):
        assert value(m, "beamlet_model_charged_bytes", model="k", version="m", device=device) == 100


def test_a_measurement_that_is_not_finite_is_dropped():
    h = Histogram()
    for v in (float("inf"), float("nan"), 5.0):
        h.record(v)
    assert (h.count, h.total, h.max) == (1, 5.0, 5.0)


# -- the run summary's latency: bounded ----------------------------------------------------------
def test_latency_keeps_flat_memory_over_a_million_samples_and_weights_by_element():
    rng = random.Random(2)
    seconds = [rng.lognormvariate(-4, 1.5) for _ in range(1000)]  # 0.1 ms to seconds
    latency = Latency()
    for i in range(10_000):
        latency.add(seconds[i % 1000], 1)
    buckets, dict_bytes = len(latency.histogram.counts), sys.getsizeof(latency.histogram.counts)
    rss = psutil.Process().memory_info().rss
    for i in range(1_000_000 - 10_000):
        latency.add(seconds[i % 1000], 1)
    grown = psutil.Process().memory_info().rss - rss
    assert latency.histogram.count == 1_000_000
    assert len(latency.histogram.counts) == buckets < 200
    assert sys.getsizeof(latency.histogram.counts) == dict_bytes
    assert grown < 1024 * 1024, f"RSS grew {grown} bytes"  # a sample list would be 8 MiB or more
    ordered = sorted(seconds)
    assert latency.percentile(99) == pytest.approx(ordered[989], rel=0.19)
    # element-weighted: 9 elements at 10 ms and 1 at 1 s -> p50 is 10 ms, p99 is 1 s
    weighted = Latency()
    weighted.add(0.010, 9)
    weighted.add(1.0, 1)
    assert weighted.percentile(50) == pytest.approx(0.010, rel=0.19)
    assert weighted.percentile(99) == pytest.approx(1.0, rel=0.19)
    assert weighted.to_dict()["p50_ms"] == pytest.approx(10, rel=0.19)


# -- addresses and the optional dependency ---------------------------------------------------
def test_addresses_parse_and_only_loopback_is_accepted_unless_asked():
    assert parse_address("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_address("127.3.4.5:0") == ("127.3.4.5", 0)
    assert parse_address("[::1]:9464") == ("::1", 9464)
    assert parse_address("localhost:1") == ("localhost", 1)
    assert parse_address("9464") == ("127.0.0.1", 9464)
    for remote in ("0.0.0.0:9464", "10.1.2.3:80", "[::]:9464", "example.com:9464"):
        with pytest.raises(MetricsAddressError, match="not a loopback address.*--metrics-allow-remote"):
            parse_address(remote)
        assert parse_address(remote, allow_remote=True)[1] in (80, 9464)
    for bad in ("127.0.0.1:http", "127.0.0.1:70000", "::1:9464"):
        with pytest.raises(MetricsAddressError):
            parse_address(bad)
    endpoint = MetricsEndpoint("0.0.0.0:0", allow_remote=True)

    class Nothing:
        def collect(self):
            return []

    endpoint.start(Nothing())
    try:
        assert endpoint.address is not None and endpoint.address.startswith("0.0.0.0:")
        port = endpoint.address.rsplit(":", 1)[1]
        assert value(scrape(f"http://127.0.0.1:{port}/metrics"), "process_open_fds") > 0
        with pytest.raises(MetricsAddressError, match="cannot serve metrics on"):
            MetricsEndpoint(f"127.0.0.1:{port}").start(Nothing())  # taken
    finally:
        endpoint.stop()
    assert endpoint.address is None


TINY_JOB = """
from runtime import Create, Map, WriteToJsonLines

def build_pipeline(input, output):
    return Create(range(3)) | Map(lambda x: x + 1) | WriteToJsonLines(output)
"""


def test_serve_and_run_refuse_a_remote_address_at_once_and_take_it_when_allowed(private_dir):
    job = os.path.join(private_dir, "job.py")
    with open(job, "w") as f:
        f.write(TINY_JOB)
    out = os.path.join(private_dir, "out.jsonl")
    sock = os.path.join(private_dir, "ms.sock")
    serve = [sys.executable, "-m", "modelserver", "serve", "--socket", sock]
    run = [sys.executable, "-m", "runtime", "run", job, "--output", out, "--workers", "1", "--no-progress"]
    commands = {
        "serve refused": [*serve, "--metrics-address", "0.0.0.0:9464"],
        "run refused": [*run, "--metrics-address", "192.168.1.1:9464"],
        "run allowed": [*run, "--metrics-address", "0.0.0.0:0", "--metrics-allow-remote"],
    }
    procs = {
        name: subprocess.Popen(cmd, env=server_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, cmd in commands.items()
    }  # fmt: skip
    results = {name: (p.wait(60), p.communicate()[1]) for name, p in procs.items()}
    for name in ("serve refused", "run refused"):
        code, err = results[name]
        assert code == 2 and "not a loopback address" in err and "--metrics-allow-remote" in err, (name, err)
    assert not os.path.exists(sock)  # refused before the server started
    code, err = results["run allowed"]
    assert code == 0 and re.search(r"runtime: metrics on http://0\.0\.0\.0:\d+/metrics", err), err


def test_without_prometheus_client_everything_imports_and_asking_for_metrics_fails_clearly(private_dir):
    job = os.path.join(private_dir, "job.py")
    with open(job, "w") as f:
        f.write(TINY_JOB)
    sock = os.path.join(private_dir, "ms.sock")
    code = f"""
import sys
sys.modules["prometheus_client"] = None  # as if it were not installed
import client, modelserver.server, runtime.harness, runtime.summary
from modelserver.__main__ import main as modelserver_main
from runtime.__main__ import main as runtime_main
print("serve", modelserver_main(["serve", "--socket", {sock!r}, "--metrics-address", "127.0.0.1:0"]))
print("run", runtime_main(["run", {job!r}, "--metrics-address", "127.0.0.1:0"]))
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], env=server_env(), cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["serve", "2", "run", "2"]
    assert proc.stderr.count("pip install 'beamlet[metrics]'") == 2, proc.stderr
    assert not os.path.exists(sock)


# -- the harness --------------------------------------------------------------------------------
STREAM_JOB = """
import torch
from client import PytorchModelHandlerTensor
from runtime import Map, RunInference, WriteToJsonLines
from tests.models import MLP
from tests.test_long_lived_harness import QueueSource

class Feeder(QueueSource):
    def __init__(self):
        super().__init__()
        for i in range({n}):
            self.queue.put(i)

def build_pipeline(input, output):
    handler = PytorchModelHandlerTensor({ckpt!r}, MLP, {{}}, min_batch_size=1, max_batch_size=8)
    return (
        Feeder()
        | Map(lambda i: torch.full((8,), float(i)))
        | RunInference(handler)
        | Map(lambda r: r.inference.tolist())
        | WriteToJsonLines(output)
    )
"""


def test_a_streaming_run_serves_live_beam_metrics_that_match_its_summary(private_dir):
    n = 50
    ckpt = os.path.join(private_dir, "mlp.pt")
    make_checkpoint(ckpt)
    job = os.path.join(private_dir, "job.py")
    with open(job, "w") as f:
        f.write(STREAM_JOB.format(n=n, ckpt=ckpt))
    out = os.path.join(private_dir, "out.jsonl")
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime", "run", job, "--output", out, "--workers", "1", "--threads", "1",
         "--bundle-size", "16", "--no-progress", "--json", "--metrics-address", "127.0.0.1:0"],
        env=server_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()
    err: list[str] = []

    def read_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            err.append(line)
            lines.put(line)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        url = None
        while url is None:
            assert proc.poll() is None and time.monotonic() < deadline, "".join(err)
            try:
                found = re.search(r"runtime: metrics on (http://\S+)", lines.get(timeout=0.5))
            except queue.Empty:
                continue
            url = found.group(1) if found else None
        while True:  # live: committed bundles show while the run goes on
            m = scrape(url)
            if m.get("beamlet_run_elements_out_total") and value(m, "beamlet_run_elements_out_total") == n:
                break
            assert proc.poll() is None and time.monotonic() < deadline, "".join(err)
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGINT)
        stdout, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    reader.join(10)
    assert proc.returncode == 128 + signal.SIGINT, "".join(err)
    summary = json.loads(stdout)
    step = "RunInference(PytorchModelHandlerTensor)"
    beam = summary["metrics"][step]
    labels = {"step": step, "model": ""}
    assert value(m, "num_inferences_total", **labels) == n == beam["num_inferences"]
    assert value(m, "failed_batches_counter_total", **labels) == 0
    batches = value(m, "inference_request_batch_size_count", **labels)
    assert batches == beam["inference_request_batch_size"]["count"] >= n / 8
    assert value(m, "inference_request_batch_size_sum", **labels) == n
    assert value(m, "inference_batch_latency_micro_secs_count", **labels) == batches
    assert value(m, "load_model_latency_milli_secs_count", **labels) == 1
    assert value(m, "model_byte_size_sum", **labels) == beam["model_byte_size"]["max"] > 0
    assert value(m, "beamlet_run_elements_in_total") == n == summary["elements_in"]
    assert value(m, "beamlet_run_bundles_committed_total") == summary["bundles"] >= n / 16
    assert value(m, "beamlet_run_dead_letters_total") == 0
    assert value(m, "beamlet_run_worker_restarts_total") == 0
    assert value(m, "beamlet_run_end_to_end_latency_seconds_count") == n  # once per element
    assert value(m, "beamlet_run_workers") == 1
