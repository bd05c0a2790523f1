"""Reading real memory: psutil for the host, NVML (and torch's allocator) for each GPU.

No NVML (no driver, no GPU, or the ``nvidia-ml-py`` package missing) is the normal CPU
case: ``gpus()`` is then empty. Also here: keeping the C heap honest, so that memory a
freed model gave back shows up in the process's RSS.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from dataclasses import dataclass
from typing import Any

import psutil

log = logging.getLogger("beamlet.memory")

M_MMAP_THRESHOLD = -3


class HostMemory:
    """The machine's RAM and this process's share of it."""

    def __init__(self) -> None:
        self._process = psutil.Process()

    def rss(self) -> int:
        return int(self._process.memory_info().rss)

    def available(self) -> int:
        return int(psutil.virtual_memory().available)

    def total(self) -> int:
        return int(psutil.virtual_memory().total)


@dataclass
class GpuReading:
    index: int
    total: int
    used: int
    free: int


class Nvml:
    """NVML, initialised once; every reading is per device index."""

    _lock = threading.Lock()
    _module: Any = None
    _failed = False

    @classmethod
    def module(cls) -> Any:
        """The initialised pynvml module, or None. The server calls it once before serving,
        so its one-time note is not written under a lock a load holds."""
        failure = None
        with cls._lock:
            if cls._module is None and not cls._failed:
                try:
                    import pynvml

                    pynvml.nvmlInit()
                    cls._module = pynvml
                except Exception as exc:  # no library, no driver, no device
                    failure = exc
                    cls._failed = True
            module = cls._module
        if failure is not None:
            log.debug("NVML unavailable: %s", failure)
        return module

    @classmethod
    def count(cls) -> int:
        nvml = cls.module()
        if nvml is None:
            return 0
        try:
            return int(nvml.nvmlDeviceGetCount())
        except Exception:
            return 0

    @classmethod
    def read(cls, index: int) -> GpuReading | None:
        nvml = cls.module()
        if nvml is None:
            return None
        try:
            info = nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(index))
        except Exception:  # no reading (callers fall back); not logged: loads read under their lock
            return None
        return GpuReading(index, int(info.total), int(info.used), int(info.free))

    @classmethod
    def name(cls, index: int) -> str | None:
        """The device's name as NVML gives it ("NVIDIA H100 80GB HBM3", "Tesla T4")."""
        nvml = cls.module()
        if nvml is None:
            return None
        try:
            name = nvml.nvmlDeviceGetName(nvml.nvmlDeviceGetHandleByIndex(index))
        except Exception:
            return None
        return name.decode() if isinstance(name, bytes) else str(name)


def gpus() -> list[GpuReading]:
    """A reading of every GPU NVML can see (empty on a CPU-only machine)."""
    return [r for i in range(Nvml.count()) if (r := Nvml.read(i)) is not None]


def torch_allocated(device: str) -> int:
    """Bytes torch's caching allocator has handed out on a CUDA device (0 for the CPU)."""
    if not device.startswith("cuda"):
        return 0
    import torch

    return int(torch.cuda.memory_allocated(torch.device(device)))


def device_index(device: str) -> int:
    if device == "cuda":
        return 0
    return int(device.split(":", 1)[1]) if ":" in device else 0


def _libc() -> Any:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def fix_mmap_threshold(nbytes: int = 1 << 20) -> None:
    """Serve every allocation of ``nbytes`` or more with its own mmap, returned to the OS
    on free. glibc otherwise raises the threshold after large frees, and a freed model's
    memory then stays in the heap and in the RSS the budget is checked against."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, nbytes)


def trim_heap() -> None:
    """Give free heap pages back to the OS (after an eviction)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def is_cuda_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is CUDA running out of memory: ``torch.cuda.OutOfMemoryError``, or
    a RuntimeError that says so (what some torch operations raise instead). The one test
    for it: loads, batches and the loaders all ask here."""
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "CUDA out of memory" in str(exc)
