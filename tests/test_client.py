"""Handlers and RunInference, in-process and through a real model server."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import subprocess
import sys
import threading

import pytest
import torch

from client import (
    ModelHandler,
    PredictionResult,
    PytorchModelHandlerKeyedTensor,
    PytorchModelHandlerTensor,
    RunInference,
    ServerClient,
    autostart,
)
from modelserver import userclass
from modelserver.errors import ModelLoadError
from tests import workers
from tests.conftest import server_env, server_processes, start_server
from tests.models import MLP, TwoInputs, make_checkpoint


@pytest.fixture
def ckpt(private_dir):
    path = os.path.join(private_dir, "mlp.pt")
    return make_checkpoint(path), path


def examples(n: int, d: int = 8, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(d, generator=g) for _ in range(n)]


def test_in_process_results_are_torchs_in_input_order(ckpt):
    model, path = ckpt
    xs = examples(50)
    results = list(xs | RunInference(PytorchModelHandlerTensor(path, MLP, {}, max_batch_size=7)))
    assert all(isinstance(r, PredictionResult) for r in results)
    assert [r.example for r in results] == xs
    with torch.inference_mode():
        for r in results:
            assert torch.allclose(r.inference, model(r.example.unsqueeze(0))[0], atol=1e-6)
    assert {r.model_id for r in results} == {path}


def test_large_model_gives_identical_results_via_an_auto_started_server(ckpt, sock_path):
    model, path = ckpt
    xs = examples(100)
    local = list(
        xs | RunInference(PytorchModelHandlerTensor(path, MLP, {}, max_batch_size=16, min_batch_size=16))
    )
    handler = PytorchModelHandlerTensor(path, MLP, {}, max_batch_size=16, min_batch_size=16, large_model=True)
    remote = list(xs | RunInference(handler))
    assert [r.example for r in remote] == xs
    for a, b in zip(local, remote):
        assert torch.equal(a.inference, b.inference)
        assert b.model_id == path
    assert len(server_processes(sock_path)) == 1
    with ServerClient(sock_path, autostart=False) as c:
        (m,) = c.status()["models"]
        assert m["rows"] == 100 and m["model_id"] == path


def test_one_model_through_two_servers_reaches_each_server(ckpt, private_dir):
    """Two handlers for the same model, each naming its own server's socket, are two
    models in this process: each handler's requests go to its own server."""
    _, path = ckpt
    servers = [start_server(os.path.join(private_dir, f"s{i}.sock")) for i in range(2)]
    try:
        xs = examples(32)
        for i, srv in enumerate(servers):
            handler = PytorchModelHandlerTensor(
                path, MLP, {}, max_batch_size=8, min_batch_size=8, large_model=True, socket_path=srv.path
            )
            assert len(list(xs[: 8 * (i + 1)] | RunInference(handler))) == 8 * (i + 1)
        for i, srv in enumerate(servers):
            with ServerClient(srv.path, autostart=False) as c:
                (m,) = c.status()["models"]
                assert m["rows"] == 8 * (i + 1), f"server {i} ran {m['rows']} rows"
    finally:
        for srv in servers:
            srv.stop()


def test_model_is_loaded_once_per_process_and_shared_by_threads(ckpt):
    _, path = ckpt
    loads = []

    class Counting(PytorchModelHandlerTensor):
        def load_model(self):
            loads.append(threading.get_ident())
            return super().load_model()

    handler = Counting(path, MLP, {}, max_batch_size=4)
    barrier = threading.Barrier(8)
    outs: list = []

    def run():
        barrier.wait()
        outs.append(len(list(examples(10) | RunInference(handler))))

    ts = [threading.Thread(target=run) for _ in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert outs == [10] * 8
    assert len(loads) == 1


def test_processes_times_threads_against_one_server_match_torch(ckpt, sock_path):
    from tests.conftest import start_server

    _, path = ckpt
    srv = start_server(sock_path)
    try:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(3) as pool:
            results = pool.starmap(
                workers.infer_from_threads, [(path, sock_path, p, 4, 64) for p in range(3)]
            )
        for per_proc in results:
            assert len(per_proc) == 4
            for server_out, expected, ids in per_proc.values():
                assert server_out.shape == (64, 3)
                assert ids == {path}
                assert (server_out == expected).all() or abs(server_out - expected).max() < 1e-6
        with srv.channel() as ch:
            (m,) = ch.request({"op": "status"})["status"]["models"]
        assert m["rows"] == 3 * 4 * 64 and m["loads"] == 1
    finally:
        srv.stop()


def test_client_reconnects_restarts_the_server_and_reloads_the_model(ckpt, sock_path):
    model, path = ckpt
    handler = PytorchModelHandlerTensor(path, MLP, {}, min_batch_size=8, max_batch_size=8, large_model=True)
    first = list(examples(20) | RunInference(handler))
    (old,) = server_processes(sock_path)
    old.kill()
    old.wait(10)
    second = list(examples(20) | RunInference(handler))
    for a, b in zip(first, second):
        assert torch.equal(a.inference, b.inference)
    (new,) = server_processes(sock_path)
    assert new.pid != old.pid


def test_client_is_fork_safe(ckpt, sock_path):
    model, path = ckpt
    client = ServerClient(sock_path)
    spec = PytorchModelHandlerTensor(path, MLP, {}).model_spec()
    client.load("m", spec)
    x = torch.ones(2, 8)
    expected = client.infer("m", x)["outputs"]
    pid = os.fork()
    if pid == 0:  # the child: must open its own connection, not reuse the parent's socket
        code = 1
        try:
            with client.channel() as ch:
                own = os.getpid() in ch.request({"op": "status"})["status"]["client_pids"]
            out = client.infer("m", x)["outputs"]
            code = 0 if own and torch.equal(out, expected) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert torch.equal(client.infer("m", x)["outputs"], expected)
    client.close()


SCRIPT = """
import json, sys, torch
from torch import nn
from client import PytorchModelHandlerTensor, RunInference
{extra_import}
SCALE = 3

class Doubler(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)
    def forward(self, x):
        return helper(self.lin(x)) * SCALE

def helper(x):
    return torch.relu(x)

torch.manual_seed(0)
model = {cls}(4)
torch.save(model.state_dict(), sys.argv[1])
xs = [torch.randn(4) for _ in range(10)]
h = PytorchModelHandlerTensor(sys.argv[1], {cls}, {{"d": 4}}, large_model=True)
remote = list(xs | RunInference(h))
with torch.inference_mode():
    ok = all(torch.allclose(r.inference, model(x)) for r, x in zip(remote, xs))
print(json.dumps({{"ok": ok}}))
"""

BESIDE = """
import torch
from torch import nn

class Beside(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, 2)
    def forward(self, x):
        return self.lin(x)
"""


@pytest.mark.parametrize("where", ["script", "module beside the script"])
def test_model_class_from_the_users_own_script_or_module(where, private_dir, sock_path, server):
    script = os.path.join(private_dir, "job.py")
    if where == "script":
        source = SCRIPT.format(extra_import="", cls="Doubler")
    else:
        with open(os.path.join(private_dir, "besidemodel.py"), "w") as f:
            f.write(BESIDE)
        source = SCRIPT.format(extra_import="from besidemodel import Beside", cls="Beside")
    with open(script, "w") as f:
        f.write(source)
    run = subprocess.run(
        [sys.executable, script, os.path.join(private_dir, "w.pt")],
        env=server_env(),
        cwd=private_dir,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {"ok": True}


def test_shipping_by_source_names_what_it_cannot_ship():
    def make():
        class Local(torch.nn.Module):
            pass

        return Local

    with pytest.raises(userclass.ShipError, match="inside a function"):
        userclass.describe(make())
    ref = userclass.describe(torch.nn.Linear)
    assert ref == {"name": "torch.nn.modules.linear:Linear", "source": None}
    ref = userclass.describe(MLP)
    assert "class MLP" in ref["source"] and "from torch import nn" not in ref["source"]
    assert userclass.resolve(ref)(4, 5, 6).net[0].in_features == 4


def test_keyed_tensors_in_process_and_in_the_server(private_dir, sock_path):
    torch.manual_seed(0)
    model = TwoInputs(4)
    path = os.path.join(private_dir, "two.pt")
    torch.save(model.state_dict(), path)
    xs = [{"a": torch.randn(4), "b": torch.randn(4)} for _ in range(12)]
    for large in (False, True):
        h = PytorchModelHandlerKeyedTensor(path, TwoInputs, {"d": 4}, max_batch_size=5, large_model=large)
        results = list(xs | RunInference(h))
        with torch.inference_mode():
            for r, x in zip(results, xs):
                assert torch.allclose(r.inference, model(a=x["a"][None], b=x["b"][None])[0], atol=1e-6)


def test_torchscript_model_in_process_and_in_the_server(private_dir, sock_path):
    torch.manual_seed(0)
    model = torch.jit.script(MLP())
    path = os.path.join(private_dir, "mlp.ts")
    model.save(path)
    xs = examples(9)
    for large in (False, True):
        h = PytorchModelHandlerTensor(torch_script_model_path=path, max_batch_size=4, large_model=large)
        results = list(xs | RunInference(h))
        with torch.inference_mode():
            expected = model(torch.stack(xs))
        assert torch.allclose(torch.stack([r.inference for r in results]), expected, atol=1e-6)
        assert results[0].model_id == path


def test_pre_and_post_processing_fns(ckpt):
    model, path = ckpt
    h = (
        PytorchModelHandlerTensor(path, MLP, {}, max_batch_size=4)
        .with_preprocess_fn(lambda row: torch.tensor(row, dtype=torch.float32))
        .with_postprocess_fn(lambda r: int(r.inference.argmax()))
    )
    rows = [[float(i + j) for j in range(8)] for i in range(10)]
    labels = list(rows | RunInference(h))
    with torch.inference_mode():
        assert labels == [int(model(torch.tensor(r)[None]).argmax()) for r in rows]


def test_gpu_request_falls_back_to_cpu_with_a_warning(ckpt, caplog):
    if torch.cuda.is_available():
        pytest.skip("CUDA is usable here")
    from modelserver import loaders

    loaders._cuda_warned.clear()
    _, path = ckpt
    with caplog.at_level(logging.WARNING, logger="beamlet.loaders"):
        out = list(examples(3) | RunInference(PytorchModelHandlerTensor(path, MLP, {}, device="GPU")))
    assert len(out) == 3
    assert "CUDA is not usable here; using the CPU" in caplog.text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_large_model_on_the_gpu(ckpt, sock_path):
    model, path = ckpt
    xs = examples(64)
    h = PytorchModelHandlerTensor(path, MLP, {}, device="GPU", max_batch_size=16, large_model=True)
    results = list(xs | RunInference(h))
    with torch.inference_mode():
        expected = model(torch.stack(xs))
    assert torch.allclose(torch.stack([r.inference for r in results]), expected, atol=1e-4)
    with ServerClient(sock_path, autostart=False) as c:
        (m,) = c.status()["models"]
    assert m["device"].startswith("cuda")


def test_bad_handler_configurations_are_clear(ckpt, private_dir):
    _, path = ckpt
    # Beam's words, and RuntimeErrors as Beam's (ValueErrors too).
    with pytest.raises(RuntimeError, match="the required model_class is missing"):
        PytorchModelHandlerTensor(path)
    with pytest.raises(ValueError, match="either torch_script_model_path"):
        PytorchModelHandlerTensor(path, MLP, torch_script_model_path=path)
    with pytest.raises(TypeError, match="unexpected arguments"):
        PytorchModelHandlerTensor(path, MLP, {}, frobnicate=True)
    missing = PytorchModelHandlerTensor(os.path.join(private_dir, "nope.pt"), MLP, {})
    with pytest.raises(ModelLoadError, match="model file not found"):
        list(examples(2) | RunInference(missing))


def test_a_custom_model_handler_runs_in_process():
    class Squares(ModelHandler[int, int, object]):
        def load_model(self):
            return object()

        def run_inference(self, batch, model, inference_args=None):
            return [PredictionResult(x, x * x) for x in batch]

        def batch_elements_kwargs(self):
            return {"max_batch_size": 3}

    assert [r.inference for r in range(7) | RunInference(Squares())] == [x * x for x in range(7)]


def test_autostart_reports_a_server_that_cannot_start(private_dir):
    bad = os.path.join(private_dir, "open")
    os.mkdir(bad)
    os.chmod(bad, 0o755)
    with pytest.raises(PermissionError, match="open to other users"):
        autostart.ensure_server(os.path.join(bad, "s.sock"), timeout=30)


def test_a_server_the_client_restarts_gets_the_clients_settings_again(sock_path):
    """A server auto-started with a budget, killed, is started again with the same budget
    and idle timeout (a crash must not quietly drop an operator's settings)."""
    import psutil

    from modelserver.loaders import ModelSpec

    spec = ModelSpec("pytorch_state_dict", None, userclass.describe(MLP), {})
    with ServerClient(sock_path, server_args=["--memory-budget", "50MiB"], idle_timeout=30) as c:
        c.load("k", spec)
        first = c.status()
        assert first["memory_budget"] == 50 << 20
        psutil.Process(first["pid"]).kill()
        psutil.Process(first["pid"]).wait(10)
        c.infer("k", torch.ones(1, 8))  # reconnects, starts a new server, registers "k" again
        second = c.status()
    assert second["pid"] != first["pid"] and second["memory_budget"] == 50 << 20
    (server,) = server_processes(sock_path)
    assert "--idle-timeout" in server.cmdline() and "30" in server.cmdline()
