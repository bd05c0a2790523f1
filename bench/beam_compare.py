"""Apache Beam's own ``large_model=True`` against ``client.beam.BeamletModelHandler``.

    python -m bench.beam_compare [--rows 10000] [--model bench|wide] [--batch 64] [--repeats 1]

Same model, same rows, same Beam pipeline on the DirectRunner in multi_processing mode
with two SDK-worker processes::

    Create(range(rows)) | Reshuffle | Map(row i) | RunInference(handler) | Map(output) | WriteToText

once with Beam's ``PytorchModelHandlerTensor(..., large_model=True)`` (the model in one
process, reached through ``multi_process_shared``'s pickled RPC) and once with
``BeamletModelHandler(PytorchModelHandlerTensor(..., large_model=True))`` (the model in
the beamlet model server, reached over its Unix socket). For each it reports
elements/s over the whole pipeline (start-up included), the peak PSS (every 200 ms) and
RSS of the whole process tree (the launching process, the SDK workers, the model's process; sampled
every 20 ms), their ratios, the largest difference between the two runs' outputs, and
what each run left in its temp directory. Each run is launched from a fresh process, so
both trees start from the same baseline. The order of the runs alternates between
repeats; the figures are medians. Needs the ``beam`` extra.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np
import psutil
import torch
from tqdm import tqdm

from bench.common import (
    ROOT,
    BenchMLP,
    WideMLP,
    child_env,
    machine_info,
    make_rows,
    private_dir,
    save_state_dict,
)
from bench.harness_runs import TreePeak


class RolePeaks(TreePeak):
    """The tree's peak RSS (every 20 ms) and peak PSS (every ``PSS_EVERY`` samples:
    reading smaps is slow), and each process's own peak RSS with its role. PSS splits
    shared pages (torch's libraries, a model mapped by several processes) among the
    processes that share them, so the tree's PSS counts each page once."""

    PSS_EVERY = 10

    def __init__(self) -> None:
        self.roles: dict[int, tuple[str, int]] = {}
        self.peak_pss = 0
        self._samples = 0
        super().__init__()

    def _total(self) -> int:
        total = pss = 0
        self._samples += 1
        with_pss = self._samples % self.PSS_EVERY == 1
        for p in [self.root, *self.root.children(recursive=True)]:
            try:
                rss = p.memory_info().rss
                cmd = " ".join(p.cmdline())
                if with_pss:
                    pss += p.memory_full_info().pss
            except psutil.Error:
                continue
            total += rss
            role = (
                "launcher" if p.pid == self.root.pid
                else "SDK worker" if "sdk_worker_main" in cmd and "-c" not in p.cmdline()[1:2]
                else "model server" if "modelserver" in cmd
                else "other"
            )  # fmt: skip
            self.roles[p.pid] = (role, max(rss, self.roles.get(p.pid, ("", 0))[1]))
        self.peak_pss = max(self.peak_pss, pss)
        return total

    def breakdown(self) -> list[tuple[str, float]]:
        """(role, peak MiB) of every process over 50 MiB, largest first."""
        rows = [(role, rss / (1 << 20)) for role, rss in self.roles.values() if rss > 50 << 20]
        return sorted(rows, key=lambda r: -r[1])


WORKERS = 2
MODELS: dict[str, tuple[type[torch.nn.Module], dict[str, Any], int]] = {
    "bench": (BenchMLP, {}, 512),  # about 21 MB of weights
    "wide": (WideMLP, {"width": 2048, "depth": 4}, 2048),  # 64 MiB
}


class RowReader:
    """Row ``i`` of a .npy file, opened once per SDK worker (the rows do not travel in the
    pipeline's definition)."""

    def __init__(self, path: str):
        self.path = path
        self._rows: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_rows": None}

    def __call__(self, i: int) -> torch.Tensor:
        if self._rows is None:
            self._rows = np.load(self.path, mmap_mode="r")
        return torch.from_numpy(np.array(self._rows[i]))


def to_line(result: Any) -> str:
    return json.dumps([result.example[:4].tolist(), torch.as_tensor(result.inference).tolist()])


def run_pipeline(handler: Any, rows_path: str, n: int, out: str) -> None:
    import apache_beam as beam
    from apache_beam.ml.inference.base import RunInference
    from apache_beam.options.pipeline_options import PipelineOptions

    options = PipelineOptions(flags=[], direct_running_mode="multi_processing", direct_num_workers=WORKERS)
    with beam.Pipeline(options=options) as p:
        _ = (
            p
            | beam.Create(range(n))
            | beam.Reshuffle()
            | beam.Map(RowReader(rows_path))
            | RunInference(handler)
            | beam.Map(to_line)
            | beam.io.WriteToText(out)
        )


def read_outputs(prefix: str) -> dict[str, list[float]]:
    """Outputs by their example's first four features (unique for random rows)."""
    found: dict[str, list[float]] = {}
    directory, base = os.path.split(prefix)
    for name in os.listdir(directory):
        if name.startswith(base + "-"):
            with open(os.path.join(directory, name)) as f:
                for line in f:
                    key, inference = json.loads(line)
                    found[json.dumps(key)] = inference
    return found


def one_run(
    kind: str, workdir: str, ckpt: str, rows_path: str, n: int, args: argparse.Namespace
) -> dict[str, Any]:
    from apache_beam.ml.inference.pytorch_inference import PytorchModelHandlerTensor as BeamHandler

    from client import PytorchModelHandlerTensor
    from client.beam import BeamletModelHandler

    model_class, params, _ = MODELS[args.model]
    run_dir = tempfile.mkdtemp(prefix=f"{kind}-", dir=workdir)
    tmp = os.path.join(run_dir, "tmp")
    os.mkdir(tmp)
    if kind == "beam":
        handler: Any = BeamHandler(
            state_dict_path=ckpt,
            model_class=model_class,
            model_params=params,
            min_batch_size=args.batch,
            max_batch_size=args.batch,
            large_model=True,
        )
    else:
        handler = BeamletModelHandler(
            PytorchModelHandlerTensor(
                ckpt,
                model_class,
                params,
                min_batch_size=args.batch,
                max_batch_size=args.batch,
                large_model=True,
                socket_path=os.path.join(run_dir, "ms.sock"),
            ),
            server_idle_timeout=1.0,
        )
    saved = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = tmp, tmp  # what the run leaves behind lands here
    peak = RolePeaks()
    started = time.perf_counter()
    try:
        run_pipeline(handler, rows_path, n, os.path.join(run_dir, "out"))
    finally:
        seconds = time.perf_counter() - started
        tree = peak.stop()
        if saved[0] is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved[0]
        tempfile.tempdir = saved[1]
    outputs = read_outputs(os.path.join(run_dir, "out"))
    assert len(outputs) == n, f"{kind}: {len(outputs)} outputs for {n} rows"
    if kind == "beamlet":
        _wait_for_servers_to_exit(run_dir)
    left = [os.path.relpath(os.path.join(r, f), tmp) for r, _d, fs in os.walk(tmp) for f in fs]
    return {
        "elements_per_s": n / seconds,
        "seconds": seconds,
        "peak_tree_rss_mib": tree / (1 << 20),
        "peak_tree_pss_mib": peak.peak_pss / (1 << 20),
        "process_peaks_mib": peak.breakdown(),
        "left_in_tmp": left,
        "outputs": outputs,
    }


def _wait_for_servers_to_exit(run_dir: str, timeout: float = 30.0) -> None:
    procs = [
        p
        for p in psutil.process_iter(["cmdline"])
        if "modelserver" in (p.info["cmdline"] or []) and run_dir + "/ms.sock" in (p.info["cmdline"] or [])
    ]
    _gone, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        if p.status() != psutil.STATUS_ZOMBIE:
            print(f"model server {p.pid} still running after {timeout:.0f}s; killing it", file=sys.stderr)
            p.kill()


def run_in_child(kind: str, workdir: str, ckpt: str, args: argparse.Namespace) -> dict[str, Any]:
    """One run in a fresh process, which is the pipeline's launching process: the tree's
    peak then starts from the same baseline for both handlers (a launcher that ran a
    pipeline before keeps some 250 MiB of it, which would count against the second)."""
    out = os.path.join(workdir, f"{kind}-{time.monotonic_ns()}.json")
    cmd = [sys.executable, "-m", "bench.beam_compare", "--rows", str(args.rows), "--model", args.model]
    cmd += ["--batch", str(args.batch), "--one-run", kind, workdir, ckpt, out]
    subprocess.run(cmd, check=True, env=child_env(), cwd=ROOT, stdout=subprocess.DEVNULL)
    with open(out) as f:
        return dict(json.load(f))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.beam_compare", description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--model", choices=sorted(MODELS), default="bench")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    parser.add_argument(
        "--one-run", nargs=4, metavar=("KIND", "WORKDIR", "CKPT", "OUT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.one_run:  # a child: one pipeline, its figures to OUT
        kind, workdir, ckpt, out = args.one_run
        result = one_run(kind, workdir, ckpt, os.path.join(workdir, "rows.npy"), args.rows, args)
        with open(out, "w") as f:
            json.dump(result, f)
        return 0
    try:
        import apache_beam  # noqa: F401
    except ImportError:
        print("needs Apache Beam: pip install -e '.[beam]'", file=sys.stderr)
        return 2
    model_class, params, d_in = MODELS[args.model]
    runs: dict[str, list[dict[str, Any]]] = {"beam": [], "beamlet": []}
    with private_dir("blbc-") as workdir:
        ckpt = os.path.join(workdir, "model.pt")
        nbytes = save_state_dict(model_class, params, ckpt)
        rows_path = os.path.join(workdir, "rows.npy")
        np.save(rows_path, make_rows(args.rows, d_in).numpy())
        order = ["beam", "beamlet"]
        with tqdm(total=2 * args.repeats, desc="runs", unit=" run") as bar:
            for _ in range(args.repeats):
                for kind in order:
                    bar.set_postfix_str(kind)
                    runs[kind].append(run_in_child(kind, workdir, ckpt, args))
                    bar.update()
                order.reverse()
    ours, theirs = runs["beamlet"][-1]["outputs"], runs["beam"][-1]["outputs"]
    max_diff = max(float(np.max(np.abs(np.subtract(ours[k], theirs[k])))) for k in theirs)
    summary = {
        kind: {
            "elements_per_s": statistics.median(r["elements_per_s"] for r in rs),
            "peak_tree_rss_mib": statistics.median(r["peak_tree_rss_mib"] for r in rs),
            "peak_tree_pss_mib": statistics.median(r["peak_tree_pss_mib"] for r in rs),
            "left_in_tmp": sorted({f for r in rs for f in r["left_in_tmp"]}),
        }
        for kind, rs in runs.items()
    }
    b, o = summary["beam"], summary["beamlet"]
    print(
        f"\n{args.rows:,} rows, model {args.model} ({nbytes / (1 << 20):.0f} MiB of weights), batch {args.batch}, "
        f"DirectRunner multi_processing with {WORKERS} SDK workers, median of {args.repeats}"
    )
    print("| handler | elements/s | peak tree PSS | peak tree RSS | files left in the temp dir |")
    print("|---|---|---|---|---|")
    for name, s in (("Beam PytorchModelHandlerTensor(large_model=True)", b), ("BeamletModelHandler", o)):
        print(
            f"| {name} | {s['elements_per_s']:,.0f} | {s['peak_tree_pss_mib']:,.0f} MiB | "
            f"{s['peak_tree_rss_mib']:,.0f} MiB | {len(s['left_in_tmp'])} |"
        )
    print(
        f"| ratio beamlet / Beam | {o['elements_per_s'] / b['elements_per_s']:.2f}x | "
        f"{o['peak_tree_pss_mib'] / b['peak_tree_pss_mib']:.2f}x | "
        f"{o['peak_tree_rss_mib'] / b['peak_tree_rss_mib']:.2f}x | |"
    )
    print(f"largest difference between the two runs' outputs: {max_diff:.3g}")
    for kind, rs in runs.items():
        parts = ", ".join(f"{role} {mib:,.0f}" for role, mib in rs[-1]["process_peaks_mib"])
        print(f"each process's own peak RSS in the last {kind} run (MiB): {parts}")
    if b["left_in_tmp"]:
        print(f"Beam's run left in its temp dir: {', '.join(b['left_in_tmp'][:6])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"summary": summary, "max_diff": max_diff, "args": vars(args), "machine": machine_info()},
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
