"""Every handler survives pickling, as runners ship them (Beam pickles handlers to its
SDK workers): the standard library's pickle and Beam's own pickler, wrapped or not,
keyed or not, large_model or not; the copy gives the same results as the original."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from client import (
    KeyedModelHandler,
    KeyModelMapping,
    PytorchModelHandlerKeyedTensor,
    PytorchModelHandlerTensor,
    RunInference,
)
from tests.models import MLP, TwoInputs

TOLERANCE = 1e-5


def double(x):  # module-level: picklable by reference
    return x * 2


def label(result):
    return result._replace(inference=result.inference.argmax())


def keyed_inputs(x):
    return {"a": x[:4], "b": x[4:]}


@pytest.fixture
def models(private_dir):
    torch.manual_seed(0)
    mlp, two = MLP().eval(), TwoInputs().eval()
    paths = {"mlp": os.path.join(private_dir, "mlp.pt"), "two": os.path.join(private_dir, "two.pt")}
    torch.save(mlp.state_dict(), paths["mlp"])
    torch.save(two.state_dict(), paths["two"])
    return paths


def handlers(paths, large):
    """(name, handler, examples) for every kind of handler."""
    mlp = PytorchModelHandlerTensor(paths["mlp"], MLP, {}, max_batch_size=4, large_model=large)
    two = PytorchModelHandlerKeyedTensor(paths["two"], TwoInputs, {}, max_batch_size=4, large_model=large)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(8, generator=g) for _ in range(6)]
    return [
        ("tensor", mlp, xs),
        ("keyed tensor", two, [keyed_inputs(x) for x in xs]),
        ("pre+post", mlp.with_preprocess_fn(double).with_postprocess_fn(label), xs),
        ("keyed pre", two.with_preprocess_fn(keyed_inputs), xs),
        ("KeyedModelHandler", KeyedModelHandler(mlp), [(str(i), x) for i, x in enumerate(xs)]),
        (
            "KeyModelMappings, wrapped",
            KeyedModelHandler(
                [KeyModelMapping(["a"], mlp), KeyModelMapping(["b"], two.with_preprocess_fn(keyed_inputs))]
            ).with_postprocess_fn(lambda kv: kv),
            [("a" if i % 2 else "b", x) for i, x in enumerate(xs)],
        ),
    ]


def same(a, b):
    if isinstance(a, tuple) and len(a) == 2 and isinstance(a[0], str):
        return a[0] == b[0] and same(a[1], b[1])
    ia, ib = getattr(a, "inference", a), getattr(b, "inference", b)
    return torch.allclose(torch.as_tensor(ia).float(), torch.as_tensor(ib).float(), atol=TOLERANCE)


@pytest.mark.parametrize("large", [False, True])
def test_every_handler_round_trips_through_both_picklers(models, sock_path, large):
    beam_pickler = pytest.importorskip("apache_beam.internal.pickler")
    for name, handler, examples in handlers(models, large):
        want = list(examples | RunInference(handler))
        copies = [beam_pickler.loads(beam_pickler.dumps(handler))]
        if name != "KeyModelMappings, wrapped":  # a lambda: Beam's pickler only, as in Beam
            copies.append(pickle.loads(pickle.dumps(handler)))
        for copy in copies:
            assert type(copy) is type(handler), name
            got = list(examples | RunInference(copy))
            assert len(got) == len(want) and all(same(a, b) for a, b in zip(got, want)), name


def test_a_wrapped_handler_runs_in_a_beam_pipeline(models, sock_path):
    beam = pytest.importorskip("apache_beam")
    from apache_beam.ml.inference.base import RunInference as BeamRunInference
    from apache_beam.testing.util import assert_that

    from client.beam import BeamletModelHandler

    mlp = MLP()
    mlp.load_state_dict(torch.load(models["mlp"], weights_only=True))
    xs = [torch.full((8,), float(i)) for i in range(5)]
    with torch.no_grad():
        want = {float(x[0]): mlp.eval()(x[None] * 2)[0] for x in xs}
    inner = PytorchModelHandlerTensor(models["mlp"], MLP, {}, large_model=True).with_preprocess_fn(double)

    def check(results):
        assert len(results) == len(xs)
        for r in results:
            assert torch.allclose(r.inference, want[float(r.example[0]) / 2], atol=TOLERANCE)

    with beam.Pipeline() as p:
        out = p | beam.Create(xs) | BeamRunInference(BeamletModelHandler(inner, server_idle_timeout=2))
        assert_that(out, check)
