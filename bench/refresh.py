"""Model refresh under load: swap a model's version while clients keep sending requests.

    python -m bench.refresh [--swaps 10] [--clients 4] [--rss-swaps 50] [--json PATH]

A model server holds one model (bench.common.BenchMLP widened to 64 MiB of weights).
``--clients`` threads send 8-row batches to it back to back, through the same client a
worker uses (``PytorchModelHandlerTensor(large_model=True)``'s RemoteModel). Once the
latency has settled, the checkpoint file is rewritten in place with new weights and the
handler is updated (``update_model_path``), ``--swaps`` times, one second apart: each
update loads the new version in the server and swaps it in.

Two budgets, in this order, in one invocation:

  beside       no memory budget: the new version loads beside the old one
  drain-first  a budget that holds one version only (--memory-budget 100MiB): the old
               version is drained and freed before the new one loads

Reported per budget: requests, failed requests (target 0), p50/p99 latency of requests
that completed outside any swap and of those that overlapped one, the longest gap
between consecutive completed results while a swap ran, the swap times, and that every
result after a swap came from the new version. Then ``--rss-swaps`` more swaps with no
load, and the server's RSS after the first five and after the last (a leak grows it).

The figures go to ``--json PATH`` (default ``bench/results/refresh-<time>.json``), and a
plot of the server's RSS after each of those swaps beside it (``bench.plots``).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psutil
import torch
from tqdm import tqdm

from bench import plots
from bench.common import (
    BenchMLP,
    LoadMeter,
    machine_info,
    model_server,
    percentile,
    private_dir,
    write_results,
)
from client import PytorchModelHandlerTensor
from client.serverclient import ServerClient

MiB = 1 << 20
PARAMS = {"d_in": 512, "hidden": 4000, "d_out": 16}  # about 69 MB of float32 weights
ROWS = 8


@dataclass
class Trace:
    """What the clients saw: (start, end, ok, model_id) per request."""

    records: list[tuple[float, float, bool, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, start: float, end: float, ok: bool, model_id: str) -> None:
        with self.lock:
            self.records.append((start, end, ok, model_id))


def write_version(path: str, seed: int) -> None:
    """New weights, written to a temporary file and renamed over the checkpoint."""
    torch.manual_seed(seed)
    model = BenchMLP(**PARAMS)
    torch.save(model.state_dict(), path + ".tmp")
    os.replace(path + ".tmp", path)


def client_loop(model: Any, stop: threading.Event, trace: Trace, seed: int) -> None:
    x = torch.randn(ROWS, PARAMS["d_in"], generator=torch.Generator().manual_seed(seed))
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            model(x)
            ok, model_id = True, model.last_model_id
        except Exception as exc:
            ok, model_id = False, f"{type(exc).__name__}: {exc}"
        trace.add(t0, time.perf_counter(), ok, model_id)


def run_budget(name: str, server_args: list[str], swaps: int, clients: int, rss_swaps: int) -> dict[str, Any]:
    with private_dir("blr-") as directory, model_server(*server_args) as server:
        path = os.path.join(directory, "model.pt")
        write_version(path, seed=0)
        handler = PytorchModelHandlerTensor(path, BenchMLP, PARAMS, large_model=True, socket_path=server.path)
        model = handler.load_model()
        trace, stop = Trace(), threading.Event()
        threads = [
            threading.Thread(target=client_loop, args=(model, stop, trace, i), daemon=True)
            for i in range(clients)
        ]
        meter = LoadMeter().start()
        for t in threads:
            t.start()
        stop.wait(2.0)  # warm-up and the "before" window: steady load, no swap
        windows: list[tuple[float, float]] = []
        revisions: list[str] = []
        for k in tqdm(range(1, swaps + 1), desc=f"{name}: swaps", unit="swap", file=sys.stderr):
            write_version(path, seed=k)
            handler.update_model_path(path)  # the same path, rewritten: a new version
            t0 = time.perf_counter()
            handler.load_model()  # the server loads it and swaps; the clients keep going
            windows.append((t0, time.perf_counter()))
            revisions.append(handler.model_spec().revision)
            stop.wait(1.0)
        stop.set()
        for t in threads:
            t.join(30)
        load = meter.stop()
        sc = ServerClient(server.path, autostart=False)
        status = sc.status()
        proc = psutil.Process(server.pid)
        rss = []
        for k in tqdm(range(rss_swaps), desc=f"{name}: RSS swaps", unit="swap", file=sys.stderr):
            write_version(path, seed=1000 + k)
            handler.update_model_path(path)
            handler.load_model()
            while sc.status()["retiring_versions"]:  # the old version is freed off-thread
                time.sleep(0.005)
            rss.append(proc.memory_info().rss)
        sc.close()
    return summarise(name, trace, windows, status, rss, load)


def summarise(
    name: str,
    trace: Trace,
    windows: list[tuple[float, float]],
    status: dict[str, Any],
    rss: list[int],
    load: dict[str, float],
) -> dict[str, Any]:
    records = sorted(trace.records, key=lambda r: r[1])
    first_swap = windows[0][0]

    def overlaps(start: float, end: float) -> bool:
        return any(start < w1 and end > w0 for w0, w1 in windows)

    before = [(e - s) * 1e3 for s, e, ok, _ in records if ok and e < first_swap]
    during = [(e - s) * 1e3 for s, e, ok, _ in records if ok and overlaps(s, e)]
    longest_gap = 0.0
    for w0, w1 in windows:
        ends = [w0] + [e for _s, e, _ok, _ in records if w0 <= e <= w1] + [w1]
        # The gap that spans the window's edge counts too: the result just after it.
        after = next((e for _s, e, _ok, _ in records if e > w1), w1)
        ends.append(after)
        longest_gap = max(longest_gap, max(b - a for a, b in zip(ends, ends[1:])))
    model = status["models"][0]
    return {
        "budget": name,
        "requests": len(records),
        "failed": sum(1 for r in records if not r[2]),
        "failures": sorted({r[3] for r in records if not r[2]})[:3],
        "p50_before_ms": percentile(before, 50),
        "p99_before_ms": percentile(before, 99),
        "p50_during_ms": percentile(during, 50),
        "p99_during_ms": percentile(during, 99),
        "requests_during": len(during),
        "longest_gap_during_swap_ms": longest_gap * 1e3,
        "swap_ms_median": percentile([(b - a) * 1e3 for a, b in windows], 50),
        "swap_ms_max": max((b - a) * 1e3 for a, b in windows),
        "server_swaps": model["swaps"],
        "footprint_mib": model["footprint"] / MiB,
        "rss_after_5_mib": rss[4] / MiB if len(rss) > 4 else float("nan"),
        "rss_after_last_mib": rss[-1] / MiB if rss else float("nan"),
        "rss_swaps": len(rss),
        "rss_mib": [round(x / MiB, 1) for x in rss],
        "foreign_cpu": load["foreign"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.refresh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--swaps", type=int, default=10)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rss-swaps", type=int, default=50)
    parser.add_argument("--json", default=None, help="the JSON results file (default in bench/results)")
    args = parser.parse_args(argv)
    started = time.time()
    rows = [
        run_budget("beside", ["--memory-budget", "none"], args.swaps, args.clients, args.rss_swaps),
        run_budget("drain-first", ["--memory-budget", "100MiB"], args.swaps, args.clients, args.rss_swaps),
    ]
    print(f"\nmodel refresh: {args.swaps} swaps of a {rows[0]['footprint_mib']:.0f} MiB model, "
          f"{args.clients} client threads sending {ROWS}-row batches back to back")  # fmt: skip
    header = (
        f"{'budget':<12} {'requests':>8} {'failed':>6} {'p50/p99 before':>15} {'p50/p99 during':>15} "
        f"{'longest gap':>11} {'swap median/max':>16} {'RSS after 5 -> after N swaps':>30}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['budget']:<12} {r['requests']:>8} {r['failed']:>6} "
            f"{r['p50_before_ms']:>6.1f}/{r['p99_before_ms']:<5.1f}ms {r['p50_during_ms']:>6.1f}/{r['p99_during_ms']:<5.1f}ms "
            f"{r['longest_gap_during_swap_ms']:>9.0f}ms {r['swap_ms_median']:>7.0f}/{r['swap_ms_max']:<5.0f}ms "
            f"{r['rss_after_5_mib']:>12.0f} -> {r['rss_after_last_mib']:.0f} MiB ({r['rss_swaps']} swaps)"
        )
        if r["failures"]:
            print(f"  failures: {r['failures']}")
        if r["foreign_cpu"] > 0.05:
            print(f"  note: other processes used {r['foreign_cpu']:.0%} of the CPUs during this run")
    payload = {"args": vars(args), "machine": machine_info(), "rows": rows}
    out = write_results(args.json, "refresh", started, payload)
    print(f"results in {os.path.relpath(out)}")
    plots.rss_over_swaps(
        {f"{r['budget']} ({r['footprint_mib']:.0f} MiB model)": r["rss_mib"] for r in rows}, out
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
