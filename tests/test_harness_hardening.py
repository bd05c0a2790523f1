"""Issue 11, the harness's part: nothing freezes, nothing waits forever. Real workers
(forked and exec'd), real model servers, small torch models made here; no sleeps as
synchronisation (waits are polls on a condition, bounded by a deadline that only a broken
build reaches)."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest
import torch

from client import PytorchModelHandlerTensor
from client.results import ModelMetadata
from modelserver.channel import Channel
from modelserver.config import DETERMINISTIC_ENV
from runtime import (
    CannotStart,
    Collect,
    Create,
    Harness,
    Map,
    PipelineError,
    ReadFromJsonLines,
    ReadFromNpy,
    ReadFromText,
    RunInference,
    WriteToJsonLines,
    control,
)
from runtime.pipeline import BundleOutput, Source, Step
from runtime.summary import DEAD_LETTER_SAMPLE
from tests.conftest import ROOT, server_env, server_processes
from tests.models import MLP, make_checkpoint
from tests.test_runtime import assert_same_output, write_cli_job

DEADLINE = 30.0  # a bound for a broken build, never a wait


def wait_for(condition: Callable[[], Any], what: str, limit: float = DEADLINE) -> Any:
    """Poll ``condition`` until it returns something true; fail after ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)
    return value


def rows(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return [torch.randn(8, generator=g) for _ in range(n)]


# -- 3. a worker that dies at hello while the harness replays model updates to it ------------
class UpdateOnce:
    """A source of model updates (``poll``/``interval``) polled by the harness's update
    thread: the first poll returns ``update``; the next one, which that thread makes only
    after it has queued the first, leaves the file ``queued``."""

    def __init__(self, update: ModelMetadata, queued: str):
        self.interval = 0.01
        self.update: ModelMetadata | None = update
        self.queued = queued

    def poll(self) -> ModelMetadata | None:
        update, self.update = self.update, None
        if update is None and not os.path.exists(self.queued):
            open(self.queued, "w").close()
        return update


class DieRightAfterHello(Step):
    """In the first worker to boot, and only there: wait until the harness has queued the
    model update, let the worker say hello, then exit at once. Its pid goes to ``pid``."""

    label = "DieRightAfterHello"

    def __init__(self, directory: str):
        self.dir = directory

    def setup(self) -> None:
        try:
            os.close(os.open(os.path.join(self.dir, "claimed"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return  # not the first worker
        wait_for(lambda: os.path.exists(os.path.join(self.dir, "queued")), "the update to be queued")
        threading.Thread(target=self._exit_once_hello_is_sent, daemon=True).start()
        with open(os.path.join(self.dir, "pid.tmp"), "w") as f:
            f.write(str(os.getpid()))
        os.replace(os.path.join(self.dir, "pid.tmp"), os.path.join(self.dir, "pid"))

    @staticmethod
    def _exit_once_hello_is_sent() -> None:
        # The worker starts its heartbeat thread right after sending hello.
        wait_for(lambda: any(t.name == "heartbeat" for t in threading.enumerate()), "hello")
        os._exit(3)

    def process(self, elements: list[Any], out: BundleOutput) -> list[Any]:
        return elements


class WaitForTheDeath(RunInference):
    """RunInference whose model updates, in the harness process only, wait until the
    dying worker is dead (a zombie: the harness has not reaped it; its sockets are
    closed) and its hello is on the harness's event queue. The harness applies an update
    to its own copy of the step on its loop, before it handles the next event, so the
    hello (queued after the update: the worker said it only once the update was queued)
    is handled after, and replaying the update to the dead worker can only fail."""

    def __init__(self, *args: Any, directory: str, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.dir = directory
        self.harness: Harness | None = None
        self.harness_pid = os.getpid()

    def update_model(self, update: Any, **kwargs: Any) -> None:
        if os.getpid() == self.harness_pid:
            self._wait_for_the_death()
        super().update_model(update, **kwargs)

    def _wait_for_the_death(self) -> None:
        pid_file = os.path.join(self.dir, "pid")
        pid = int(wait_for(lambda: os.path.exists(pid_file) and open(pid_file).read(), "the dying worker"))

        def dead() -> bool:
            # A zombie whose other threads are gone: a leader shows "Z" while its other
            # threads are still exiting, and they may still hold its sockets open.
            try:
                zombie = psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
                return zombie and os.listdir(f"/proc/{pid}/task") == [str(pid)]
            except (psutil.NoSuchProcess, FileNotFoundError):
                return True

        def hello_queued() -> bool:
            run = self.harness.current if self.harness else None
            events = list(run.events.queue) if run is not None else []
            return any(
                isinstance(m, dict) and m.get("op") == "hello" and m.get("pid") == pid for *_, m in events
            )

        wait_for(dead, "the worker to die")
        wait_for(hello_queued, "its hello to reach the harness")


def test_a_worker_that_dies_while_updates_are_replayed_at_hello_is_replaced(private_dir, caplog):
    v1, v2 = os.path.join(private_dir, "v1.pt"), os.path.join(private_dir, "v2.pt")
    make_checkpoint(v1, seed=1)
    make_checkpoint(v2, seed=2)
    xs = rows(64)
    updates = UpdateOnce(ModelMetadata(v2, ""), os.path.join(private_dir, "queued"))
    sink = Collect()
    inference = WaitForTheDeath(
        PytorchModelHandlerTensor(v1, MLP, {}), model_metadata_pcoll=updates, directory=private_dir
    )
    pipeline = (
        Create(range(len(xs)))
        | DieRightAfterHello(private_dir)
        | Map(lambda i: xs[i])
        | inference
        | Map(lambda r: (r.example.tolist(), r.model_id, os.getpid()))
        | sink
    )
    caplog.set_level("WARNING", logger="beamlet.harness")
    harness = inference.harness = Harness(workers=2, threads=1, bundle_size=8, progress=False)
    summary = harness.run(pipeline)
    dead = int(open(os.path.join(private_dir, "pid")).read())
    assert f"pid {dead}" in caplog.text and "at hello" in caplog.text, caplog.text
    assert summary.worker_restarts == 1 and summary.model_updates == 1
    assert [x for x, _, _ in sink.values] == [x.tolist() for x in xs]  # each once, in order
    assert dead not in {pid for *_, pid in sink.values}


# -- 1. deterministic mode --------------------------------------------------------------------
class WatchServer(Source):
    """Rows 0..n-1; once half are read, the status of the model server at ``sock``
    (started by the run: forked, so its /proc environ is the harness's at start) goes
    into ``seen``."""

    def __init__(self, n: int, sock: str, seen: dict[str, Any]):
        self.n, self.sock, self.seen = n, sock, seen

    def read(self) -> Iterator[int]:
        for i in range(self.n):
            if i == self.n // 2:
                (server,) = server_processes(self.sock)
                with Channel(self.sock) as ch:
                    self.seen.update(ch.request({"op": "status"})["status"])
                assert self.seen["pid"] == server.pid
            yield i


def deterministic_run(path: str, sock: str, n: int, server_status: dict[str, Any]) -> list:
    """n rows through a large-model MLP with 4 callers (2 workers x 2 threads) sharing the
    server and adaptive batch sizes: what makes batch composition, and so a row's last
    digits, vary between ordinary runs. Each output: (input, output, the worker's
    BEAMLET_DETERMINISTIC)."""
    xs = rows(n)
    handler = PytorchModelHandlerTensor(path, MLP, {}, min_batch_size=1, max_batch_size=64, large_model=True)
    sink = Collect()
    pipeline = (
        WatchServer(n, sock, server_status)
        | Map(lambda i: xs[i])
        | RunInference(handler)
        | Map(lambda r: (r.example.tolist(), r.inference.tolist(), os.environ.get(DETERMINISTIC_ENV)))
        | sink
    )
    Harness(workers=2, threads=2, bundle_size=40, progress=False, deterministic=True).run(pipeline)
    return sink.values


def test_deterministic_mode_reaches_every_process_the_run_starts(private_dir, sock_path):
    path = os.path.join(private_dir, "mlp.pt")
    model = make_checkpoint(path, seed=3)
    seen: dict[str, Any] = {}
    out = deterministic_run(path, sock_path, 200, seen)
    assert seen.get("deterministic") is True, "the model server the run started is not deterministic"
    assert {flag for *_, flag in out} == {"1"}, "a forked worker is not deterministic"
    with torch.inference_mode():
        assert_same_output(
            [(x, y) for x, y, _ in out], [(x.tolist(), model(x[None])[0].tolist()) for x in rows(200)]
        )
    job = os.path.join(private_dir, "env_job.py")
    with open(job, "w") as f:
        f.write(
            "import os\nfrom runtime import Map, Pipeline\n\n"
            "def build_pipeline(input=None, output=None):\n"
            f"    return Pipeline.of(Map(lambda x: os.environ.get({DETERMINISTIC_ENV!r})))\n"
        )
    for deterministic, want in ((True, "1"), (False, None)):  # exec'd workers, as the CLI starts them
        harness = Harness(workers=1, threads=1, progress=False, pipeline_ref=job, deterministic=deterministic)
        (result,) = harness.process([[0]], Map(str))
        assert result.outputs == [want]


# Bitwise equality needs every half of the mode: the flag reaching every process (above),
# the model server merging no requests of different callers, RunInference's fixed batch sizes.
def test_a_deterministic_run_gives_bitwise_the_same_output_twice(private_dir, sock_path):
    path = os.path.join(private_dir, "mlp.pt")
    model = make_checkpoint(path, seed=3)
    n = 800
    first = deterministic_run(path, sock_path, n, {})
    second = deterministic_run(path, sock_path, n, {})
    with torch.inference_mode():
        assert_same_output(
            [(x, y) for x, y, _ in first], [(x.tolist(), model(x[None])[0].tolist()) for x in rows(n)]
        )
    differ = [i for i, (a, b) in enumerate(zip(first, second)) if a != b]
    assert not differ, f"{len(differ)} of {n} rows differ between two deterministic runs, first {differ[:5]}"


# -- 4. input and output are checked before any process starts --------------------------------
def run_cli(job: str, inp: str, out: str, tmp: str) -> tuple[subprocess.CompletedProcess[str], float]:
    env = server_env()
    env["TMPDIR"] = tmp  # where the run's private directory (its control socket) would go
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "runtime", "run", job, "--input", inp, "--output", out, "--no-progress"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return run, time.monotonic() - started


@pytest.mark.parametrize("wrong", ["missing input", "missing output directory"])
def test_the_cli_refuses_a_bad_input_or_output_before_starting_anything(private_dir, sock_path, wrong):
    job, inp, out = write_cli_job(private_dir, os.path.join(private_dir, "mlp.pt"), 5)
    make_checkpoint(os.path.join(private_dir, "mlp.pt"))
    tmp = os.path.join(private_dir, "tmp")
    os.mkdir(tmp)
    if wrong == "missing input":
        inp = os.path.join(private_dir, "nope.jsonl")
        expected = f"runtime: cannot start: the input {inp} does not exist"
    else:
        out = os.path.join(private_dir, "no-dir", "out.jsonl")
        expected = f"runtime: cannot start: the output directory {os.path.dirname(out)} does not exist"
    run, seconds = run_cli(job, inp, out, tmp)
    assert run.returncode == 1, run.stderr
    assert run.stderr.strip() == expected
    assert os.listdir(tmp) == [], "the run made its directory: it started"
    assert not os.path.exists(sock_path) and not os.path.exists(os.path.join(private_dir, "modelserver.log"))
    assert not os.path.exists(out) and not os.path.exists(out + ".partial")
    assert seconds < 15, f"{seconds:.1f}s to refuse"  # the interpreter and torch's import; no server
    print(f"refused {wrong} in {seconds:.2f}s")


@pytest.mark.parametrize("wrong", ["not an array", "a directory as input", "output into a file"])
def test_harness_run_refuses_a_bad_source_or_sink_before_starting_anything(private_dir, monkeypatch, wrong):
    tmp = os.path.join(private_dir, "tmp")
    os.mkdir(tmp)
    monkeypatch.setattr(tempfile, "tempdir", tmp)  # where the run's directory would go
    text = os.path.join(private_dir, "rows.txt")
    with open(text, "w") as f:
        f.write("1\n2\n")
    out = os.path.join(private_dir, "out.jsonl")
    if wrong == "not an array":
        pipeline = ReadFromNpy(text) | Map(str) | WriteToJsonLines(out)
        match = f"the input {text} is not a .npy array"
    elif wrong == "a directory as input":
        pipeline = ReadFromText(private_dir) | Map(str) | WriteToJsonLines(out)
        match = f"the input {private_dir} is a directory"
    else:
        out = os.path.join(text, "out.jsonl")
        pipeline = ReadFromText(text) | Map(str) | WriteToJsonLines(out)
        match = f"the output directory {text} is not a directory"
    with pytest.raises(CannotStart, match=re.escape(match)):
        Harness(workers=1, threads=1, progress=False).run(pipeline)
    assert os.listdir(tmp) == []


def test_an_input_that_breaks_while_it_is_read_fails_the_run_cleanly(private_dir):
    inp, out = os.path.join(private_dir, "in.jsonl"), os.path.join(private_dir, "out.jsonl")
    with open(inp, "w") as f:
        f.write("1\n2\nnot json\n4\n")
    pipeline = ReadFromJsonLines(inp) | Map(lambda x: x * 2) | WriteToJsonLines(out)
    with pytest.raises(
        PipelineError, match=f"reading the input failed: ValueError: {re.escape(inp)}:3: not JSON"
    ):
        Harness(workers=1, threads=1, bundle_size=1, progress=False).run(pipeline)
    assert os.listdir(private_dir) == ["in.jsonl"]  # no output, no .partial


# -- 5. a bundle that keeps timing out says so -------------------------------------------------
def test_a_bundle_that_times_out_every_time_fails_the_run_saying_so():
    def hang_on_three(x: int) -> int:
        if x == 3:
            threading.Event().wait(600)  # ended by the harness's SIGKILL
        return x

    harness = Harness(workers=1, threads=1, bundle_size=2, bundle_timeout=0.5, progress=False)
    with pytest.raises(PipelineError) as err:
        harness.run(Create(range(6)) | Map(hang_on_three) | Collect())
    assert (
        str(err.value) == "bundle 1 timed out 3 times (timed out after 0.5s, each time its worker was killed)"
    )


# -- 6. dead letters go to their file as their bundles commit --------------------------------
class CheckDeadLettersMidRun(Source):
    """Rows 0..n-1 in bundles of ``size`` on one worker of one thread: the harness holds
    two bundles and reads at most two more ahead, so asked for the ninth bundle, bundle 0
    has been committed; the dead-letter file's lines at that moment go into ``seen``."""

    def __init__(self, n: int, size: int, dead_file: str, seen: list[int]):
        self.n, self.size, self.dead_file, self.seen = n, size, dead_file, seen

    def read(self) -> Iterator[int]:
        for i in range(self.n):
            if i == 8 * self.size:
                with open(self.dead_file + ".partial") as f:
                    self.seen.append(len(f.readlines()))
            yield i


def test_dead_letters_are_written_as_their_bundles_commit_and_the_summary_stays_small(private_dir):
    path = os.path.join(private_dir, "mlp.pt")
    make_checkpoint(path)
    out = os.path.join(private_dir, "out.jsonl")
    sink = WriteToJsonLines(out)
    n, size = 400, 10
    xs = [torch.ones(5) if i % 2 else x for i, x in enumerate(rows(n))]  # odd rows: wrong shape
    seen: list[int] = []
    handler = PytorchModelHandlerTensor(path, MLP, {}, max_batch_size=1)
    pipeline = (
        CheckDeadLettersMidRun(n, size, sink.dead_letters_path, seen)
        | Map(lambda i: xs[i])
        | RunInference(handler).with_exception_handling()
        | Map(lambda r: r.inference.tolist())
        | sink
    )
    summary = Harness(workers=1, threads=1, bundle_size=size, progress=False).run(pipeline)
    assert seen and size // 2 <= seen[0] < n // 2, seen  # bundle 0's, not all at the end
    assert summary.dead_letter_count == n // 2 and len(summary.dead_letters) == DEAD_LETTER_SAMPLE
    with open(sink.dead_letters_path) as f:
        dead = [json.loads(line) for line in f]
    assert [d["element"] for d in dead] == [[1.0] * 5] * (n // 2)  # each once
    assert all("shapes cannot be multiplied" in d["error"] for d in dead)
    assert not os.path.exists(sink.dead_letters_path + ".partial")
    with open(out) as f:
        assert sum(1 for _ in f) == n // 2


# -- 7. the control protocol's table is complete and in step ---------------------------------
def test_the_control_protocol_table_matches_its_docs_and_the_messages_the_code_sends():
    doc_rows = {}
    for line in (control.__doc__ or "").splitlines():
        m = re.match(r"\s+(worker -> harness|harness -> worker)\s+(\w+)\s+([^(]*)", line)
        if m:
            fields = m[3].strip()
            doc_rows[m[2]] = (m[1], () if fields == "-" else tuple(fields.split(", ")))
    assert doc_rows == control.MESSAGES

    with open(os.path.join(ROOT, "docs", "runtime.md")) as f:
        md = f.read()
    md_rows = {}
    for line in md.splitlines():
        m = re.match(r"\| (worker|harness) → (worker|harness) \| `(\w+)` \|([^|]*)\|", line)
        if m:
            fields = tuple(t for t in re.findall(r"`([^`]*)`", m[4]) if re.fullmatch(r"\w+", t))
            md_rows[m[3]] = (f"{m[1]} -> {m[2]}", fields)
    assert md_rows == control.MESSAGES

    sent: dict[str, set[tuple[str, tuple[str, ...]]]] = {}
    handled: dict[str, set[str]] = {}
    for name in sorted(os.listdir(os.path.join(ROOT, "runtime"))):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(ROOT, "runtime", name)) as f:
            tree = ast.parse(f.read())
        if name in ("serverkeeper.py", "zygote.py"):
            continue  # they speak the model server's protocol and the zygote's, not this one
        direction = control.TO_HARNESS if name == "worker.py" else control.TO_WORKER
        for node in ast.walk(tree):
            if isinstance(node, ast.Dict):
                keys = [k.value for k in node.keys if isinstance(k, ast.Constant)]
                if "op" in keys:
                    op = node.values[keys.index("op")]
                    assert isinstance(op, ast.Constant), f"{name}: an op that is not a literal"
                    fields = tuple(k for k in keys if k != "op")
                    sent.setdefault(op.value, set()).add((direction, fields))
            if isinstance(node, ast.Compare) and isinstance(node.left, ast.Name) and node.left.id == "op":
                for c in node.comparators:
                    if isinstance(c, ast.Constant):
                        handled.setdefault(name, set()).add(c.value)
    assert sent == {op: {row} for op, row in control.MESSAGES.items()}
    to_worker = {op for op, (d, _) in control.MESSAGES.items() if d == control.TO_WORKER}
    assert handled["worker.py"] == to_worker
    assert handled["arbiter.py"] == set(control.MESSAGES) - to_worker  # the run's loop (runtime/arbiter.py)
