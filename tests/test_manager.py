"""The memory-aware model manager, in-process with real models, and through a real server
under a long random keyed workload from several processes."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time

import psutil
import pytest
import torch

from modelserver import userclass
from modelserver.errors import OutOfMemory
from modelserver.loaders import ModelSpec
from modelserver.manager import ModelManager
from tests import workers
from tests.conftest import start_server
from tests.models import Blob, Gate, blob_side, make_blob

MB = 1 << 20


def blob_spec(path: str, megabytes: float) -> ModelSpec:
    return ModelSpec("pytorch_state_dict", path, userclass.describe(Blob), {"d": blob_side(megabytes)})


@pytest.fixture
def blobs(private_dir):
    """Three 40 MB models on disk."""
    specs = {}
    for name in ("a", "b", "c"):
        path = os.path.join(private_dir, f"{name}.pt")
        make_blob(path, 40)
        specs[name] = blob_spec(path, 40)
    return specs


@pytest.fixture
def manager_factory():
    made: list[ModelManager] = []

    def make(budget_mb: float | None, **kw) -> ModelManager:
        m = ModelManager(int(budget_mb * MB) if budget_mb else None, **kw)
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


def loaded(m: ModelManager) -> set[str]:
    return {s["key"] for s in m.status() if s["loaded"]}


def infer(m: ModelManager, key: str, x: torch.Tensor) -> torch.Tensor:
    done = threading.Event()
    box: dict = {}

    def reply(out, err):
        box["out"], box["err"] = out, err
        done.set()

    from modelserver.batcher import Work

    m.submit(key, Work(x, {}, reply))
    assert done.wait(30)
    if box["err"] is not None:
        raise box["err"]
    return box["out"]


def test_footprint_is_measured_and_checked_against_tensor_bytes(blobs, manager_factory):
    m = manager_factory(None)
    m.register("a", blobs["a"])
    (s,) = m.status()
    tensor_bytes = blob_side(40) ** 2 * 4
    assert s["nbytes"] == tensor_bytes
    assert s["measured"] >= 0.8 * tensor_bytes, "the RSS reading should see the weights arrive"
    assert tensor_bytes <= s["footprint"] <= tensor_bytes * 1.5 + 64 * MB
    assert s["loads"] == 1 and s["load_seconds"] > 0


def test_budget_holds_and_the_policy_picks_the_victim(blobs, manager_factory):
    m = manager_factory(100)  # room for two 40 MB models, not three
    m.register("a", blobs["a"])
    m.register("b", blobs["b"])
    x = torch.randn(2, blob_side(40))
    for _ in range(5):
        infer(m, "a", x)  # "a" is popular, "b" was used once
    m.register("c", blobs["c"])
    assert loaded(m) == {"a", "c"}
    assert m.used("cpu") <= 100 * MB
    stats = {s["key"]: s for s in m.status()}
    assert stats["b"]["evictions"] == 1 and stats["a"]["hits"] == 5
    # b comes back on demand (a miss), evicting the least valuable of a and c
    out = infer(m, "b", x)
    assert out.shape == x.shape
    assert "b" in loaded(m) and len(loaded(m)) == 2
    assert {s["key"]: s for s in m.status()}["b"]["misses"] == 1


def test_a_model_larger_than_the_budget_is_refused_at_once(blobs, manager_factory):
    m = manager_factory(30)
    started = time.monotonic()
    with pytest.raises(OutOfMemory, match="more than the whole"):
        m.register("a", blobs["a"])
    assert time.monotonic() - started < 2
    assert not loaded(m)


def gate_spec(gate: str, megabytes: float = 0) -> ModelSpec:
    params = {"gate": gate, "d": blob_side(megabytes) if megabytes else 0}
    return ModelSpec("pytorch_state_dict", None, userclass.describe(Gate), params)


def hold(m: ModelManager, key: str) -> threading.Thread:
    """Send a request that the gate model keeps in flight until its gate file appears."""
    t = threading.Thread(target=infer, args=(m, key, torch.ones(1)))
    t.start()
    deadline = time.monotonic() + 10
    while not any(s["key"] == key and s["in_flight"] for s in m.status()):
        assert time.monotonic() < deadline, "the request never reached the model"
        time.sleep(0.005)
    return t


def test_a_model_in_use_is_never_evicted_and_a_load_that_waits_times_out(blobs, manager_factory, private_dir):
    gate = os.path.join(private_dir, "gate")
    m = manager_factory(60, load_wait=0.5)
    m.register("g", gate_spec(gate, 40))
    held = hold(m, "g")
    started = time.monotonic()
    with pytest.raises(OutOfMemory, match="held by models in use"):
        m.register("a", blobs["a"])
    assert 0.4 < time.monotonic() - started < 10
    assert loaded(m) == {"g"}
    open(gate, "w").close()
    held.join(30)
    assert not held.is_alive()


def test_a_waiting_load_proceeds_when_the_model_in_use_goes_idle(blobs, manager_factory, private_dir):
    gate = os.path.join(private_dir, "gate")
    m = manager_factory(60, load_wait=60)
    m.register("g", gate_spec(gate, 40))
    held = hold(m, "g")
    result: dict = {}
    loader = threading.Thread(target=lambda: result.setdefault("slot", m.register("a", blobs["a"])))
    loader.start()
    deadline = time.monotonic() + 10
    while m.waiting_loads != 1:
        assert time.monotonic() < deadline, "the load never started waiting"
        time.sleep(0.005)
    assert loaded(m) == {"g"}
    open(gate, "w").close()  # g's batch ends, g goes idle, the load evicts it and proceeds
    loader.join(30)
    held.join(30)
    assert result["slot"].loaded and loaded(m) == {"a"}
    assert {s["key"]: s for s in m.status()}["g"]["evictions"] == 1


class FakeHost:
    """Readings of a machine whose free memory the test sets."""

    def __init__(self):
        import modelserver.memory as memory

        self._real = memory.HostMemory()
        self.available_bytes = 10 << 30

    def rss(self):
        return self._real.rss()

    def available(self):
        return self.available_bytes

    def total(self):
        return 16 << 30


def test_pressure_from_outside_the_server_evicts_idle_models(blobs, manager_factory, private_dir):
    host = FakeHost()
    m = manager_factory(None, host=host, min_free_bytes=1 << 30, pressure_interval=3600)
    m.register("a", blobs["a"])
    m.register("b", blobs["b"])
    assert m.check_pressure() == 0
    host.available_bytes = (1 << 30) - 50 * MB  # another process ate the machine's memory
    assert m.check_pressure() == 2  # 50 MB short: both 40 MB models go
    assert loaded(m) == set() and m.pressure_evictions == 2


def test_budget_holds_through_a_long_random_keyed_workload_from_several_processes(private_dir, sock_path):
    sizes = {"m20": 20, "m30": 30, "m40": 40, "m50": 50, "m60": 60, "m35": 35}  # 235 MB in all
    models = {}
    for i, (key, mb) in enumerate(sizes.items()):
        path = os.path.join(private_dir, f"{key}.pt")
        make_blob(path, mb, seed=i)
        models[key] = (path, blob_side(mb))
    budget = 150 * MB  # holds some, never all
    srv = start_server(sock_path, "--memory-budget", str(budget))
    try:
        server = psutil.Process(srv.proc.pid)
        baseline = server.memory_info().rss
        peak = [baseline]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.01):
                peak[0] = max(peak[0], server.memory_info().rss)

        sampler = threading.Thread(target=sample)
        sampler.start()
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(3) as pool:
            results = pool.starmap(
                workers.keyed_workload, [(sock_path, models, seed, 160) for seed in range(3)]
            )
        stop.set()
        sampler.join()
        with srv.channel() as ch:
            status = ch.request({"op": "status"})["status"]
    finally:
        srv.stop()
    assert all(r["n"] == 160 and r["bad"] == 0 for r in results), results
    tolerance = 64 * MB
    assert peak[0] <= baseline + budget + tolerance, (
        f"server RSS peaked at {peak[0] / MB:.0f} MiB: baseline {baseline / MB:.0f} + budget {budget / MB:.0f}"
    )
    evictions = sum(m["evictions"] for m in status["models"])
    loads = sum(m["loads"] for m in status["models"])
    assert evictions > 0 and loads > len(sizes)
    assert status["devices"]["cpu"]["used"] <= budget
    print(f"peak RSS {peak[0] / MB:.0f} MiB = baseline {baseline / MB:.0f} + {(peak[0] - baseline) / MB:.0f}; "
          f"budget {budget / MB:.0f}; {loads} loads, {evictions} evictions")  # fmt: skip


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_budget_is_checked_against_nvml_and_torch_readings(private_dir, manager_factory):
    from modelserver import memory

    m = manager_factory(None, gpu_fraction=0.9)
    specs = {}
    for i in range(3):
        path = os.path.join(private_dir, f"g{i}.pt")
        make_blob(path, 64, seed=i)
        specs[i] = ModelSpec(
            "pytorch_state_dict", path, userclass.describe(Blob), {"d": blob_side(64)}, "GPU"
        )
    m.register("g0", specs[0])
    (s,) = m.status()
    assert s["device"].startswith("cuda")
    tensor_bytes = blob_side(64) ** 2 * 4
    assert tensor_bytes <= s["footprint"] <= tensor_bytes * 1.5 + 64 * MB
    assert s["measured"] >= 0.9 * tensor_bytes  # torch's allocator saw the weights arrive
    reading = memory.Nvml.read(0)
    assert reading is not None and m.budget("cuda:0") == int(reading.total * 0.9)
    # a budget that holds two: the third load evicts one
    m._gpu_budgets["cuda:0"] = int(2.5 * s["footprint"])  # noqa: SLF001 - a small GPU, for the test
    m.register("g1", specs[1])
    m.register("g2", specs[2])
    assert len(loaded(m)) == 2 and m.used("cuda:0") <= m.budget("cuda:0")
