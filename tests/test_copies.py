"""``model_copies``: N copies of a model in one real server, least-busy routing, the
budget counting every copy, and swaps that replace every copy under load."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from client.handlers import ConfigurationError, PytorchModelHandlerTensor
from client.serverclient import ServerClient
from modelserver import protocol, userclass
from modelserver.batcher import Compute
from modelserver.channel import Channel
from modelserver.copies import split
from modelserver.errors import BadRequest, OutOfMemory
from modelserver.loaders import ModelSpec
from tests.conftest import start_server
from tests.models import MLP, Blob, blob_side, make_blob, make_checkpoint
from tests.workers import keep_sending, run_threads

MB = 1 << 20
TOLERANCE = 1e-5


def mlp_spec(path: str) -> ModelSpec:
    return ModelSpec("pytorch_state_dict", path, userclass.describe(MLP), {})


def send_from_threads(client: ServerClient, key: str, xs: list[torch.Tensor], threads: int) -> list:
    """Each of ``threads`` threads (one connection each) sends every batch of ``xs``; the
    replies, in order, per thread."""
    out: list[list] = [[] for _ in range(threads)]
    errors: list[BaseException] = []

    def send(i: int) -> None:
        try:
            for x in xs:
                out[i].append(client.infer(key, x))
        except BaseException as exc:
            errors.append(exc)

    run_threads(send, threads, errors)
    return out


def test_two_copies_give_one_copys_results_and_share_four_clients_requests(private_dir, sock_path):
    path = os.path.join(private_dir, "mlp.pt")
    ref = make_checkpoint(path, seed=3)
    srv = start_server(sock_path, "--threads", "2")
    try:
        xs = [torch.randn(8, 8) for _ in range(25)]
        with ServerClient(sock_path, autostart=False) as c:
            c.load("one", mlp_spec(path))
            reply = c.load("two", mlp_spec(path), copies=2)
            assert reply["copies"] == 2
            alone = [c.infer("one", x)["outputs"] for x in xs]
            replies = send_from_threads(c, "two", xs, threads=4)
            status = {m["key"]: m for m in c.status()["models"]}
        with torch.inference_mode():
            for per_thread in replies:
                for x, single, r in zip(xs, alone, per_thread):
                    torch.testing.assert_close(r["outputs"], single, rtol=0, atol=TOLERANCE)
                    torch.testing.assert_close(r["outputs"], ref(x), rtol=0, atol=TOLERANCE)
        two = status["two"]
        assert len(two["copies"]) == 2 and len(status["one"]["copies"]) == 1
        counts = [copy["requests"] for copy in two["copies"]]
        assert all(n > 0 for n in counts), counts
        assert sum(counts) == two["requests"] == 100  # the model's totals count every copy
        assert two["footprint"] == sum(copy["footprint"] for copy in two["copies"])
        assert {copy["device"] for copy in two["copies"]} == {"cpu"}
        # each copy has its share of the server's compute threads; together as many as one copy
        assert [copy["compute_threads"] for copy in two["copies"]] == [1, 1]
        assert two["compute_threads"] == status["one"]["compute_threads"] == 2
    finally:
        srv.stop()


def test_the_handlers_model_copies_runs_in_the_server_with_one_copys_results(private_dir, sock_path):
    path = os.path.join(private_dir, "mlp.pt")
    make_checkpoint(path, seed=5)
    srv = start_server(sock_path)
    try:
        xs = [torch.randn(8) for _ in range(16)]
        local = PytorchModelHandlerTensor(path, MLP)
        copied = PytorchModelHandlerTensor(path, MLP, model_copies=2, socket_path=sock_path)
        assert copied.share_model_across_processes() and copied.model_copies() == 2
        want = local.run_inference(xs, local.load_model())
        got = copied.run_inference(xs, copied.load_model())
        for w, g in zip(want, got):
            torch.testing.assert_close(g.inference, w.inference, rtol=0, atol=TOLERANCE)
        with ServerClient(sock_path, autostart=False) as c:
            (model,) = c.status()["models"]
        assert len(model["copies"]) == 2
    finally:
        srv.stop()


def test_the_budget_refuses_a_third_copy_that_does_not_fit(private_dir, sock_path):
    """16 MB copies in a 40 MiB budget: two fit, three do not (refused before loading
    anything, naming what they need); two copies make room by evicting an idle model."""
    path = os.path.join(private_dir, "blob.pt")
    make_blob(path, 16)
    spec = ModelSpec("pytorch_state_dict", path, userclass.describe(Blob), {"d": blob_side(16)})
    srv = start_server(sock_path, "--memory-budget", "40MiB")
    try:
        with ServerClient(sock_path, autostart=False) as c:
            with pytest.raises(OutOfMemory, match=r"needs about \d+ bytes \(3 copies\)"):
                c.load("three", spec, copies=3)
            c.load("single", spec)
            c.load("pair", spec, copies=2)  # 16 + 32 MB do not fit: the idle single copy goes
            status = c.status()
        models = {m["key"]: m for m in status["models"]}
        assert "three" not in models
        assert not models["single"]["loaded"] and models["single"]["evictions"] == 1
        pair = models["pair"]
        assert pair["loaded"] and len(pair["copies"]) == 2
        assert pair["footprint"] == sum(copy["footprint"] for copy in pair["copies"]) >= 32 * MB
        assert status["devices"]["cpu"]["used"] == pair["footprint"] <= 40 * MB
    finally:
        srv.stop()


def test_a_swap_replaces_both_copies_under_load_and_no_request_fails(private_dir, sock_path):
    paths = [os.path.join(private_dir, f"v{i}.pt") for i in range(2)]
    refs = [make_checkpoint(p, seed=i) for i, p in enumerate(paths)]
    x = torch.randn(8, 8)
    with torch.inference_mode():
        wants = {p: ref(x) for p, ref in zip(paths, refs)}
    srv = start_server(sock_path)
    try:
        with ServerClient(sock_path, autostart=False) as c:
            c.load("k", mlp_spec(paths[0]), copies=2)
            with keep_sending(c, "k", x, 4) as (seen, errors):
                while len(seen) < 50 and not errors:
                    threading.Event().wait(0.005)
                c.load("k", mlp_spec(paths[1]), replace=True, copies=2)
                swapped = len(seen)
                while len(seen) < swapped + 50 and not errors:  # served after the swap too
                    threading.Event().wait(0.005)
            after = c.infer("k", x)
            status = c.status()
        assert not errors, errors[:3]
        for model_id, y in seen:
            torch.testing.assert_close(y, wants[model_id], rtol=0, atol=TOLERANCE)
        assert after["model_id"] == paths[1] and seen[-1][0] == paths[1]
        torch.testing.assert_close(after["outputs"], wants[paths[1]], rtol=0, atol=TOLERANCE)
        (model,) = status["models"]
        assert model["swaps"] == 1 and model["model_id"] == paths[1] and len(model["copies"]) == 2
        # the new copies served, and the old ones are gone (their bytes no longer charged)
        assert sum(copy["requests"] for copy in model["copies"]) > 0
        assert status["devices"]["cpu"]["used"] == model["footprint"]
    finally:
        srv.stop()


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_model_copies_below_one_or_not_an_int_is_a_configuration_error(private_dir, bad):
    path = os.path.join(private_dir, "mlp.pt")
    make_checkpoint(path)
    with pytest.raises(ConfigurationError, match="model_copies"):
        PytorchModelHandlerTensor(path, MLP, model_copies=bad)


def test_model_copies_implies_large_model_and_defaults_to_one(private_dir):
    path = os.path.join(private_dir, "mlp.pt")
    make_checkpoint(path)
    assert PytorchModelHandlerTensor(path, MLP, model_copies=1).share_model_across_processes()
    plain = PytorchModelHandlerTensor(path, MLP)
    assert not plain.share_model_across_processes() and plain.model_copies() == 1


@pytest.mark.parametrize("bad", [0, -2, 2.0, "3", True, None, [2]])
def test_a_load_with_a_bad_copies_field_is_a_bad_request_naming_it(bad):
    msg = {"op": "load", "id": 1, "key": "k", "spec": {}, "copies": bad}
    with pytest.raises(BadRequest, match="'copies'"):
        protocol.parse_request(msg)


def test_copies_default_to_one_and_a_bad_field_is_refused_by_the_server(server, sock_path):
    load = protocol.parse_request({"op": "load", "id": 1, "key": "k", "spec": {}})
    assert isinstance(load, protocol.Load) and load.copies == 1
    spec = ModelSpec("pytorch_state_dict", None, {"name": "torch.nn:Identity", "source": None})
    with Channel(sock_path) as ch:
        with pytest.raises(BadRequest, match="copies"):
            ch.request({"op": "load", "key": "i", "spec": spec.to_wire(), "copies": 0})
        assert ch.request({"op": "status"})["status"]["models"] == []
        reply = ch.request({"op": "load", "key": "i", "spec": spec.to_wire()})
        assert reply["copies"] == 1


def test_copies_split_the_compute_threads():
    assert split(Compute(8, 8), 2) == Compute(4, 4)
    assert split(Compute(2, 2), 4) == Compute(1, 1)  # at least one each
    assert split(Compute(4, None), 3) == Compute(1, None)
    assert split(Compute(4, 4), 1) == Compute(4, 4)


def serve_two_copies(private_dir: str, sock_path: str, device: str) -> tuple[dict, dict]:
    """Two copies of a model on ``device`` in a real server, 4 clients' requests checked
    against the model; the server's status, and the model's row in it."""
    path = os.path.join(private_dir, "mlp.pt")
    ref = make_checkpoint(path, seed=3)
    srv = start_server(sock_path)
    try:
        spec = ModelSpec("pytorch_state_dict", path, userclass.describe(MLP), {}, device=device)
        xs = [torch.randn(8, 8) for _ in range(25)]
        with ServerClient(sock_path, autostart=False) as c:
            reply = c.load("two", spec, copies=2)
            replies = send_from_threads(c, "two", xs, threads=4)
            status = c.status()
    finally:
        srv.stop()
    with torch.inference_mode():
        for per_thread in replies:
            for x, r in zip(xs, per_thread):
                torch.testing.assert_close(r["outputs"], ref(x), rtol=0, atol=TOLERANCE)
    (model,) = status["models"]
    assert reply["copies"] == 2 and reply["device"] == model["device"]
    assert all(copy["requests"] > 0 for copy in model["copies"]), model["copies"]
    assert model["footprint"] == sum(model["charges"].values())
    return status, model


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_two_copies_on_one_gpu_give_one_copys_results_and_share_the_requests(private_dir, sock_path):
    status, model = serve_two_copies(private_dir, sock_path, "cuda:0")
    assert [copy["device"] for copy in model["copies"]] == ["cuda:0", "cuda:0"]
    assert model["charges"] == {"cuda:0": model["footprint"]}
    assert status["devices"]["cuda:0"]["used"] == model["footprint"]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_copies_on_gpus_go_one_to_each_and_each_gpu_is_charged_its_copy(private_dir, sock_path):
    """``device="GPU"`` with two copies on a machine with two (or more) empty GPUs: the
    second copy goes to another GPU than the first (the first's is charged before it is
    placed), and each GPU's ``used`` is the footprint of the copy on it."""
    status, model = serve_two_copies(private_dir, sock_path, "GPU")
    devices = [copy["device"] for copy in model["copies"]]
    assert len(set(devices)) == 2 and all(d.startswith("cuda:") for d in devices), devices
    assert model["device"] == devices[0]  # the first copy's, as before copies spread
    assert model["charges"] == {copy["device"]: copy["footprint"] for copy in model["copies"]}
    for copy in model["copies"]:
        assert status["devices"][copy["device"]]["used"] == copy["footprint"] > 0
