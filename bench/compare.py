"""Whole-path benchmarks, each measured against its baseline in the same run, as ratios.

    python -m bench.compare [--only 1,2,3,4] [--rows N] [--repeats N] [--iterations N] [--device cuda]

1. throughput  MLP 512-2048-2048-16, batches of 64: elements/s through RunInference with
               large_model=True (the model server), over a raw torch loop in this process.
               Target >= 0.90. ``--device cuda``: the model on the GPU (device="GPU"; the
               server places it), against a raw loop on the GPU that also moves each
               batch there and its output back.
2. round trip  a 1-row request to torch.nn.Identity in the server, by Channel and by
               ServerClient.infer, over a plain msgpack echo over a Unix socket.
               Target <= 3x (medians).
3. bulk        a 64 MiB float32 batch to Identity and back: effective bandwidth (2 x 64 MiB
               moved) over memcpy bandwidth (np.copyto), through shared memory (the
               channel's default). Target >= 0.50. Also shown: the same through the
               socket only (a channel with shm_bytes=0), the path before shared memory.
4. memory      4 worker processes using a 256 MiB model via the server (workers + server)
               versus each worker loading it: summed RSS, PSS and USS, and their ratios.
5. batch-1     4 worker processes x 4 threads, each RunInference call carrying one element
               (WideMLP 2048 x 4, 64 MiB; --b1-width 0: the MLP of 1): calls/s through the
               model server, which merges them across workers, over the same workers each
               with the model in-process. Target >= 3x.

Progress goes to stderr, the table to stdout, and every figure to
``bench/results/compare-<time>.json``; beside it, the CDFs of the per-call latencies of
2 and 5 (``bench.plots``).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psutil
import torch

from bench import common, plots
from bench.common import BenchMLP, Progress, WideMLP, median, percentile
from bench.echo import EchoClient
from client import PytorchModelHandlerTensor, RunInference
from client.serverclient import ServerClient
from modelserver.channel import Channel

MiB = 1024 * 1024


@dataclass
class Row:
    """One line of the result table."""

    bench: str
    what: str
    value: str
    baseline: str
    ratio: float | None
    target: str = ""
    passed: bool | None = None

    @property
    def verdict(self) -> str:
        if self.passed is None:
            return "-"
        return "PASS" if self.passed else "MISS"


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # per-call latencies (us) for the latency CDF plot, by panel and series; not in the JSON
    latencies: dict[str, dict[str, list[float]]] = field(default_factory=dict)


# -- 1. throughput ---------------------------------------------------------------------------
def bench_throughput(args: argparse.Namespace, report: Report, progress: Progress) -> None:
    b = args.batch
    device = torch.device(args.device)
    on = "GPU" if device.type == "cuda" else "CPU"
    data = common.make_rows(args.rows, 512, seed=0)
    batches = list(data.split(b))
    examples = list(data.unbind(0))
    with common.private_dir() as directory, common.model_server(*args.server_args) as srv:
        state = os.path.join(directory, "mlp.pt")
        common.save_state_dict(BenchMLP, {}, state)
        server_handler = PytorchModelHandlerTensor(
            state,
            BenchMLP,
            {},
            on,
            min_batch_size=b,
            max_batch_size=b,
            large_model=True,
            socket_path=srv.path,
        )
        local_handler = PytorchModelHandlerTensor(state, BenchMLP, {}, on, min_batch_size=b, max_batch_size=b)
        model = BenchMLP()
        model.load_state_dict(torch.load(state, weights_only=True))
        model.eval().to(device)

        def raw() -> int:
            outs = []
            with torch.inference_mode():
                for x in batches:  # to the device and back, as RunInference's results come back
                    outs.append(model(x.to(device)).cpu())
            return sum(len(o) for o in outs)

        def via_server() -> int:
            return len(list(examples | RunInference(server_handler)))

        def in_process() -> int:
            return len(list(examples | RunInference(local_handler)))

        progress(
            f"1 throughput: warm-up ({args.rows} rows, batch {b}, on {device}, "
            f"torch threads {torch.get_num_threads()})"
        )
        warm = examples[: 20 * b]
        got = [r.inference for r in warm | RunInference(server_handler)]
        with torch.inference_mode():
            want = model(torch.stack(warm).to(device)).cpu()
        max_err = float((torch.stack(got) - want).abs().max())
        if max_err > 1e-4:
            raise AssertionError(f"server outputs differ from torch's by {max_err}")
        list(warm | RunInference(local_handler))
        with torch.inference_mode():
            for x in batches[:20]:
                model(x.to(device)).cpu()

        kinds: dict[str, Callable[[], int]] = {
            "raw_torch": raw,
            "runinference_server": via_server,
            "runinference_in_process": in_process,
        }
        names = list(kinds)
        seconds: dict[str, list[float]] = {k: [] for k in kinds}
        load: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
        busy: list[float] = []
        with srv.channel() as ch:
            for r in range(args.repeats):
                order = names[r % len(names) :] + names[: r % len(names)]  # rotate: no fixed position
                for name in order:
                    before = _busy_seconds(ch) if name == "runinference_server" else 0.0
                    meter = common.LoadMeter().start()
                    t0 = time.perf_counter()
                    n = kinds[name]()
                    dt = time.perf_counter() - t0
                    load[name].append(meter.stop())
                    if n != args.rows:
                        raise AssertionError(f"{name} returned {n} results for {args.rows} rows")
                    seconds[name].append(dt)
                    if name == "runinference_server":
                        busy.append((_busy_seconds(ch) - before) / dt)
                    progress(
                        f"1 throughput: repeat {r + 1}/{args.repeats} {name:<24} {args.rows / dt:>9,.0f} el/s"
                        f"  (other load {load[name][-1]['foreign']:.0%})"
                    )

    rate = {k: args.rows / median(v) for k, v in seconds.items()}
    ratio = rate["runinference_server"] / rate["raw_torch"]
    in_proc_ratio = rate["runinference_in_process"] / rate["raw_torch"]
    paired = [raw_s / srv_s for raw_s, srv_s in zip(seconds["raw_torch"], seconds["runinference_server"])]
    report.results["throughput"] = {
        "device": str(device),
        "rows": args.rows,
        "batch": b,
        "seconds": seconds,
        "elements_per_second_median": rate,
        "ratio_server_over_raw": ratio,
        "ratio_server_over_raw_paired_median": median(paired),
        "ratio_in_process_over_raw": in_proc_ratio,
        "server_batcher_busy_share": busy,
        "other_load": load,
        "max_abs_error_vs_torch": max_err,
        "target": ">= 0.90",
    }
    report.notes.append(_load_note("1", [x["foreign"] for runs in load.values() for x in runs]))
    report.rows.append(
        Row(
            "1",
            f"MLP el/s{' on ' + str(device) if device.type != 'cpu' else ''}, RunInference via server",
            f"{rate['runinference_server']:,.0f}/s",
            f"raw torch {rate['raw_torch']:,.0f}/s",
            ratio,
            ">= 0.90",
            ratio >= 0.90,
        )
    )
    n_batches = len(batches)
    busy_ms = median([share * t for share, t in zip(busy, seconds["runinference_server"])]) / n_batches * 1e3
    report.rows.append(
        Row(
            "1",
            "  (info) server batcher busy per batch",
            f"{busy_ms:.2f}ms",
            f"raw forward {median(seconds['raw_torch']) / n_batches * 1e3:.2f}ms",
            None,
        )
    )
    report.rows.append(
        Row(
            "1",
            "  (info) RunInference in-process",
            f"{rate['runinference_in_process']:,.0f}/s",
            "raw torch",
            in_proc_ratio,
        )
    )


def _busy_seconds(ch: Any) -> float:
    models = ch.request({"op": "status"})["status"]["models"]
    return float(sum(m.get("busy_seconds", 0.0) for m in models))


def _load_note(bench: str, loads: list[float]) -> str:
    """A line saying how many timed runs other processes disturbed (>10% of the CPUs)."""
    bad = [x for x in loads if x > 0.10]
    if not bad:
        return (
            f"{bench}: no timed run was disturbed (other processes used at most {max(loads):.0%} of the CPUs)"
        )
    verdict = (
        "medians are robust to a minority of them"
        if len(bad) * 2 < len(loads)
        else "figures unreliable: rerun on a quieter machine (--wait-quiet)"
    )
    return (
        f"{bench}: {len(bad)} of {len(loads)} timed runs disturbed by other processes "
        f"(up to {max(bad):.0%} of the CPUs); {verdict}"
    )


# -- 2. round trip ---------------------------------------------------------------------------
def bench_roundtrip(args: argparse.Namespace, report: Report, progress: Progress) -> None:
    n = args.iterations
    chunk = max(1, min(1000, n // 5))
    x = torch.zeros(1, 4)
    echo_msg = {"op": "infer", "key": "identity", "id": 0, "inputs": bytes(16), "kwargs": {}}
    with common.model_server(*args.server_args) as srv, common.echo_server() as echo:
        ch = srv.channel()
        client = ServerClient(srv.path, autostart=False)
        echo_client = EchoClient(echo.path)
        try:
            ch.request({"op": "load", "key": "identity", "spec": common.identity_spec().to_wire()})
            reply = ch.request({"op": "infer", "key": "identity", "inputs": x})
            if not torch.equal(reply["outputs"], x):
                raise AssertionError("Identity did not return its input")

            def by_channel() -> None:
                ch.request({"op": "infer", "key": "identity", "inputs": x})

            def by_client() -> None:
                client.infer("identity", x)

            def by_echo() -> None:
                echo_client.request(echo_msg)

            kinds = {"channel": by_channel, "serverclient": by_client, "msgpack_echo": by_echo}
            progress(f"2 round trip: warm-up, then {n} iterations of each, interleaved in chunks of {chunk}")
            for fn in kinds.values():
                for _ in range(min(500, n)):
                    fn()
            samples: dict[str, list[float]] = {k: [] for k in kinds}
            load = []
            done = 0
            while done < n:
                step = min(chunk, n - done)
                meter = common.LoadMeter().start()
                for name, fn in kinds.items():
                    samples[name].extend(_time_calls(fn, step))
                load.append(meter.stop())
                done += step
                progress(
                    f"2 round trip: {done}/{n}  "
                    + "  ".join(f"{k} {median(v[-step:]):.1f}us" for k, v in samples.items())
                    + f"  (other load {load[-1]['foreign']:.0%})"
                )
        finally:
            echo_client.close()
            client.close()
            ch.close()

    stats = {
        k: {
            "median_us": median(v),
            "p99_us": percentile(v, 99),
            "mean_us": sum(v) / len(v),
            "min_us": min(v),
        }
        for k, v in samples.items()
    }
    report.latencies["1-row round trip, Identity"] = {
        "msgpack echo": samples["msgpack_echo"],
        "Channel": samples["channel"],
        "ServerClient": samples["serverclient"],
    }
    base = stats["msgpack_echo"]
    report.results["round_trip"] = {
        "iterations": n,
        "stats": stats,
        "other_load": load,
        "target": "<= 3x (median)",
    }
    report.notes.append(_load_note("2", [x["foreign"] for x in load]))
    report.rows.append(Row("2", "1-row echo baseline (msgpack, UDS)", _us(base), "-", None))
    for name, label in (
        ("channel", "1-row round trip, Channel"),
        ("serverclient", "1-row round trip, ServerClient"),
    ):
        ratio = stats[name]["median_us"] / base["median_us"]
        p99_ratio = stats[name]["p99_us"] / base["p99_us"]
        report.results["round_trip"][f"ratio_{name}_median"] = ratio
        report.results["round_trip"][f"ratio_{name}_p99"] = p99_ratio
        report.rows.append(Row("2", label, _us(stats[name]), "echo", ratio, "<= 3x", ratio <= 3.0))
        report.rows.append(Row("2", f"  (info) {name} p99 / echo p99", "", "", p99_ratio))


def _time_calls(fn: Callable[[], None], n: int) -> list[float]:
    out = []
    clock = time.perf_counter_ns
    for _ in range(n):
        t0 = clock()
        fn()
        out.append((clock() - t0) / 1000.0)
    return out


def _us(s: dict[str, float]) -> str:
    return f"{s['median_us']:.1f}us (p99 {s['p99_us']:.0f})"


# -- 3. bulk transfer ------------------------------------------------------------------------
def bench_bulk(args: argparse.Namespace, report: Report, progress: Progress) -> None:
    rows = args.bulk_mib * MiB // (1024 * 4)
    x = common.make_rows(rows, 1024, seed=2)
    nbytes = x.numel() * x.element_size()
    src = x.numpy()
    dst = np.empty_like(src)
    reps = args.bulk_repeats

    progress(f"3 bulk: memcpy baseline, {reps} copies of {nbytes / MiB:.0f} MiB")
    np.copyto(dst, src)
    warm_copy = []
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        warm_copy.append(time.perf_counter() - t0)
    fresh_copy = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fresh = np.empty_like(src)
        np.copyto(fresh, src)
        fresh_copy.append(time.perf_counter() - t0)
        del fresh

    with common.model_server(*args.server_args) as srv:
        trips, load = _bulk_trips(srv, x, reps, progress, shm_bytes=None)
        socket_trips, _ = _bulk_trips(srv, x, reps, progress, shm_bytes=0)
    report.notes.append(_load_note("3", [load["foreign"]]))

    t = median(trips)
    bw = 2 * nbytes / t
    socket_bw = 2 * nbytes / median(socket_trips)
    memcpy_bw = nbytes / median(warm_copy)
    fresh_bw = nbytes / median(fresh_copy)
    ratio = bw / memcpy_bw
    report.results["bulk"] = {
        "bytes": nbytes,
        "round_trip_seconds": trips,
        "effective_bandwidth_Bps": bw,
        "socket_round_trip_seconds": socket_trips,
        "socket_effective_bandwidth_Bps": socket_bw,
        "memcpy_seconds": warm_copy,
        "memcpy_bandwidth_Bps": memcpy_bw,
        "memcpy_fresh_destination_seconds": fresh_copy,
        "memcpy_fresh_destination_bandwidth_Bps": fresh_bw,
        "ratio_effective_over_memcpy": ratio,
        "ratio_socket_over_memcpy": socket_bw / memcpy_bw,
        "ratio_effective_over_fresh_memcpy": bw / fresh_bw,
        "other_load": load,
        "target": ">= 0.50",
    }
    report.rows.append(
        Row(
            "3",
            f"{nbytes / MiB:.0f} MiB to Identity and back",
            f"{t * 1000:.1f}ms = {bw / 1e9:.2f} GB/s",
            f"memcpy {memcpy_bw / 1e9:.2f} GB/s",
            ratio,
            ">= 0.50",
            ratio >= 0.50,
        )
    )
    report.rows.append(
        Row(
            "3",
            "  (info) the same through the socket",
            f"{median(socket_trips) * 1000:.1f}ms = {socket_bw / 1e9:.2f} GB/s",
            f"memcpy {memcpy_bw / 1e9:.2f} GB/s",
            socket_bw / memcpy_bw,
        )
    )
    report.rows.append(
        Row("3", "  (info) vs memcpy into fresh pages", "", f"{fresh_bw / 1e9:.2f} GB/s", bw / fresh_bw)
    )


def _bulk_trips(
    srv: common.ServerProcess, x: torch.Tensor, reps: int, progress: Progress, shm_bytes: int | None
) -> tuple[list[float], dict[str, float]]:
    """``reps`` timed round trips of ``x`` through Identity on a new channel (after a
    checked warm-up), and the other processes' load meanwhile. ``shm_bytes``: the
    channel's shared memory (None: the default; 0: none, the socket only)."""
    path = "the socket" if shm_bytes == 0 else "shared memory"
    with Channel(srv.path, shm_bytes=shm_bytes) as ch:
        ch.request({"op": "load", "key": "identity", "spec": common.identity_spec().to_wire()})
        progress(
            f"3 bulk: warm-up, then {reps} round trips of {x.nbytes / MiB:.0f} MiB through Identity ({path})"
        )
        out = ch.request({"op": "infer", "key": "identity", "inputs": x})["outputs"]
        if not torch.equal(out, x):
            raise AssertionError(f"the {x.nbytes / MiB:.0f} MiB batch came back changed ({path})")
        del out
        trips = []
        meter = common.LoadMeter().start()
        for _ in range(reps):
            t0 = time.perf_counter()
            out = ch.request({"op": "infer", "key": "identity", "inputs": x})["outputs"]
            trips.append(time.perf_counter() - t0)
            del out
        return trips, meter.stop()


# -- 4. memory -------------------------------------------------------------------------------
def bench_memory(args: argparse.Namespace, report: Report, progress: Progress) -> None:
    params = {"width": args.width, "depth": 4}
    with common.private_dir() as directory:
        state = os.path.join(directory, "wide.pt")
        model_bytes = common.save_state_dict(WideMLP, params, state)
        progress(f"4 memory: {args.workers} workers, model {model_bytes / MiB:.0f} MiB, in-process")
        local = _memory_run(args, state, params, None, progress)
        with common.model_server(*args.server_args) as srv:
            progress(f"4 memory: {args.workers} workers via the model server (pid {srv.pid})")
            served = _memory_run(args, state, params, srv, progress)
            with srv.channel() as ch:
                (m,) = ch.request({"op": "status"})["status"]["models"]
            served["server_model"] = {
                k: m.get(k) for k in ("nbytes", "footprint", "loads", "requests", "rows")
            }

    ratios = {k: served["total"][k] / local["total"][k] for k in ("rss", "pss", "uss")}
    saved = {k: local["total"][k] - served["total"][k] for k in ("rss", "pss", "uss")}
    report.results["memory"] = {
        "workers": args.workers,
        "model_bytes": model_bytes,
        "in_process": local,
        "via_server": served,
        "ratio_server_over_in_process": ratios,
        "saved_bytes": saved,
        "ideal_saving_bytes": (args.workers - 1) * model_bytes,
    }
    for key in ("pss", "rss", "uss"):
        report.rows.append(
            Row(
                "4",
                f"{args.workers} workers + server, sum {key.upper()}",
                _mib(served["total"][key]),
                f"in-process {_mib(local['total'][key])}",
                ratios[key],
            )
        )
    report.rows.append(
        Row(
            "4",
            "  (info) PSS saved / ideal (N-1) x model",
            _mib(saved["pss"]),
            _mib((args.workers - 1) * model_bytes),
            saved["pss"] / ((args.workers - 1) * model_bytes),
        )
    )


def _memory_run(
    args: argparse.Namespace,
    state: str,
    params: dict[str, Any],
    srv: common.ServerProcess | None,
    progress: Progress,
) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    procs = []
    pipes = []
    try:
        for i in range(args.workers):
            p, conn = common.spawn_worker(
                ctx,
                common.memory_worker,
                (srv is not None, state, params, srv.path if srv else None, 3, 16),
                f"bench-memory-worker-{i}",
                daemon=True,
            )
            procs.append(p)
            pipes.append(conn)
        for i, conn in enumerate(pipes):
            common.report_of(conn, f"memory worker {i}", "ready", 300)
        pids = {f"worker{i}": p.pid for i, p in enumerate(procs)}
        if srv is not None:
            pids["server"] = srv.pid
        per = {}
        for name, pid in pids.items():
            info = psutil.Process(pid).memory_full_info()
            per[name] = {"pid": pid, "rss": info.rss, "pss": info.pss, "uss": info.uss}
        total = {k: sum(v[k] for v in per.values()) for k in ("rss", "pss", "uss")}
        progress(
            f"4 memory: {'server' if srv else 'in-process'}: RSS {_mib(total['rss'])}, "
            f"PSS {_mib(total['pss'])}, USS {_mib(total['uss'])}"
        )
        return {"processes": per, "total": total}
    finally:
        common.stop_workers(pipes, procs, "exit")


# -- 5. batch-1 traffic from several workers -------------------------------------------------
def bench_batch1(args: argparse.Namespace, report: Report, progress: Progress) -> None:
    from bench import batch1

    procs, threads, calls, width = args.b1_workers, args.b1_threads, args.b1_calls, args.b1_width
    with common.private_dir() as directory, common.model_server(*args.server_args) as srv:
        state = os.path.join(directory, "mlp.pt")
        if width:
            common.save_state_dict(WideMLP, {"width": width, "depth": 4}, state)
        else:
            common.save_state_dict(BenchMLP, {}, state)
        kinds = {"server": srv.path, "in_process": None}
        rates: dict[str, list[float]] = {k: [] for k in kinds}
        latency: dict[str, list[float]] = {k: [] for k in kinds}
        load: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
        server_threads: list[int] = []
        for r in range(args.repeats):
            for name in list(kinds) if r % 2 == 0 else list(reversed(kinds)):
                meter = common.LoadMeter().start()
                total, seconds, calls_us = _batch1_run(
                    batch1.worker, state, kinds[name], procs, threads, calls, width
                )
                load[name].append(meter.stop())
                latency[name].extend(calls_us)
                rates[name].append(total / seconds)
                if name == "server":
                    server_threads.append(psutil.Process(srv.pid).num_threads())
                progress(
                    f"5 batch-1: repeat {r + 1}/{args.repeats} {name:<10} {total / seconds:>8,.0f} calls/s"
                    f"  (other load {load[name][-1]['foreign']:.0%})"
                )
        with srv.channel() as ch:
            (m,) = ch.request({"op": "status"})["status"]["models"]
    rate = {k: median(v) for k, v in rates.items()}
    ratio = rate["server"] / rate["in_process"]
    report.results["batch1"] = {
        "workers": procs,
        "threads": threads,
        "calls_per_thread": calls,
        "model": f"WideMLP({width}, 4)" if width else "BenchMLP",
        "calls_per_second": rates,
        "calls_per_second_median": rate,
        "call_latency_us": {
            k: {"median": median(v), "p99": percentile(v, 99), "max": max(v)} for k, v in latency.items()
        },
        "ratio_server_over_in_process": ratio,
        "server_requests": m["requests"],
        "server_batches": m["batches"],
        "server_threads_after_each_run": server_threads,
        "other_load": load,
        "target": ">= 3",
    }
    report.latencies[f"batch-1 calls, {procs} workers x {threads} threads"] = {
        "in-process": latency["in_process"],
        "model server": latency["server"],
    }
    report.notes.append(_load_note("5", [x["foreign"] for runs in load.values() for x in runs]))
    report.rows.append(
        Row(
            "5",
            f"batch-1 calls/s, {procs} workers x {threads} threads, "
            + (f"WideMLP {width}x4" if width else "MLP")
            + ", via server",
            f"{rate['server']:,.0f}/s",
            f"in-process {rate['in_process']:,.0f}/s",
            ratio,
            ">= 3x",
            ratio >= 3.0,
        )
    )
    report.rows.append(
        Row(
            "5",
            "  (info) server rows per forward pass",
            f"{m['rows'] / max(1, m['batches']):.1f}",
            f"{m['requests']} requests",
            None,
        )
    )


def _batch1_run(
    target: Callable[..., None],
    state: str,
    path: str | None,
    procs: int,
    threads: int,
    calls: int,
    width: int,
) -> tuple[int, float, list[float]]:
    """One run: ``procs`` spawned workers start together; (calls made, seconds from the
    first worker's start to the last one's end, every call's latency in microseconds)."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(procs)
    pipes, workers = [], []
    try:
        for i in range(procs):
            p, conn = common.spawn_worker(
                ctx, target, (barrier, state, path, threads, calls, width), f"bench-batch1-{i}"
            )
            workers.append(p)
            pipes.append(conn)
        got = [common.report_of(conn, f"batch-1 worker {i}", "ok", 600) for i, conn in enumerate(pipes)]
    finally:
        for p in workers:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join()
    total = sum(n for n, _, _, _ in got)
    if total != procs * threads * calls:
        raise AssertionError(f"{total} of {procs * threads * calls} calls returned a 16-wide result")
    seconds = max(end for _, _, end, _ in got) - min(start for _, start, _, _ in got)
    return total, seconds, [us for *_, per_call in got for us in per_call]


def _mib(n: float) -> str:
    return f"{n / MiB:,.0f} MiB"


# -- the table and the run ---------------------------------------------------------------
def render(report: Report, machine: dict[str, Any]) -> str:
    head = (
        f"beamlet benchmarks - {machine['cpus_usable']} CPUs ({machine['cpu_model']}), "
        f"{machine['memory_bytes'] / 2**30:.0f} GiB, torch {machine['torch']} "
        f"({machine['torch_threads']} threads), CUDA {'yes' if machine['cuda'] else 'no'}"
    )
    cols = ("#", "measurement", "value", "baseline", "ratio", "target", "result")
    table = [
        (
            r.bench,
            r.what,
            r.value,
            r.baseline,
            "" if r.ratio is None else f"{r.ratio:.3f}",
            r.target,
            r.verdict,
        )
        for r in report.rows
    ]
    widths = [max(len(c), *(len(t[i]) for t in table)) if table else len(c) for i, c in enumerate(cols)]
    lines = [head, ""]
    fmt = "  ".join(f"{{:{'>' if i == 4 else '<'}{w}}}" for i, w in enumerate(widths))
    lines.append(fmt.format(*cols))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend(fmt.format(*t) for t in table)
    return "\n".join(lines)


def wait_until_quiet(limit: float, progress: Progress, threshold: float = 0.10) -> None:
    """Wait (at most ``limit`` seconds) until other processes leave the CPUs alone for a
    second: on a shared machine a concurrent test run halves every figure."""
    started = time.monotonic()
    said = -10.0
    while True:
        meter = common.LoadMeter().start()
        time.sleep(1.0)
        foreign = meter.stop()["foreign"]
        waited = time.monotonic() - started
        if foreign < threshold:
            if waited > 2:
                progress(f"machine quiet after {waited:.0f}s")
            return
        if waited > limit:
            progress(f"machine still busy ({foreign:.0%} used by other processes); going ahead")
            return
        if waited - said >= 10:
            progress(f"waiting for the machine to quiet down ({foreign:.0%} used by other processes)")
            said = waited


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="1,2,3,4,5", help="which benchmarks, e.g. 1,3 (default all)")
    p.add_argument("--rows", type=int, default=20_000, help="rows for the throughput benchmark")
    p.add_argument("--batch", type=int, default=64, help="batch size for the throughput benchmark")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each throughput variant")
    p.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="where the throughput benchmark's model runs (cuda: every variant on the GPU)",
    )
    p.add_argument("--iterations", type=int, default=5000, help="round trips of each kind")
    p.add_argument("--bulk-mib", type=int, default=64, help="size of the bulk batch")
    p.add_argument("--bulk-repeats", type=int, default=10, help="bulk round trips and memcpys")
    p.add_argument("--workers", type=int, default=4, help="worker processes in the memory benchmark")
    p.add_argument("--width", type=int, default=4096, help="memory model width (4 layers; 4096 = 256 MiB)")
    p.add_argument("--b1-workers", type=int, default=4, help="worker processes in the batch-1 benchmark")
    p.add_argument("--b1-threads", type=int, default=4, help="threads per worker in the batch-1 benchmark")
    p.add_argument("--b1-calls", type=int, default=100, help="one-element calls per thread (batch-1)")
    p.add_argument(
        "--b1-width",
        type=int,
        default=2048,
        help="batch-1 model: WideMLP of 4 square layers this wide (2048: 64 MiB); 0: the MLP of 1",
    )
    p.add_argument("--out", default=None, help="JSON path (default bench/results/compare-<time>.json)")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each benchmark, wait up to this long for other processes to leave the CPUs idle",
    )
    p.add_argument(
        "--server-args",
        type=shlex.split,
        default=[],
        metavar="ARGS",
        help="extra arguments for every model server, e.g. '--threads 1'",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    args = p.parse_args(argv)
    try:
        args.selected = sorted({int(s) for s in args.only.split(",") if s.strip()})
    except ValueError:
        p.error(f"--only takes numbers 1-5 separated by commas, not {args.only!r}")
    if not set(args.selected) <= set(BENCHMARKS):
        p.error("--only takes numbers 1-5")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    return args


BENCHMARKS: dict[int, Callable[[argparse.Namespace, Report, Progress], None]] = {
    1: bench_throughput,
    2: bench_roundtrip,
    3: bench_bulk,
    4: bench_memory,
    5: bench_batch1,
}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    progress = Progress(args.quiet)
    machine = common.machine_info()
    report = Report()
    started = time.time()
    for number in args.selected:
        if args.wait_quiet:
            wait_until_quiet(args.wait_quiet, progress)
        BENCHMARKS[number](args, report, progress)
    elapsed = time.time() - started
    print(render(report, machine))
    if report.notes:
        print("\n" + "\n".join(report.notes))
    missed = [r for r in report.rows if r.passed is False]
    options = {k: v for k, v in vars(args).items() if k != "selected"}
    payload = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "elapsed_seconds": elapsed,
        "options": options,
        "machine": machine,
        "results": report.results,
        "table": [{**r.__dict__, "verdict": r.verdict} for r in report.rows],
        "notes": report.notes,
    }
    out = common.write_results(args.out, "compare", started, payload)
    print(f"\n{len(missed)} target(s) missed; took {elapsed:.0f}s; results in {os.path.relpath(out)}")
    plots.latency_cdfs(report.latencies, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
