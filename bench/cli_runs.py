"""``python -m runtime run`` timed from outside: start-up and steady state, large_model
against in-process against a raw torch loop.

    python -m bench.cli_runs [--small 6400] [--large 38400] [--repeats 3] [--workers 2] [--threads 2]
                             [--compute-threads 1]

The MLP of ``bench.compare`` (512 -> 2048 -> 2048 -> 16), batch 64, in a pipeline file
``ReadFromNpy | RunInference | Map(label) | WriteToJsonLines`` written to a private temp
directory, run by the CLI as a user would (a fresh process each time, the model server
started by the run). Each mode runs on two input sizes; the steady-state rate is the
extra rows over the extra seconds, and start-up is what the small run took beyond its
rows at that rate. Runs are interleaved (mode and size rotate) and reported as medians,
with the share of the CPUs other processes took meanwhile. The raw loop runs the same
batches in this process, between the CLI runs. ``--compute-threads 1`` adds a
large_model mode whose server runs one forward at a time over all cores (the server's
default is one forward per core), to compare the two.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

import numpy as np
import torch

from bench import common
from bench.common import BenchMLP, median

PIPELINE = """
from bench.common import BenchMLP
from client import PytorchModelHandlerTensor
from runtime import Map, ReadFromNpy, RunInference, WriteToJsonLines

LARGE = {large}


def build_pipeline(input, output):
    handler = PytorchModelHandlerTensor(
        {state!r}, BenchMLP, {{}}, min_batch_size=64, max_batch_size=64, large_model=LARGE
    )
    return (
        ReadFromNpy(input)
        | RunInference(handler)
        | Map(lambda r: {{"label": int(r.inference.argmax())}})
        | WriteToJsonLines(output)
    )
"""


def cli_run(
    job: str, rows: str, out: str, sock: str, workers: int, threads: int, server_args: str = ""
) -> float:
    cmd = [sys.executable, "-m", "runtime", "run", job, "--input", rows, "--output", out]
    cmd += ["--workers", str(workers), "--threads", str(threads), "--socket", sock, "--no-progress"]
    if server_args:
        cmd += ["--server-args", server_args]
    started = time.perf_counter()
    subprocess.run(cmd, check=True, env=common.child_env(), cwd=common.ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def raw_rate(state: str, data: torch.Tensor) -> float:
    model = BenchMLP()
    model.load_state_dict(torch.load(state, weights_only=True))
    model.eval()
    started = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(data), 64):
            model(data[i : i + 64])
    return len(data) / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cli_runs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=6400)
    parser.add_argument("--large", type=int, default=38400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument(
        "--compute-threads",
        default="",
        metavar="K,...",
        help="also run large_model with the server's --compute-threads K, for each K (the default "
        "is one per core)",
    )
    args = parser.parse_args(argv)
    modes = {"large_model": True, "in_process": False}
    server_args = {"large_model": "", "in_process": ""}
    for k in filter(None, args.compute_threads.split(",")):
        modes[f"large_model_k{k}"] = True
        server_args[f"large_model_k{k}"] = f"--compute-threads {int(k)}"
    sizes = {"small": args.small, "large": args.large}
    seconds: dict[str, dict[str, list[float]]] = {m: {s: [] for s in sizes} for m in modes}
    foreign: list[float] = []
    raw: list[float] = []
    with common.private_dir("blcli-") as d:
        state = os.path.join(d, "mlp.pt")
        common.save_state_dict(BenchMLP, {}, state)
        data = common.make_rows(args.large, 512, seed=0)
        paths = {}
        for size, n in sizes.items():
            paths[size] = os.path.join(d, f"rows-{n}.npy")
            np.save(paths[size], data[:n].numpy())
        jobs = {}
        for mode, large in modes.items():
            jobs[mode] = os.path.join(d, f"job_{large}.py")
            with open(jobs[mode], "w") as f:
                f.write(PIPELINE.format(large=large, state=state))
        raw_rate(state, data[:1280])  # warm-up
        order = [(m, s) for m in modes for s in sizes]
        total = args.repeats * len(order)
        done = 0
        for r in range(args.repeats):
            rotated = order[r % len(order) :] + order[: r % len(order)]
            for mode, size in rotated:
                meter = common.LoadMeter().start()
                t = cli_run(jobs[mode], paths[size], os.path.join(d, "out.jsonl"), os.path.join(d, "ms.sock"),
                            args.workers, args.threads, server_args[mode])  # fmt: skip
                foreign.append(meter.stop()["foreign"])
                seconds[mode][size].append(t)
                done += 1
                print(f"[{done}/{total}] {mode:<11} {sizes[size]:>6} rows {t:6.2f}s "
                      f"(other load {foreign[-1]:.0%})", file=sys.stderr, flush=True)  # fmt: skip
            raw.append(raw_rate(state, data))
    extra = args.large - args.small
    result: dict[str, Any] = {"workers": args.workers, "threads": args.threads, "seconds": seconds}
    rate = {}
    for mode in modes:
        small, large = median(seconds[mode]["small"]), median(seconds[mode]["large"])
        rate[mode] = extra / (large - small)
        result[mode] = {
            "small_seconds": small,
            "large_seconds": large,
            "steady_rows_per_second": rate[mode],
            "startup_seconds": small - args.small / rate[mode],
        }
    result["raw_rows_per_second"] = median(raw)
    result["other_load"] = foreign
    disturbed = sum(f > 0.10 for f in foreign)
    print(f"\npython -m runtime run, {args.workers} workers x {args.threads} threads, MLP 512-2048-2048-16, "
          f"batch 64; medians of {args.repeats}; {disturbed} of {len(foreign)} runs disturbed (>10% of CPUs)")  # fmt: skip
    print("| mode | start-up | steady rows/s | / raw torch |")
    print("|---|---:|---:|---:|")
    for mode in modes:
        m = result[mode]
        print(
            f"| {mode} | {m['startup_seconds']:.2f} s | {rate[mode]:,.0f} | {rate[mode] / median(raw):.2f} |"
        )
    print(f"| raw torch loop | - | {median(raw):,.0f} | 1.00 |")
    print(f"steady state large_model / in-process: {rate['large_model'] / rate['in_process']:.2f}")
    for mode in modes:
        if mode.startswith("large_model_k"):
            print(
                f"steady state {mode} / large_model (one forward per core): {rate[mode] / rate['large_model']:.2f}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
