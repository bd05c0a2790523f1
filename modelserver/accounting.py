"""Per-device accounting: what a model's copies charge each device.

A model's copies may live on several devices (``model_copies=N`` spread over GPUs by
``placement``), so a model is charged per device: each device the sum of the footprints
of the copies on it (``Charges``). The manager keeps a slot's charges after the model is
evicted, as the estimate of its next load, and asks here what a device holds. Plain
functions over plain maps, so the arithmetic is tested without a GPU; the caller holds
whatever lock guards the maps.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, MutableMapping, Sequence

Charges = dict[str, int]  # device -> bytes, in the order the model's copies went there


def charges(copies: Iterable[tuple[str, int]]) -> Charges:
    """Each device's charge from the (device, footprint) of every copy: the sum of the
    footprints of the copies on it, devices in the order their first copy came."""
    out: Charges = {}
    for device, footprint in copies:
        if footprint < 0:
            raise ValueError(f"a copy's footprint must be a number of bytes, got {footprint} on {device}")
        out[device] = out.get(device, 0) + footprint
    return out


def planned(devices: Sequence[str], per_copy: int) -> Charges:
    """The charges a load expects before it is measured: ``per_copy`` bytes for each
    copy, on the device placement chose for it."""
    return charges((d, per_copy) for d in devices)


def used(device: str, loaded: Iterable[Mapping[str, int]], retiring: Mapping[str, int]) -> int:
    """What ``device`` holds: the charges of the loaded models (``loaded``: each one's
    charges) on it, and the swapped-out versions still finishing their batches there."""
    return sum(c.get(device, 0) for c in loaded) + retiring.get(device, 0)


def add(totals: MutableMapping[str, int], more: Mapping[str, int]) -> None:
    """Charge ``more`` to ``totals`` (per device, in place)."""
    for device, nbytes in more.items():
        totals[device] = totals.get(device, 0) + nbytes


def remove(totals: MutableMapping[str, int], less: Mapping[str, int]) -> None:
    """Take ``less`` back from ``totals`` (per device, in place); a device left at zero
    goes. Taking more than was charged is a bookkeeping bug: ValueError, nothing changed."""
    short = [d for d, n in less.items() if n > totals.get(d, 0)]
    if short:
        raise ValueError(f"uncharging more than is charged on {', '.join(short)}")
    for device, nbytes in less.items():
        left = totals.get(device, 0) - nbytes
        if left:
            totals[device] = left
        else:
            totals.pop(device, None)


def describe_share(copies_here: int, copies: int) -> str:
    """How an error names the copies a device is to hold: "one copy", "3 copies", or
    "2 of its 3 copies" when the others went elsewhere."""
    if copies_here == copies:
        return "one copy" if copies == 1 else f"{copies} copies"
    return f"{copies_here} of its {copies} copies"
