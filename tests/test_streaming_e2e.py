"""Streaming end to end: Redis -> RunInference (large_model) -> Redis through the CLI,
with the harness, workers and the model server killed along the way (issue 13)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import psutil
import pytest
import torch

from tests.conftest import ROOT, server_env, server_processes
from tests.models import make_checkpoint

redis = pytest.importorskip("redis")

JOB = """
import json
import torch
from client import KeyedModelHandler, PytorchModelHandlerTensor
from runtime import Map, RunInference
from runtime.streams import ReadFromRedisStream, WriteToRedisStream
from tests.models import MLP


def parse(e):
    return (e["id"], torch.tensor(json.loads(e["x"]), dtype=torch.float32))


def out(keyed):
    key, r = keyed
    return {{"id": key, "y": json.dumps(r.inference.tolist()), "model": str(r.model_id)}}


def build_pipeline(input, output):
    handler = PytorchModelHandlerTensor({ckpt!r}, MLP, {{}}, max_batch_size=32, large_model=True)
    return (
        ReadFromRedisStream({url!r}, "in", "g", claim_idle=None)
        | Map(parse)
        | RunInference(KeyedModelHandler(handler))
        | Map(out)
        | WriteToRedisStream({url!r}, "out")
    )
"""

N = 20_000
ATOL = 1e-5  # rows computed in merged server batches may differ in the last digits


def rows(n: int) -> torch.Tensor:
    return torch.randn(n, 8, generator=torch.Generator().manual_seed(3))


class Producer(threading.Thread):
    """Pushes the N events at a steady rate while the job runs."""

    def __init__(self, url_socket: str, xs: torch.Tensor, rate: float):
        super().__init__(daemon=True)
        self.r = redis.Redis(unix_socket_path=url_socket)
        self.xs, self.rate = xs, rate
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            began = time.monotonic()
            for start in range(0, len(self.xs), 50):
                wait = began + start / self.rate - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                pipe = self.r.pipeline(transaction=False)
                for i in range(start, min(len(self.xs), start + 50)):
                    pipe.xadd("in", {"id": str(i), "x": json.dumps(self.xs[i].tolist())})
                pipe.execute()
        except BaseException as exc:  # reported by the test
            self.error = exc


def start_job(job: str, sock: str, *extra: str, bundle_size: int = 64) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "runtime", "run", job, "--workers", "2", "--threads", "2",
           "--bundle-size", str(bundle_size), "--max-bundle-wait", "0.02", "--socket", sock,
           "--no-progress", "--json", *extra]  # fmt: skip
    return subprocess.Popen(
        cmd, env=server_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_outputs(r: Any, n: int, job: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while r.xlen("out") < n:
        if job.poll() is not None:
            raise AssertionError(f"the job ended early ({job.returncode}): {job.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, f"{r.xlen('out')} of {n} outputs"
        time.sleep(0.02)


def stop_with_sigterm(job: subprocess.Popen[str]) -> tuple[str, str]:
    """SIGTERM the job: it commits what is in flight and exits 128 + SIGTERM. Its output."""
    job.send_signal(signal.SIGTERM)
    stdout, stderr = job.communicate(timeout=60)
    assert job.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    return stdout, stderr


def reap(job: subprocess.Popen[str]) -> None:
    """Kill the job if a failed test left it running."""
    if job.poll() is None:
        job.kill()
        job.communicate()


def outputs_exactly_once(r: Any, n: int) -> tuple[list[Any], list[int]]:
    """The output stream's entries and their event ids, after checking it holds each of
    the ``n`` events once."""
    entries = r.xrange("out")
    ids = [int(f[b"id"]) for _, f in entries]
    assert len(ids) == n and sorted(ids) == list(range(n)), "an event lost or written twice"
    return entries, ids


def workers_of(job: subprocess.Popen[str]) -> list[psutil.Process]:
    return [p for p in psutil.Process(job.pid).children(recursive=True) if p.name() == "beamlet-worker"]


def kill_harness(job: subprocess.Popen[str]) -> None:
    job.send_signal(signal.SIGKILL)
    job.communicate(timeout=30)


def test_killed_harness_workers_and_server_lose_and_duplicate_no_event(redis_server, private_dir, sock_path):
    ckpt = os.path.join(private_dir, "mlp.pt")
    model = make_checkpoint(ckpt)
    job = os.path.join(private_dir, "job.py")
    with open(job, "w") as f:
        f.write(JOB.format(ckpt=ckpt, url=redis_server.url))
    r = redis.Redis(unix_socket_path=redis_server.socket)
    xs = rows(N)
    producer = Producer(redis_server.socket, xs, rate=2500)
    producer.start()
    running = start_job(job, sock_path)
    try:
        wait_outputs(r, 1_500, running)
        kill_harness(running)  # 1: the harness, SIGKILLed (its workers die with it)
        running = start_job(job, sock_path)
        wait_outputs(r, 5_000, running)
        workers = workers_of(running)
        assert len(workers) == 2, workers
        for worker in workers:  # 2: two workers
            worker.kill()
        wait_outputs(r, 8_000, running)
        servers = server_processes(sock_path)
        assert len(servers) == 1, servers
        servers[0].kill()  # 3: the model server
        wait_outputs(r, 11_000, running)
        kill_harness(running)  # 4: the harness again
        running = start_job(job, sock_path)
        producer.join(60)
        assert producer.error is None, producer.error
        wait_outputs(r, N, running)
        stdout, _ = stop_with_sigterm(running)
        summary = json.loads(stdout)
        assert summary["interrupted"] == "SIGTERM" and summary["latency"]["p99_ms"] > 0
    finally:
        reap(running)
    entries, ids = outputs_exactly_once(r, N)
    with torch.inference_mode():
        want = model(xs)
    got = torch.tensor([json.loads(f[b"y"]) for _, f in entries])
    torch.testing.assert_close(got, want[ids], rtol=0, atol=ATOL)
    assert r.xpending("in", "g")["pending"] == 0  # every input acknowledged
    assert r.xlen("out:dead_letters") == 0


def test_a_new_checkpoint_swaps_in_while_events_flow(redis_server, private_dir, sock_path, capsys):
    """The seed's scenario: events flowing, a new checkpoint dropped into the watched
    directory. No event is lost or duplicated, every output names the version that
    computed it (its prediction is that version's), outputs switch to the new version
    within the watch interval plus one swap, and the longest gap between committed
    outputs during the swap is reported."""
    models = os.path.join(private_dir, "models")
    os.makedirs(models)
    v1, v2 = os.path.join(models, "v1.pt"), os.path.join(models, "v2.pt")
    m1 = make_checkpoint(v1, seed=1)
    job = os.path.join(private_dir, "job.py")
    with open(job, "w") as f:
        f.write(JOB.format(ckpt=v1, url=redis_server.url))
    r = redis.Redis(unix_socket_path=redis_server.socket)
    n, rate, interval = 4_000, 500.0, 0.5
    xs = rows(n)
    watch = ("--watch-model", os.path.join(models, "v*.pt"), "--watch-interval", str(interval))
    running = start_job(job, sock_path, *watch, bundle_size=32)
    producer = Producer(redis_server.socket, xs, rate=rate)
    producer.start()
    try:
        wait_outputs(r, n // 3, running)
        tmp = os.path.join(models, ".v2.tmp")
        m2 = make_checkpoint(tmp, seed=2)
        dropped = time.time()
        os.replace(tmp, v2)
        producer.join(60)
        assert producer.error is None, producer.error
        wait_outputs(r, n, running)
        stop_with_sigterm(running)
    finally:
        reap(running)
    entries, ids = outputs_exactly_once(r, n)
    names = [f[b"model"].decode() for _, f in entries]
    assert set(names) == {v1, v2}, set(names)
    got = torch.tensor([json.loads(f[b"y"]) for _, f in entries])
    with torch.inference_mode():
        for version, model in ((v1, m1), (v2, m2)):
            at = [k for k, name in enumerate(names) if name == version]
            torch.testing.assert_close(got[at], model(xs[[ids[k] for k in at]]), rtol=0, atol=ATOL)
    committed = [int(e.decode().split("-")[0]) / 1000 for e, _ in entries]
    first_v2 = committed[names.index(v2)]
    last_v1 = committed[len(names) - 1 - names[::-1].index(v1)]
    switch = first_v2 - dropped
    assert 0 < switch < interval + 10.0, f"outputs named v2 only {switch:.2f}s after it was dropped"
    assert last_v1 - first_v2 < 5.0, "v1 kept computing long after v2 served"
    around = [b - a for a, b in zip(committed, committed[1:]) if dropped - 1 <= a <= last_v1 + 1]
    with capsys.disabled():
        print(
            f"\nswap: first v2 output {switch:.2f}s after the drop (watch interval {interval}s), last v1 output "
            f"{last_v1 - first_v2:+.2f}s from it; longest gap between committed outputs around the swap "
            f"{max(around) * 1000:.0f} ms (at {rate:.0f} events/s)"
        )


def test_a_redis_server_that_goes_away_and_comes_back_loses_nothing(redis_server, private_dir, sock_path):
    ckpt = os.path.join(private_dir, "mlp.pt")
    model = make_checkpoint(ckpt)
    job = os.path.join(private_dir, "job.py")
    with open(job, "w") as f:
        f.write(JOB.format(ckpt=ckpt, url=redis_server.url))
    n = 3_000
    xs = rows(n)
    producer = Producer(redis_server.socket, xs[: n // 2], rate=3000)
    producer.start()
    producer.join(60)
    running = start_job(job, sock_path)
    try:
        r = redis.Redis(unix_socket_path=redis_server.socket)
        wait_outputs(r, 300, running)
        redis_server.stop(keep_data=True)  # saved, then gone for a while
        time.sleep(1.0)  # the job must notice it is gone: it waits, it does not fail
        assert running.poll() is None, running.stderr.read()[-3000:]
        redis_server.start()
        r = redis.Redis(unix_socket_path=redis_server.socket)
        pipe = r.pipeline(transaction=False)
        for i in range(n // 2, n):
            pipe.xadd("in", {"id": str(i), "x": json.dumps(xs[i].tolist())})
        pipe.execute()
        wait_outputs(r, n, running)
        running.send_signal(signal.SIGTERM)
        _, stderr = running.communicate(timeout=60)
    finally:
        reap(running)
    assert "unreachable" in stderr and "retrying" in stderr, stderr[-3000:]
    entries, _ = outputs_exactly_once(r, n)
    with torch.inference_mode():
        want = model(xs)
    got = {int(f[b"id"]): json.loads(f[b"y"]) for _, f in entries}
    torch.testing.assert_close(torch.tensor([got[i] for i in range(n)]), want, rtol=0, atol=ATOL)
