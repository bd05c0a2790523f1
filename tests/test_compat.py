"""The model server as a faithful stand-in for an in-process model (issue 10).

``large_model=True`` changes where a model lives, never what it computes or what a user
can do with it: each test runs the same use in-process and through a real model server
(and where Beam has the same use, as Beam has it) and expects the same outcome.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time

import pytest
import torch

from client import (
    ConfigurationError,
    ModelMetadata,
    ModelUpdates,
    PytorchModelHandlerKeyedTensor,
    PytorchModelHandlerTensor,
    RemoteModel,
    RunInference,
    ServerClient,
    make_keyed_tensor_model_fn,
    make_tensor_model_fn,
)
from modelserver import loaders, userclass
from modelserver.batcher import Batcher, Work
from modelserver.errors import BadRequest, ModelLoadError
from modelserver.loaders import ModelSpec
from tests import workers
from tests.models import MLP, EnvProbe, Gate, KeyedWithArgs, LayerConfig, PlainDict, TypedParams, WithGenerate

TOLERANCE = 1e-5  # rows computed in different batches may differ in the last digits


def saved(cls, directory, name, seed):
    """A new model of ``cls`` (seeded) and the path of its saved state_dict."""
    torch.manual_seed(seed)
    model = cls().eval()
    path = os.path.join(directory, name)
    torch.save(model.state_dict(), path)
    return model, path


@pytest.fixture
def generate_ckpt(private_dir):
    return saved(WithGenerate, private_dir, "gen.pt", 3)


@pytest.fixture
def keyed_ckpt(private_dir):
    return saved(KeyedWithArgs, private_dir, "keyed.pt", 4)


def examples(n, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(d, generator=g) for _ in range(n)]


# -- 1. side arguments are never merged ------------------------------------------------------


def test_distinct_tensor_inference_args_from_4_processes_x_4_threads_are_never_mixed(keyed_ckpt, server):
    _, path = keyed_ckpt
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        counts = pool.starmap(workers.keyed_side_args, [(path, server.path, p, 4, 6) for p in range(4)])
    assert sum(c["requests"] for c in counts) == 4 * 4 * 6
    assert sum(c["rows"] for c in counts) == 4 * 4 * 6 * 12
    assert [c["wrong"] for c in counts] == [0, 0, 0, 0]


def _held_batcher(tmp, kwargs_list, inputs_list):
    """Queue requests behind one held in the model, then release them together; return
    the replies and the batcher's counts."""
    gate = os.path.join(tmp, "gate")
    loaded = loaders.load(ModelSpec("pytorch_state_dict", None, userclass.describe(Gate), {"gate": gate}))
    batcher = Batcher("gate", loaded)
    replies: dict[int, object] = {}
    done = threading.Event()

    def reply_to(i):
        def reply(out, err):
            replies[i] = err if err is not None else out
            if len(replies) == len(inputs_list) + 1:
                done.set()

        return reply

    first = threading.Thread(target=batcher.submit, args=(Work(torch.ones(1, 1), {}, reply_to(-1)),))
    first.start()
    try:
        deadline = time.monotonic() + 10
        # poll: the first request is in the model (taken off the queue, held by the gate)
        while not (batcher.busy and batcher.queued == 0) and time.monotonic() < deadline:
            time.sleep(0.001)
        for i, (x, kw) in enumerate(zip(inputs_list, kwargs_list)):
            batcher.submit(Work(x, kw, reply_to(i)))
        assert batcher.queued == len(inputs_list)
    finally:
        open(gate, "w").close()
    first.join(10)
    assert done.wait(10)
    batcher.drain(10)
    return replies, batcher.stats


def test_requests_merge_only_when_their_side_arguments_are_equal(private_dir):
    xs = [torch.full((2, 1), float(i)) for i in range(6)]
    same = {"note": "a", "t": torch.tensor([1.0, 2.0])}
    kwargs = [same, dict(same), {"note": "b", "t": same["t"]}, {"note": "a", "t": torch.tensor([1.0, 3.0])}]
    kwargs += [{}, {}]
    replies, stats = _held_batcher(private_dir, kwargs, xs)
    # Behind the held request: 0 and 1 (equal arguments) merge, 4 and 5 (none) merge, 2 and
    # 3 (a different note, a different tensor) each run alone: 1 + 4 forwards.
    assert stats.requests == 7
    assert stats.batches == 5
    for i, (x, kw) in enumerate(zip(xs, kwargs)):
        assert torch.equal(replies[i], x + (kw["t"].sum() if "t" in kw else 0)), i


# -- 2. never random weights ------------------------------------------------------------------


@pytest.mark.parametrize("large", [False, True])
def test_an_empty_model_path_keeps_the_current_model(generate_ckpt, sock_path, large):
    model, path = generate_ckpt
    xs = examples(8)
    handler = PytorchModelHandlerTensor(path, WithGenerate, {}, max_batch_size=4, large_model=large)
    before = list(xs | RunInference(handler))
    handler.update_model_path("")
    after_direct = list(xs | RunInference(handler))
    updates = ModelUpdates()
    updates.put(ModelMetadata(model_id="", model_name=""))
    after_side_input = list(xs | RunInference(handler, model_metadata_pcoll=updates))
    with torch.no_grad():
        want = model(torch.stack(xs))
    for results in (before, after_direct, after_side_input):
        assert {r.model_id for r in results} == {path}
        assert torch.allclose(torch.stack([r.inference for r in results]), want, atol=TOLERANCE)


def test_a_state_dict_handler_without_a_checkpoint_is_refused_at_construction():
    for cls in (PytorchModelHandlerTensor, PytorchModelHandlerKeyedTensor):
        for large in (False, True):
            with pytest.raises(RuntimeError, match="required state_dict_path is missing"):
                cls(model_class=MLP, model_params={}, large_model=large)
            with pytest.raises(ConfigurationError, match="required model_class is missing"):
                cls(state_dict_path="/m.pt", large_model=large)


# -- 3. inference_args is {} ------------------------------------------------------------------


@pytest.mark.parametrize("large", [False, True])
def test_inference_fn_receives_empty_inference_args_as_in_beam(generate_ckpt, sock_path, large):
    model, path = generate_ckpt
    seen = []

    def beam_style_fn(batch, model, device, inference_args, model_id=None):
        seen.append(inference_args)
        out = model(torch.stack(batch), **inference_args)  # Beam's default does exactly this
        return [(x, y) for x, y in zip(batch, out)]

    h = PytorchModelHandlerTensor(path, WithGenerate, {}, inference_fn=beam_style_fn, large_model=large)
    results = list(examples(5) | RunInference(h))
    assert len(results) == 5 and seen and all(a == {} for a in seen)


# -- 4. a large model's methods by name ---------------------------------------------------------


@pytest.mark.parametrize("large", [False, True])
def test_make_tensor_model_fn_calls_a_public_method_by_name(generate_ckpt, sock_path, large):
    model, path = generate_ckpt
    xs = examples(10)
    h = PytorchModelHandlerTensor(
        path,
        WithGenerate,
        {},
        inference_fn=make_tensor_model_fn("generate"),
        max_batch_size=4,
        large_model=large,
    )
    results = list(xs | RunInference(h, inference_args={"bias": 2.0}))
    with torch.no_grad():
        want = model.generate(torch.stack(xs), bias=2.0)
    assert torch.allclose(torch.stack([r.inference for r in results]), want, atol=TOLERANCE)


def test_beams_own_make_tensor_model_fn_works_on_a_remote_model(generate_ckpt, sock_path):
    beam_pt = pytest.importorskip("apache_beam.ml.inference.pytorch_inference")
    model, path = generate_ckpt
    xs = examples(6)
    h = PytorchModelHandlerTensor(
        path, WithGenerate, {}, inference_fn=beam_pt.make_tensor_model_fn("generate"), large_model=True
    )
    results = list(xs | RunInference(h))
    with torch.no_grad():
        want = model.generate(torch.stack(xs))
    assert torch.allclose(torch.stack([r.inference for r in results]), want, atol=TOLERANCE)


@pytest.mark.parametrize("large", [False, True])
def test_keyed_method_by_name_with_side_arguments(keyed_ckpt, sock_path, large):
    model, path = keyed_ckpt
    g = torch.Generator().manual_seed(1)
    xs = [{"k1": torch.randn(4, generator=g), "k2": torch.randn(4, generator=g)} for _ in range(8)]
    args = {"offset": torch.arange(4.0), "scale": 3.0}
    h = PytorchModelHandlerKeyedTensor(
        path,
        KeyedWithArgs,
        {},
        inference_fn=make_keyed_tensor_model_fn("generate"),
        max_batch_size=4,
        large_model=large,
    )
    results = list(xs | RunInference(h, inference_args=args))
    with torch.no_grad():
        want = model.generate(torch.stack([x["k1"] for x in xs]), torch.stack([x["k2"] for x in xs]), **args)
    assert torch.allclose(torch.stack([r.inference for r in results]), want, atol=TOLERANCE)


def test_a_remote_model_offers_public_methods_only(generate_ckpt, server):
    _, path = generate_ckpt
    h = PytorchModelHandlerTensor(path, WithGenerate, {}, large_model=True, socket_path=server.path)
    remote = h.load_model()
    assert isinstance(remote, RemoteModel)
    assert {"forward", "generate"} <= remote.methods
    assert not {"to", "load_state_dict", "train", "_private"} & remote.methods
    assert torch.allclose(remote.generate(torch.ones(2, 8)), remote(torch.ones(2, 8)) + 0.5, atol=TOLERANCE)
    with pytest.raises(AttributeError, match="no public method 'nope'"):
        remote.nope  # noqa: B018
    with pytest.raises(AttributeError):
        remote._private  # noqa: B018
    with ServerClient(server.path, autostart=False) as c:
        for method in ("to", "load_state_dict", "_private", "__class__"):
            with pytest.raises(BadRequest, match="method"):
                c.infer(h.model_key(), torch.ones(1, 8), {}, method)


def test_beams_keyed_model_handler_over_beamlet_handlers(generate_ckpt, sock_path, private_dir):
    beam = pytest.importorskip("apache_beam")
    from apache_beam.ml.inference import base as beam_base
    from apache_beam.testing.util import assert_that

    from client.beam import BeamletModelHandler

    model, path = generate_ckpt
    other, other_path = saved(WithGenerate, private_dir, "other.pt", 9)
    mhs = [
        beam_base.KeyModelMapping(
            ["a"], BeamletModelHandler(PytorchModelHandlerTensor(path, WithGenerate, {}, large_model=True))
        ),
        beam_base.KeyModelMapping(
            ["b"], BeamletModelHandler(PytorchModelHandlerTensor(other_path, WithGenerate, {}))
        ),
    ]
    xs = [("a" if i % 2 else "b", x) for i, x in enumerate(examples(6))]
    with torch.no_grad():
        want = {(k, tuple(x.tolist())): (model if k == "a" else other)(x[None])[0] for k, x in xs}

    def check(results):
        assert len(results) == len(xs)
        for key, r in results:
            expected = want[(key, tuple(r.example.tolist()))]
            assert torch.allclose(r.inference, expected, atol=TOLERANCE)
            assert r.model_id == (path if key == "a" else other_path)

    with beam.Pipeline() as p:
        out = p | beam.Create(xs) | beam_base.RunInference(beam_base.KeyedModelHandler(mhs))
        assert_that(out, check)


# -- 5. model_params and inference_args that are not plain data -------------------------------


@pytest.mark.parametrize("large", [False, True])
def test_torch_dtypes_and_dataclasses_as_model_params_and_inference_args(private_dir, sock_path, large):
    params = {"dtype": torch.float64, "config": LayerConfig(8, 3)}
    local = TypedParams(**params).eval()
    path = os.path.join(private_dir, "typed.pt")
    torch.save(local.state_dict(), path)
    h = PytorchModelHandlerTensor(path, TypedParams, params, large_model=large)
    xs = examples(5)
    results = list(xs | RunInference(h, inference_args={"out_dtype": torch.float16}))
    got = torch.stack([r.inference for r in results])
    assert got.dtype == torch.float16
    with torch.no_grad():
        want = local(torch.stack(xs), out_dtype=torch.float16)
    assert torch.allclose(got.float(), want.float(), atol=1e-2)


def test_a_model_param_the_wire_cannot_carry_is_named_at_construction(generate_ckpt):
    _, path = generate_ckpt

    class Opaque:
        pass

    # In-process, anything the constructor takes is fine ...
    PytorchModelHandlerTensor(path, WithGenerate, {"opaque": Opaque()})
    # ... and for the server the error names the parameter, before anything starts.
    with pytest.raises(ConfigurationError, match=r"model_params\['opaque'\] cannot travel"):
        PytorchModelHandlerTensor(path, WithGenerate, {"opaque": Opaque()}, large_model=True)
    h = PytorchModelHandlerTensor(path, WithGenerate, {}, large_model=True)
    with pytest.raises(ConfigurationError, match=r"inference_args\['how'\] cannot travel"):
        RunInference(h, inference_args={"how": Opaque()})


# -- 6. weights_only=False and env_vars -------------------------------------------------------


@pytest.mark.parametrize("large", [False, True])
def test_weights_only_false_is_honoured_when_asked_for(private_dir, sock_path, large, caplog):
    torch.manual_seed(5)
    model = MLP().eval()
    path = os.path.join(private_dir, "pickled.pt")
    torch.save(PlainDict(model.state_dict()), path)
    xs = examples(4)
    refused = PytorchModelHandlerTensor(path, MLP, {}, large_model=large)
    with pytest.raises(ModelLoadError, match="weights_only|Unsupported global"):
        list(xs | RunInference(refused))
    caplog.set_level(logging.WARNING)
    h = PytorchModelHandlerTensor(path, MLP, {}, load_model_args={"weights_only": False}, large_model=large)
    results = list(xs | RunInference(h))
    with torch.no_grad():
        want = model(torch.stack(xs))
    assert torch.allclose(torch.stack([r.inference for r in results]), want, atol=TOLERANCE)
    if not large:  # the server logs its own warning, in its own log
        assert any("weights_only=False" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("large", [False, True])
def test_env_vars_reach_the_worker_and_a_running_server(private_dir, server, large, monkeypatch):
    monkeypatch.delenv("BEAMLET_TEST_ENV", raising=False)
    torch.save(EnvProbe().state_dict(), path := os.path.join(private_dir, "env.pt"))
    h = PytorchModelHandlerTensor(
        path, EnvProbe, {}, env_vars={"BEAMLET_TEST_ENV": "3"}, large_model=large, socket_path=server.path
    )
    results = list([torch.ones(2)] | RunInference(h))
    assert torch.equal(results[0].inference, torch.full((2,), 3.0))  # computed where the model lives
    assert os.environ.get("BEAMLET_TEST_ENV") == "3"  # and set in this process, as Beam does
    clash = PytorchModelHandlerTensor(
        path, EnvProbe, {}, env_vars={"BEAMLET_TEST_ENV": "4"}, large_model=large, socket_path=server.path
    )
    with pytest.raises(ModelLoadError, match="BEAMLET_TEST_ENV"):
        list([torch.ones(2)] | RunInference(clash))
    monkeypatch.delenv("BEAMLET_TEST_ENV", raising=False)
    loaders._env_owners.pop("BEAMLET_TEST_ENV", None)


# -- 7. outputs can change in place -------------------------------------------------------------


@pytest.mark.parametrize("large", [False, True])
def test_a_postprocess_function_may_change_outputs_in_place(generate_ckpt, sock_path, large):
    model, path = generate_ckpt
    xs = examples(4)
    h = PytorchModelHandlerTensor(path, WithGenerate, {}, large_model=large).with_postprocess_fn(
        lambda r: r.inference.mul_(2)
    )
    got = torch.stack(list(xs | RunInference(h)))
    with torch.no_grad():
        want = model(torch.stack(xs)) * 2
    assert torch.allclose(got, want, atol=TOLERANCE)


# -- 8. model_id is the path as given --------------------------------------------------------------


@pytest.mark.parametrize("large", [False, True])
def test_model_id_is_the_path_as_the_user_gave_it(generate_ckpt, sock_path, large, monkeypatch):
    _, path = generate_ckpt
    monkeypatch.chdir(os.path.dirname(path))
    h = PytorchModelHandlerTensor(os.path.basename(path), WithGenerate, {}, large_model=large)
    results = list(examples(3) | RunInference(h))
    assert {r.model_id for r in results} == {"gen.pt"}
    assert h.model_spec().path == path  # what the server keys on stays absolute
