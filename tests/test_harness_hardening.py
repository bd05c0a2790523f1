"""Issue 11, the harness's part: nothing freezes, nothing waits forever. Real workers
(forked and exec'd), real model servers, small torch models made here; no sleeps as
synchronisation (waits are polls on a condition, bounded by a deadline that only a broken
build reaches)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import torch

from client import PytorchModelHandlerTensor
from client.results import ModelMetadata
from runtime import Collect, Harness, Map, RunInference
from runtime.pipeline import BundleOutput, Source, Step
from tests.models import MLP, make_checkpoint

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


class AfterTheDeath(Source):
    """Reads nothing until the dying worker is dead (a zombie: the harness has not reaped
    it). The harness reads its input in its main loop, so until then it handles no event:
    when it does, the update comes before the dead worker's hello, and replaying the
    update to it can only fail."""

    def __init__(self, directory: str, n: int):
        self.dir, self.n = directory, n

    def read(self) -> Iterator[int]:
        pid_file = os.path.join(self.dir, "pid")
        pid = int(wait_for(lambda: os.path.exists(pid_file) and open(pid_file).read(), "the dying worker"))

        def dead() -> bool:
            try:
                return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        wait_for(dead, "the worker to die")
        yield from range(self.n)


def test_a_worker_that_dies_while_updates_are_replayed_at_hello_is_replaced(private_dir, caplog):
    v1, v2 = os.path.join(private_dir, "v1.pt"), os.path.join(private_dir, "v2.pt")
    make_checkpoint(v1, seed=1)
    make_checkpoint(v2, seed=2)
    xs = rows(64)
    updates = UpdateOnce(ModelMetadata(v2, ""), os.path.join(private_dir, "queued"))
    sink = Collect()
    pipeline = (
        AfterTheDeath(private_dir, len(xs))
        | DieRightAfterHello(private_dir)
        | Map(lambda i: xs[i])
        | RunInference(PytorchModelHandlerTensor(v1, MLP, {}), model_metadata_pcoll=updates)
        | Map(lambda r: (r.example.tolist(), r.model_id, os.getpid()))
        | sink
    )
    caplog.set_level("WARNING", logger="beamlet.harness")
    summary = Harness(workers=2, threads=1, bundle_size=8, progress=False).run(pipeline)
    dead = int(open(os.path.join(private_dir, "pid")).read())
    assert f"pid {dead}" in caplog.text and "at hello" in caplog.text, caplog.text
    assert summary.worker_restarts == 1 and summary.model_updates == 1
    assert [x for x, _, _ in sink.values] == [x.tolist() for x in xs]  # each once, in order
    assert dead not in {pid for *_, pid in sink.values}
