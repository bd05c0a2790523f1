"""client.beam on Apache Beam's DirectRunner with two SDK-worker processes: the same
results as Beam's own PyTorch handler, one model server for every worker, a keyed
pipeline over more models than the server's budget holds, Beam's dead letters and model
updates; and the server gone, with nothing left behind, when the pipeline ends.

The models here have weights on a 1/16 grid and the inputs are small integers, so every
sum a forward pass makes is exact in float32: results must be bitwise identical however
Beam and the model server cut and merge the batches.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

beam = pytest.importorskip("apache_beam")

from apache_beam.metrics.metric import MetricsFilter  # noqa: E402
from apache_beam.ml.inference import base as beam_base  # noqa: E402
from apache_beam.ml.inference.pytorch_inference import (  # noqa: E402
    PytorchModelHandlerTensor as BeamPytorchModelHandlerTensor,
)
from apache_beam.options.pipeline_options import PipelineOptions  # noqa: E402

from client import KeyedModelHandler, KeyModelMapping, PytorchModelHandlerTensor  # noqa: E402
from client.beam import MODEL_BYTES_METRIC, SERVER_PID_METRIC, BeamletModelHandler  # noqa: E402
from client.serverclient import shared_client  # noqa: E402
from modelserver import config  # noqa: E402
from modelserver.startlock import lock_path  # noqa: E402
from tests.conftest import kill_servers  # noqa: E402
from tests.models import MLP, Blob  # noqa: E402

WORKERS = 2
MLP_PARAMS = {"d_in": 8, "hidden": 16, "d_out": 3}
MB = 1 << 20


def exact_checkpoint(model: torch.nn.Module, path: str, seed: int) -> torch.nn.Module:
    """Save ``model`` with every weight an integer multiple of 1/16 in [-2/16, 2/16]."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randint(-2, 3, p.shape, generator=g).float() / 16)
    torch.save(model.state_dict(), path)
    return model.eval()


def int_rows(n: int, d: int, seed: int) -> list[list[float]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-3, 4, (n, d), generator=g).float().tolist()


def to_tensor(row: list[float]) -> torch.Tensor:
    return torch.tensor(row, dtype=torch.float32)


def to_record(result: Any) -> str:
    return json.dumps(
        {
            "example": result.example.tolist(),
            "inference": torch.as_tensor(result.inference).tolist(),
            "model_id": result.model_id,
        }
    )


def with_worker_pid(result: Any) -> Any:
    return {"pid": os.getpid(), "result": result}


def read_lines(prefix: str) -> list[dict[str, Any]]:
    directory = os.path.dirname(prefix)
    rows = []
    for name in sorted(os.listdir(directory)):
        if name.startswith(os.path.basename(prefix) + "-"):
            with open(os.path.join(directory, name)) as f:
                rows += [json.loads(line) for line in f]
    return rows


def multi_process_options() -> PipelineOptions:
    return PipelineOptions(flags=[], direct_running_mode="multi_processing", direct_num_workers=WORKERS)


def distribution(result: Any, name: str) -> Any:
    found = result.metrics().query(MetricsFilter().with_name(name))["distributions"]
    assert found, f"no {name} metric"
    return found[0].committed


def counter(result: Any, name: str, step: str) -> int:
    found = result.metrics().query(MetricsFilter().with_name(name).with_step(step))["counters"]
    return sum(r.committed for r in found)


@pytest.fixture
def beam_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A private directory that is also the temp directory of the run (and of its SDK
    workers), so whatever a run leaves behind is found there; the system temp directory
    must not gain a rendezvous file or socket either."""
    system_tmp = tempfile.gettempdir()
    before = set(os.listdir(system_tmp))
    path = tempfile.mkdtemp(prefix="bl-beam-")
    os.chmod(path, 0o700)
    run_tmp = os.path.join(path, "tmp")
    os.mkdir(run_tmp, 0o700)
    monkeypatch.setenv("TMPDIR", run_tmp)
    monkeypatch.setattr(tempfile, "tempdir", run_tmp)
    monkeypatch.delenv("BEAMLET_SOCKET", raising=False)
    try:
        yield path
    finally:
        kill_servers(os.path.join(path, "ms.sock"))
        import shutil

        shutil.rmtree(path, ignore_errors=True)
    monkeypatch.undo()
    # Other jobs on the machine may add entries of their own meanwhile: look only for
    # what a run of ours could leave (rendezvous files, sockets).
    new = set(os.listdir(system_tmp)) - before
    assert {n for n in new if n.endswith((".address", ".lock", ".sock"))} == set()


def assert_server_gone(server_pid: int, beam_dir: str, deadline: float | None = None) -> None:
    """The server exits once the SDK workers are gone (by ``deadline``, a monotonic
    time; else within 30 s); its socket and lock files go with it, and nothing of
    beamlet's (or a Beam rendezvous file) is left in the run's temp dir."""
    if deadline is None:
        deadline = time.monotonic() + 30
    assert config.wait_for_exit(server_pid, max(deadline - time.monotonic(), 0)), (
        "the model server outlived the pipeline"
    )
    sock = os.path.join(beam_dir, "ms.sock")
    assert not os.path.exists(sock) and not os.path.exists(lock_path(sock))
    left = []
    for root, _dirs, files in os.walk(os.path.join(beam_dir, "tmp")):
        left += [os.path.join(root, f) for f in files]
    assert [f for f in left if f.endswith((".address", ".lock", ".sock")) or "beamlet" in f] == [], left


def test_results_match_beams_own_handler_with_one_server_for_all_sdk_workers(beam_dir: str) -> None:
    """With the handler's default settings: one server start for the SDK workers, reused
    by a worker that comes after the job, and gone with its socket soon after the job."""
    ckpt = os.path.join(beam_dir, "mlp.pt")
    exact_checkpoint(MLP(**MLP_PARAMS), ckpt, seed=1)
    rows = int_rows(96, 8, seed=2)
    sock = os.path.join(beam_dir, "ms.sock")
    beamlet_handler = PytorchModelHandlerTensor(
        ckpt, MLP, MLP_PARAMS, max_batch_size=8, large_model=True, socket_path=sock
    )
    ours = (
        BeamletModelHandler(beamlet_handler)
        .with_preprocess_fn(to_tensor)
        .with_postprocess_fn(with_worker_pid)
    )
    theirs = BeamPytorchModelHandlerTensor(
        state_dict_path=ckpt, model_class=MLP, model_params=MLP_PARAMS, max_batch_size=8
    ).with_preprocess_fn(to_tensor)
    out_ours, out_theirs = os.path.join(beam_dir, "ours"), os.path.join(beam_dir, "theirs")

    p = beam.Pipeline(options=multi_process_options())
    data = p | beam.Create(rows) | beam.Reshuffle()
    (
        data
        | "beamlet" >> beam_base.RunInference(ours)
        | beam.Map(lambda r: json.dumps({"pid": r["pid"], **json.loads(to_record(r["result"]))}))
        | "write ours" >> beam.io.WriteToText(out_ours)
    )
    (
        data
        | "beam" >> beam_base.RunInference(theirs)
        | beam.Map(to_record)
        | "write theirs" >> beam.io.WriteToText(out_theirs)
    )
    result = p.run()
    result.wait_until_finish()
    ended = time.monotonic()
    pids = distribution(result, SERVER_PID_METRIC)
    # A worker that comes back soon after the job finds the same server.
    late_worker = BeamletModelHandler(beamlet_handler)
    late_worker.load_model()
    with shared_client(sock).channel() as ch:
        assert ch.server_pid == pids.min
    shared_client(sock).close()

    ours_rows, theirs_rows = read_lines(out_ours), read_lines(out_theirs)
    assert len(ours_rows) == len(theirs_rows) == len(rows)

    def key(r: dict[str, Any]) -> str:
        return json.dumps(r["example"])

    theirs_by_example = {key(r): r for r in theirs_rows}
    for r in ours_rows:
        assert r["inference"] == theirs_by_example[key(r)]["inference"]
        assert r["model_id"] == theirs_by_example[key(r)]["model_id"] == ckpt
    worker_pids = {r["pid"] for r in ours_rows}
    assert len(worker_pids) >= 2, f"only SDK worker(s) {worker_pids} ran the model"

    assert pids.count >= 2 and pids.min == pids.max, "SDK workers did not all use one model server"
    assert distribution(result, MODEL_BYTES_METRIC).min > 0
    assert counter(result, "num_inferences", "beamlet") == len(rows)
    assert counter(result, "failed_batches_counter", "beamlet") == 0
    with open(os.path.join(beam_dir, "modelserver.log")) as f:
        log = f.read()
    assert log.count("starting a model server") == 1 and log.count("listening on") == 1, log
    assert_server_gone(pids.min, beam_dir, deadline=ended + 15)
    print(f"the server was gone {time.monotonic() - ended:.1f}s after the pipeline ended")


def test_keyed_pipeline_over_more_models_than_the_budget_holds(beam_dir: str) -> None:
    d = 1024  # 4 MiB of weights per model; the budget holds two
    keys = [f"k{i}" for i in range(5)]
    models, mappings = {}, []
    sock = os.path.join(beam_dir, "ms.sock")
    for i, k in enumerate(keys):
        path = os.path.join(beam_dir, f"{k}.pt")
        models[k] = exact_checkpoint(Blob(d), path, seed=10 + i)
        mappings.append(
            KeyModelMapping(
                [k], PytorchModelHandlerTensor(path, Blob, {"d": d}, large_model=True, socket_path=sock)
            )
        )
    handler = BeamletModelHandler(
        KeyedModelHandler(mappings), server_idle_timeout=1.0, memory_budget=str(12 * MB), max_batch_size=4
    ).with_preprocess_fn(lambda kv: (kv[0], to_tensor(kv[1])))
    examples = [(keys[i % len(keys)], row) for i, row in enumerate(int_rows(60, d, seed=3))]
    out = os.path.join(beam_dir, "keyed")

    p = beam.Pipeline(options=multi_process_options())
    (
        p
        | beam.Create(examples)
        | beam.Reshuffle()
        | beam_base.RunInference(handler)
        | beam.Map(lambda kv: json.dumps({"key": kv[0], **json.loads(to_record(kv[1]))}))
        | beam.io.WriteToText(out)
    )
    result = p.run()
    result.wait_until_finish()

    got = read_lines(out)
    assert len(got) == len(examples)
    for r in got:
        x = torch.tensor([r["example"]])
        with torch.inference_mode():
            expected = models[r["key"]](x)[0].tolist()
        assert r["inference"] == expected
        assert r["model_id"] == os.path.join(beam_dir, f"{r['key']}.pt")
    with open(os.path.join(beam_dir, "modelserver.log")) as f:
        log = f.read()
    assert log.count("listening on") == 1 and "evicting" in log, log[-2000:]
    pids = distribution(result, SERVER_PID_METRIC)
    assert pids.min == pids.max
    assert_server_gone(pids.min, beam_dir)


def test_dead_letters_and_a_model_update_from_a_side_input(beam_dir: str) -> None:
    v1, v2 = os.path.join(beam_dir, "v1.pt"), os.path.join(beam_dir, "v2.pt")
    exact_checkpoint(MLP(**MLP_PARAMS), v1, seed=4)
    model2 = exact_checkpoint(MLP(**MLP_PARAMS), v2, seed=5)
    sock = os.path.join(beam_dir, "ms.sock")
    handler = BeamletModelHandler(
        PytorchModelHandlerTensor(v1, MLP, MLP_PARAMS, large_model=True, socket_path=sock),
        server_idle_timeout=1.0,
        min_batch_size=1,
        max_batch_size=1,
    ).with_preprocess_fn(to_tensor)
    good = int_rows(6, 8, seed=6)
    bad = [[1.0, 2.0, 3.0]]  # the model takes 8 features
    out, dead = os.path.join(beam_dir, "out"), os.path.join(beam_dir, "dead")

    p = beam.Pipeline(options=multi_process_options())
    side = p | "metadata" >> beam.Create([beam_base.ModelMetadata(model_id=v2, model_name="v2")])
    main, dlq = (
        p
        | beam.Create(good + bad)
        | beam_base.RunInference(handler, model_metadata_pcoll=side).with_exception_handling()
    )
    main | beam.Map(to_record) | "write out" >> beam.io.WriteToText(out)
    (
        dlq.failed_inferences
        | beam.Map(lambda be: json.dumps(str(be)))
        | "write dead" >> beam.io.WriteToText(dead)
    )
    result = p.run()
    result.wait_until_finish()

    got, failed = read_lines(out), read_lines(dead)
    assert len(got) == len(good) and len(failed) == len(bad)
    assert "ModelError" in failed[0]
    for r in got:
        assert r["model_id"] == v2
        with torch.inference_mode():
            assert r["inference"] == model2(torch.tensor([r["example"]]))[0].tolist()
    assert_server_gone(distribution(result, SERVER_PID_METRIC).min, beam_dir)


def test_the_handler_keeps_beams_sharing_machinery_out() -> None:
    inner = PytorchModelHandlerTensor("/m/a.pt", MLP, MLP_PARAMS, max_batch_size=16, large_model=True)
    handler = BeamletModelHandler(inner, min_batch_size=4)
    assert isinstance(handler, beam_base.ModelHandler)
    assert not handler.share_model_across_processes() and handler.model_copies() == 1
    assert handler.batch_elements_kwargs() == {"max_batch_size": 16, "min_batch_size": 4}
    assert handler.get_metrics_namespace() == "BeamML_PyTorch"
    handler.update_model_path("/m/b.pt")
    assert inner.model_spec().path == "/m/b.pt"
    with pytest.raises(ValueError, match="belong to the beamlet handler"):
        BeamletModelHandler(inner, large_model=True)
    with pytest.raises(TypeError, match="wraps a beamlet handler"):
        BeamletModelHandler(BeamPytorchModelHandlerTensor(state_dict_path="/m/a.pt", model_class=MLP))


def test_per_key_model_paths_reach_the_mapped_handler() -> None:
    a = PytorchModelHandlerTensor("/m/a.pt", MLP, MLP_PARAMS, large_model=True)
    b = PytorchModelHandlerTensor("/m/b.pt", MLP, MLP_PARAMS, large_model=True)
    handler = BeamletModelHandler(
        KeyedModelHandler([KeyModelMapping(["x", "y"], a), KeyModelMapping(["z"], b)])
    )
    handler.update_model_paths(None, [beam_base.KeyModelPathMapping(["y", "x"], "/m/a2.pt", "a2")])
    assert a.model_spec().path == "/m/a2.pt" and b.model_spec().path == "/m/b.pt"
    with pytest.raises(ValueError, match="served by different models"):
        handler.update_model_paths(None, [beam_base.KeyModelPathMapping(["x", "z"], "/m/a3.pt", "a3")])
    with pytest.raises(ValueError, match="no model is mapped"):
        handler.update_model_paths(None, [beam_base.KeyModelPathMapping(["w"], "/m/a3.pt", "a3")])
    assert a.model_spec().path == "/m/a2.pt" and b.model_spec().path == "/m/b.pt"  # all or nothing


def prism_binary() -> str | None:
    """A Prism runner binary, if this machine has one: $BEAMLET_PRISM_BINARY, or the one
    apache-beam caches after downloading it."""
    path = os.environ.get("BEAMLET_PRISM_BINARY")
    if path:
        return path
    cache = os.path.expanduser("~/.apache_beam/cache/prism/bin")
    names = sorted(os.listdir(cache)) if os.path.isdir(cache) else []
    return next((os.path.join(cache, n) for n in names if "prism" in n and not n.endswith(".zip")), None)


@pytest.mark.skipif(
    prism_binary() is None,
    reason="Prism is a Go binary that apache-beam downloads from GitHub releases on first use; "
    "the wheel does not carry it, none is cached here and GitHub is unreachable (set BEAMLET_PRISM_BINARY)",
)
def test_on_prism(beam_dir: str) -> None:
    ckpt = os.path.join(beam_dir, "mlp.pt")
    model = exact_checkpoint(MLP(**MLP_PARAMS), ckpt, seed=7)
    sock = os.path.join(beam_dir, "ms.sock")
    handler = BeamletModelHandler(
        PytorchModelHandlerTensor(ckpt, MLP, MLP_PARAMS, large_model=True, socket_path=sock),
        server_idle_timeout=1.0,
    ).with_preprocess_fn(to_tensor)
    rows = int_rows(32, 8, seed=8)
    out = os.path.join(beam_dir, "prism")
    options = PipelineOptions(flags=[], runner="PrismRunner", prism_location=prism_binary())
    p = beam.Pipeline(options=options)
    p | beam.Create(rows) | beam_base.RunInference(handler) | beam.Map(to_record) | beam.io.WriteToText(out)
    result = p.run()
    result.wait_until_finish()
    got = read_lines(out)
    assert len(got) == len(rows)
    for r in got:
        with torch.inference_mode():
            assert r["inference"] == model(torch.tensor([r["example"]]))[0].tolist()
    # Prism's default (LOOPBACK) runs the SDK worker in this process, which keeps its
    # connection for as long as it lives: let go of it, as an exiting worker would.
    shared_client(sock).close()
    assert_server_gone(distribution(result, SERVER_PID_METRIC).min, beam_dir)
