"""Placement: which device each copy of a model goes to. A pure function of the devices'
budgets, so that it is tested without a GPU; the manager feeds it its own accounting.

The rules (docs/operations.md, "Placement"):

- ``"cpu"`` places every copy on the CPU.
- ``"GPU"`` (or ``"cuda"``) places each copy on the GPU with the most free budget, each
  copy charged before the next is placed, so copies (and keyed models loaded one after
  another) spread across GPUs; a tie goes to the GPU holding fewer of this model's copies,
  then to the lowest index.
- ``"cuda:N"`` pins every copy to GPU N; a GPU this machine lacks is a ModelLoadError.
- A copy fits a device when it fits the device's budget (``budgets``: the whole budget,
  since idle models can be evicted to make room; by default what is free now), after the
  copies already placed there. Among the devices it fits, those where it fits at once
  come first: ``reclaimable`` is each device's room once its idle models are evicted
  (its budget less what models in use and retiring versions hold), so a GPU whose room
  is held by busy models, where the load would wait for them, comes after one whose
  idle models can go now. A model that fits no device is OutOfMemory, naming every
  candidate device's free budget. A full GPU never sends a model to the CPU.
- With no GPU at all (no usable CUDA), ``"GPU"`` and ``"cuda:N"`` fall back to the CPU
  with a warning, as Beam's PyTorch handlers do, when ``fallback`` allows it (the spec's
  ``cpu_fallback``); otherwise ModelLoadError (``no_cpu_fallback``).

Devices are named as torch names them: ``"cpu"``, ``"cuda:0"``, ``"cuda:1"``...; a
budget of None means the device has none (anything fits; it ranks above every number).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

from modelserver.errors import ModelLoadError, OutOfMemory
from modelserver.serverlog import DeferredLog

log = logging.getLogger("beamlet.placement")

_PINNED = re.compile(r"cuda:(\d+)")


def place(
    request: str,
    free: Mapping[str, int | None],
    footprint: int,
    copies: int = 1,
    *,
    budgets: Mapping[str, int | None] | None = None,
    reclaimable: Mapping[str, int | None] | None = None,
    fallback: bool = True,
    what: str = "the model",
    notes: DeferredLog | None = None,
) -> list[str]:
    """The device for each of ``copies`` copies of a model of ``footprint`` bytes.

    ``request``: the spec's device ("cpu", "GPU", "cuda:N"; any case). ``free``: every
    device this process can use, with its free budget in bytes (None: no budget);
    ``budgets``: each device's whole budget, which decides what fits (default: ``free``);
    ``reclaimable``: each device's room once its idle models are evicted (default: every
    fitting device counts as making room at once).
    ``what``: how errors name the model; ``notes``: where the fallback warning goes when
    the caller holds a lock. Raises ValueError for a request that names no device."""
    if copies < 1:
        raise ValueError(f"copies must be at least 1, got {copies}")
    if footprint < 0:
        raise ValueError(f"footprint must be a number of bytes, got {footprint}")
    wanted = request.strip().lower()
    gpus = sorted((d for d in free if _PINNED.fullmatch(d)), key=_index)
    if wanted == "cpu":
        candidates = ["cpu"]
    elif wanted in ("gpu", "cuda") or _PINNED.fullmatch(wanted):
        if not gpus:
            if not fallback:
                raise no_cpu_fallback(what, request)
            message = "device %r requested but CUDA is not usable here; using the CPU"
            if notes is not None:
                notes.warning(log, message, request)
            else:
                log.warning(message, request)
            candidates = ["cpu"]
        elif wanted in ("gpu", "cuda"):
            candidates = gpus
        elif wanted in free:
            candidates = [wanted]
        else:
            raise ModelLoadError(f"{what} asks for {wanted}, but this machine's GPUs are {', '.join(gpus)}")
    else:
        raise ValueError(f"unknown device {request!r}; use 'CPU', 'GPU' or 'cuda:N'")
    limits = free if budgets is None else budgets
    placed: dict[str, int] = dict.fromkeys(candidates, 0)
    chosen = []
    for _ in range(copies):
        fitting = [d for d in candidates if _fits(limits.get(d), footprint * (placed[d] + 1))]
        if not fitting:
            raise OutOfMemory(_fits_nowhere(what, footprint, copies, candidates, free, budgets))
        device = max(
            fitting,
            key=lambda d: (
                reclaimable is None or _fits(reclaimable.get(d), footprint * (placed[d] + 1)),
                _room(free.get(d), footprint * placed[d]),
                -placed[d],
                -_index(d),
            ),
        )
        placed[device] += 1
        chosen.append(device)
    return chosen


def no_cpu_fallback(what: str, request: str) -> ModelLoadError:
    """The error for a GPU request where CUDA is not usable and the handler forbids the
    CPU fallback (``cpu_fallback=False``)."""
    return ModelLoadError(
        f"{what} asked for the GPU (device {request!r}), but CUDA is not usable here, and its "
        "handler forbids the CPU fallback (cpu_fallback=False)"
    )


def _index(device: str) -> int:
    match = _PINNED.fullmatch(device)
    return int(match.group(1)) if match else -1


def _fits(limit: int | None, needed: int) -> bool:
    return limit is None or needed <= limit


def _room(free: int | None, taken: int) -> float:
    return float("inf") if free is None else free - taken


def _fits_nowhere(
    what: str,
    footprint: int,
    copies: int,
    candidates: list[str],
    free: Mapping[str, int | None],
    budgets: Mapping[str, int | None] | None,
) -> str:
    def describe(d: str) -> str:
        text = f"{d} {free.get(d)} bytes free"
        if budgets is not None:
            text += f" of a {budgets.get(d)}-byte budget"
        return text

    need = f"{footprint} bytes" + (f" for each of {copies} copies" if copies > 1 else "")
    return f"{what} needs {need}, which fits no device: {'; '.join(describe(d) for d in candidates)}"
