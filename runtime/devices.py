"""The machine's devices, as the harness sees them before a run: whether the machine meets
every step's resource hints, and which GPU each SDK worker sees.

Resource hints (``client.resources``) are checked before any process starts; the first
one the machine does not meet fails the run with CannotStart, in one line naming the hint
and what the machine has:

- ``min_ram``: the machine's total RAM (psutil) must be at least the hint.
- ``accelerator``: at least ``count`` visible GPUs (NVML's, narrowed by
  ``CUDA_VISIBLE_DEVICES`` when it lists indices) must match ``type``. Matching is loose,
  because Beam's type names (``nvidia-tesla-t4``, ``nvidia-h100-80gb``) are not NVML's
  device names ("Tesla T4", "NVIDIA H100 80GB HBM3"): both are lower-cased and cut into
  words at every character that is not a letter or digit, and the words ``nvidia`` and
  ``tesla`` are dropped. The type's first remaining word (the model: ``t4``, ``a100``,
  ``h100``, ``l4``) must be one of the device's words, and a memory size in the type
  (``80gb``) must equal the device's when the device's name states one. Other words of the
  type (``mega``, ``sxm4``) are not checked.

``CUDA_VISIBLE_DEVICES``: a worker that keeps a GPU model in-process (a handler without
``large_model`` whose device is "GPU") sees one GPU, assigned round-robin over the
visible GPUs (``cuda_visible_devices``), so that the workers share the GPUs instead of
all loading onto the first. A handler pinned to "cuda:N" leaves the workers' GPUs alone
(N means what it says only with every GPU visible). The model server is not narrowed: it
sees every visible GPU and places its models itself (``modelserver.placement``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psutil

from client.resources import Accelerator, ResourceHints
from modelserver import memory
from runtime.errors import CannotStart

VISIBLE_ENV = "CUDA_VISIBLE_DEVICES"
_DROPPED = {"", "nvidia", "tesla"}
_SIZE = re.compile(r"\d+gb")


@dataclass(frozen=True)
class Machine:
    """What the hints are checked against: total RAM in bytes, and the visible GPUs' names."""

    ram: int
    gpus: tuple[str, ...]

    @classmethod
    def here(cls, environ: Mapping[str, str] = os.environ) -> Machine:
        """This machine, read now (NVML for the GPUs; none without NVML)."""
        count = memory.Nvml.count()
        names = (memory.Nvml.name(i) for i in visible_indices(count, environ))
        return cls(int(psutil.virtual_memory().total), tuple(n for n in names if n is not None))


def visible_indices(count: int, environ: Mapping[str, str] = os.environ) -> list[int]:
    """The NVML indices of the GPUs CUDA would show this process: all ``count``, or those
    ``CUDA_VISIBLE_DEVICES`` lists by index (entries it does not list by index, such as
    UUIDs, leave every GPU counted)."""
    value = environ.get(VISIBLE_ENV)
    if value is None:
        return list(range(count))
    entries = [e.strip() for e in value.split(",") if e.strip()]
    if not all(e.isdigit() for e in entries):
        return list(range(count))
    return [int(e) for e in entries if int(e) < count]


def matches(accelerator_type: str, device_name: str) -> bool:
    """Whether a GPU called ``device_name`` by NVML is of Beam's ``accelerator_type``
    (the loose rule in the module's docstring)."""
    wanted = [w for w in re.split(r"[^a-z0-9]+", accelerator_type.lower()) if w not in _DROPPED]
    have = [w for w in re.split(r"[^a-z0-9]+", device_name.lower()) if w not in _DROPPED]
    if not wanted or wanted[0] not in have:
        return False
    stated = {w for w in have if _SIZE.fullmatch(w)}
    return not stated or all(w in stated for w in wanted if _SIZE.fullmatch(w))


def unmet(hints: ResourceHints, machine: Machine) -> str | None:
    """What the machine lacks for ``hints``, in words; None when it meets them all."""
    if hints.min_ram is not None and machine.ram < hints.min_ram:
        return (
            f"resource hint min_ram={hints.min_ram_spec!r} ({hints.min_ram} bytes) is not met: "
            f"this machine has {machine.ram} bytes of RAM ({machine.ram / 2**30:.1f} GiB)"
        )
    if hints.accelerator is not None:
        return _unmet_accelerator(hints.accelerator, machine)
    return None


def _unmet_accelerator(accelerator: Accelerator, machine: Machine) -> str | None:
    found = sum(matches(accelerator.type, name) for name in machine.gpus)
    if found >= accelerator.count:
        return None
    hint = f"resource hint accelerator={accelerator.spec!r} is not met"
    if not machine.gpus:
        return f"{hint}: this machine has no visible GPU (NVML sees none)"
    return (
        f"{hint}: {accelerator.count} {accelerator.type} wanted, and {found} of this machine's "
        f"{len(machine.gpus)} visible GPUs match ({', '.join(machine.gpus)})"
    )


def check_hints(steps: Iterable[Any], machine: Machine | None = None) -> None:
    """CannotStart when the machine does not meet a RunInference step's resource hints.
    The machine is read only when some step has hints."""
    from runtime.pipeline import InferenceStep

    for step in steps:
        if not isinstance(step, InferenceStep) or not step.transform.resource_hints:
            continue
        machine = machine or Machine.here()
        problem = unmet(step.transform.resource_hints, machine)
        if problem is not None:
            raise CannotStart(f"{step.label}: {problem}")


def cuda_visible_devices(workers: int, gpus: Sequence[str]) -> list[str]:
    """Each worker's ``CUDA_VISIBLE_DEVICES``: one of ``gpus`` (the visible GPUs, as
    ``CUDA_VISIBLE_DEVICES`` entries), round-robin; empty when there is no GPU."""
    if workers < 0:
        raise ValueError(f"workers must not be negative, got {workers}")
    return [gpus[i % len(gpus)] for i in range(workers)] if gpus else []


def visible_gpus(environ: Mapping[str, str] = os.environ) -> list[str]:
    """The visible GPUs as ``CUDA_VISIBLE_DEVICES`` entries: its own entries when it is set,
    else every GPU NVML sees, by index."""
    value = environ.get(VISIBLE_ENV)
    if value is not None:
        return [e.strip() for e in value.split(",") if e.strip()]
    return [str(i) for i in range(memory.Nvml.count())]


def in_process_gpu(steps: Iterable[Any]) -> bool:
    """Whether a RunInference step keeps a model in the worker on "GPU" (not pinned to
    "cuda:N"; not in the model server)."""
    from runtime.pipeline import InferenceStep

    requested = [
        d for s in steps if isinstance(s, InferenceStep) for d in _in_process_devices(s.transform.handler)
    ]
    gpu = [d for d in requested if d != "cpu"]
    return bool(gpu) and all(d in ("gpu", "cuda") for d in gpu)


def _in_process_devices(handler: Any) -> list[str]:
    """The devices ``handler``'s in-process models ask for, lower-cased."""
    mappings = getattr(handler, "mappings", None)
    if mappings is not None:  # a KeyedModelHandler over several models
        return [d for m in mappings for d in _in_process_devices(m.mh)]
    if handler.share_model_across_processes():
        return []
    spec = handler.model_spec()
    return [spec.device.strip().lower()] if spec is not None else []


def worker_gpus(steps: Iterable[Any], workers: int, environ: Mapping[str, str] = os.environ) -> list[str]:
    """The run's per-worker ``CUDA_VISIBLE_DEVICES`` values, or empty: workers are narrowed
    to a GPU each only when they run a GPU model in-process and GPUs are visible."""
    if not in_process_gpu(steps):
        return []
    return cuda_visible_devices(workers, visible_gpus(environ))
