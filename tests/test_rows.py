"""Bundles without copies: rows of one array travel as one array, both ways.

``runtime.rows`` packs a bundle's rows (and a result's outputs) into one array per field
for the control channel and unpacks them into views; ``client.handlers.stack_rows``
makes a batch of consecutive rows a view instead of a copy. Real harness runs check that
nothing changes for the user but the cost."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from client import PytorchModelHandlerTensor
from client.handlers import stack_rows
from client.results import PredictionResult
from modelserver import wire
from runtime import Collect, Harness, Map, ReadFromNpy, RunInference, rows
from tests.models import MLP, make_checkpoint

ATOL = 1e-5  # a row computed in a merged server batch may differ in the last digits


def test_an_array_bundle_travels_as_one_array_and_arrives_as_views():
    bundle = np.arange(256 * 8, dtype=np.float32).reshape(256, 8)
    packed = rows.pack(bundle)
    assert packed == {"packed": 256, "array": bundle}
    got = rows.unpack(packed)
    assert len(got) == 256 and all(np.shares_memory(r, bundle) for r in got)
    np.testing.assert_array_equal(np.stack(got), bundle)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_separate_rows_of_one_shape_are_packed_and_come_back_equal(kind):
    make = (lambda i: np.full((3, 2), i, np.int16)) if kind == "numpy" else (lambda i: torch.full((3, 2), i))
    elements = [make(i) for i in range(10)]
    packed = rows.pack(elements)
    assert set(packed) == {"packed", "array"} and tuple(packed["array"].shape) == (10, 3, 2)
    back = rows.unpack(_through_the_wire(packed))
    assert [type(r) for r in back] == [type(e) for e in elements]
    for a, b in zip(back, elements):
        assert a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape) and (a == b).all()


def test_scalars_stay_zero_dimensional():
    back = rows.unpack(_through_the_wire(rows.pack([torch.tensor(float(i)) for i in range(4)])))
    assert all(isinstance(r, torch.Tensor) and r.dim() == 0 for r in back)
    assert [float(r) for r in back] == [0.0, 1.0, 2.0, 3.0]
    back = rows.unpack(rows.pack([np.array(i) for i in range(3)]))
    assert all(isinstance(r, np.ndarray) and r.ndim == 0 for r in back)


def test_prediction_results_travel_as_columns_and_arrive_as_maps():
    results = [PredictionResult(torch.randn(8), torch.randn(4), "m.pt") for _ in range(5)]
    packed = rows.pack(results)
    assert packed["packed"] == 5 and list(packed["columns"]) == ["example", "inference", "model_id"]
    assert packed["columns"]["model_id"] == ["m.pt"] * 5
    back = rows.unpack(_through_the_wire(packed))
    for b, r in zip(back, results, strict=True):
        # packed or not, a NamedTuple arrives as a map of its fields
        assert list(b) == list(_through_the_wire(r)) == ["example", "inference", "model_id"]
        assert torch.equal(b["example"], r.example) and torch.equal(b["inference"], r.inference)
        assert b["model_id"] == "m.pt"


@pytest.mark.parametrize(
    "elements",
    [
        [np.zeros(3), np.zeros(4)],  # shapes differ
        [np.zeros(3, np.float32), np.zeros(3, np.float64)],  # dtypes differ
        [np.zeros(3), torch.zeros(3)],  # kinds differ
        [{"label": 1}, {"label": 2}],  # nothing to stack: msgpack does maps of numbers best
        [{"a": np.zeros(2)}, {"b": np.zeros(2)}],  # keys differ
        [np.array(["a", None], dtype=object)] * 2,  # objects do not travel
        ["text", "more"],
        [np.zeros(3)],  # one row
        [],
    ],
    ids=["shapes", "dtypes", "kinds", "numbers", "keys", "objects", "strings", "one", "none"],
)
def test_what_does_not_pack_stays_a_list(elements):
    packed = rows.pack(elements)
    assert packed is elements and rows.unpack(packed) is elements


@pytest.mark.parametrize(
    "bad",
    [
        {"packed": 3, "array": np.zeros((2, 4))},
        {"packed": -1, "array": np.zeros((0, 4))},
        {"packed": 2, "columns": {"x": [1]}},
        {"packed": 2, "columns": {"x": np.zeros(3)}},
        {"packed": 2},
        {"packed": 2, "array": "no"},
        {"rows": 2},
        "text",
    ],
)
def test_a_malformed_packed_form_is_refused(bad):
    with pytest.raises(TypeError):
        rows.unpack(bad)


def test_a_batch_of_consecutive_rows_is_a_view_not_a_copy():
    bundle = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    elements = rows.unpack(rows.pack(bundle))
    batch = stack_rows(elements[16:32])
    assert np.shares_memory(batch.numpy(), bundle)
    np.testing.assert_array_equal(batch.numpy(), bundle[16:32])
    t = torch.randn(10, 3)
    view = stack_rows(list(t)[2:5])
    assert view.data_ptr() == t[2].data_ptr() and torch.equal(view, t[2:5])


@pytest.mark.parametrize("case", ["reversed", "gap", "two arrays", "one row of another"])
def test_rows_that_are_not_consecutive_are_copied_and_still_right(case):
    a = np.arange(40, dtype=np.float32).reshape(10, 4)
    b = np.arange(40, 80, dtype=np.float32).reshape(10, 4)
    batch = {
        "reversed": [a[3], a[2], a[1]],
        "gap": [a[0], a[2], a[3]],
        "two arrays": [a[8], a[9], b[0]],
        "one row of another": [a[1], a[2], np.array(a[3])],
    }[case]
    got = stack_rows(batch)
    assert not np.shares_memory(got.numpy(), a)
    np.testing.assert_array_equal(got.numpy(), np.stack(batch))


def test_read_from_npy_cuts_bundles_as_slices(private_dir):
    path = os.path.join(private_dir, "x.npy")
    data = np.random.default_rng(1).standard_normal((1000, 8)).astype(np.float32)
    np.save(path, data)
    bundles = list(ReadFromNpy(path).bundles(256))
    assert [len(b) for b in bundles] == [256, 256, 256, 232]
    assert all(isinstance(b, np.ndarray) for b in bundles)
    np.testing.assert_array_equal(np.concatenate(bundles), data)


@pytest.mark.parametrize("large", [False, True], ids=["in-process", "large_model"])
def test_a_run_over_npy_gives_each_row_its_prediction(private_dir, sock_path, large):
    """ReadFromNpy -> RunInference -> sink: array bundles out, column results back, the
    same predictions as the model on each row alone, in input order."""
    ckpt = os.path.join(private_dir, "mlp.pt")
    model = make_checkpoint(ckpt)
    path = os.path.join(private_dir, "x.npy")
    data = np.random.default_rng(2).standard_normal((700, 8)).astype(np.float32)
    np.save(path, data)
    handler = PytorchModelHandlerTensor(
        ckpt, MLP, {}, large_model=large, min_batch_size=16, max_batch_size=16, socket_path=sock_path
    )
    sink = Collect()
    summary = Harness(workers=2, threads=2, bundle_size=100, progress=False).run(
        ReadFromNpy(path) | RunInference(handler) | sink
    )
    assert summary.outputs == 700 and not summary.dead_letters
    with torch.inference_mode():
        want = model(torch.from_numpy(data))
    for i, r in enumerate(sink.values):
        assert np.array_equal(np.asarray(r["example"]), data[i]), f"row {i} lost, duplicated or out of order"
        torch.testing.assert_close(torch.as_tensor(r["inference"]), want[i], rtol=0, atol=ATOL)


def test_a_run_with_maps_after_inference_is_unchanged(private_dir):
    path = os.path.join(private_dir, "x.npy")
    data = np.arange(300 * 4, dtype=np.float64).reshape(300, 4)
    np.save(path, data)
    sink = Collect()
    Harness(workers=2, threads=1, bundle_size=64, progress=False).run(
        ReadFromNpy(path) | Map(lambda x: {"sum": float(x.sum()), "row": x * 2}) | sink
    )
    assert [v["sum"] for v in sink.values] == [float(r.sum()) for r in data]
    np.testing.assert_array_equal(np.stack([v["row"] for v in sink.values]), data * 2)


def _through_the_wire(value):
    """``value`` encoded and decoded as a control message carries it."""
    import socket

    a, b = socket.socketpair()
    try:
        wire.send_frame(a, {"v": value})
        return wire.FrameReader(b).read()["v"]
    finally:
        a.close()
        b.close()
