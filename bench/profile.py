"""Where each millisecond of a batch goes, in-process and through the model server.

    python -m bench.profile [--rows N] [--passes N] [--batch N] [--warmup N] [--device cuda]

Runs the standard workload of ``bench.compare`` benchmark 1 (the MLP 512-2048-2048-16,
batches of 64 rows) batch by batch, first with the model in this process, then through
a model server, and prints each stage's median and p99 per batch side by side:

    in-process   assemble (stacking the batch's rows), forward (the model call)
    server path  assemble (the same stacking, in the client); the client's encode, send,
                 wait and decode; within the wait, the server's queue, assemble, forward
                 and encode (the reply's ``stages``); transport, what the server's stages
                 leave of the wait (the socket both ways, reading and dispatching the
                 request, scheduling); client other, what the client's stages leave of
                 the call (the connection pool, building the request)

RunInference's per-element work (batching the elements, wrapping each result) is the
same on both paths and left out. ``--server-args '--no-metrics'``: a server that records
no stage times (the server's rows then stay empty). Progress goes to stderr, the table to
stdout, and every figure to ``bench/results/profile-<time>.json``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections import defaultdict
from collections.abc import Callable

import torch
from tqdm import tqdm

from bench import common
from bench.common import BenchMLP, median, percentile
from client.serverclient import ServerClient
from client.stages import CLIENT_STAGES
from modelserver import userclass
from modelserver.loaders import ModelSpec

CHUNK = 25  # batches each path runs before the other takes its turn
IN_PROCESS = ("assemble", "forward")
SERVER_PATH = (
    "assemble",
    "encode",
    "send",
    "server_queue",
    "server_assemble",
    "server_forward",
    "server_encode",
    "transport",
    "decode",
    "client_other",
)
LABELS = {
    "assemble": "assemble (stack rows)",
    "forward": "forward",
    "encode": "client encode",
    "send": "client send",
    "server_queue": "  server queue",
    "server_assemble": "  server assemble",
    "server_forward": "  server forward",
    "server_encode": "  server encode",
    "transport": "  transport (rest of wait)",
    "decode": "client decode",
    "client_other": "client other",
    "total": "total per batch",
}


Times = dict[str, list[float]]


def profile_in_process(
    model: torch.nn.Module, batches: list[list[torch.Tensor]], device: torch.device, times: Times
) -> None:
    """Each batch's stages with the model in this process, in seconds, added to ``times``."""
    with torch.inference_mode():
        for rows in batches:
            t0 = time.perf_counter()
            x = torch.stack(rows).to(device)
            t1 = time.perf_counter()
            model(x).cpu()
            t2 = time.perf_counter()
            times["assemble"].append(t1 - t0)
            times["forward"].append(t2 - t1)
            times["total"].append(t2 - t0)


def profile_server(client: ServerClient, key: str, batches: list[list[torch.Tensor]], times: Times) -> None:
    """Each batch's stages through the model server, in seconds (``client.stages``), added
    to ``times``."""
    for rows in batches:
        t0 = time.perf_counter()
        x = torch.stack(rows)
        t1 = time.perf_counter()
        client.infer(key, x)
        t2 = time.perf_counter()
        stages = client.last_stages()
        times["assemble"].append(t1 - t0)
        for name in SERVER_PATH[1:-1]:
            if name in stages:
                times[name].append(stages[name])
        on_wire = sum(stages[s] for s in CLIENT_STAGES)
        times["client_other"].append(max(0.0, (t2 - t1) - on_wire))
        times["total"].append(t2 - t0)


def summarise(times: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Per stage: median, p99 and mean in milliseconds, and the batches counted."""
    return {
        name: {
            "median_ms": median(v) * 1e3,
            "p99_ms": percentile(v, 99) * 1e3,
            "mean_ms": sum(v) / len(v) * 1e3,
            "batches": len(v),
        }
        for name, v in times.items()
        if v
    }


def render(local: dict[str, dict[str, float]], remote: dict[str, dict[str, float]]) -> str:
    """The side-by-side table: each stage's median and p99 per batch, in ms."""
    lines = [
        f"{'per batch, ms':<28} {'in-process':>21} {'server path':>21}",
        f"{'':<28} {'median':>10} {'p99':>10} {'median':>10} {'p99':>10}",
    ]

    def cell(summary: dict[str, dict[str, float]], name: str) -> str:
        s = summary.get(name)
        return f"{'-':>10} {'-':>10}" if s is None else f"{s['median_ms']:>10.3f} {s['p99_ms']:>10.3f}"

    for name in ("assemble", "forward", *SERVER_PATH[1:], "total"):
        lines.append(f"{LABELS[name]:<28} {cell(local, name)} {cell(remote, name)}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Times]:
    """Both paths, warm-up first, then taking turns every ``CHUNK`` batches (so a busy
    spell on a shared machine falls on both); each one's figures."""
    device = torch.device(args.device)
    data = common.make_rows(args.rows, 512, seed=0)
    examples = list(data.unbind(0))
    one_pass = [examples[i : i + args.batch] for i in range(0, len(examples), args.batch)]
    batches = one_pass * args.passes
    warm = one_pass[: args.warmup]
    results: dict[str, Times] = {
        "in_process": {k: [] for k in (*IN_PROCESS, "total")},
        "server": {k: [] for k in (*SERVER_PATH, "total")},
    }
    with common.private_dir() as directory, common.model_server(*args.server_args) as srv:
        state = os.path.join(directory, "mlp.pt")
        common.save_state_dict(BenchMLP, {}, state)
        model = BenchMLP()
        model.load_state_dict(torch.load(state, weights_only=True))
        model.eval().to(device)
        on = "GPU" if device.type == "cuda" else "CPU"
        spec = ModelSpec("pytorch_state_dict", state, userclass.describe(BenchMLP), {}, on)
        with ServerClient(srv.path, autostart=False) as client:
            client.load("mlp", spec)
            paths: dict[str, Callable[[list[list[torch.Tensor]], Times], None]] = {
                "in_process": lambda b, t: profile_in_process(model, b, device, t),
                "server": lambda b, t: profile_server(client, "mlp", b, t),
            }
            total = 2 * (len(warm) + len(batches))
            with tqdm(total=total, desc="batches", unit=" batch", file=sys.stderr) as bar:
                for path in paths.values():
                    path(warm, defaultdict(list))  # not counted
                    bar.update(len(warm))
                for start in range(0, len(batches), CHUNK):
                    chunk = batches[start : start + CHUNK]
                    for name, path in paths.items():
                        path(chunk, results[name])
                        bar.update(len(chunk))
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=20_000, help="rows of one pass (default 20000)")
    p.add_argument("--batch", type=int, default=64, help="rows per batch (default 64)")
    p.add_argument("--passes", type=int, default=2, help="timed passes over the rows, per path (default 2)")
    p.add_argument("--warmup", type=int, default=20, help="batches run first and not counted (default 20)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the model runs")
    server = "extra arguments for the model server, e.g. '--threads 1' or '--no-metrics'"
    p.add_argument("--server-args", type=shlex.split, default=[], metavar="ARGS", help=server)
    p.add_argument("--out", default=None, help="JSON path (default bench/results/profile-<time>.json)")
    args = p.parse_args(argv)
    if min(args.rows, args.batch, args.passes) < 1 or args.warmup < 0:
        p.error("--rows, --batch and --passes must be at least 1, --warmup at least 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    times = run(args)
    local, remote = summarise(times["in_process"]), summarise(times["server"])
    print(render(local, remote))
    hop = remote["total"]["median_ms"] - local["total"]["median_ms"]
    print(f"\nthe server hop costs {hop:.3f} ms per {args.batch}-row batch (medians)")
    payload = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "elapsed_seconds": time.time() - started,
        "options": vars(args),
        "machine": common.machine_info(),
        "in_process": local,
        "server": remote,
        "server_hop_ms_median": hop,
    }
    out = common.write_results(args.out, "profile", started, payload)
    print(f"results in {os.path.relpath(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
