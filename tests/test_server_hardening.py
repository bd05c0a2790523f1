"""Issue 11, hardening: nothing freezes, nothing waits forever. Real servers on real
sockets, with small torch models made here (tests/hardening_models.py)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest
import torch

from modelserver import loaders, userclass
from modelserver.channel import Channel
from modelserver.errors import BadInput, ModelError, ModelLoadError
from modelserver.loaders import ModelSpec
from tests.conftest import RunningServer, kill_servers, start_server
from tests.hardening_models import Faulty, Wide
from tests.models import MLP, Blob, make_checkpoint

MB = 1 << 20


def spec_of(cls: type, path: str | None = None, **params) -> ModelSpec:
    return ModelSpec("pytorch_state_dict", path, userclass.describe(cls), params)


def load_request(key: str, spec: ModelSpec) -> dict:
    return {"op": "load", "key": key, "spec": spec.to_wire()}


def channel(path: str, timeout: float = 30.0) -> Channel:
    """A channel whose reads give up after ``timeout`` seconds: a hung server fails the
    test instead of hanging it."""
    ch = Channel(path)
    ch.sock.settimeout(timeout)
    return ch


@pytest.fixture(scope="module")
def workdir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="bl-h-")
    os.chmod(path, 0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def plain_server(workdir: str) -> Iterator[RunningServer]:
    """One server with the default settings, shared by the tests that only send requests."""
    path = os.path.join(workdir, "plain.sock")
    srv = start_server(path)
    yield srv
    srv.stop()
    kill_servers(path)


# -- 4: whose fault a failure is -----------------------------------------------------------
def test_a_models_own_exception_is_a_model_error_with_its_traceback(plain_server):
    with channel(plain_server.path) as ch:
        ch.request(load_request("faulty", spec_of(Faulty, depth=3)))
        with pytest.raises(ModelError) as caught:
            ch.request({"op": "infer", "key": "faulty", "inputs": torch.ones(2, 4)})
        text = str(caught.value)
        assert text.startswith("model tests.hardening_models:Faulty")
        assert "ZeroDivisionError in forward on input float32[2, 4]: the model's own bug, on 2 rows" in text
        assert text.count("in _left") == 3 and text.count("in _right") == 2, text  # down to the raise
        assert "_call_impl" not in text  # torch's module-call wrappers are left out
        # hundreds of frames deep: the message stays bounded and keeps the innermost frames
        ch.request(load_request("deep", spec_of(Faulty, depth=400)))
        with pytest.raises(ModelError) as caught:
            ch.request({"op": "infer", "key": "deep", "inputs": torch.ones(1, 4)})
        text = str(caught.value)
        assert len(text) < loaders.MAX_ERROR_TEXT + 500
        assert "characters cut" in text and text.endswith("in _left"), text[-300:]


def test_arguments_the_signature_does_not_take_are_bad_input(plain_server):
    with channel(plain_server.path) as ch:
        ch.request(load_request("mlp", spec_of(MLP)))
        with pytest.raises(BadInput, match=r"forward\(x\) does not take input float32\[2, 8\] with bias"):
            ch.request({"op": "infer", "key": "mlp", "inputs": torch.ones(2, 8), "kwargs": {"bias": 1.0}})
        with pytest.raises(BadInput, match="unexpected keyword argument 'y'"):
            ch.request(
                {"op": "infer", "key": "mlp", "inputs": {"x": torch.ones(2, 8), "y": torch.ones(2, 8)}}
            )
        assert ch.request({"op": "infer", "key": "mlp", "inputs": torch.ones(2, 8)})["outputs"].shape == (
            2,
            3,
        )


# -- 5: a state_dict that does not fit says everything that does not fit --------------------
def test_a_misfitting_state_dict_is_reported_whole(plain_server, workdir):
    narrow = os.path.join(workdir, "narrow.pt")
    make_checkpoint(narrow, d_in=5)
    blob = os.path.join(workdir, "blob.pt")
    torch.save(Blob(4).state_dict(), blob)
    shapes = ("size mismatch for net.0.weight", "torch.Size([16, 5])", "torch.Size([16, 8])")
    keys = (
        'Missing key(s) in state_dict: "net.0.weight", "net.0.bias", "net.2.weight"',
        'Unexpected key(s) in state_dict: "lin.weight"',
    )
    for path, expected in ((narrow, shapes), (blob, keys)):
        for attempt in (loaders.load, loaders.check):  # a load, and the check before a drained swap
            with pytest.raises(ModelLoadError) as caught:
                attempt(spec_of(MLP, path))
            for part in expected:
                assert part in str(caught.value), (attempt.__name__, str(caught.value))
    with channel(plain_server.path) as ch:  # and over the wire, whole
        with pytest.raises(ModelLoadError) as caught:
            ch.request(load_request("blob-as-mlp", spec_of(MLP, blob)))
    assert all(part in str(caught.value) for part in keys), str(caught.value)
    # 600 misfits: bounded, and says how much it left out
    wide = os.path.join(workdir, "wide.pt")
    torch.save(Wide(300, 2).state_dict(), wide)
    with pytest.raises(ModelLoadError, match="size mismatch for layers.0.weight") as caught:
        loaders.load(spec_of(Wide, wide, n=300, d=3))
    assert len(str(caught.value)) < loaders.MAX_ERROR_TEXT + 300 and "characters cut" in str(caught.value)
