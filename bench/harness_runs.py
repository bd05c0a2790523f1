"""Whole runs through the harness, as ratios to a raw torch loop on the same data.

    python -m bench.harness_runs [--rows 20000] [--workers 1,2] [--threads 1,2,3,4] [--beam] [--json PATH]

The MLP of the first benchmark (512 -> 2048 -> 2048 -> 16, ReLU), batch 64, ``--rows``
deterministic rows. For every combination of workers, threads and large_model on/off it
runs ``Create | Map(row) | RunInference | Map(to list) | Collect`` through
``runtime.Harness`` and reports elements/s, the ratio to the raw loop (``model(batch)``
under ``torch.inference_mode`` in one process, same batches), and the peak RSS of the
whole process tree (harness, workers, model server), sampled every 20 ms. With
``--beam`` (Apache Beam installed: ``pip install -e '.[beam]'``) it also runs Beam's own
``RunInference(PytorchModelHandlerTensor)`` on the DirectRunner over the same data.

The figures go to ``--json PATH`` (default ``bench/results/harness-runs-<time>.json``),
and a plot of elements/s by workers x threads beside it (``bench.plots``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from typing import Any

import psutil
import torch

from bench import common, plots
from client import PytorchModelHandlerTensor
from runtime import Collect, Create, Harness, Map, RunInference

BATCH = 64


class BenchMLP(torch.nn.Module):
    """512 -> 2048 -> 2048 -> 16."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(512, 2048),
            torch.nn.ReLU(),
            torch.nn.Linear(2048, 2048),
            torch.nn.ReLU(),
            torch.nn.Linear(2048, 16),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TreePeak:
    """Peak of the summed RSS of this process and all its descendants."""

    def __init__(self) -> None:
        self.root = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _total(self) -> int:
        total = 0
        for p in [self.root, *self.root.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._total())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def raw_loop(model: torch.nn.Module, data: torch.Tensor) -> float:
    started = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(data), BATCH):
            model(data[i : i + BATCH])
    return len(data) / (time.perf_counter() - started)


def harness_run(
    path: str, data: torch.Tensor, workers: int, threads: int, large: bool, sock: str
) -> dict[str, Any]:
    handler = PytorchModelHandlerTensor(
        path, BenchMLP, {}, min_batch_size=BATCH, max_batch_size=BATCH, large_model=large, socket_path=sock
    )
    sink = Collect()
    pipeline = (
        Create(range(len(data))) | Map(lambda i: data[i]) | RunInference(handler) | Map(_as_list) | sink
    )
    peak = TreePeak()
    started = time.perf_counter()
    summary = Harness(workers, threads, bundle_size=BATCH * 4, progress=False).run(pipeline)
    seconds = time.perf_counter() - started
    tree = peak.stop()
    assert summary.outputs == len(data) and len(sink.values) == len(data)
    return {"elements_per_s": len(data) / seconds, "peak_tree_rss_mib": tree / (1 << 20)}


def _as_list(r: Any) -> list[float]:
    return r.inference.tolist()


def beam_run(path: str, data: torch.Tensor) -> dict[str, Any] | None:
    try:
        import apache_beam as beam
        from apache_beam.ml.inference.base import RunInference as BeamRunInference
        from apache_beam.ml.inference.pytorch_inference import PytorchModelHandlerTensor as BeamHandler
    except ImportError:
        return None
    handler = BeamHandler(
        state_dict_path=path,
        model_class=BenchMLP,
        model_params={},
        min_batch_size=BATCH,
        max_batch_size=BATCH,
    )
    rows = [data[i].clone() for i in range(len(data))]  # a view would pickle the whole storage
    peak = TreePeak()
    started = time.perf_counter()
    with beam.Pipeline(runner="DirectRunner") as p:
        _ = p | beam.Create(rows) | BeamRunInference(handler) | beam.Map(lambda r: r.inference.tolist())
    seconds = time.perf_counter() - started
    tree = peak.stop()
    return {"elements_per_s": len(data) / seconds, "peak_tree_rss_mib": tree / (1 << 20)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.harness_runs", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--threads", default="1,2,3,4")
    parser.add_argument(
        "--beam", action="store_true", help="also run Apache Beam's RunInference (DirectRunner)"
    )
    parser.add_argument("--json", default=None, help="the JSON results file (default in bench/results)")
    args = parser.parse_args(argv)
    started = time.time()
    torch.manual_seed(0)
    model = BenchMLP().eval()
    data = torch.randn(args.rows, 512, generator=torch.Generator().manual_seed(1))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bl-hr-") as directory:
        os.chmod(directory, 0o700)
        path = os.path.join(directory, "mlp.pt")
        torch.save(model.state_dict(), path)
        sock = os.path.join(directory, "ms.sock")
        raw_loop(model, data[: BATCH * 20])  # warm up
        raw = raw_loop(model, data)
        print(f"raw torch loop: {raw:,.0f} elements/s ({args.rows} rows, batch {BATCH})", flush=True)
        for large in (False, True):
            for w in (int(x) for x in args.workers.split(",")):
                for t in (int(x) for x in args.threads.split(",")):
                    r = harness_run(path, data, w, t, large, sock)
                    r.update(workers=w, threads=t, large_model=large, ratio=r["elements_per_s"] / raw)
                    rows.append(r)
                    print(
                        f"  workers {w} threads {t} large_model={str(large):<5} "
                        f"{r['elements_per_s']:>9,.0f} el/s  ratio {r['ratio']:.2f}  "
                        f"peak tree RSS {r['peak_tree_rss_mib']:,.0f} MiB",
                        flush=True,
                    )
        # Beam last, so that its memory does not count in the harness runs' process tree.
        beam = beam_run(path, data) if args.beam else None
        if args.beam and beam is None:
            print("Apache Beam is not installed: pip install -e '.[beam]'")
        elif beam is not None:
            beam["ratio"] = beam["elements_per_s"] / raw
            print(
                f"  Beam RunInference, DirectRunner: {beam['elements_per_s']:>9,.0f} el/s  ratio "
                f"{beam['ratio']:.2f}  peak tree RSS {beam['peak_tree_rss_mib']:,.0f} MiB",
                flush=True,
            )
    print("\n| workers | threads | large_model | elements/s | / raw torch | peak tree RSS |")
    print("|---:|---:|:---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['workers']} | {r['threads']} | {r['large_model']} | {r['elements_per_s']:,.0f} | "
            f"{r['ratio']:.2f} | {r['peak_tree_rss_mib']:,.0f} MiB |"
        )
    if beam is not None:
        print(f"| Beam DirectRunner | - | - | {beam['elements_per_s']:,.0f} | {beam['ratio']:.2f} | "
              f"{beam['peak_tree_rss_mib']:,.0f} MiB |")  # fmt: skip
    print(f"\nraw torch loop: {raw:,.0f} elements/s")
    payload = {"raw_elements_per_s": raw, "rows": rows, "beam": beam, "args": vars(args)}
    out = common.write_results(args.json, "harness-runs", started, payload)
    print(f"results in {os.path.relpath(out)}")
    plots.throughput_grid(rows, raw, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
