"""Automatic model refresh: new model versions swap in while a job runs.

The file watcher on a fake clock; RunInference swapping in-process; the model server's
swap beside the old version and, under a tight budget, after draining it; rejected
versions; keyed updates; memory across many swaps; and whole harness runs under steady
load while checkpoints change.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import psutil
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
from modelserver.errors import InternalError, ModelLoadError
from modelserver.loaders import ModelSpec, file_revision
from runtime import Collect, Harness, Map, WatchFilePattern
from runtime.pipeline import Source
from runtime.watch import FileInfo
from tests.conftest import server_processes, start_server
from tests.models import MLP, Blob, Gate, make_blob, make_checkpoint
from tests.test_manager import MB, blob_spec, infer
from tests.test_manager import manager_factory as manager_factory  # the fixture
from tests.workers import keep_sending


def write_atomically(path: str, seed: int) -> MLP:
    """A new checkpoint, renamed into place so a watcher never sees half of it."""
    tmp = path + ".tmp"
    model = make_checkpoint(tmp, seed=seed)
    os.replace(tmp, path)
    return model


def write_corrupt(path: str) -> None:
    with open(path + ".tmp", "wb") as f:
        f.write(b"PK\x03\x04 this is not a checkpoint" * 100)
    os.replace(path + ".tmp", path)


def examples(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, generator=g) for _ in range(n)]


# -- WatchFilePattern ------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_watch_file_pattern_waits_for_a_match_and_a_complete_file(private_dir):
    clock = Clock()
    watch = WatchFilePattern(os.path.join(private_dir, "*.pt"), interval=10, settle=1, clock=clock)
    assert watch.poll() is None  # nothing matches yet: it waits, no error
    a = os.path.join(private_dir, "a.pt")
    with open(a, "wb") as f:
        f.write(b"x" * 100)
    clock.now = 10
    assert watch.poll() is None  # seen once: not yet known to be complete
    with open(a, "ab") as f:
        f.write(b"y" * 100)  # still being written
    clock.now = 11
    assert watch.poll() is None  # changed since: wait again
    clock.now = 12
    assert watch.poll() == ModelMetadata(a, "a")  # the same size and time twice, settle apart
    clock.now = 22
    assert watch.poll() is None  # unchanged: nothing new


def test_watch_file_pattern_sees_a_newer_file_and_an_in_place_rewrite(private_dir):
    clock = Clock()
    watch = WatchFilePattern(os.path.join(private_dir, "model-*.pt"), interval=5, settle=0.5, clock=clock)
    a, b = (os.path.join(private_dir, f"model-{n}.pt") for n in "ab")
    make_checkpoint(a, seed=1)
    os.utime(a, ns=(10**18, 10**18))
    for t in (0, 0.5):
        clock.now = t
        got = watch.poll()
    assert got == ModelMetadata(a, "model-a")
    make_checkpoint(b, seed=2)
    os.utime(b, ns=(2 * 10**18, 2 * 10**18))
    for t in (5.5, 6):
        clock.now = t
        got = watch.poll()
    assert got == ModelMetadata(b, "model-b")
    # The same file rewritten in place, same size (same architecture): a new version.
    size = os.path.getsize(b)
    make_checkpoint(b, seed=3)
    os.utime(b, ns=(3 * 10**18, 3 * 10**18))
    assert os.path.getsize(b) == size
    for t in (11, 11.5):
        clock.now = t
        got = watch.poll()
    assert got == ModelMetadata(b, "model-b")
    assert watch.interval == 0.5  # a harness polls it every settle period; it lists when due


def test_watch_file_pattern_takes_any_file_store(private_dir):
    class Store:
        def __init__(self):
            self.files = []

        def match(self, pattern):
            return list(self.files)

    store, clock = Store(), Clock()
    watch = WatchFilePattern("bucket://models/*", interval=1, settle=0, store=store, clock=clock)
    assert watch.poll() is None
    store.files = [FileInfo("bucket://models/v1.pt", 10, 1), FileInfo("bucket://models/v2.pt", 10, 2)]
    clock.now = 1
    assert watch.poll() == ModelMetadata("bucket://models/v2.pt", "v2")


# -- RunInference in one process -----------------------------------------------------------
def check_results(results, xs, refs):
    """Every result's model_id is a known version, and its inference is that version's."""
    with torch.inference_mode():
        for x, r in zip(xs, results, strict=True):
            assert r.model_id in refs, r.model_id
            assert torch.allclose(r.inference, refs[r.model_id](x[None])[0], atol=1e-5)


@pytest.mark.parametrize("large", [False, True])
def test_run_inference_swaps_versions_on_updates_and_names_each_result(private_dir, sock_path, large, caplog):
    v1, v2, bad = (os.path.join(private_dir, n) for n in ("v1.pt", "v2.pt", "bad.pt"))
    refs = {v1: make_checkpoint(v1, seed=1), v2: make_checkpoint(v2, seed=2)}
    write_corrupt(bad)
    handler = PytorchModelHandlerTensor(v1, MLP, {}, max_batch_size=10, large_model=large)
    updates = ModelUpdates()
    ri = RunInference(handler, model_metadata_pcoll=updates)
    xs = examples(300)

    def source():
        for i, x in enumerate(xs):
            if i == 100:
                updates.put(ModelMetadata(v2, "v2"))
            if i == 110:
                assert models.wait_for(handler)  # the new version is loaded (no element waits)
            if i == 200:
                updates.put(ModelMetadata(bad, "bad"))
            if i == 210:  # the bad version is tried and rejected (not merely still loading)
                assert models.wait_for(handler) is False
            yield x

    with caplog.at_level(logging.ERROR):
        results = list(source() | ri)
    check_results(results, xs, refs)
    ids = [r.model_id for r in results]
    switch = ids.index(v2)
    assert 80 <= switch <= 120 and set(ids[:switch]) == {v1}
    # After the switch: v2. With large_model, RunInference keeps two batches in flight to
    # the server, and the two around the server's swap may finish in either order.
    settled = switch + (2 * 10 if large else 0)
    assert set(ids[settled:]) == {v2} and set(ids[switch:settled]) <= {v1, v2}
    assert "rejected" in caplog.text and "bad.pt" in caplog.text
    # Metrics: unprefixed before the first named update, then under Beam's prefix.
    named = ri.beam_metrics()
    assert named["num_inferences"] + named["v2_num_inferences"] + named["bad_num_inferences"] == 300
    assert named["v2_num_inferences"] > 0 and 90 <= named["bad_num_inferences"] <= 110  # from the batch after


@pytest.mark.parametrize("large", [False, True])
def test_an_update_to_the_same_path_loads_what_the_file_now_holds(private_dir, sock_path, large):
    path = os.path.join(private_dir, "model.pt")
    old = make_checkpoint(path, seed=1)
    handler = PytorchModelHandlerTensor(path, MLP, {}, large_model=large)
    xs = examples(20)
    first = list(xs | RunInference(handler))
    check_results(first, xs, {path: old})
    before = file_revision(path)
    new = write_atomically(path, seed=2)
    assert file_revision(path) != before
    handler.update_model_path(path)  # the path already in use: the file was rewritten
    assert models.wait_for(handler)
    check_results(list(xs | RunInference(handler)), xs, {path: new})
    if large:
        with ServerClient(sock_path, autostart=False) as c:
            (status,) = c.status()["models"]
        assert status["swaps"] == 1 and status["loaded"]


def test_every_update_is_a_new_try_so_a_fixed_file_loads(private_dir):
    path = os.path.join(private_dir, "model.pt")
    make_checkpoint(path, seed=1)
    handler = PytorchModelHandlerTensor(path, MLP, {})
    xs = examples(5)
    list(xs | RunInference(handler))
    write_corrupt(path)
    handler.update_model_path(path)
    assert not models.wait_for(handler)  # rejected: the old version keeps serving
    good = write_atomically(path, seed=2)
    handler.update_model_path(path)  # the file is fixed: the same path, updated again
    assert models.wait_for(handler)
    check_results(list(xs | RunInference(handler)), xs, {path: good})


def test_keyed_handlers_update_some_keys_with_key_model_path_mappings(private_dir):
    paths = {n: os.path.join(private_dir, f"{n}.pt") for n in ("en", "de", "de2")}
    refs = {p: make_checkpoint(p, seed=i) for i, p in enumerate(paths.values())}
    keyed = KeyedModelHandler(
        [
            KeyModelMapping(["en"], PytorchModelHandlerTensor(paths["en"], MLP, {})),
            KeyModelMapping(["de", "at"], PytorchModelHandlerTensor(paths["de"], MLP, {})),
        ]
    )
    ri = RunInference(keyed)
    keys = ["en", "de", "at"] * 10
    xs = examples(len(keys))
    before = list(zip(keys, xs) | ri)
    ri.update_model([KeyModelPathMapping(["de", "at"], paths["de2"])])
    list(zip(keys[:3], xs[:3]) | ri)  # the next batch starts loading de2 aside; it does not wait
    assert models.get(keyed).wait_for_updates(30)
    after = list(zip(keys, xs) | ri)
    for results, de in ((before, paths["de"]), (after, paths["de2"])):
        for key, (k, r) in zip(keys, results):
            want = paths["en"] if key == "en" else de
            assert k == key and r.model_id == want
        check_results([r for _, r in results], xs, refs)
    with pytest.raises(ValueError, match="different models"):
        ri.update_model([KeyModelPathMapping(["en", "de"], paths["de2"])])
    with pytest.raises(ValueError, match="no model is mapped"):
        ri.update_model([KeyModelPathMapping(["fr"], paths["de2"])])
    with pytest.raises(TypeError, match="ModelMetadata or a list of KeyModelPathMapping"):
        ri.update_model("de2.pt")  # type: ignore[arg-type]


def test_handlers_pickle_with_their_current_version(private_dir):
    """Runners such as Beam ship handlers by pickling them (not on beamlet's wire)."""
    import pickle

    v1, v2 = (os.path.join(private_dir, n) for n in ("v1.pt", "v2.pt"))
    make_checkpoint(v1, seed=1)
    ref = make_checkpoint(v2, seed=2)
    handler = PytorchModelHandlerTensor(v1, MLP, {})
    handler.load_model()
    handler.update_model_path(v2)
    copy = pickle.loads(pickle.dumps(handler))
    assert copy.model_spec() == handler.model_spec() and copy.cache_key() == handler.cache_key()
    x = examples(3)
    check_results(list(x | RunInference(copy)), x, {v2: ref})


# -- the model server's swap ----------------------------------------------------------------
def gate_spec(gate: str, scale: float, private_dir: str, name: str) -> ModelSpec:
    path = os.path.join(private_dir, f"{name}.pt")
    model = Gate(gate, 30)
    with torch.no_grad():
        model.scale.fill_(scale)
    torch.save(model.state_dict(), path)
    return ModelSpec("pytorch_state_dict", path, userclass.describe(Gate), {"gate": gate, "limit": 30})


def test_a_swap_loads_beside_the_old_version_whose_in_flight_batch_finishes_on_it(
    private_dir, manager_factory
):
    m = manager_factory(None)
    gate = os.path.join(private_dir, "open")
    v1 = gate_spec(gate, 1.0, private_dir, "v1")
    v2 = gate_spec(os.path.join(private_dir, "always-open"), 2.0, private_dir, "v2")
    open(os.path.join(private_dir, "always-open"), "w").close()
    m.register("k", v1)
    box: dict = {}
    in_flight = threading.Thread(target=lambda: box.setdefault("old", infer(m, "k", torch.ones(2, 1))))
    in_flight.start()
    while not m.status()[0]["in_flight"]:  # the request is in the old version's hands
        threading.Event().wait(0.005)
    one = m.used("cpu")
    m.register("k", v2)  # loads beside, swaps atomically; does not wait for the old batch
    assert torch.equal(infer(m, "k", torch.ones(2, 1)), torch.full((2, 1), 2.0))
    assert in_flight.is_alive()
    assert m.used("cpu") > one and m.retiring == 1  # the old version is still charged
    open(gate, "w").close()
    in_flight.join(30)
    while m.retiring:  # freed on its retiring thread
        threading.Event().wait(0.005)
    assert m.used("cpu") == m.status()[0]["footprint"]
    assert torch.equal(box["old"], torch.ones(2, 1))  # finished on the old version
    (status,) = m.status()
    assert status["model_id"] == v2.path and status["swaps"] == 1 and status["loads"] == 2


def test_a_corrupt_or_misfitting_version_is_rejected_and_the_old_one_keeps_serving(
    private_dir, manager_factory, caplog
):
    m = manager_factory(None)
    good = os.path.join(private_dir, "good.pt")
    make_checkpoint(good, seed=1)
    spec = ModelSpec("pytorch_state_dict", good, userclass.describe(MLP), {})
    m.register("k", spec)
    bad = os.path.join(private_dir, "bad.pt")
    write_corrupt(bad)
    wrong = os.path.join(private_dir, "wrong.pt")
    make_checkpoint(wrong, seed=1, d_in=5)
    with caplog.at_level(logging.ERROR):
        for path, why in ((bad, "cannot read checkpoint"), (wrong, "does not fit")):
            with pytest.raises(ModelLoadError, match=why):
                m.register("k", ModelSpec("pytorch_state_dict", path, userclass.describe(MLP), {}))
    assert "rejected" in caplog.text and "good.pt keeps serving" in caplog.text
    (status,) = m.status()
    assert status["model_id"] == good and status["loaded"] and status["failed_swaps"] == 2
    assert infer(m, "k", torch.ones(3, 8)).shape == (3, 3)


def blob_versions(directory: str, n: int, megabytes: float) -> tuple[list[ModelSpec], list[Blob]]:
    """``n`` versions of a Blob model on disk: their specs, and the models themselves."""
    specs, refs = [], []
    for i in range(n):
        path = os.path.join(directory, f"v{i}.pt")
        refs.append(make_blob(path, megabytes, seed=i))
        specs.append(blob_spec(path, megabytes))
    return specs, refs


def serve(m, key: str, x: torch.Tensor) -> torch.Tensor:
    """One request as the server runs it: a model swapped out between lookup and submit
    (InternalError from its batcher) is looked up again."""
    for _ in range(3):
        try:
            return infer(m, key, x)
        except InternalError:
            continue
    raise AssertionError("the model kept being replaced")


def test_a_tight_budget_swap_drains_the_old_version_first_and_no_request_fails(private_dir, manager_factory):
    """60 MB budget, 40 MB versions: both cannot be held, so the old one is drained,
    freed, and the new one loaded, while requests keep coming from four threads."""
    m = manager_factory(60, load_wait=10)
    specs, refs = blob_versions(private_dir, 3, 40)
    m.register("k", specs[0])
    x = torch.randn(2, refs[0].lin.in_features)
    stop, errors, seen = threading.Event(), [], []

    def load() -> None:
        while not stop.is_set():
            try:
                seen.append(serve(m, "k", x))
            except Exception as exc:
                errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    for spec in specs[1:]:
        m.register("k", spec)
        assert m.used("cpu") <= 60 * MB
    bad = os.path.join(private_dir, "bad.pt")
    write_corrupt(bad)
    with pytest.raises(ModelLoadError):  # checked before the old version is dropped
        m.register("k", blob_spec(bad, 40))
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors
    with torch.inference_mode():
        wants = [ref(x) for ref in refs]
    assert all(any(torch.allclose(y, w, atol=1e-4) for w in wants) for y in seen)
    assert torch.allclose(infer(m, "k", x), wants[2], atol=1e-4)
    (status,) = m.status()
    assert status["swaps"] == 2 and status["failed_swaps"] == 1 and status["model_id"] == specs[2].path


def test_a_tight_budget_swap_through_the_server_fails_no_request(private_dir, sock_path):
    """The same drain-first swap in a real server, with clients on their own connections:
    requests that arrive while no version is loaded wait for the load."""
    srv = start_server(sock_path, "--memory-budget", "60MiB")
    try:
        specs, refs = blob_versions(private_dir, 3, 40)
        x = torch.randn(2, refs[0].lin.in_features)
        with torch.inference_mode():
            wants = {spec.path: ref(x) for spec, ref in zip(specs, refs)}
        with ServerClient(sock_path, autostart=False) as c:
            c.load("k", specs[0])
            with keep_sending(c, "k", x, 3) as (seen, errors):
                for spec in specs[1:]:
                    before = len(seen)
                    c.load("k", spec, replace=True)
                    while len(seen) < before + 5 and not errors:  # served after the swap too
                        threading.Event().wait(0.005)
            (status,) = c.status()["models"]
        assert not errors, errors[:3]
        assert all(torch.allclose(y, wants[model_id], atol=1e-4) for model_id, y in seen)
        assert seen[-1][0] == specs[2].path and status["swaps"] == 2 and status["footprint"] <= 60 * MB
    finally:
        srv.stop()


def test_a_corrupt_torchscript_version_written_in_place_is_caught_before_draining(
    private_dir, manager_factory
):
    m = manager_factory(6, load_wait=1)  # holds one 4 MiB version, not two
    path = os.path.join(private_dir, "m.ts")
    torch.jit.script(Blob(1024)).save(path)
    spec = ModelSpec("torchscript", path, revision=file_revision(path))
    m.register("k", spec)
    with open(path, "r+b") as f:  # rewritten in place, and cut short
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(ModelLoadError, match="corrupt"):
        m.register("k", ModelSpec("torchscript", path, revision=file_revision(path)))
    (status,) = m.status()
    assert status["loaded"] and status["revision"] == spec.revision and status["failed_swaps"] == 1
    assert infer(m, "k", torch.ones(1, 1024)).shape == (1, 1024)


def test_server_memory_stays_flat_over_many_swaps(private_dir, sock_path):
    srv = start_server(sock_path)
    try:
        paths = [os.path.join(private_dir, f"b{i}.pt") for i in range(2)]
        for i, p in enumerate(paths):
            make_blob(p, 16, seed=i)
        server = psutil.Process(srv.proc.pid)
        x = torch.randn(1, 2048)
        with ServerClient(sock_path, autostart=False) as c:
            rss = []
            for i in range(40):
                c.load("k", blob_spec(paths[i % 2], 16), replace=True)
                c.infer("k", x)
                while c.status()["retiring_versions"]:  # the old version is freed off-thread
                    threading.Event().wait(0.005)
                rss.append(server.memory_info().rss)
            status = c.status()
        assert status["models"][0]["swaps"] == 39
        growth = max(rss[10:]) - rss[9]
        assert growth < 24 * MB, f"server RSS grew {growth / MB:.0f} MiB over 30 swaps of a 16 MiB model"
    finally:
        srv.stop()


# -- whole runs: a harness under steady load while checkpoints change ---------------------------
class Versions(Source):
    """Steady input that writes new model versions as it goes. After writing a version it
    keeps producing until every worker's output shows it (or, for a version meant to be
    rejected, for a fixed count), so each version is really used before the next."""

    def __init__(self, directory: str, sink: Collect, workers: int):
        self.dir, self.sink, self.workers = directory, sink, workers
        self.harness: Harness | None = None
        self.refs: dict[str, MLP] = {}
        self.xs = examples(1000, seed=5)  # element i is xs[i % 1000]
        self.plan = [("model-1.pt", 1), ("model-2.pt", 2), ("model-3.pt", None), ("model-4.pt", 4)]

    def write(self, name: str, seed: int | None) -> str:
        path = os.path.join(self.dir, name)
        if seed is None:
            write_corrupt(path)
        else:
            self.refs[path] = write_atomically(path, seed)
        return path

    def seen_by_all(self, path: str) -> bool:
        return len({pid for _, model_id, pid, _ in self.sink.values if model_id == path}) == self.workers

    def rejected(self, path: str) -> bool:
        """The harness has checked the file at ``path`` and rejected it."""
        run = self.harness.current if self.harness else None
        return run is not None and run.summary.rejected_model_updates > 0

    def read(self):
        self.write(*self.plan[0])
        i = 0
        for name, seed in self.plan[1:]:
            for _ in range(150):  # on the current version
                yield i
                i += 1
            path = self.write(name, seed)
            done = self.seen_by_all if seed is not None else self.rejected  # a corrupt one never serves
            deadline = time.monotonic() + 30  # a bound for a broken build, not a wait
            while not done(path) and time.monotonic() < deadline:
                yield i
                i += 1
            for _ in range(100 if seed is None else 0):  # on the old version, after the rejection
                yield i
                i += 1
        for _ in range(150):
            yield i
            i += 1


@pytest.mark.parametrize("large", [False, True])
def test_a_running_job_picks_up_new_versions_with_no_lost_element(private_dir, sock_path, large):
    models_dir = os.path.join(private_dir, "models")
    os.mkdir(models_dir)
    sink = Collect()
    source = Versions(models_dir, sink, workers=2)
    first = os.path.join(models_dir, "model-1.pt")
    source.refs[first] = make_checkpoint(first, seed=1)
    handler = PytorchModelHandlerTensor(first, MLP, {}, max_batch_size=8, large_model=large)
    watch = WatchFilePattern(os.path.join(models_dir, "model-*.pt"), interval=0.05, settle=0.1)
    xs = source.xs
    pipeline = (
        source
        | Map(lambda i: (i, xs[i % len(xs)]))
        | RunInference(handler.with_preprocess_fn(lambda e: e[1]), model_metadata_pcoll=watch)
        | Map(lambda r: (r.example.tolist(), r.model_id, os.getpid(), r.inference.tolist()))
        | sink
    )
    harness = source.harness = Harness(workers=2, threads=1, bundle_size=16, progress=False)
    summary = harness.run(pipeline)
    n = summary.elements_in
    assert summary.outputs == n == len(sink.values) and not summary.dead_letters  # none lost or failed
    refs = source.refs
    by_worker: dict[int, list[int]] = {}
    order = sorted(refs)  # model-1 < model-2 < model-4
    with torch.inference_mode():
        for i, (x, model_id, pid, y) in enumerate(sink.values):
            assert model_id in refs, f"element {i} came from {model_id}"
            want = refs[model_id](torch.tensor(x)[None])[0]
            assert torch.allclose(torch.tensor(y), want, atol=1e-5)
            by_worker.setdefault(pid, []).append(order.index(model_id))
    assert len(by_worker) == 2
    for pid, versions in by_worker.items():
        # one switch point per version per worker: the versions only ever move forward
        assert versions == sorted(versions), f"worker {pid} went back to an older version"
        assert versions[-1] == len(order) - 1, f"worker {pid} never reached the last version"
    assert summary.model_updates >= 2 and summary.rejected_model_updates == 1  # 2, 4 sent; 3 rejected
    assert any(label.endswith("[model-4]") for label in summary.metrics)
    assert any("model-4_num_inferences" in m for m in summary.metrics.values())
    if large:
        assert not server_processes(sock_path)


def test_the_cli_swaps_in_the_newest_model_file_it_is_told_to_watch(private_dir, sock_path):
    """python -m runtime run --watch-model: the pipeline file names model-1.pt; a newer
    model-2.pt matches the pattern, and the job moves to it while it runs."""
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT, server_env
    from tests.test_runtime import to_tensor, write_cli_job

    models_dir = os.path.join(private_dir, "models")
    os.mkdir(models_dir)
    m1, m2 = (os.path.join(models_dir, f"model-{v}.pt") for v in (1, 2))
    refs = {m1: make_checkpoint(m1, seed=1)}
    os.utime(m1, ns=(10**18, 10**18))  # older
    refs[m2] = make_checkpoint(m2, seed=2)
    job, inp, out = write_cli_job(private_dir, m1, 3000)
    run = subprocess.run(
        [sys.executable, "-m", "runtime", "run", job, "--input", inp, "--output", out, "--workers", "2",
         "--threads", "2", "--bundle-size", "16", "--json", "--watch-model", os.path.join(models_dir, "model-*.pt"),
         "--watch-interval", "0.05"],
        env=server_env(), cwd=ROOT, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["outputs"] == 3000 and summary["dead_letters"] == 0 and summary["model_updates"] >= 1
    with open(out) as f:
        rows = [json.loads(line) for line in f]
    with torch.inference_mode():
        for i, r in enumerate(rows):
            assert r["model_id"] in refs
            assert torch.allclose(torch.tensor(r["y"]), refs[r["model_id"]](to_tensor(i)[None])[0], atol=1e-5)
    assert rows[-1]["model_id"] == m2
    assert not os.path.exists(sock_path)


class KillAfterRejection(Source):
    """Steady input; sends a corrupt update, and once the harness has rejected it, kills
    a worker, then goes on until the replacement's results show up."""

    def __init__(self, sink: Collect, updates: ModelUpdates, corrupt: str):
        self.sink, self.updates, self.corrupt = sink, updates, corrupt
        self.harness: Harness | None = None
        self.killed: int | None = None

    def read(self):
        i = 0
        for _ in range(200):
            yield i
            i += 1
        self.updates.put(ModelMetadata(self.corrupt, "corrupt"))
        deadline = time.monotonic() + 30  # a bound for a broken build, not a wait
        assert self.harness is not None
        while time.monotonic() < deadline:
            run = self.harness.current
            if self.killed is None and run is not None and run.summary.rejected_model_updates:
                self.killed = self.harness.worker_pids()[0]
                os.kill(self.killed, 9)
            if len({pid for *_, pid in self.sink.values}) >= 3:  # two first workers + the replacement
                break
            yield i
            i += 1
        for _ in range(100):
            yield i
            i += 1


def test_a_worker_started_after_a_rejected_update_boots_on_the_serving_version(private_dir):
    v1, bad = os.path.join(private_dir, "v1.pt"), os.path.join(private_dir, "bad.pt")
    ref = make_checkpoint(v1, seed=1)
    write_corrupt(bad)
    sink, updates = Collect(), ModelUpdates()
    source = KillAfterRejection(sink, updates, bad)
    xs = examples(100)
    pipeline = (
        source
        | Map(lambda i: xs[i % len(xs)])
        | RunInference(PytorchModelHandlerTensor(v1, MLP, {}), model_metadata_pcoll=updates)
        | Map(lambda r: (r.inference.tolist(), r.model_id, os.getpid()))
        | sink
    )
    harness = source.harness = Harness(workers=2, threads=1, bundle_size=16, progress=False)
    summary = harness.run(pipeline)  # must not fail: nobody is pointed at the corrupt file
    assert summary.rejected_model_updates == 1 and summary.worker_restarts == 1
    assert summary.outputs == summary.elements_in == len(sink.values)
    assert len({pid for *_, pid in sink.values}) == 3 and {m for _, m, _ in sink.values} == {v1}
    with torch.inference_mode():
        for i, (y, _, _) in enumerate(sink.values):
            assert torch.allclose(torch.tensor(y), ref(xs[i % len(xs)][None])[0], atol=1e-5)
