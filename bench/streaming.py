"""Streaming through Redis: sustained events/s at p99 end-to-end latency <= 100 ms, beamlet
against the consumer loop a user would otherwise write, and the longest gap through a
model swap.

    python -m bench.streaming [--rates 500,1000,2000,3000,4000] [--seconds 6]
                              [--workers 2] [--threads 2] [--no-swap]

A private ``redis-server`` (the Debian package) on a Unix socket. Each event is an entry
``{id, t, x}``: ``t`` the producer's ``time.time()`` when it added it, ``x`` 512 float32
features (base64). The model is ``bench.common.BenchMLP`` (512-2048-2048-16).

- **beamlet**: ``python -m runtime run`` on a pipeline file
  ``ReadFromRedisStream | Map(parse) | RunInference(large_model=True) | Map(label) |
  WriteToRedisStream``, started once, warmed up, then fed each rate in turn.
- **baseline**: one process, the loop a user writes: XREADGROUP (COUNT 64, BLOCK 5 ms) ->
  the model in-process (torch's threads) -> XADD of the outputs and XACK of the inputs
  in one MULTI/EXEC.

For each rate a producer thread adds events at that rate for ``--seconds``; the latency
of an event is the output entry's id (the Redis server's clock, ms) minus its ``t``. A
rate is sustained when every event came out, the outputs kept up (the last output
within 1 s of the last input) and p99 <= 100 ms. The two jobs run one after the other
for each rate (interleaved), with the share of the CPUs other processes took meanwhile.
Then, unless ``--no-swap``, the beamlet job runs at half its best sustained rate while a
new checkpoint is dropped into its ``--watch-model`` directory: the report gives the
longest gap between committed outputs around the swap, and which version each output
names.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import numpy as np
import torch

from bench import common
from bench.common import BenchMLP, LoadMeter

GOAL_P99_MS = 100.0
D_IN = 512

PIPELINE = """
import base64
import numpy as np
import torch
from bench.common import BenchMLP
from client import KeyedModelHandler, PytorchModelHandlerTensor
from runtime import Map, RunInference
from runtime.streams import ReadFromRedisStream, WriteToRedisStream

URL = {url!r}


def parse(e):
    x = torch.from_numpy(np.frombuffer(base64.b64decode(e["x"]), dtype=np.float32).copy())
    return (e["id"] + " " + e["t"], x)  # Beam's keyed form: the key travels beside the example


def label(keyed):
    key, r = keyed
    i, t = key.split(" ")
    return {{"id": i, "t": t, "label": int(r.inference.argmax()), "model": str(r.model_id)}}


def build_pipeline(input, output):
    handler = PytorchModelHandlerTensor({state!r}, BenchMLP, {{}}, max_batch_size=64, large_model=True)
    return (
        ReadFromRedisStream(URL, "in", "beamlet")
        | Map(parse)
        | RunInference(KeyedModelHandler(handler))
        | Map(label)
        | WriteToRedisStream(URL, "out")
    )
"""


def start_redis(directory: str) -> tuple[subprocess.Popen[bytes], str]:
    exe = shutil.which("redis-server")
    if exe is None:
        sys.exit("bench.streaming needs redis-server (apt-get install redis-server)")
    sock = os.path.join(directory, "redis.sock")
    proc = subprocess.Popen(
        [exe, "--port", "0", "--unixsocket", sock, "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    import redis

    deadline = time.monotonic() + 30
    while True:
        try:
            redis.Redis(unix_socket_path=sock).ping()
            return proc, sock
        except (redis.ConnectionError, FileNotFoundError):
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                sys.exit("redis-server did not start")
            time.sleep(0.05)


def produce(r: Any, stream: str, rate: float, seconds: float, first: int, rows: np.ndarray) -> int:
    """Add events at ``rate`` per second for ``seconds``; how many were added."""
    n = int(rate * seconds)
    began = time.monotonic()
    step = max(1, int(rate / 200))  # up to 200 pipelined groups a second
    i = 0
    while i < n:
        due = began + i / rate
        wait = due - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        pipe = r.pipeline(transaction=False)
        for k in range(i, min(n, i + step)):
            x = base64.b64encode(rows[(first + k) % len(rows)].tobytes())
            pipe.xadd(stream, {"id": first + k, "t": repr(time.time()), "x": x})
        pipe.execute()
        i += step
    return n


def outputs_since(r: Any, stream: str, start_id: str) -> list[tuple[float, dict[str, str]]]:
    """(server time in seconds, fields) of each output entry after ``start_id``."""
    out = []
    for entry_id, fields in r.xrange(stream, min=f"({start_id}"):
        ms = int(entry_id.decode().split("-")[0])
        out.append((ms / 1000.0, {k.decode(): v.decode() for k, v in fields.items()}))
    return out


def last_id(r: Any, stream: str) -> str:
    entries = r.xrevrange(stream, count=1)
    return entries[0][0].decode() if entries else "0-0"


def measure(
    r: Any, in_stream: str, out_stream: str, rate: float, seconds: float, first: int, rows: np.ndarray
) -> dict[str, Any]:
    """Feed one rate, wait for the outputs, and measure them."""
    start = last_id(r, out_stream)
    meter = LoadMeter()
    meter.start()
    n = produce(r, in_stream, rate, seconds, first, rows)
    produced_at = time.time()
    deadline = time.monotonic() + max(10.0, seconds)
    outs: list[tuple[float, dict[str, str]]] = []
    while time.monotonic() < deadline:
        outs = outputs_since(r, out_stream, start)
        if len(outs) >= n:
            break
        time.sleep(0.05)
    load = meter.stop()
    latencies = sorted(at - float(f["t"]) for at, f in outs if "t" in f)
    if len(outs) < n or not latencies:
        return {"rate": rate, "events": n, "out": len(outs), "sustained": False, "load": load}
    p50 = latencies[len(latencies) // 2] * 1000
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1000
    lag = outs[-1][0] - produced_at
    return {
        "rate": rate,
        "events": n,
        "out": len(outs),
        "p50_ms": round(p50, 1),
        "p99_ms": round(p99, 1),
        "lag_s": round(lag, 3),
        "sustained": p99 <= GOAL_P99_MS and lag <= 1.0,
        "load": load,
    }


class Baseline:
    """The single-process consumer loop a user would write, on a thread of this process."""

    def __init__(self, sock: str, state: str):
        import redis

        self.r = redis.Redis(unix_socket_path=sock)
        self.model = BenchMLP().eval()
        self.model.load_state_dict(torch.load(state, weights_only=True))
        self.stop = threading.Event()
        try:
            self.r.xgroup_create("bin", "base", id="0", mkstream=True)
        except redis.ResponseError:
            pass
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self) -> None:
        while not self.stop.is_set():
            resp = self.r.xreadgroup("base", "c", {"bin": ">"}, count=64, block=5)
            if not resp:
                continue
            entries = resp[0][1]
            ids = [e[0] for e in entries]
            x = torch.from_numpy(
                np.stack([np.frombuffer(base64.b64decode(f[b"x"]), dtype=np.float32) for _, f in entries])
            )
            with torch.inference_mode():
                labels = self.model(x).argmax(dim=1).tolist()
            pipe = self.r.pipeline(transaction=True)
            for (_, f), label in zip(entries, labels):
                pipe.xadd("bout", {"id": f[b"id"], "t": f[b"t"], "label": label})
            pipe.xack("bin", "base", *ids)
            pipe.execute()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="500,1000,2000,3000,4000")
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-swap", action="store_true")
    args = ap.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    import redis

    rows = common.make_rows(4096, D_IN).numpy()
    with tempfile.TemporaryDirectory(prefix="blb-stream-") as d:
        os.chmod(d, 0o700)
        redis_proc, sock = start_redis(d)
        url = f"unix://{sock}"
        r = redis.Redis(unix_socket_path=sock)
        models = os.path.join(d, "models")
        os.makedirs(models)
        state = os.path.join(models, "v1.pt")
        common.save_state_dict(BenchMLP, {}, state, seed=1)
        job = os.path.join(d, "job.py")
        with open(job, "w") as f:
            f.write(PIPELINE.format(url=url, state=state))
        cmd = [
            sys.executable,
            "-m",
            "runtime",
            "run",
            job,
            "--workers",
            str(args.workers),
            "--threads",
            str(args.threads),
            "--max-bundle-wait",
            "0.01",
            "--bundle-size",
            "64",
            "--socket",
            os.path.join(d, "ms.sock"),
            "--no-progress",
            "--json",
            "--watch-model",
            os.path.join(models, "v*.pt"),
            "--watch-interval",
            "1",
        ]
        print(f"beamlet: {' '.join(cmd[2:5])} ... (workers {args.workers} x {args.threads})", flush=True)
        cli = subprocess.Popen(
            cmd,
            env=common.child_env(),
            cwd=common.ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        baseline = Baseline(sock, state)
        results: dict[str, list[dict[str, Any]]] = {"beamlet": [], "baseline": []}
        swap: dict[str, Any] = {}
        try:
            first = 0
            for name, (ins, outs) in (("beamlet", ("in", "out")), ("baseline", ("bin", "bout"))):
                warm = measure(r, ins, outs, 200, 2.0, first, rows)  # start-up and warm-up
                first += warm["events"]
                print(f"warm-up {name}: {warm.get('out')} of {warm['events']} events out", flush=True)
            for rate in rates:
                for name, (ins, outs) in (("beamlet", ("in", "out")), ("baseline", ("bin", "bout"))):
                    res = measure(r, ins, outs, rate, args.seconds, first, rows)
                    first += res["events"]
                    results[name].append(res)
                    print(
                        f"{name:9} {rate:7,.0f} ev/s offered: {res['out']:,}/{res['events']:,} out, "
                        f"p50 {res.get('p50_ms', '-')} ms, p99 {res.get('p99_ms', '-')} ms, "
                        f"lag {res.get('lag_s', '-')} s, other load {res['load']['foreign']:.0%}"
                        f"{'' if res['sustained'] else '  (not sustained)'}",
                        flush=True,
                    )
            if not args.no_swap:
                swap = measure_swap(r, models, rates, results["beamlet"], args.seconds, first, rows)
        finally:
            baseline.close()
            cli.send_signal(signal.SIGTERM)
            try:
                out, err = cli.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                cli.kill()
                out, err = cli.communicate()
            redis_proc.terminate()
            redis_proc.wait(10)
        report(results, swap, cli.returncode, out, err, args)


def measure_swap(
    r: Any,
    models: str,
    rates: list[float],
    runs: list[dict[str, Any]],
    seconds: float,
    first: int,
    rows: np.ndarray,
) -> dict[str, Any]:
    """Half the best sustained rate, a new checkpoint dropped into the watched directory
    after a third of the time: the longest gap between outputs, and the versions named."""
    best = max((x["rate"] for x in runs if x["sustained"]), default=rates[0])
    rate = best / 2
    span = max(seconds, 6.0)
    start = last_id(r, "out")
    v2 = os.path.join(models, "v2.pt")

    def drop() -> None:
        time.sleep(span / 3)
        tmp = os.path.join(models, "tmp-v2")
        common.save_state_dict(BenchMLP, {}, tmp, seed=2)
        os.replace(tmp, v2)

    dropper = threading.Thread(target=drop)
    dropper.start()
    dropped = time.time() + span / 3
    n = produce(r, "in", rate, span, first, rows)
    dropper.join()
    deadline = time.monotonic() + 20
    outs = outputs_since(r, "out", start)
    while len(outs) < n and time.monotonic() < deadline:
        time.sleep(0.1)
        outs = outputs_since(r, "out", start)
    times = [at for at, _ in outs]
    gaps = [b - a for a, b in zip(times, times[1:])]
    models_seen = [f.get("model", "") for _, f in outs]
    switched = next((i for i, m in enumerate(models_seen) if m.endswith("v2.pt")), None)
    back = switched is not None and any(not m.endswith("v2.pt") for m in models_seen[switched:])
    res = {
        "rate": rate,
        "events": n,
        "out": len(outs),
        "longest_gap_ms": round(max(gaps) * 1000, 1) if gaps else None,
        "median_gap_ms": round(sorted(gaps)[len(gaps) // 2] * 1000, 2) if gaps else None,
        "switch_after_drop_s": round(times[switched] - dropped, 2) if switched is not None else None,
        "went_back_to_v1": back,
    }
    print(f"swap at {rate:,.0f} ev/s: {res}", flush=True)
    return res


def report(
    results: dict[str, list[dict[str, Any]]],
    swap: dict[str, Any],
    code: int | None,
    out: str,
    err: str,
    args: argparse.Namespace,
) -> None:
    def best(name: str) -> float:
        return max((x["rate"] for x in results[name] if x["sustained"]), default=0.0)

    b, base = best("beamlet"), best("baseline")
    print()
    print(
        f"Redis -> RunInference (BenchMLP, large_model) -> Redis; {args.workers} workers x {args.threads} "
        f"threads; {args.seconds:g} s per rate; sustained = all out, p99 <= {GOAL_P99_MS:g} ms, lag <= 1 s"
    )
    print("| offered ev/s | beamlet p50 / p99 ms | baseline p50 / p99 ms | beamlet / baseline sustained |")
    print("|---:|---:|---:|---|")
    for x, y in zip(results["beamlet"], results["baseline"]):
        print(
            f"| {x['rate']:,.0f} | {x.get('p50_ms', '-')} / {x.get('p99_ms', '-')} | "
            f"{y.get('p50_ms', '-')} / {y.get('p99_ms', '-')} | {'yes' if x['sustained'] else 'no'} / "
            f"{'yes' if y['sustained'] else 'no'} |"
        )
    ratio = f"{b / base:.2f}" if base else "n/a"
    print(f"best sustained rate: beamlet {b:,.0f} ev/s, baseline {base:,.0f} ev/s, ratio {ratio}")
    if swap:
        print(
            f"model swap at {swap['rate']:,.0f} ev/s: longest gap {swap['longest_gap_ms']} ms (median "
            f"{swap['median_gap_ms']} ms), outputs named v2 {swap['switch_after_drop_s']} s after the file "
            f"was dropped (watch interval 1 s), back to v1 afterwards: {swap['went_back_to_v1']}, "
            f"{swap['out']}/{swap['events']} out"
        )
    print(f"beamlet job exit code {code} (SIGTERM: {128 + signal.SIGTERM} expected)")
    try:
        summary = json.loads(out)
        print(
            f"beamlet summary: latency {summary.get('latency')}, {summary.get('elements_in')} in, "
            f"{summary.get('outputs')} out"
        )
    except ValueError:
        print("beamlet stderr tail:", err[-2000:])
    os.makedirs(common.RESULTS_DIR, exist_ok=True)
    path = os.path.join(common.RESULTS_DIR, f"streaming-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump({"results": results, "swap": swap, "args": vars(args)}, f, indent=1)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
