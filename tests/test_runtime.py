"""The harness and its SDK workers: real processes, real sockets, real failures."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest
import torch

from client import PytorchModelHandlerTensor
from modelserver import wire
from runtime import (
    Collect,
    Create,
    Filter,
    FlatMap,
    Harness,
    Map,
    PipelineError,
    RunInference,
)
from runtime.control import ControlChannel
from tests.conftest import ROOT, server_env, server_processes
from tests.models import MLP, make_checkpoint


@pytest.fixture
def ckpt(private_dir):
    path = os.path.join(private_dir, "mlp.pt")
    return make_checkpoint(path), path


def to_tensor(i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(i)
    return torch.randn(8, generator=g)


def expected_outputs(model, n: int) -> list[tuple[list[float], list[float]]]:
    """Each row as the pipeline outputs it: (its input, the model's output on it alone)."""
    with torch.inference_mode():
        return [(to_tensor(i).tolist(), model(to_tensor(i)[None])[0].tolist()) for i in range(n)]


ATOL = 1e-5


def assert_same_output(got: list, want: list, atol: float = ATOL) -> None:
    """What "the same output" means for a run: the same rows, in the same order, each
    exactly once (nothing lost, nothing duplicated: each row's input, which travels
    untouched, is bitwise the one expected at its place), and each row's values equal
    within ``atol``. Not bitwise: a row computed in a batch that the model server merged
    with another client's rows may differ in the 7th digit from the same row computed
    alone, and batch composition varies with timing outside the deterministic mode."""
    assert len(got) == len(want), f"{len(got)} rows, expected {len(want)}"
    for n, ((x, y), (want_x, want_y)) in enumerate(zip(got, want)):
        assert x == want_x, f"row {n} is not the expected input: lost, duplicated or out of order"
        assert torch.allclose(torch.tensor(y), torch.tensor(want_y), atol=atol), f"row {n}: {y} != {want_y}"


def inference_pipeline(path: str, n: int, large: bool, sink: Collect, slow: float = 0.0, **handler_args):
    """Rows 0..n-1 through the MLP; each output is (input row, model output) as lists."""

    def prepare(i: int) -> torch.Tensor:
        if slow:
            time.sleep(slow)
        return to_tensor(i)

    handler = PytorchModelHandlerTensor(
        path, MLP, {}, large_model=large, min_batch_size=16, max_batch_size=16, **handler_args
    )
    return (
        Create(range(n))
        | Map(prepare)
        | RunInference(handler)
        | Map(lambda r: (r.example.tolist(), r.inference.tolist()))
        | sink
    )


@pytest.mark.parametrize("large", [False, True])
def test_harness_output_matches_torch_in_input_order(ckpt, sock_path, large):
    model, path = ckpt
    sink = Collect()
    summary = Harness(workers=2, threads=3, bundle_size=37, progress=False).run(
        inference_pipeline(path, 500, large, sink)
    )
    assert_same_output(sink.values, expected_outputs(model, 500))
    assert summary.elements_in == 500 and summary.outputs == 500 and not summary.dead_letters
    (m,) = summary.metrics.values()
    assert m["num_inferences"] == 500 and m["inference_batch_latency_micro_secs"]["count"] >= 500 / 16
    assert m["model_byte_size"]["max"] > 0 and m["load_model_latency_milli_secs"]["max"] > 0
    if large:
        assert not server_processes(sock_path), "the harness must stop the server it started"
        assert not os.path.exists(sock_path)


def test_map_flatmap_filter_and_the_process_api_for_custom_runners():
    pipeline = Map(lambda x: x * 2) | FlatMap(lambda x: [x, x + 1]) | Filter(lambda x: x % 3 != 0)
    bundles = [list(range(i * 10, i * 10 + 10)) for i in range(7)]
    results = list(Harness(workers=2, threads=2, progress=False).process(bundles, pipeline))
    assert [r.index for r in results] == list(range(7))
    for r, b in zip(results, bundles):
        assert r.outputs == [y for x in b for y in (2 * x, 2 * x + 1) if y % 3 != 0]


def kill_workers_while_running(harness: Harness, kills: int) -> list[int]:
    killed: list[int] = []
    seen = 0
    deadline = time.monotonic() + 60
    while len(killed) < kills and time.monotonic() < deadline:
        done = harness.progress_bundles()
        pids = harness.worker_pids()
        if done > seen and pids:
            seen = done + 1
            victim = pids[len(killed) % len(pids)]
            try:
                os.kill(victim, signal.SIGKILL)
                killed.append(victim)
            except ProcessLookupError:
                pass
        time.sleep(0.01)
    return killed


@pytest.mark.parametrize("large", [False, True])
def test_workers_killed_repeatedly_mid_run_give_the_clean_output(ckpt, sock_path, large):
    model, path = ckpt
    n = 1200
    clean = Collect()
    Harness(workers=2, threads=2, bundle_size=20, progress=False).run(
        inference_pipeline(path, n, large, clean)
    )
    sink = Collect()
    harness = Harness(workers=2, threads=2, bundle_size=20, progress=False)
    result: dict = {}
    t = threading.Thread(
        target=lambda: result.setdefault(
            "s", harness.run(inference_pipeline(path, n, large, sink, slow=0.002))
        )
    )
    t.start()
    killed = kill_workers_while_running(harness, kills=4)
    t.join(120)
    summary = result["s"]
    assert len(killed) == 4
    assert summary.worker_restarts >= 4 and summary.bundle_retries >= 1
    assert_same_output(sink.values, clean.values)  # each row exactly once, in order
    assert_same_output(sink.values, expected_outputs(model, n))


def test_model_server_killed_mid_run_is_replaced_and_the_output_is_clean(ckpt, sock_path):
    model, path = ckpt
    n = 800
    sink = Collect()
    harness = Harness(workers=2, threads=2, bundle_size=20, progress=False)
    result: dict = {}
    t = threading.Thread(
        target=lambda: result.setdefault(
            "s", harness.run(inference_pipeline(path, n, True, sink, slow=0.003))
        )
    )
    t.start()
    deadline = time.monotonic() + 60
    while harness.progress_bundles() < 5:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    (server,) = server_processes(sock_path)
    server.kill()
    t.join(120)
    assert result["s"].outputs == n
    assert_same_output(sink.values, expected_outputs(model, n))
    assert not server_processes(sock_path) and not os.path.exists(sock_path)


def test_worker_that_cannot_boot_fails_the_run_with_its_error(private_dir):
    missing = os.path.join(private_dir, "missing.pt")
    handler = PytorchModelHandlerTensor(missing, MLP, {})
    pipeline = Create(range(10)) | Map(to_tensor) | RunInference(handler) | Collect()
    harness = Harness(workers=2, threads=1, progress=False)
    started = time.monotonic()
    with pytest.raises(PipelineError, match="could not boot: ModelLoadError: model file not found"):
        harness.run(pipeline)
    assert time.monotonic() - started < 30


def test_unimportable_pipeline_in_an_exec_worker_fails_the_run():
    harness = Harness(workers=1, threads=1, progress=False, pipeline_ref="no_such_pipeline_module")
    with pytest.raises(PipelineError, match="could not boot: ModuleNotFoundError"):
        harness.run(Create(range(3)) | Map(str) | Collect())


def hang_once(marker: str):
    def fn(x: int) -> int:
        if x == 7 and not os.path.exists(marker):
            open(marker, "w").close()
            threading.Event().wait(600)  # a hang, ended by the harness's SIGKILL
        return x * 10

    return fn


def test_a_hanging_worker_is_killed_and_its_bundle_re_run(private_dir):
    marker = os.path.join(private_dir, "hung")
    sink = Collect()
    harness = Harness(workers=2, threads=1, bundle_size=5, bundle_timeout=2.0, progress=False)
    summary = harness.run(Create(range(40)) | Map(hang_once(marker)) | sink)
    assert sink.values == [x * 10 for x in range(40)]
    assert os.path.exists(marker)
    assert summary.worker_restarts == 1 and summary.bundle_retries == 1


def test_failing_batches_become_dead_letters_with_exception_handling(ckpt):
    model, path = ckpt
    handler = PytorchModelHandlerTensor(path, MLP, {}, max_batch_size=1)
    rows = [torch.ones(5) if i % 10 == 3 else to_tensor(i) for i in range(50)]
    sink = Collect()
    pipeline = (
        Create(range(50)) | Map(lambda i: rows[i]) | RunInference(handler).with_exception_handling() | sink
    )
    summary = Harness(workers=2, threads=2, bundle_size=8, progress=False).run(pipeline)
    assert summary.outputs == 45 and len(summary.dead_letters) == 5
    for d in summary.dead_letters:
        assert d["element"].shape == (5,)
        assert "shapes cannot be multiplied" in d["error"] and d["step"].startswith("RunInference")
    (m,) = summary.metrics.values()
    assert m["failed_batches_counter"] == 5 and m["num_inferences"] == 45


def test_user_code_that_keeps_raising_fails_the_run_after_retries():
    def boom(x: int) -> int:
        if x == 13:
            raise ValueError("thirteen is unlucky")
        return x

    with pytest.raises(PipelineError, match="failed 3 times: ValueError: thirteen is unlucky"):
        Harness(workers=1, threads=2, bundle_size=4, progress=False).run(
            Create(range(30)) | Map(boom) | Collect()
        )


PIPELINE_FILE = """
import time
import torch
from client import PytorchModelHandlerTensor
from runtime import ReadFromJsonLines, WriteToJsonLines, Map, RunInference
from tests.models import MLP

CKPT = {ckpt!r}
SLOW = {slow!r}

def parse(row):
    if SLOW:
        time.sleep(SLOW)
    return torch.tensor(row["x"], dtype=torch.float32)

def build_pipeline(input, output):
    handler = PytorchModelHandlerTensor(CKPT, MLP, {{}}, large_model=True, max_batch_size=16)
    return (
        ReadFromJsonLines(input)
        | Map(parse)
        | RunInference(handler)
        | Map(lambda r: {{"x": r.example.tolist(), "y": r.inference.tolist(), "model_id": r.model_id}})
        | WriteToJsonLines(output)
    )
"""


def write_cli_job(private_dir: str, path: str, n: int, slow: float = 0.0) -> tuple[str, str, str]:
    """A pipeline file (each row takes ``slow`` seconds to parse), its input, its output."""
    job = os.path.join(private_dir, "job.py")
    with open(job, "w") as f:
        f.write(PIPELINE_FILE.format(ckpt=path, slow=slow))
    inp = os.path.join(private_dir, "in.jsonl")
    with open(inp, "w") as f:
        for i in range(n):
            f.write(json.dumps({"x": to_tensor(i).tolist()}) + "\n")
    return job, inp, os.path.join(private_dir, "out.jsonl")


def test_cli_runs_a_pipeline_file_end_to_end(ckpt, private_dir, sock_path):
    model, path = ckpt
    job, inp, out = write_cli_job(private_dir, path, 300)
    run = subprocess.run(
        [sys.executable, "-m", "runtime", "run", job, "--input", inp, "--output", out,
         "--workers", "2", "--threads", "2", "--bundle-size", "32", "--json"],
        env=server_env(), cwd=ROOT, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["elements_in"] == 300 and summary["outputs"] == 300 and summary["dead_letters"] == 0
    assert summary["metrics"]["RunInference(PytorchModelHandlerTensor)"]["num_inferences"] == 300
    with open(out) as f:
        rows = [json.loads(line) for line in f]
    assert_same_output([(r["x"], r["y"]) for r in rows], expected_outputs(model, 300))
    assert {r["model_id"] for r in rows} == {path}
    assert not os.path.exists(sock_path)


def is_worker(p: psutil.Process) -> bool:
    """A harness's SDK worker: forked from its zygote, or exec'd (python -m runtime.worker)."""
    try:
        return p.name() == "beamlet-worker" or "runtime.worker" in p.cmdline()
    except psutil.Error:
        return False


@pytest.mark.parametrize(
    "how,start",
    [
        ("SIGTERM to the harness", "fork"),
        ("SIGINT to its process group (Ctrl-C)", "fork"),
        ("SIGTERM to the harness", "exec"),
    ],
)
def test_a_signal_stops_the_cli_harness_with_no_orphans_and_no_stale_sockets(
    ckpt, private_dir, sock_path, how, start
):
    _, path = ckpt
    job, inp, out = write_cli_job(private_dir, path, 20000, slow=0.001)  # 5 s at least: still running
    env = server_env()
    env["TMPDIR"] = private_dir  # where the run's private directory (its control socket) goes
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime", "run", job, "--input", inp, "--output", out,
         "--workers", "2", "--threads", "2", "--bundle-size", "8", "--no-progress",
         *(["--exec-workers"] if start == "exec" else [])],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        process_group=0,  # its own group, as a shell gives a job
    )  # fmt: skip
    sig = signal.SIGTERM if how.startswith("SIGTERM") else signal.SIGINT
    try:
        harness = psutil.Process(proc.pid)
        deadline = time.monotonic() + 120
        while True:  # wait until both workers and the model server are up and working
            family = harness.children(recursive=True)
            workers = [p for p in family if is_worker(p)]
            if len(workers) == 2 and server_processes(sock_path) and os.path.exists(out + ".partial"):
                break
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run never got going"
            time.sleep(0.05)
        forked = [w.name() == "beamlet-worker" for w in workers]
        assert forked == [start == "fork"] * 2, [w.cmdline() for w in workers]
        (run_dir,) = [d for d in os.listdir(private_dir) if d.startswith("beamlet-run-")]
        control = os.path.join(private_dir, run_dir, "control.sock")
        assert os.path.exists(control)
        family = family + server_processes(sock_path)
        if sig == signal.SIGTERM:
            proc.send_signal(sig)
        else:
            os.killpg(proc.pid, sig)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err, err
    gone, alive = psutil.wait_procs(family, timeout=20)
    assert not alive, f"orphans: {[p.pid for p in alive]}"
    assert not os.path.exists(control) and not os.path.exists(os.path.dirname(control))
    assert not os.path.exists(sock_path)
    assert not os.path.exists(out) and not os.path.exists(out + ".partial")


def test_a_custom_runner_can_launch_and_drive_a_worker_itself(private_dir):
    """The documented control protocol, spoken by the test as a custom runner would."""
    pipeline_file = os.path.join(private_dir, "double.py")
    with open(pipeline_file, "w") as f:
        f.write("from runtime import Map, Pipeline\n\ndef build_pipeline(input=None, output=None):\n"
                "    return Pipeline.of(Map(lambda x: x * 2))\n")  # fmt: skip
    control = os.path.join(private_dir, "control.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(control)
    listener.listen(1)
    listener.settimeout(60)
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.worker", "--control", control, "--pipeline", pipeline_file, "--threads", "2"],
        env=server_env(), cwd=ROOT,
    )  # fmt: skip
    try:
        conn, _ = listener.accept()
        ch = ControlChannel(conn)
        hello = ch.read()
        assert hello["op"] == "hello" and hello["pid"] == proc.pid and hello["threads"] == 2
        ch.send({"op": "bundle", "bundle": 0, "attempt": 0, "elements": [1, 2, 3]})
        ch.send({"op": "bundle", "bundle": 1, "attempt": 0, "elements": [torch.ones(2)]})
        replies = {}
        while len(replies) < 2:
            msg = ch.read()
            if msg["op"] == "result":
                replies[msg["bundle"]] = msg["outputs"]
        assert replies[0] == [2, 4, 6] and torch.equal(replies[1][0], torch.full((2,), 2.0))
        ch.send({"op": "stop"})
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        listener.close()
    assert wire  # the control channel is the model server's wire format
