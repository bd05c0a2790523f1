"""Issue 12: start-up, and who owns the compute threads. The CLI forks its workers and its
model server from a zygote instead of starting Pythons that import torch again; a worker
whose models all live in the server computes with one torch thread. Real processes, real
sockets, small models made here; waits are polls bounded by a deadline."""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np
import psutil
import pytest
import torch

from client import PytorchModelHandlerTensor, autostart
from modelserver.channel import Channel
from modelserver.startlock import lock_path
from runtime import (
    Collect,
    Create,
    Harness,
    Map,
    Pipeline,
    PipelineError,
    RunInference,
    computethreads,
    zygote,
)
from runtime.computethreads import SERVER_ONLY_ENV
from tests.conftest import ROOT, server_env
from tests.models import MLP, make_checkpoint

PROBE = '''
import os, sys, threading
{imports}
from runtime import Map, ReadFromNpy, ReadFromJsonLines, RunInference, WriteToJsonLines
{prelude}

def probe(row):
    """Where a row ran: the worker's process, and the torch threads it computes with."""
    torch = sys.modules.get("torch")
    return {{
        "row": row,
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "name": open("/proc/self/comm").read().strip(),
        "cmdline": open("/proc/self/cmdline").read().split("\\0"),
        "torch_threads": torch.get_num_threads() if torch else None,
        "interop_threads": torch.get_num_interop_threads() if torch else None,
        "env": {{k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")}},
        "tasks": len(os.listdir("/proc/self/task")),
    }}

def build_pipeline(input, output):
    {build}
'''

INFERENCE = dict(
    imports="import torch\nfrom client import PytorchModelHandlerTensor\nfrom tests.models import MLP",
    prelude="CKPT = {ckpt!r}",
    build="handler = PytorchModelHandlerTensor(CKPT, MLP, {{}}, large_model=True, max_batch_size=64)\n"
    "    return (ReadFromNpy(input) | Map(torch.from_numpy) | RunInference(handler)\n"
    "            | Map(lambda r: probe(int(r.inference.argmax()))) | WriteToJsonLines(output))",
)
# No torch, and a thread started while the file loads: forking from it is not safe.
THREADED = dict(
    imports="",
    prelude="threading.Thread(target=threading.Event().wait, name='user-thread', daemon=True).start()",
    build="return ReadFromJsonLines(input) | Map(probe) | WriteToJsonLines(output)",
)


def write_job(directory: str, kind: dict[str, str], **values: Any) -> str:
    job = os.path.join(directory, "probe_job.py")
    with open(job, "w") as f:
        f.write(PROBE.format(**{k: v.format(**values) for k, v in kind.items()}))
    return job


def run_cli(job: str, inp: str, out: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runtime", "run", job, "--input", inp, "--output", out, "--workers", "2",
         "--threads", "2", "--no-progress", "--log-level", "INFO", *args],
        env=server_env(), cwd=ROOT, capture_output=True, text=True, timeout=180,
    )  # fmt: skip


def startup_steps(stderr: str) -> dict[str, float]:
    """The seconds of each ``start-up:`` line, by step (worker lines by worker)."""
    return {m[1]: float(m[2]) for m in re.finditer(r"start-up: (.+?) (\d+\.\d+)s", stderr)}


def read_rows(out: str) -> list[dict[str, Any]]:
    with open(out) as f:
        return [json.loads(line) for line in f]


# -- the CLI's start ---------------------------------------------------------------------------
def test_the_cli_forks_its_workers_and_server_and_commits_a_bundle_soon_after_importing(
    private_dir, sock_path
):
    """What a start costs beyond importing the pipeline once (torch): forking a zygote,
    from it the model server and the workers, the model's load and the first bundle. The
    bound is against the run's own import time, measured on the same machine in the same
    minute, so a loaded CI machine moves both: starting Pythons that import torch again
    (the model server, then the workers: two imports one after the other) takes about
    twice the import, forking takes a small part of one."""
    ckpt = os.path.join(private_dir, "mlp.pt")
    make_checkpoint(ckpt)
    inp, out = os.path.join(private_dir, "rows.npy"), os.path.join(private_dir, "out.jsonl")
    np.save(inp, np.random.default_rng(0).standard_normal((1024, 8)).astype(np.float32))
    run = run_cli(write_job(private_dir, INFERENCE, ckpt=ckpt), inp, out)
    assert run.returncode == 0, run.stderr
    steps = startup_steps(run.stderr)
    after_imports = steps["first bundle committed"] - steps["harness import"] - steps["pipeline import"]
    assert after_imports <= max(3.0, steps["pipeline import"]), run.stderr
    assert re.search(r"start-up: model server .*forked", run.stderr), run.stderr
    assert len(re.findall(r"start-up: worker \d+ .*forked", run.stderr)) >= 1, run.stderr

    rows = read_rows(out)
    assert len(rows) == 1024
    harness = {int(m) for m in re.findall(r"beamlet\.startup\[(\d+)\]", run.stderr)}
    zygotes = {r["ppid"] for r in rows}
    assert len(harness) == 1 and len(zygotes) == 1 and not zygotes & harness  # forked from the zygote
    assert {r["name"] for r in rows} == {"beamlet-worker"}
    assert all("runtime.worker" not in " ".join(r["cmdline"]) for r in rows)  # not exec'd
    assert not os.path.exists(sock_path)


def test_the_cli_execs_its_workers_when_loading_the_pipeline_started_a_thread(private_dir):
    inp, out = os.path.join(private_dir, "in.jsonl"), os.path.join(private_dir, "out.jsonl")
    with open(inp, "w") as f:
        f.writelines(f"{i}\n" for i in range(20))
    run = run_cli(write_job(private_dir, THREADED), inp, out)
    assert run.returncode == 0, run.stderr
    assert "started 1 thread(s)" in run.stderr and "python -m runtime.worker instead" in run.stderr
    rows = read_rows(out)
    assert [r["row"] for r in rows] == list(range(20))
    assert all("runtime.worker" in r["cmdline"] for r in rows)
    assert re.search(r"start-up: worker \d+ .*exec'd", run.stderr), run.stderr


# -- compute threads -------------------------------------------------------------------------
def probe(row: Any) -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "name": open("/proc/self/comm").read().strip(),
        "torch_threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")},
        "tasks": len(os.listdir("/proc/self/task")),
    }


@pytest.mark.parametrize("large", [True, False], ids=["models in the server", "models in-process"])
def test_a_worker_computes_with_one_torch_thread_when_its_models_live_in_the_server(
    private_dir, sock_path, large
):
    ckpt = os.path.join(private_dir, "mlp.pt")
    make_checkpoint(ckpt)
    handler = PytorchModelHandlerTensor(ckpt, MLP, {}, large_model=large, max_batch_size=16)
    sink = Collect()
    pipeline = (
        Create(range(200))
        | Map(lambda i: torch.full((8,), float(i)))
        | RunInference(handler)
        | Map(probe)
        | sink
    )
    Harness(workers=2, threads=2, bundle_size=20, progress=False).run(pipeline)
    seen = {
        (r["name"], r["torch_threads"], r["interop_threads"], tuple(r["env"].items())) for r in sink.values
    }
    if large:
        assert seen == {("beamlet-worker", 1, 1, tuple(SERVER_ONLY_ENV.items()))}
        # main, two bundle threads, heartbeat: no OpenMP team, no BLAS pool
        assert max(r["tasks"] for r in sink.values) <= 4
    else:
        share = max(1, computethreads.process_threads() // 2)
        env = (("OMP_NUM_THREADS", str(share)), ("MKL_NUM_THREADS", None), ("OMP_WAIT_POLICY", None))
        assert seen == {("beamlet-worker", share, torch.get_num_interop_threads(), env)}


def test_an_execd_worker_whose_models_live_in_the_server_computes_with_one_torch_thread(
    private_dir, sock_path
):
    ckpt = os.path.join(private_dir, "mlp.pt")
    make_checkpoint(ckpt)
    job = os.path.join(private_dir, "job.py")
    with open(job, "w") as f:
        f.write(
            "import torch\nfrom client import PytorchModelHandlerTensor\nfrom runtime import Map, Pipeline, "
            "RunInference\nfrom tests.models import MLP\nfrom tests.test_startup import probe\n\n"
            "def build_pipeline(input=None, output=None):\n"
            f"    handler = PytorchModelHandlerTensor({ckpt!r}, MLP, {{}}, large_model=True)\n"
            "    return Pipeline.of(Map(lambda i: torch.ones(8)) | RunInference(handler) | Map(probe))\n"
        )
    pipeline = Map(lambda i: torch.ones(8)) | RunInference(
        PytorchModelHandlerTensor(ckpt, MLP, {}, large_model=True)
    )
    (result,) = Harness(workers=1, threads=1, progress=False, pipeline_ref=job).process([[0, 1]], pipeline)
    assert {r["name"] for r in result.outputs} != {"beamlet-worker"}  # exec'd
    assert {(r["torch_threads"], r["interop_threads"]) for r in result.outputs} == {(1, 1)}
    assert all(r["env"] == SERVER_ONLY_ENV for r in result.outputs)


def test_the_compute_thread_plan():
    large = RunInference(PytorchModelHandlerTensor("m.pt", MLP, {}, large_model=True))
    local = RunInference(PytorchModelHandlerTensor("m.pt", MLP, {}))

    def plan(
        pipeline: Any, workers: int, threads: int, environ: dict[str, str]
    ) -> computethreads.ComputeThreads:
        return computethreads.for_workers(Pipeline.of(pipeline).steps, workers, threads, environ)

    assert plan(Map(str) | large, 2, 16, {}).intra_op == 1
    assert plan(Map(str) | large, 2, 16, {"OMP_NUM_THREADS": "8"}).env == SERVER_ONLY_ENV  # 8: the server's
    assert plan(Pipeline.of(large) | local, 2, 16, {}).intra_op == 8  # one model computes here
    assert plan(Map(str) | Map(str), 3, 16, {}).intra_op == 5  # no inference: torch work of its own?
    assert plan(local, 4, 2, {}).intra_op == 1
    user = plan(local, 2, 16, {"MKL_NUM_THREADS": "3"})
    assert (user.intra_op, user.inter_op, user.env) == (None, None, {}) and "MKL_NUM_THREADS=3" in user.why
    assert computethreads.ComputeThreads.from_wire(plan(local, 2, 16, {}).to_wire()) == plan(local, 2, 16, {})


# -- the zygote --------------------------------------------------------------------------------
def slow(x: int) -> int:
    time.sleep(0.01)
    return x


def test_a_run_whose_zygote_is_killed_fails_saying_so_and_leaves_no_worker(private_dir):
    harness = Harness(workers=2, threads=1, bundle_size=5, progress=False)
    outcome: dict[str, BaseException] = {}

    def run() -> None:
        try:
            harness.run(Create(range(100_000)) | Map(slow) | Collect())
        except BaseException as exc:  # what the test checks
            outcome["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 60
    while harness.progress_bundles() < 2:
        assert t.is_alive() and time.monotonic() < deadline, outcome
        time.sleep(0.01)
    run_ = harness.current
    assert run_ is not None and run_.zygote is not None
    workers = [psutil.Process(pid) for pid in harness.worker_pids()]
    os.kill(run_.zygote.pid, signal.SIGKILL)
    t.join(60)
    assert not t.is_alive()
    assert isinstance(outcome.get("error"), PipelineError)
    assert re.search(r"the zygote \(pid \d+\) was killed by SIGKILL", str(outcome["error"])), outcome
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive


def open_fds(pid: int) -> dict[int, str]:
    """What process ``pid`` has open, by descriptor. A live server opens and closes
    descriptors meanwhile (a probe's connection, a file torch reads): one that closed
    between the listing and its readlink is left out."""
    fds = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            fds[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
    return fds


def test_a_server_forked_from_the_zygote_holds_nothing_of_the_harness(private_dir):
    """A session of its own, its log as stdout and stderr, the start lock, and none of the
    descriptors its zygote inherited (a file and a listening socket of the "harness")."""
    path = os.path.join(private_dir, "ms.sock")
    harness_file = open(os.path.join(private_dir, "harness-file"), "w")  # noqa: SIM115
    harness_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    harness_sock.bind(os.path.join(private_dir, "harness.sock"))
    harness_sock.listen(1)
    z = zygote.Zygote([])
    try:
        lock = autostart.claim_start(path)
        assert lock is not None
        log_fd = autostart.open_log(path)
        server = z.spawn_server(autostart.serve_args(path, [], None), autostart.server_env(), log_fd, lock.fd)
        os.close(log_fd)
        lock.detach()
        autostart.wait_until_serving(path, server, 60)
        proc = psutil.Process(server.pid)
        assert proc.name() == "beamlet-server" and os.getsid(server.pid) == server.pid
        assert proc.ppid() == z.pid
        fds = open_fds(server.pid)
        assert fds[1] == fds[2] == autostart.log_path(path) and fds[0] == os.devnull
        assert lock_path(path) in fds.values()
        inherited = {os.readlink(f"/proc/self/fd/{f.fileno()}") for f in (harness_file, harness_sock)}
        assert not inherited & set(fds.values()), fds
        with Channel(path) as ch:
            assert ch.server_pid == server.pid
            ch.request({"op": "shutdown"})
        assert server.wait(30) == 0
    finally:
        z.close()
        harness_file.close()
        harness_sock.close()
    with pytest.raises(zygote.ZygoteLost):
        z.spawn_server(["serve"], {}, 0, None)


def test_the_zygote_protocol_table_matches_the_messages_its_code_sends():
    rows = {}
    for line in (zygote.__doc__ or "").splitlines():
        m = re.match(r"\s+(harness -> zygote|zygote -> harness)\s+(\w+)\s+(.*?)\s{2,}", line)
        if m:
            rows[m[2]] = (m[1], tuple(re.findall(r"\b[a-z]+\b", m[3].split(";")[0])))
    with open(zygote.__file__) as f:
        tree = ast.parse(f.read())
    sent = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            keys = [k.value for k in node.keys if isinstance(k, ast.Constant)]
            if "op" in keys:
                op = node.values[keys.index("op")]
                assert isinstance(op, ast.Constant)
                sent[op.value] = tuple(k for k in keys if k != "op")
    assert {op: fields for op, (_, fields) in rows.items()} == sent
