"""KeyedModelHandler and KeyModelMapping, in-process and with models in the server."""

from __future__ import annotations

import os

import pytest
import torch

from client import (
    KeyedModelHandler,
    KeyModelMapping,
    PredictionResult,
    PytorchModelHandlerTensor,
    RunInference,
    ServerClient,
)
from tests.models import MLP, make_checkpoint


@pytest.fixture
def three_models(private_dir):
    out = {}
    for i, name in enumerate(("en", "de", "fr")):
        path = os.path.join(private_dir, f"{name}.pt")
        out[name] = (make_checkpoint(path, seed=i), path)
    return out


def keyed_examples(keys, n=30):
    g = torch.Generator().manual_seed(3)
    return [(keys[i % len(keys)], torch.randn(8, generator=g)) for i in range(n)]


@pytest.mark.parametrize("large", [False, True])
def test_examples_go_to_the_model_mapped_to_their_key(three_models, sock_path, large):
    mappings = [
        KeyModelMapping(
            ["en", "en-gb"], PytorchModelHandlerTensor(three_models["en"][1], MLP, {}, large_model=large)
        ),
        KeyModelMapping(["de"], PytorchModelHandlerTensor(three_models["de"][1], MLP, {}, large_model=large)),
        KeyModelMapping(["fr"], PytorchModelHandlerTensor(three_models["fr"][1], MLP, {}, large_model=large)),
    ]
    examples = keyed_examples(["en", "de", "fr", "en-gb"])
    results = list(examples | RunInference(KeyedModelHandler(mappings)))
    assert [k for k, _ in results] == [k for k, _ in examples]
    with torch.inference_mode():
        for (key, x), (_, r) in zip(examples, results):
            model, path = three_models["en" if key == "en-gb" else key]
            assert isinstance(r, PredictionResult) and r.model_id == path
            assert torch.allclose(r.inference, model(x[None])[0], atol=1e-6)
    if large:
        with ServerClient(sock_path, autostart=False) as c:
            status = c.status()
        assert len(status["models"]) == 3
        # the en and en-gb examples share one model and its batches
        en = next(m for m in status["models"] if m["model_id"] == three_models["en"][1])
        assert en["rows"] == sum(1 for k, _ in examples if k in ("en", "en-gb"))


def test_one_handler_serves_every_key(three_models):
    model, path = three_models["en"]
    examples = keyed_examples(["a", "b"])
    results = list(examples | RunInference(KeyedModelHandler(PytorchModelHandlerTensor(path, MLP, {}))))
    with torch.inference_mode():
        for (key, x), (rkey, r) in zip(examples, results):
            assert rkey == key and torch.allclose(r.inference, model(x[None])[0], atol=1e-6)


def test_max_models_per_worker_hint_caps_models_in_process(three_models):
    mappings = [
        KeyModelMapping([k], PytorchModelHandlerTensor(p, MLP, {})) for k, (_, p) in three_models.items()
    ]
    handler = KeyedModelHandler(mappings, max_models_per_worker_hint=1)
    model = handler.load_model()
    examples = keyed_examples(["en", "de", "fr"], n=9)
    for key, x in examples:
        handler.run_inference([(key, x)], model)
        assert len(model._local) == 1  # noqa: SLF001
    assert model.evictions == 8


def test_keyed_mistakes_are_clear(three_models):
    h = PytorchModelHandlerTensor(three_models["en"][1], MLP, {})
    with pytest.raises(ValueError, match="mapped to more than one model"):
        KeyedModelHandler([KeyModelMapping(["a"], h), KeyModelMapping(["a"], h)])
    with pytest.raises(ValueError, match="at least one key"):
        KeyModelMapping([], h)
    keyed = KeyedModelHandler([KeyModelMapping(["a"], h)])
    with pytest.raises(KeyError, match="no model is mapped to key 'zz'"):
        list([("zz", torch.ones(8))] | RunInference(keyed))
