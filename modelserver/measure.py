"""Measuring a load: what a model really costs its device, read around its load.

The manager serialises loads (one at a time for the whole server), so the readings taken
around a load (process RSS for the host; torch's allocator and NVML for a GPU) belong to
that load. Inference on other models may still run meanwhile and move those readings, so
each reading is checked against the bytes of the model's tensors: the footprint is the
larger of the two, unless the reading exceeds the tensor bytes by more than half again
plus 64 MiB, in which case it is taken as polluted and the tensor bytes plus 10% are
charged. ``status`` shows all three numbers.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from modelserver import loaders, memory
from modelserver.errors import ModelLoadError, OutOfMemory
from modelserver.serverlog import DeferredLog

log = logging.getLogger("beamlet.manager")

POLLUTION_SLACK = 64 << 20


@dataclass
class MeasuredLoad:
    """A model just loaded, and what it was found to cost."""

    model: loaders.LoadedModel
    footprint: int  # bytes charged to the device
    measured: int  # the raw reading (RSS delta, or allocator delta on a GPU)
    nvml_delta: int
    seconds: float


def charged_bytes(tensor_bytes: int, reading: int) -> int:
    """What a model costs its device, from its tensors and a reading around its load."""
    if reading > tensor_bytes * 1.5 + POLLUTION_SLACK:
        return int(tensor_bytes * 1.1)
    return max(tensor_bytes, reading)


def estimate_bytes(spec: loaders.ModelSpec) -> int:
    """A model's footprint before it was ever loaded: its checkpoint's size, else 0."""
    try:
        return os.path.getsize(spec.path) if spec.path else 0
    except OSError:
        return 0


def measured_load(
    key: str,
    spec: loaders.ModelSpec,
    device: str,
    host: memory.HostMemory,
    *,
    collect: Callable[[], None],
    relieve: Callable[[], None],
    notes: DeferredLog,
) -> MeasuredLoad:
    """Load ``spec`` once (twice after a CUDA out-of-memory, with ``relieve`` freeing the
    device's idle models in between) and measure what it took. ``collect`` frees what
    can be freed before each reading. Runs under the load lock: it logs into ``notes``."""
    for attempt in (1, 2):
        collect()
        rss0 = host.rss()
        alloc0 = memory.torch_allocated(device)
        nvml0 = memory.Nvml.read(memory.device_index(device)) if device != "cpu" else None
        started = time.monotonic()
        try:
            model = loaders.load(spec, owner=key, notes=notes, device=device)
        except ModelLoadError:
            raise
        except MemoryError:
            raise OutOfMemory(f"loading {key!r} ran out of host memory") from None
        except Exception as exc:
            if not memory.is_cuda_oom(exc):
                notes.exception(log, "loading %s failed", key)
                raise ModelLoadError(f"loading {key!r} failed: {type(exc).__name__}: {exc}") from None
            if attempt == 2:
                raise OutOfMemory(f"loading {key!r} ran out of memory on {device}: {exc}") from None
            notes.warning(log, "CUDA ran out of memory loading %s; evicting idle models and retrying", key)
            relieve()
            continue
        seconds = time.monotonic() - started
        if device == "cpu":
            measured = max(0, host.rss() - rss0)
            nvml_delta = 0
        else:
            measured = max(0, memory.torch_allocated(device) - alloc0)
            nvml1 = memory.Nvml.read(memory.device_index(device))
            nvml_delta = (nvml1.used - nvml0.used) if nvml0 and nvml1 else 0
        return MeasuredLoad(model, charged_bytes(model.nbytes, measured), measured, nvml_delta, seconds)
    raise AssertionError("unreachable")
