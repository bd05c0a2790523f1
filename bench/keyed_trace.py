"""Keyed trace: many models, a budget that holds about three, three ways to manage them.

    python -m bench.keyed_trace [--requests 1500] [--budget-mib 160] [--seed 0] [--json PATH]

Ten models of mixed sizes (10..100 MiB of weights, 440 MiB in all) are requested by a
zipf-distributed trace (s=1.1, the popular models shuffled among the sizes). The same
trace runs three times, in this order, in one invocation:

  gdsf   the model server, --memory-budget, its default policy (size, use, reload cost)
  lru    the model server, same budget, plain least-recently-used by memory
  count  Beam's way: models in the worker process, at most N at a time by count
         (KeyedModelHandler max_models_per_worker_hint=N, N = how many of the average
         model fit the budget), no notion of their size

Reported: hit ratio (requests served by a model already loaded), loads, peak RSS of the
process that holds the models above its baseline, and requests per second. The figures
go to ``--json PATH`` (default ``bench/results/keyed-trace-<time>.json``), and a plot
of the hit ratio by policy beside it (``bench.plots``).
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import psutil
import torch

from bench import plots
from bench.common import write_results
from client import KeyedModelHandler, KeyModelMapping, PytorchModelHandlerTensor, ServerClient
from modelserver.channel import Channel
from modelserver.errors import ServerUnavailable

MiB = 1 << 20
SIZES_MIB = [10, 20, 30, 40, 60, 80, 100, 20, 30, 50]
ROWS = 8


class TraceBlob(torch.nn.Module):
    """A square linear layer: 4 * d * d bytes."""

    def __init__(self, d: int):
        super().__init__()
        self.lin = torch.nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def side(mib: float) -> int:
    return int((mib * MiB / 4) ** 0.5)


def make_models(directory: str) -> list[tuple[str, str, int]]:
    models = []
    for i, mib in enumerate(SIZES_MIB):
        torch.manual_seed(i)
        d = side(mib)
        path = os.path.join(directory, f"m{i}.pt")
        torch.save(TraceBlob(d).state_dict(), path)
        models.append((f"m{i}", path, d))
    return models


def zipf_trace(n: int, k: int, seed: int, s: float = 1.1) -> list[int]:
    rng = random.Random(seed)
    ranks = list(range(k))
    rng.shuffle(ranks)  # which model is most popular has nothing to do with its size
    weights = [1 / (r + 1) ** s for r in range(k)]
    return [ranks[i] for i in rng.choices(range(k), weights=weights, k=n)]


class PeakRss:
    """Samples a process's RSS every 10 ms on a thread."""

    def __init__(self, pid: int):
        self.proc = psutil.Process(pid)
        self.baseline = self.proc.memory_info().rss
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak - self.baseline


def run_server(
    models, trace, policy: str, budget: int, directory: str, device: str = "CPU"
) -> dict[str, Any]:
    """The trace through a model server with ``budget`` bytes for its models: host memory,
    or with ``device`` a GPU, that GPU's budget (``--gpu-memory-fraction``: budget / its
    total), read back with NVML's figures from ``status``."""
    sock = os.path.join(directory, f"{policy}.sock")
    limit = ["--memory-budget", str(budget)]
    if device != "CPU":
        total = torch.cuda.get_device_properties(torch.device(device)).total_memory
        limit = ["--gpu-memory-fraction", f"{budget / total:.6f}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "modelserver", "serve", "--socket", sock, *limit,
         "--eviction-policy", policy, "--log-level", "WARNING"],
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                Channel(sock, shm_bytes=0).close()
                break
            except ServerUnavailable:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.05)
        rss = PeakRss(proc.pid)
        client = ServerClient(sock, autostart=False)
        handlers = [
            PytorchModelHandlerTensor(p, TraceBlob, {"d": d}, large_model=True, device=device)
            for _, p, d in models
        ]
        for (key, _, _), h in zip(models, handlers):
            client._specs[key] = (h.model_spec(), None)  # registered lazily, on the first miss
        inputs = [torch.randn(ROWS, d) for _, _, d in models]
        started = time.perf_counter()
        for i in progress(trace, policy):
            client.infer(models[i][0], inputs[i])
        seconds = time.perf_counter() - started
        peak = rss.stop()
        status = client.status()
        client.shutdown()
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    loads = sum(m["loads"] for m in status["models"])
    gpu = (
        {k: v for k, v in status.get("devices", {}).items() if k.startswith("cuda")}
        if device != "CPU"
        else {}
    )
    return {
        "gpu_status": gpu,
        "way": f"server, {policy}" + (f", {device}" if device != "CPU" else ""),
        "hit_ratio": 1 - loads / len(trace),
        "loads": loads,
        "peak_rss_mib": peak / MiB,
        "requests_per_s": len(trace) / seconds,
    }


def run_count_lru(models, trace, count: int) -> dict[str, Any]:
    mappings = [KeyModelMapping([k], PytorchModelHandlerTensor(p, TraceBlob, {"d": d})) for k, p, d in models]
    keyed = KeyedModelHandler(mappings, max_models_per_worker_hint=count)
    holder = keyed.load_model()
    loads = 0
    original = holder.model_for

    def counting(index: int) -> Any:
        nonlocal loads
        if index not in holder._local:
            loads += 1
        return original(index)

    holder.model_for = counting  # type: ignore[method-assign]
    inputs = [torch.randn(ROWS, d) for _, _, d in models]
    rss = PeakRss(os.getpid())
    started = time.perf_counter()
    with torch.inference_mode():
        for i in progress(trace, "count"):
            holder.model_for(i)(inputs[i])
    seconds = time.perf_counter() - started
    peak = rss.stop()
    return {
        "way": f"in-process, max_models_per_worker_hint={count}",
        "hit_ratio": 1 - loads / len(trace),
        "loads": loads,
        "peak_rss_mib": peak / MiB,
        "requests_per_s": len(trace) / seconds,
    }


def progress(items: list[int], label: str):
    from tqdm import tqdm

    return tqdm(items, desc=label, unit="req", leave=False, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.keyed_trace", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--budget-mib", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="the JSON results file (default in bench/results)")
    parser.add_argument(
        "--device", default="CPU", help="CPU, or a GPU (cuda:N): the budget is then that GPU's"
    )
    args = parser.parse_args(argv)
    started = time.time()
    budget = args.budget_mib * MiB
    count = max(1, round(args.budget_mib / (sum(SIZES_MIB) / len(SIZES_MIB))))
    with tempfile.TemporaryDirectory(prefix="bl-trace-") as directory:
        os.chmod(directory, 0o700)
        models = make_models(directory)
        trace = zipf_trace(args.requests, len(models), args.seed)
        rows = [
            run_server(models, trace, "gdsf", budget, directory, args.device),
            run_server(models, trace, "lru", budget, directory, args.device),
        ]
        if args.device == "CPU":
            rows.append(run_count_lru(models, trace, count))
    print(f"\nkeyed trace: {args.requests} requests, zipf s=1.1 over {len(SIZES_MIB)} models "
          f"({sum(SIZES_MIB)} MiB in all), budget {args.budget_mib} MiB (count cap {count})")  # fmt: skip
    print(f"{'way':<42} {'hit ratio':>9} {'loads':>6} {'peak RSS above base':>20} {'req/s':>8}")
    for r in rows:
        print(
            f"{r['way']:<42} {r['hit_ratio']:>9.3f} {r['loads']:>6} {r['peak_rss_mib']:>16.0f} MiB "
            f"{r['requests_per_s']:>8.1f}"
        )
    for r in rows:
        for name, dev in r.get("gpu_status", {}).items():
            print(f"{r['way']}: {name} at the end: {dev}")
    out = write_results(args.json, "keyed-trace", started, {"args": vars(args), "rows": rows})
    print(f"results in {os.path.relpath(out)}")
    title = (
        f"Hit ratio by policy: {args.requests} zipf requests, {args.budget_mib} MiB budget over "
        f"{sum(SIZES_MIB)} MiB" + (f" on {args.device}" if args.device != "CPU" else "")
    )
    plots.hit_ratios(rows, out, title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
