"""Per-device accounting as pure functions: what a model's copies charge each device, what
a device holds, and the charges of retiring versions. No GPU needed: devices are names."""

from __future__ import annotations

import pytest

from modelserver import accounting
from modelserver.placement import place

GB = 1 << 30


def test_each_device_is_charged_the_footprints_of_the_copies_on_it():
    copies = [("cuda:1", 3 * GB), ("cuda:0", 2 * GB), ("cuda:1", 4 * GB), ("cuda:2", GB)]
    charges = accounting.charges(copies)
    assert charges == {"cuda:1": 7 * GB, "cuda:0": 2 * GB, "cuda:2": GB}
    assert list(charges) == ["cuda:1", "cuda:0", "cuda:2"]  # the first copy's device first
    assert sum(charges.values()) == sum(f for _, f in copies)
    assert accounting.charges([("cpu", 5), ("cpu", 6)]) == {"cpu": 11}
    assert accounting.charges([]) == {}
    with pytest.raises(ValueError, match="footprint"):
        accounting.charges([("cuda:0", -1)])


def test_planned_charges_follow_placement_over_gpus_with_unequal_free_budgets():
    free = {"cuda:0": 6 * GB, "cuda:1": 10 * GB, "cuda:2": 3 * GB, "cuda:3": 8 * GB}
    devices = place("GPU", free, 2 * GB, copies=5)
    assert devices == ["cuda:1", "cuda:3", "cuda:1", "cuda:0", "cuda:3"]
    planned = accounting.planned(devices, 2 * GB)
    assert planned == {"cuda:1": 4 * GB, "cuda:3": 4 * GB, "cuda:0": 2 * GB}
    # what each GPU has free once the load is charged: the next model goes to cuda:1
    left = {d: free[d] - planned.get(d, 0) for d in free}
    assert left == {"cuda:0": 4 * GB, "cuda:1": 6 * GB, "cuda:2": 3 * GB, "cuda:3": 4 * GB}
    assert place("GPU", left, 2 * GB) == ["cuda:1"]


def test_a_device_holds_the_charges_of_loaded_models_and_retiring_versions():
    loaded = [{"cuda:0": 3 * GB, "cuda:1": 3 * GB}, {"cuda:1": 2 * GB}, {"cpu": 5 * GB}]
    retiring = {"cuda:1": GB}
    assert accounting.used("cuda:0", loaded, retiring) == 3 * GB
    assert accounting.used("cuda:1", loaded, retiring) == 6 * GB
    assert accounting.used("cpu", loaded, retiring) == 5 * GB
    assert accounting.used("cuda:2", loaded, retiring) == 0
    assert accounting.used("cuda:0", [], {}) == 0


def test_retiring_charges_are_added_and_taken_back_per_device():
    totals: dict[str, int] = {}
    accounting.add(totals, {"cuda:0": 3 * GB, "cuda:1": 2 * GB})
    accounting.add(totals, {"cuda:1": GB})
    assert totals == {"cuda:0": 3 * GB, "cuda:1": 3 * GB}
    accounting.remove(totals, {"cuda:0": 3 * GB, "cuda:1": 2 * GB})
    assert totals == {"cuda:1": GB}  # a device left at zero goes
    with pytest.raises(ValueError, match="cuda:1"):
        accounting.remove(totals, {"cuda:1": 2 * GB, "cuda:0": 0})
    assert totals == {"cuda:1": GB}  # nothing changed
    accounting.remove(totals, {"cuda:1": GB})
    assert totals == {}


def test_errors_name_the_share_of_the_copies_a_device_holds():
    assert accounting.describe_share(1, 1) == "one copy"
    assert accounting.describe_share(3, 3) == "3 copies"
    assert accounting.describe_share(2, 3) == "2 of its 3 copies"
