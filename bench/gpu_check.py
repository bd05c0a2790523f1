"""The prepared GPU check: what to run, in one go, on a machine with a CUDA device.

    python -m bench.gpu_check        (or: make gpu-check)

1. the GPU-marked tests (``pytest -m gpu``): placement on cuda:N, the budget against NVML
   and torch readings, and the other real GPU paths;
2. ``bench.compare`` benchmark 1 with ``--device cuda``: the MLP through RunInference
   with the model on the GPU (in the model server, and in-process), against a raw GPU
   loop in this process;
3. ``bench.copies --device cuda:0 --copies 1,2``: model_copies 1 vs 2 on one GPU, and
   ``bench.keyed_trace --device cuda:0``: a keyed workload whose models exceed the GPU
   budget (the server's evictions against its NVML readings);
4. a summary of the figures (and the GPU they were measured on) on stdout; the JSON of
   benchmark 1 under bench/results/.

It fits in 8 minutes on one GPU: each part has a deadline (``--tests-timeout``,
``--bench-timeout``), and a part that overruns is reported as such. Without a CUDA device
it says so and exits 0, having run nothing. Exit status: 0 when every part passed, 1
otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from typing import Any

from bench import common

ROOT = common.ROOT


def gpu_description() -> str:
    """The GPUs, as torch and NVML name them, with their memory."""
    import torch

    from modelserver import memory

    parts = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        reading = memory.Nvml.read(i)
        nvml = f", NVML {reading.used / 2**30:.1f}/{reading.total / 2**30:.1f} GiB used" if reading else ""
        parts.append(f"cuda:{i} {props.name} ({props.total_memory / 2**30:.0f} GiB{nvml})")
    return "; ".join(parts)


def run_part(name: str, argv: list[str], timeout: float) -> tuple[int | None, str, float]:
    """Run one part as a child process: (exit status or None on timeout, output, seconds).
    Its output also goes to stderr as it comes, so a long part shows its progress."""
    print(f"gpu-check: {name}: {' '.join(argv)}", file=sys.stderr, flush=True)
    started = time.monotonic()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = started + timeout
        for line in proc.stdout:
            lines.append(line)
            sys.stderr.write(line)
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(argv, timeout)
        code: int | None = proc.wait(max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        code = None
    return code, "".join(lines), time.monotonic() - started


def test_summary(output: str) -> str:
    """pytest's last line ("3 passed, 1 skipped in 4.2s"), without its decoration."""
    for line in reversed(output.strip().splitlines()):
        if re.search(r"\b(passed|failed|error|skipped|deselected|no tests ran)\b", line):
            return line.strip("= ").strip()
    return "(no pytest summary)"


def bench_summary(path: str) -> list[str]:
    """The figures of benchmark 1 from its JSON."""
    with open(path) as f:
        result: dict[str, Any] = json.load(f)["results"]["throughput"]
    rate = result["elements_per_second_median"]
    return [
        f"benchmark 1 on {result['device']}: {result['rows']} rows, batch {result['batch']}",
        f"  raw torch loop          {rate['raw_torch']:>12,.0f} el/s",
        f"  RunInference, server    {rate['runinference_server']:>12,.0f} el/s"
        f"  ratio {result['ratio_server_over_raw']:.3f} (target {result['target']})",
        f"  RunInference, in-proc   {rate['runinference_in_process']:>12,.0f} el/s"
        f"  ratio {result['ratio_in_process_over_raw']:.3f}",
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--tests-timeout", type=float, default=180.0, metavar="SECONDS")
    p.add_argument("--bench-timeout", type=float, default=240.0, metavar="SECONDS")
    p.add_argument("--rows", type=int, default=20_000, help="rows for benchmark 1")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each variant of benchmark 1")
    args = p.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here (torch.cuda.is_available() is False): nothing to check")
        return 0
    started = time.monotonic()
    gpus = gpu_description()
    code, output, test_seconds = run_part(
        "GPU-marked tests", [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests"], args.tests_timeout
    )
    tests_ok = code == 0
    tests_line = test_summary(output) if code is not None else f"timed out after {args.tests_timeout:.0f}s"

    os.makedirs(common.RESULTS_DIR, exist_ok=True)
    out = os.path.join(common.RESULTS_DIR, time.strftime("gpu-check-%Y%m%d-%H%M%S.json"))
    code, output, bench_seconds = run_part(
        "benchmark 1 on the GPU",
        [sys.executable, "-m", "bench.compare", "--only", "1", "--device", "cuda",
         "--rows", str(args.rows), "--repeats", str(args.repeats), "--out", out],
        args.bench_timeout,
    )  # fmt: skip
    bench_ok = code == 0 and os.path.exists(out)
    if bench_ok:
        figures = bench_summary(out)
    elif code is None:
        figures = [f"benchmark 1: timed out after {args.bench_timeout:.0f}s"]
    else:
        figures = [f"benchmark 1: failed (exit {code}); its output is above"]

    parts_ok = True
    extra: list[str] = []
    for name, argv_part in (
        ("model_copies 1 vs 2 on one GPU",
         [sys.executable, "-m", "bench.copies", "--device", "cuda:0", "--copies", "1,2", "--repeats", "2"]),
        ("keyed models over the GPU budget",
         [sys.executable, "-m", "bench.keyed_trace", "--device", "cuda:0", "--requests", "600"]),
    ):  # fmt: skip
        code, output, seconds = run_part(name, argv_part, args.bench_timeout / 2)
        parts_ok = parts_ok and code == 0
        tail = [line for line in output.splitlines() if line.strip()][-8:]
        status = "timed out" if code is None else ("ok" if code == 0 else f"FAILED (exit {code})")
        extra.append(f"{name}: {status} ({seconds:.0f}s)\n  " + "\n  ".join(tail))

    print(f"\ngpu-check on {gpus}")
    print(f"GPU-marked tests: {tests_line} ({test_seconds:.0f}s){'' if tests_ok else '  FAILED'}")
    print("\n".join(figures) + (f"  ({bench_seconds:.0f}s; {os.path.relpath(out)})" if bench_ok else ""))
    print("\n".join(extra))
    ok = tests_ok and bench_ok and parts_ok
    print(f"took {time.monotonic() - started:.0f}s; {'all passed' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
