"""``cpu_fallback``: a handler that asks for the GPU may forbid the CPU fallback, and then a
machine without usable CUDA refuses its model with a typed error, in-process and in the
model server (which keeps serving other models). The default still falls back, with a
warning, as Beam does. Real models, a real server; no GPU needed (the server is started
with CUDA hidden, so these run on GPU machines too)."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from client import RunInference
from client.handlers import ConfigurationError, PytorchModelHandlerTensor
from client.serverclient import ServerClient
from modelserver import loaders, userclass
from modelserver.errors import ModelLoadError
from modelserver.loaders import ModelSpec
from tests.conftest import start_server
from tests.models import MLP, make_checkpoint

TOLERANCE = 1e-5
REFUSAL = r"asked for the GPU \(device 'GPU'\), but CUDA is not usable here, and its handler forbids the CPU fallback"

no_cuda_here = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is usable here")


@pytest.fixture
def ckpt(private_dir):
    path = os.path.join(private_dir, "mlp.pt")
    return make_checkpoint(path, seed=7), path


def examples(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return [torch.randn(8, generator=g) for _ in range(n)]


def test_the_spec_carries_the_option_only_when_it_forbids_the_fallback(ckpt):
    _, path = ckpt
    allows = ModelSpec("pytorch_state_dict", path, userclass.describe(MLP), {}, "GPU")
    forbids = ModelSpec("pytorch_state_dict", path, userclass.describe(MLP), {}, "GPU", cpu_fallback=False)
    assert allows.cpu_fallback is True and "cpu_fallback" not in allows.to_wire()
    assert forbids.to_wire()["cpu_fallback"] is False
    # a spec from a client that predates the field means True; the digest is unchanged by it
    assert ModelSpec.from_wire(allows.to_wire()) == allows
    assert ModelSpec.from_wire(forbids.to_wire()) == forbids
    assert forbids.digest() != allows.digest()
    with pytest.raises(ModelLoadError, match="cpu_fallback must be true or false"):
        ModelSpec.from_wire({**allows.to_wire(), "cpu_fallback": "no"})


def test_a_handler_takes_a_bool_and_its_key_tells_the_two_apart(ckpt):
    _, path = ckpt
    default = PytorchModelHandlerTensor(path, MLP, device="GPU")
    strict = PytorchModelHandlerTensor(path, MLP, device="GPU", cpu_fallback=False)
    assert default.model_spec().cpu_fallback is True and strict.model_spec().cpu_fallback is False
    assert default.model_key() != strict.model_key()
    with pytest.raises(ConfigurationError, match="cpu_fallback"):
        PytorchModelHandlerTensor(path, MLP, device="GPU", cpu_fallback="no")  # type: ignore[arg-type]


@no_cuda_here
def test_resolving_a_gpu_request_without_the_fallback_is_a_load_error():
    with pytest.raises(ModelLoadError, match=f"model 'k' {REFUSAL}"):
        loaders.resolve_device("GPU", fallback=False, what="model 'k'")
    with pytest.raises(ModelLoadError, match="forbids the CPU fallback"):
        loaders.resolve_device("cuda:1", fallback=False)
    assert loaders.resolve_device("CPU", fallback=False) == "cpu"  # nothing to fall back from


@no_cuda_here
def test_an_in_process_model_that_forbids_the_fallback_fails_to_load(ckpt, caplog):
    model, path = ckpt
    strict = PytorchModelHandlerTensor(path, MLP, device="GPU", cpu_fallback=False)
    with pytest.raises(ModelLoadError, match=REFUSAL):
        strict.load_model()
    with pytest.raises(ModelLoadError, match=REFUSAL):
        list(examples(3) | RunInference(strict))
    loaders._cuda_warned.clear()  # noqa: SLF001 - the fallback warning is logged once per process
    with caplog.at_level(logging.WARNING, logger="beamlet.loaders"):
        results = list(examples(3) | RunInference(PytorchModelHandlerTensor(path, MLP, device="GPU")))
    assert "CUDA is not usable here; using the CPU" in caplog.text
    with torch.inference_mode():
        want = model(torch.stack(examples(3)))
    torch.testing.assert_close(torch.stack([r.inference for r in results]), want, rtol=0, atol=TOLERANCE)


def test_the_server_refuses_a_model_that_forbids_the_fallback_and_serves_the_others(
    ckpt, sock_path, monkeypatch, caplog
):
    model, path = ckpt
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the server sees no usable CUDA, GPU or not
    srv = start_server(sock_path)
    try:
        xs = examples(6)
        strict = PytorchModelHandlerTensor(
            path, MLP, device="GPU", cpu_fallback=False, large_model=True, socket_path=sock_path
        )
        with pytest.raises(ModelLoadError, match=f"model '{strict.model_key()}' {REFUSAL}"):
            list(xs | RunInference(strict))
        default = PytorchModelHandlerTensor(path, MLP, device="GPU", large_model=True, socket_path=sock_path)
        with caplog.at_level(logging.WARNING, logger="beamlet.remote"):
            results = list(xs | RunInference(default))
        assert "asked for a GPU; the model server runs it on the CPU" in caplog.text
        with torch.inference_mode():
            want = model(torch.stack(xs))
        torch.testing.assert_close(torch.stack([r.inference for r in results]), want, rtol=0, atol=TOLERANCE)
        with ServerClient(sock_path, autostart=False) as c:
            status = c.status()
        (served,) = status["models"]  # the refused model left nothing behind
        assert served["key"] == default.model_key() and served["device"] == "cpu"
        assert served["charges"] == {"cpu": served["footprint"]}
        assert srv.proc.poll() is None
    finally:
        srv.stop()


@pytest.mark.parametrize("device", [None, 0, ["GPU"]])
def test_a_device_that_is_not_a_string_is_a_typed_error(ckpt, device):
    _, path = ckpt
    spec = ModelSpec("pytorch_state_dict", path, userclass.describe(MLP), {}, device)
    with pytest.raises(ModelLoadError, match="device must be a string"):
        spec.validate()
