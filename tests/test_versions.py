"""Versions only move forward: a key's versions are ordered by the sequence the harness
gives each update, and the model server refuses a swap to an older one.

Through a real server: older refused and attached, newer swapped, equal sequences,
loads without a sequence (the last wins), a malformed sequence. In the manager: the log
line, and an evicted key. A keyed handler's updates. And a whole harness run where a
restarted worker loads the previous version after the next one serves.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import pytest
import torch

from client import (
    KeyedModelHandler,
    KeyModelMapping,
    KeyModelPathMapping,
    ModelMetadata,
    ModelUpdates,
    PytorchModelHandlerTensor,
    RunInference,
    ServerClient,
)
from client.inference import models
from modelserver import userclass
from modelserver.errors import BadRequest
from modelserver.loaders import ModelSpec, file_revision
from runtime import Collect, Harness, Map
from runtime.pipeline import Source
from tests.models import MLP, make_checkpoint
from tests.test_manager import infer
from tests.test_manager import manager_factory as manager_factory  # the fixture
from tests.test_refresh import examples

EPOCH = 1_700_000_000_000_000_000  # a run's epoch, as the harness takes it: time.time_ns()


def versions(directory: str, n: int) -> tuple[list[ModelSpec], list[MLP]]:
    """``n`` checkpoints of the MLP: their specs (as a handler sends them) and the models."""
    specs, refs = [], []
    for i in range(n):
        path = os.path.join(directory, f"v{i}.pt")
        refs.append(make_checkpoint(path, seed=i))
        specs.append(
            ModelSpec("pytorch_state_dict", path, userclass.describe(MLP), {}, revision=file_revision(path))
        )
    return specs, refs


def served(c: ServerClient, key: str = "k") -> dict:
    (model,) = [m for m in c.status()["models"] if m["key"] == key]
    return model


# -- the model server's order --------------------------------------------------------------------
def test_a_load_older_than_the_served_version_attaches_to_it_and_says_so(server, private_dir):
    specs, refs = versions(private_dir, 3)
    x = torch.randn(4, 8)
    with ServerClient(server.path, autostart=False) as c:
        first = c.load("k", specs[0], sequence=(EPOCH, 1))
        assert first["sequence"] == [EPOCH, 1] and not first.get("stale")
        newer = c.load("k", specs[2], sequence=(EPOCH, 3))  # a newer one swaps, as today
        assert newer["model_id"] == specs[2].path and not newer.get("stale")
        older = c.load("k", specs[1], sequence=(EPOCH, 2))  # late: refused, attached
        assert older["stale"] is True and older["sequence"] == [EPOCH, 3]
        assert older["model_id"] == specs[2].path and ModelSpec.from_wire(older["spec"]) == specs[2]
        reply = c.infer("k", x)
        model = served(c)
    assert reply["model_id"] == specs[2].path
    with torch.inference_mode():
        assert torch.allclose(reply["outputs"], refs[2](x), atol=1e-6)
    assert model["model_id"] == specs[2].path and model["swaps"] == 1 and model["sequence"] == [EPOCH, 3]


def test_an_earlier_runs_versions_order_before_a_later_runs(server, private_dir):
    specs, _ = versions(private_dir, 2)
    with ServerClient(server.path, autostart=False) as c:
        c.load("k", specs[0], sequence=(EPOCH, 40))
        assert c.load("k", specs[1], sequence=(EPOCH + 1, 1))["model_id"] == specs[1].path
        assert c.load("k", specs[0], sequence=(EPOCH, 41))["stale"] is True
        assert served(c)["sequence"] == [EPOCH + 1, 1]


def test_an_equal_sequence_attaches_to_the_same_spec_and_refuses_another(server, private_dir):
    specs, _ = versions(private_dir, 2)
    with ServerClient(server.path, autostart=False) as c:
        c.load("k", specs[0], sequence=(EPOCH, 1))
        again = c.load("k", specs[0], sequence=(EPOCH, 1))
        assert again["model_id"] == specs[0].path and not again.get("stale")
        with pytest.raises(BadRequest, match=r"v1\.pt.*sequence \[1700000000000000000, 1\].*v0\.pt"):
            c.load("k", specs[1], sequence=(EPOCH, 1))
        model = served(c)
    assert model["model_id"] == specs[0].path and model["swaps"] == 0 and model["loads"] == 1


def test_the_same_spec_under_a_newer_sequence_moves_the_served_sequence_on(server, private_dir):
    """v0 is updated to (E, 3) and attaches; a late (E, 2) for v1 is then older than what
    serves, though it is newer than the load that put v0 in."""
    specs, _ = versions(private_dir, 2)
    with ServerClient(server.path, autostart=False) as c:
        c.load("k", specs[0], sequence=(EPOCH, 1))
        assert not c.load("k", specs[0], sequence=(EPOCH, 3)).get("stale")
        assert served(c)["sequence"] == [EPOCH, 3]
        assert c.load("k", specs[1], sequence=(EPOCH, 2))["stale"] is True
        assert served(c)["model_id"] == specs[0].path


def test_loads_without_a_sequence_keep_last_wins(server, private_dir):
    """Beam's adapter, or a user calling update_model_path: no order, the last swaps; and
    a version with no order is swapped by the next sequenced load, whatever its sequence."""
    specs, _ = versions(private_dir, 3)
    with ServerClient(server.path, autostart=False) as c:
        c.load("k", specs[0])
        assert served(c)["sequence"] is None
        c.load("k", specs[1])
        c.load("k", specs[0])
        assert served(c)["model_id"] == specs[0].path and served(c)["swaps"] == 2
        c.load("k", specs[2], sequence=(EPOCH, 5))
        reply = c.load("k", specs[1])  # unordered: swaps, and what serves has no order now
        assert reply["model_id"] == specs[1].path and reply["sequence"] is None and not reply.get("stale")
        assert c.load("k", specs[0], sequence=(EPOCH, 1))["model_id"] == specs[0].path
        assert served(c)["swaps"] == 5 and served(c)["sequence"] == [EPOCH, 1]


@pytest.mark.parametrize("bad", ["3", 3, [1], [1, 2, 3], [1, -2], [-1, 2], [1, True], [1.0, 2], None])
def test_a_malformed_sequence_is_refused_naming_the_field(server, private_dir, bad):
    specs, _ = versions(private_dir, 1)
    message = {"op": "load", "key": "k", "spec": specs[0].to_wire(), "sequence": bad}
    with server.channel() as ch:
        if bad is None:  # null is as good as absent
            assert ch.request(message)["sequence"] is None
            return
        with pytest.raises(BadRequest, match="'sequence'"):
            ch.request(message)
        assert ch.request({"op": "status"})["status"]["models"] == []


# -- in the manager ------------------------------------------------------------------------------
def test_a_refused_stale_swap_logs_one_line(private_dir, manager_factory, caplog):
    specs, _ = versions(private_dir, 2)
    m = manager_factory(None)
    m.register("k", specs[1], sequence=(EPOCH, 2))
    with caplog.at_level(logging.INFO, logger="beamlet.manager"):
        m.register("k", specs[0], sequence=(EPOCH, 1))
    lines = [r.getMessage() for r in caplog.records if "older" in r.getMessage()]
    assert len(lines) == 1 and "v0.pt" in lines[0] and "v1.pt" in lines[0], caplog.text


def test_an_evicted_key_reloads_what_it_serves_when_an_older_version_asks(private_dir, manager_factory):
    specs, refs = versions(private_dir, 2)
    m = manager_factory(None)
    m.register("k", specs[1], sequence=(EPOCH, 2))
    assert m.relieve("cpu") == 1
    slot = m.register("k", specs[0], sequence=(EPOCH, 1))
    assert slot.spec == specs[1] and slot.sequence == (EPOCH, 2)
    x = torch.randn(2, 8)
    with torch.inference_mode():
        assert torch.allclose(infer(m, "k", x), refs[1](x), atol=1e-6)
    (status,) = m.status()
    assert status["model_id"] == specs[1].path and status["swaps"] == 0


# -- handlers ---------------------------------------------------------------------------------
def test_a_keyed_handlers_update_carries_its_sequence_to_the_server(private_dir, sock_path):
    paths = {n: os.path.join(private_dir, f"{n}.pt") for n in ("de1", "de2", "de3", "en1")}
    refs = {p: make_checkpoint(p, seed=i) for i, p in enumerate(paths.values())}
    de = PytorchModelHandlerTensor(paths["de1"], MLP, {}, large_model=True)
    en = PytorchModelHandlerTensor(paths["en1"], MLP, {}, large_model=True)
    keyed = KeyedModelHandler([KeyModelMapping(["de"], de), KeyModelMapping(["en"], en)])
    ri = RunInference(keyed)
    xs = [("de", x) for x in examples(4)]
    assert {r.model_id for _, r in xs | ri} == {paths["de1"]}
    ri.update_model([KeyModelPathMapping(["de"], paths["de3"])], sequence=(EPOCH, 2))
    assert models.wait_for(de)  # loaded in the background, as in a running job
    assert {r.model_id for _, r in xs | ri} == {paths["de3"]}
    ri.update_model([KeyModelPathMapping(["de"], paths["de2"])], sequence=(EPOCH, 1))  # late
    assert models.wait_for(de)
    results = list(xs | ri)
    assert {r.model_id for _, r in results} == {paths["de3"]}  # named for what computed them
    with torch.inference_mode():
        for (_, x), (_, r) in zip(xs, results):
            assert torch.allclose(r.inference, refs[paths["de3"]](x[None])[0], atol=1e-5)
    with ServerClient(sock_path, autostart=False) as c:
        model = served(c, de.model_key())
    assert model["sequence"] == [EPOCH, 2] and model["swaps"] == 1


# -- a whole run: a restarted worker loads the previous version after the next one serves --------
_asked: dict[int, str] = {}  # thread -> the checkpoint its last load asked for


class HoldsBack(PytorchModelHandlerTensor):
    """Sends the load of the checkpoint ``held`` to the server only once the file ``hold``
    is gone (in the workers: the harness's own process never waits), after reading the
    version to load: a worker that is slow to reach the server with the version it was
    told about. Marks each held load (``held-<pid>``) and each finished load
    (``loaded-<pid>-<file>``) in the directory ``marks``."""

    def __init__(self, *args, held: str, hold: str, marks: str, **kwargs):
        self.held, self.hold, self.marks, self.harness_pid = held, hold, marks, os.getpid()
        super().__init__(*args, **kwargs)

    def _spec(self, version):
        spec = super()._spec(version)
        _asked[threading.get_ident()] = spec.path
        if spec.path == self.held and os.getpid() != self.harness_pid and os.path.exists(self.hold):
            self._mark(f"held-{os.getpid()}")
            deadline = time.monotonic() + 60  # a bound for a broken test, not a wait
            while os.path.exists(self.hold) and time.monotonic() < deadline:
                time.sleep(0.01)  # the other process's file is the condition; nothing to wait on
        return spec

    def load_model(self):
        model = super().load_model()
        self._mark(f"loaded-{os.getpid()}-{os.path.basename(_asked[threading.get_ident()])}")
        return model

    def _mark(self, name: str) -> None:
        open(os.path.join(self.marks, name), "w").close()


class UpdatesAroundARestart(Source):
    """Steady input; pushes v1 and waits until both workers loaded it; kills a worker whose
    replacement then holds its load of v1 (replayed at hello); pushes v2 and waits until
    the server serves it; releases the held load, and waits until that worker has loaded
    v2 too. Records the server's view of the model all along."""

    def __init__(self, d: str, updates: ModelUpdates, v1: str, v2: str):
        self.dir, self.updates, self.v1, self.v2 = d, updates, v1, v2
        self.hold, self.marks = os.path.join(d, "hold"), os.path.join(d, "marks")
        os.mkdir(self.marks)
        self.harness: Harness | None = None
        self.key = ""
        self.seen: list[tuple[str, int, list[int] | None]] = []  # (model_id, swaps, sequence)
        self.after_v2 = -1
        self.i = 0

    def look(self) -> dict:
        with ServerClient(autostart=False, retry_seconds=5) as c:
            (model,) = [m for m in c.status()["models"] if m["key"] == self.key]
        self.seen.append((model["model_id"], model["swaps"], model.get("sequence")))
        return model

    def loaded(self, path: str) -> bool:
        """Every running worker has loaded ``path`` (the server may serve it before)."""
        assert self.harness is not None
        name = os.path.basename(path)
        return all(
            os.path.exists(os.path.join(self.marks, f"loaded-{pid}-{name}"))
            for pid in self.harness.worker_pids()
        )

    def steady(self, n: int):
        for _ in range(n):
            yield self.i
            self.i += 1

    def until(self, done, what: str):
        deadline = time.monotonic() + 60  # a bound for a broken build, not a wait
        while not done():
            assert time.monotonic() < deadline, f"gave up waiting until {what}"
            yield from self.steady(4)

    def read(self):
        assert self.harness is not None
        yield from self.steady(64)
        self.updates.put(ModelMetadata(self.v1, "v1"))
        yield from self.until(lambda: self.loaded(self.v1), "both workers loaded v1")
        open(self.hold, "w").close()
        os.kill(self.harness.worker_pids()[0], signal.SIGKILL)
        held = lambda: [n for n in os.listdir(self.marks) if n.startswith("held-")]  # noqa: E731
        yield from self.until(held, "the replacement holds its load of v1")
        replacement = held()[0].removeprefix("held-")
        self.updates.put(ModelMetadata(self.v2, "v2"))
        yield from self.until(lambda: self.look()["model_id"] == self.v2, "the server serves v2")
        self.after_v2 = self.i  # this element and the next ones are computed after the swap
        os.remove(self.hold)
        loaded_v2 = lambda: os.path.exists(os.path.join(self.marks, f"loaded-{replacement}-v2.pt"))  # noqa: E731
        yield from self.until(lambda: self.look() and loaded_v2(), "the replacement loaded v2")
        for _ in range(16):
            yield from self.steady(4)
            self.look()


def test_versions_only_move_forward_when_a_restarted_worker_loads_the_previous_one_late(
    private_dir, sock_path
):
    v0, v1, v2 = (os.path.join(private_dir, f"v{i}.pt") for i in range(3))
    refs = {p: make_checkpoint(p, seed=i) for i, p in enumerate((v0, v1, v2))}
    sink, updates = Collect(), ModelUpdates()
    source = UpdatesAroundARestart(private_dir, updates, v1, v2)
    handler = HoldsBack(
        v0, MLP, {}, max_batch_size=4, large_model=True, held=v1, hold=source.hold, marks=source.marks
    )
    source.key = handler.model_key()
    xs = examples(64)

    def element(i: int) -> torch.Tensor:  # carries its index, which the output names
        x = xs[i % len(xs)].clone()
        x[0] = i
        return x

    pipeline = (
        source
        | Map(element)
        | RunInference(handler, model_metadata_pcoll=updates)
        | Map(lambda r: (int(r.example[0]), r.model_id, os.getpid(), r.inference.tolist()))
        | sink
    )
    harness = source.harness = Harness(workers=2, threads=1, bundle_size=8, progress=False)
    summary = harness.run(pipeline)
    assert summary.worker_restarts == 1 and summary.model_updates == 2
    assert summary.outputs == summary.elements_in == len(sink.values) and not summary.dead_letters
    # The server swapped twice (v0 -> v1 -> v2), never back: the late v1 load attached.
    after = source.seen[[m for m, _, _ in source.seen].index(v2) :]
    assert len(after) >= 16 and {(m, s) for m, s, _ in after} == {(v2, 2)}, source.seen
    epoch, n = after[-1][2]
    assert epoch > 0 and n == 2 and {tuple(q) for _, _, q in after} == {(epoch, 2)}
    # Every element sent after the server served v2 ran on v2; each output names the
    # version that computed it.
    assert 0 < source.after_v2 < len(sink.values)
    assert {m for i, m, _, _ in sink.values if i >= source.after_v2} == {v2}
    with torch.inference_mode():
        for i, m, _, y in sink.values:
            assert torch.allclose(torch.tensor(y), refs[m](element(i)[None])[0], atol=1e-5)
