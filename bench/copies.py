"""model_copies 1 vs 2 vs 4 (issue 14): batch-8 traffic from 4 worker processes x 4
threads to one model server holding the model once, twice and four times (three keys,
the same checkpoint), requests/s and p99 latency as ratios to one copy, in one run.

Runs interleave (1, 2, 4, then 4, 2, 1, ...) so drift on a shared machine falls on every
setting alike; figures are medians over the repeats; each run's other-load share
(``common.LoadMeter``) is reported beside it. The workers are spawned once and drive
every run, each thread on its own pooled connection.

    python -m bench.copies [--repeats 3] [--calls 150] [--server-args "--threads 2"]
                           [--device CPU|GPU|cuda:N] [--copies 1,2,4]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shlex
import sys
import time
from typing import Any

import torch

from bench import common

COPIES: tuple[int, ...] = (1, 2, 4)


def worker(conn: Any, barrier: Any, socket_path: str, threads: int, calls: int, rows: int) -> None:
    """Wait for a key, then (with every worker, at ``barrier``) make ``threads`` x
    ``calls`` batch-``rows`` requests to it; send back (latencies, start, end) on the
    machine-wide monotonic clock. None ends the worker."""
    from client.serverclient import ServerClient

    try:
        client = ServerClient(socket_path, autostart=False)
        g = torch.Generator().manual_seed(os.getpid())
        xs = [torch.randn(rows, 512, generator=g) for _ in range(calls)]
        conn.send(("ready", None))
        while (key := conn.recv()) is not None:
            for x in xs[:5]:
                client.infer(key, x)
            latencies: list[list[float]] = [[] for _ in range(threads)]

            def work(t: int, key: str = key, into: list[list[float]] = latencies) -> None:
                for x in xs:
                    t0 = time.monotonic()
                    client.infer(key, x)
                    into[t].append(time.monotonic() - t0)

            barrier.wait(120)
            start = time.monotonic()
            common.run_threads(work, threads)
            conn.send(("ok", ([s for per in latencies for s in per], start, time.monotonic())))
    except BaseException as exc:  # reported to the parent
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


def run(args: argparse.Namespace) -> dict[str, Any]:
    from client.serverclient import ServerClient
    from modelserver import userclass
    from modelserver.loaders import ModelSpec

    ctx = multiprocessing.get_context("spawn")
    with common.private_dir() as directory, common.model_server(*args.server_args) as srv:
        state = os.path.join(directory, "mlp.pt")
        common.save_state_dict(common.BenchMLP, {}, state)
        spec = ModelSpec(
            "pytorch_state_dict", state, userclass.describe(common.BenchMLP), {}, device=args.device
        )
        with ServerClient(srv.path, autostart=False) as c:
            for n in COPIES:
                c.load(f"copies-{n}", spec, copies=n)
        barrier = ctx.Barrier(args.workers)
        pipes, procs = [], []
        rates: dict[int, list[float]] = {n: [] for n in COPIES}
        p99s: dict[int, list[float]] = {n: [] for n in COPIES}
        load: dict[int, list[float]] = {n: [] for n in COPIES}
        try:
            for i in range(args.workers):
                p, conn = common.spawn_worker(
                    ctx, worker, (barrier, srv.path, args.threads, args.calls, args.rows), f"bench-copies-{i}"
                )
                procs.append(p)
                pipes.append(conn)
            for i, conn in enumerate(pipes):
                common.report_of(conn, f"worker {i}", "ready", 300)
            for r in range(args.repeats):
                for n in COPIES if r % 2 == 0 else tuple(reversed(COPIES)):
                    meter = common.LoadMeter().start()
                    for conn in pipes:
                        conn.send(f"copies-{n}")
                    got = [common.report_of(conn, f"worker {i}", "ok", 300) for i, conn in enumerate(pipes)]
                    load[n].append(meter.stop()["foreign"])
                    lat = [s for per, _, _ in got for s in per]
                    seconds = max(e for _, _, e in got) - min(s for _, s, _ in got)
                    rates[n].append(len(lat) / seconds)
                    p99s[n].append(common.percentile(lat, 99) * 1e3)
                    print(
                        f"repeat {r + 1}/{args.repeats} copies={n}: {rates[n][-1]:8,.0f} requests/s, "
                        f"p99 {p99s[n][-1]:6.2f} ms (other load {load[n][-1]:.0%})",
                        flush=True,
                    )
        finally:
            common.stop_workers(pipes, procs, None)
        with srv.channel() as ch:
            models = ch.request({"op": "status"})["status"]["models"]
    per_copy = {m["key"]: [c["requests"] for c in m["copies"]] for m in models}
    rate = {n: common.median(v) for n, v in rates.items()}
    p99 = {n: common.median(v) for n, v in p99s.items()}
    return {
        "workers": args.workers,
        "threads": args.threads,
        "calls_per_thread": args.calls,
        "rows_per_request": args.rows,
        "model": "BenchMLP",
        "requests_per_second": rates,
        "p99_ms": p99s,
        "requests_per_second_median": rate,
        "p99_ms_median": p99,
        "throughput_ratio_to_one_copy": {n: rate[n] / rate[COPIES[0]] for n in COPIES},
        "p99_ratio_to_one_copy": {n: p99[n] / p99[COPIES[0]] for n in COPIES},
        "requests_per_copy": per_copy,
        "other_load": load,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.copies", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--calls", type=int, default=150, help="requests per thread per run")
    p.add_argument("--rows", type=int, default=8, help="rows per request")
    p.add_argument("--server-args", type=shlex.split, default=[], metavar="ARGS")
    p.add_argument("--out", default=None, help="the JSON results file")
    p.add_argument("--device", default="CPU", help="where the copies live: CPU, GPU or cuda:N")
    p.add_argument("--copies", default="1,2,4", help="the settings to compare, the first the baseline")
    args = p.parse_args(argv)
    global COPIES
    COPIES = tuple(int(n) for n in args.copies.split(","))
    started = time.time()
    result = run(args)
    rate, p99 = result["requests_per_second_median"], result["p99_ms_median"]
    print(
        f"\nmedians of {args.repeats} interleaved repeats, {args.workers} workers x {args.threads} threads:"
    )
    print(
        f"{'copies':>6} {'requests/s':>11} {'ratio':>6} {'p99 ms':>7} {'ratio':>6} {'other load (max)':>17}"
    )
    for n in COPIES:
        print(
            f"{n:>6} {rate[n]:>11,.0f} {rate[n] / rate[COPIES[0]]:>6.2f} {p99[n]:>7.2f} {p99[n] / p99[COPIES[0]]:>6.2f} "
            f"{max(result['other_load'][n]):>17.0%}"
        )
    print(f"requests per copy: {result['requests_per_copy']}")
    payload = {"machine": common.machine_info(), "options": vars(args), "results": result}
    out = common.write_results(args.out, "copies", started, payload)
    print(f"took {time.time() - started:.0f}s; results in {os.path.relpath(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
