"""Placement as a pure function: which device each copy of a model goes to, from the
devices' free budgets. No GPU needed: the devices are data."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from modelserver import memory, userclass
from modelserver.errors import ModelLoadError, OutOfMemory
from modelserver.loaders import ModelSpec
from modelserver.manager import ModelManager
from modelserver.placement import place
from tests.models import Blob, blob_side, make_blob

GB = 1 << 30


def test_gpu_picks_the_gpu_with_the_most_free_budget():
    free = {"cuda:0": 2 * GB, "cuda:1": 5 * GB, "cuda:2": 3 * GB}
    assert place("GPU", free, 1 * GB) == ["cuda:1"]


def test_gpu_ties_go_to_the_lowest_index():
    assert place("GPU", {"cuda:1": 4 * GB, "cuda:0": 4 * GB}, GB) == ["cuda:0"]


def test_successive_keyed_models_spread_across_gpus():
    free = {"cuda:0": 8 * GB, "cuda:1": 8 * GB}
    placed = []
    for _ in range(4):
        (device,) = place("GPU", free, 3 * GB)
        free[device] -= 3 * GB  # what the manager's budget says after the load
        placed.append(device)
    assert placed == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]


def test_copies_spread_over_gpus_by_free_budget():
    free = {"cuda:0": 10 * GB, "cuda:1": 4 * GB}
    # cuda:0 takes the first two (10, then 7 free); then 4 = 4 and cuda:1 holds none yet
    assert place("GPU", free, 3 * GB, copies=3) == ["cuda:0", "cuda:0", "cuda:1"]
    assert place("GPU", {"cuda:0": 8 * GB, "cuda:1": 8 * GB}, GB, copies=4) == [
        "cuda:0",
        "cuda:1",
        "cuda:0",
        "cuda:1",
    ]


@pytest.mark.parametrize(
    ("free", "footprint", "copies", "expected"),
    [
        # 3 GPUs: cuda:1 has the most room for two; then cuda:2 ties it and holds none yet
        ({"cuda:0": 1 * GB, "cuda:1": 4 * GB, "cuda:2": 2 * GB}, GB, 4, [1, 1, 2, 1]),
        # 4 GPUs: ties go to the GPU holding fewer copies, then to the lowest index
        (
            {"cuda:0": 6 * GB, "cuda:1": 10 * GB, "cuda:2": 3 * GB, "cuda:3": 8 * GB},
            2 * GB,
            5,
            [1, 3, 1, 0, 3],
        ),
        # the GPU with little room takes none until the others come down to it
        ({"cuda:0": 9 * GB, "cuda:1": 9 * GB, "cuda:2": GB, "cuda:3": 5 * GB}, GB, 6, [0, 1, 0, 1, 0, 1]),
    ],
)
def test_copies_spread_over_three_or_four_gpus_with_unequal_free_budgets(free, footprint, copies, expected):
    assert place("GPU", free, footprint, copies=copies) == [f"cuda:{i}" for i in expected]


def test_a_copy_that_fits_no_gpu_names_each_free_budget():
    # the first two copies fit (cuda:0, then cuda:1); the third fits none of the three
    free = {"cuda:0": 3 * GB, "cuda:1": 2 * GB, "cuda:2": GB}
    with pytest.raises(OutOfMemory) as err:
        place("GPU", free, 2 * GB, copies=3, what="model 'k'")
    message = str(err.value)
    assert message.startswith(f"model 'k' needs {2 * GB} bytes for each of 3 copies")
    for device, nbytes in free.items():
        assert f"{device} {nbytes} bytes free" in message


def test_copies_that_do_not_all_fit_fail_naming_each_budget():
    with pytest.raises(OutOfMemory) as err:
        place("GPU", {"cuda:0": 5 * GB, "cuda:1": 5 * GB}, 3 * GB, copies=3)
    assert "3 copies" in str(err.value)
    assert f"cuda:0 {5 * GB}" in str(err.value) and f"cuda:1 {5 * GB}" in str(err.value)


def test_pinned_device_is_kept_even_when_another_has_more_room():
    free = {"cuda:0": 9 * GB, "cuda:1": 2 * GB}
    assert place("cuda:1", free, GB) == ["cuda:1"]
    assert place("CUDA:1", free, GB, copies=2) == ["cuda:1", "cuda:1"]


def test_pinned_device_that_does_not_fit_fails():
    with pytest.raises(OutOfMemory, match="cuda:1"):
        place("cuda:1", {"cuda:0": 9 * GB, "cuda:1": 2 * GB}, 3 * GB)


def test_pinned_device_this_machine_lacks_fails():
    with pytest.raises(ModelLoadError, match=r"cuda:3.*cuda:0, cuda:1"):
        place("cuda:3", {"cpu": None, "cuda:0": GB, "cuda:1": GB}, 1)


def test_a_model_that_fits_no_device_names_each_free_budget():
    free = {"cuda:0": 2 * GB, "cuda:1": 3 * GB}
    with pytest.raises(OutOfMemory) as err:
        place("GPU", free, 4 * GB, what="model 'big'")
    message = str(err.value)
    assert "model 'big'" in message and str(4 * GB) in message
    assert f"cuda:0 {2 * GB}" in message and f"cuda:1 {3 * GB}" in message


def test_whole_budgets_decide_fit_and_free_budgets_the_order():
    # cuda:0 has more free now; cuda:1's idle models could be evicted to make room for it
    free = {"cuda:0": 3 * GB, "cuda:1": 1 * GB}
    budgets = {"cuda:0": 3 * GB, "cuda:1": 8 * GB}
    assert place("GPU", free, 2 * GB, budgets=budgets) == ["cuda:0"]
    assert place("GPU", free, 5 * GB, budgets=budgets) == ["cuda:1"]
    with pytest.raises(OutOfMemory, match="budget"):
        place("GPU", free, 9 * GB, budgets=budgets)


def test_a_gpu_whose_room_is_held_by_busy_models_comes_after_one_that_can_evict():
    """cuda:0 has more free now but the rest of it is held by models in use; cuda:1 is
    full of idle models. A model that fits cuda:0 only by waiting for its busy models goes
    to cuda:1, where evicting makes room at once; one that fits cuda:0's free room stays
    there (free room first: nothing is evicted)."""
    budgets = {"cuda:0": 10 * GB, "cuda:1": 10 * GB}
    free = {"cuda:0": 3 * GB, "cuda:1": 2 * GB}
    reclaimable = {"cuda:0": 3 * GB, "cuda:1": 10 * GB}  # 7 GB busy on cuda:0; cuda:1 all idle
    assert place("GPU", free, 5 * GB, budgets=budgets, reclaimable=reclaimable) == ["cuda:1"]
    assert place("GPU", free, 5 * GB, budgets=budgets) == ["cuda:0"]  # without the readings: as before
    assert place("GPU", free, 3 * GB, budgets=budgets, reclaimable=reclaimable) == ["cuda:0"]
    # two copies: the first to cuda:1 (evicting), the second too (cuda:0 would wait)
    assert place("GPU", free, 4 * GB, 2, budgets=budgets, reclaimable=reclaimable) == ["cuda:1", "cuda:1"]
    # when every GPU would have to wait, the one with the most free room, as before
    busy = {"cuda:0": 3 * GB, "cuda:1": 2 * GB}
    assert place("GPU", free, 5 * GB, budgets=budgets, reclaimable=busy) == ["cuda:0"]


def test_a_device_without_a_budget_always_fits():
    assert place("cpu", {"cpu": None}, 100 * GB, copies=2) == ["cpu", "cpu"]
    assert place("GPU", {"cuda:0": None, "cuda:1": GB}, 100 * GB) == ["cuda:0"]


def test_cpu_request_stays_on_the_cpu():
    assert place("CPU", {"cpu": 4 * GB, "cuda:0": 80 * GB}, GB) == ["cpu"]
    with pytest.raises(OutOfMemory, match="cpu"):
        place("cpu", {"cpu": GB}, 2 * GB)


def test_gpu_without_cuda_falls_back_to_the_cpu_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="beamlet.placement"):
        assert place("GPU", {"cpu": 8 * GB}, GB, copies=2) == ["cpu", "cpu"]
    assert "CUDA" in caplog.text and "CPU" in caplog.text


def test_gpu_without_cuda_fails_when_the_fallback_is_not_allowed():
    with pytest.raises(ModelLoadError) as err:
        place("GPU", {"cpu": 8 * GB}, GB, fallback=False, what="model 'k'")
    assert str(err.value) == (
        "model 'k' asked for the GPU (device 'GPU'), but CUDA is not usable here, and its "
        "handler forbids the CPU fallback (cpu_fallback=False)"
    )


def test_full_gpus_do_not_fall_back_to_the_cpu():
    with pytest.raises(OutOfMemory):
        place("GPU", {"cpu": 100 * GB, "cuda:0": GB}, 2 * GB)


@pytest.mark.parametrize("request_", ["tpu", "cuda:x", "cuda:-1", "", "gpu:0"])
def test_invalid_requests_are_refused(request_):
    with pytest.raises(ValueError, match="device"):
        place(request_, {"cpu": None, "cuda:0": GB}, 1)


def test_invalid_copies_and_footprints_are_refused():
    with pytest.raises(ValueError, match="copies"):
        place("GPU", {"cuda:0": GB}, 1, copies=0)
    with pytest.raises(ValueError, match="footprint"):
        place("GPU", {"cuda:0": GB}, -1)


# -- the real path: the manager places on CUDA devices (GPU-marked, skipped without CUDA) --

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def gpu_manager():
    made: list[ModelManager] = []

    def make(**kw) -> ModelManager:
        m = ModelManager(None, load_wait=1.0, **kw)
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


def _blob_spec(private_dir: str, name: str, megabytes: float, device: str) -> ModelSpec:
    path = os.path.join(private_dir, f"{name}.pt")
    make_blob(path, megabytes)
    return ModelSpec(
        "pytorch_state_dict", path, userclass.describe(Blob), {"d": blob_side(megabytes)}, device
    )


def _device_of(m: ModelManager, key: str) -> str:
    return next(s["device"] for s in m.status() if s["key"] == key)


@pytest.mark.gpu
@needs_cuda
def test_manager_places_gpu_models_on_cuda_n(private_dir, gpu_manager):
    m = gpu_manager()
    count = torch.cuda.device_count()
    last = f"cuda:{count - 1}"
    m.register("pinned", _blob_spec(private_dir, "pinned", 16, last))
    assert _device_of(m, "pinned") == last
    m.register("any", _blob_spec(private_dir, "any", 16, "GPU"))
    # the most free budget: with one GPU it is cuda:0; with more, not the one just charged
    assert _device_of(m, "any") == "cuda:0"  # the most free budget (with more GPUs, not the pinned one)
    m.register("cpu", _blob_spec(private_dir, "cpu", 16, "CPU"))
    assert _device_of(m, "cpu") == "cpu"
    with pytest.raises(ModelLoadError, match=f"cuda:{count}"):
        m.register("missing", _blob_spec(private_dir, "missing", 1, f"cuda:{count}"))


@pytest.mark.gpu
@needs_cuda
def test_a_model_larger_than_every_gpu_budget_names_them(private_dir, gpu_manager):
    m = gpu_manager()
    for i in range(torch.cuda.device_count()):
        m._gpu_budgets[f"cuda:{i}"] = 8 << 20  # noqa: SLF001 - small GPUs, for the test
    with pytest.raises(OutOfMemory, match="fits no device: cuda:0"):
        m.register("big", _blob_spec(private_dir, "big", 32, "GPU"))


@pytest.mark.gpu
@needs_cuda
def test_placed_model_is_charged_what_nvml_and_torch_read(private_dir, gpu_manager):
    m = gpu_manager(gpu_fraction=0.9)
    m.register("g", _blob_spec(private_dir, "g", 64, "GPU"))
    (s,) = m.status()
    device = s["device"]
    tensor_bytes = blob_side(64) ** 2 * 4
    assert tensor_bytes <= s["footprint"] <= tensor_bytes * 1.5 + (64 << 20)
    assert torch.cuda.memory_allocated(torch.device(device)) >= tensor_bytes
    reading = memory.Nvml.read(memory.device_index(device))
    if reading is not None:  # NVML (nvidia-ml-py) present: the budget is its total's share
        assert m.budget(device) == int(reading.total * 0.9)
        assert s["nvml_delta"] >= 0
        entry = m.devices()[device]
        assert entry["used"] == s["footprint"] and entry["nvml_used"] >= tensor_bytes
