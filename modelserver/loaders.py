"""How a model is described, loaded and run. The one copy of this code.

The model server uses it for large models; a worker that keeps a small model in-process
uses it too. A client-side handler never loads a model itself: it builds a ``ModelSpec``
(plain data that travels over the wire) and hands it here.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import zipfile
from dataclasses import asdict, dataclass, field
from typing import Any

import msgpack

from modelserver import userclass
from modelserver.errors import BadInput, ModelLoadError

log = logging.getLogger("beamlet.loaders")

LOADERS = ("pytorch_state_dict", "torchscript")
_cuda_warned = threading.Event()


@dataclass(frozen=True)
class ModelSpec:
    """A model as data: how to load it, from where, on which device.

    loader             "pytorch_state_dict" (model_class(**model_params), then the weights
                       at ``path`` if given) or "torchscript" (``path`` is a TorchScript file)
    path               checkpoint or TorchScript file; for state_dict, None means the
                       class (or factory) builds the whole model itself
    model_class        ``userclass.describe(cls)``: {"name": "mod:Qual", "source": ...}
    model_params       keyword arguments for model_class, msgpack-able
    device             "CPU", "GPU" (the first CUDA device, falling back to CPU with a
                       warning when CUDA is unusable) or an explicit "cuda:N"
    load_model_args    extra keyword arguments for torch.load / torch.jit.load
                       (weights_only is always True)
    revision           which version of the file at ``path``: its identity when the
                       handler was pointed at it (``file_revision``). A file rewritten in
                       place gets a new revision, so the spec differs and the model swaps.
    """

    loader: str
    path: str | None = None
    model_class: dict[str, Any] | None = None
    model_params: dict[str, Any] = field(default_factory=dict)
    device: str = "CPU"
    load_model_args: dict[str, Any] = field(default_factory=dict)
    revision: str = ""

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> ModelSpec:
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ModelLoadError(f"model spec has unknown fields: {sorted(unknown)}")
        spec = cls(**data)
        spec.validate()
        return spec

    def validate(self) -> None:
        if self.loader not in LOADERS:
            raise ModelLoadError(f"unknown loader {self.loader!r}; known: {', '.join(LOADERS)}")
        if self.loader == "torchscript" and not self.path:
            raise ModelLoadError("a torchscript model needs a path")
        if self.loader == "pytorch_state_dict" and not self.model_class:
            raise ModelLoadError("a state_dict model needs a model_class")
        if not isinstance(self.model_params, dict) or not isinstance(self.load_model_args, dict):
            raise ModelLoadError("model_params and load_model_args must be maps")

    def digest(self) -> str:
        """A stable fingerprint: two specs with the same digest load the same model."""
        packed = msgpack.packb(self.to_wire(), use_bin_type=True)
        return hashlib.sha256(packed).hexdigest()[:16]

    @property
    def model_id(self) -> str:
        """What a PredictionResult names as the producer: the path, as in Beam."""
        if self.path:
            return self.path
        name = (self.model_class or {}).get("name", "model")
        return f"{name}@{self.digest()}"


def file_revision(path: str | None) -> str:
    """The identity of what ``path`` holds now: inode, size, modification and change
    times (nanoseconds). Rewriting the file in place, or renaming a new file over it,
    changes it; an unchanged file keeps it, so processes that look at the same file
    agree. Empty when there is no such file (the load will say so)."""
    if not path:
        return ""
    try:
        st = os.stat(path)
    except OSError:
        return ""
    return f"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}-{st.st_ctime_ns:x}"


@dataclass
class LoadedModel:
    """A model in memory, ready to run."""

    module: Any
    device: str
    nbytes: int
    model_id: str


def resolve_device(requested: str) -> str:
    """The torch device for a spec's device string, with Beam's GPU-to-CPU fall-back."""
    import torch

    wanted = requested.strip()
    if wanted.upper() == "CPU":
        return "cpu"
    if wanted.upper() in ("GPU", "CUDA") or wanted.lower().startswith("cuda"):
        if torch.cuda.is_available():
            return "cuda" if wanted.upper() in ("GPU", "CUDA") else wanted.lower()
        if not _cuda_warned.is_set():
            _cuda_warned.set()
            log.warning("device %r requested but CUDA is not usable here; using the CPU", requested)
        return "cpu"
    raise ModelLoadError(f"unknown device {requested!r}; use 'CPU', 'GPU' or 'cuda:N'")


def load(spec: ModelSpec, model_class: Any = None) -> LoadedModel:
    """Load a model; any failure becomes a ModelLoadError that says what and where.

    ``model_class``: the live class (or factory) when the caller has it, as a worker
    loading its own small model does; otherwise the spec's class reference is resolved."""
    import torch

    spec.validate()
    device = resolve_device(spec.device)
    args = {k: v for k, v in spec.load_model_args.items() if k not in ("weights_only", "map_location")}
    if spec.loader == "torchscript":
        path = _existing(spec.path)
        try:
            module = torch.jit.load(path, map_location=device, **args)
        except Exception as exc:
            raise ModelLoadError(f"cannot load TorchScript file {path}: {exc}") from None
    else:
        if spec.path:
            path = _existing(spec.path)
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, **args)
            except Exception as exc:
                raise ModelLoadError(f"cannot read checkpoint {path}: {_first_line(exc)}") from None
            module = _build_with_state(spec, model_class, state, path)
            del state
        else:
            module = _build(spec, model_class)
        module = module.to(device)
    module.eval()
    return LoadedModel(module, device, tensor_bytes(module), spec.model_id)


def check(spec: ModelSpec) -> None:
    """Check a model file without loading its weights, for ModelLoadError before anything
    is dropped (a swap that must drop the old version first; the harness before it sends
    an update to its workers). Both loaders write zip archives: every member's CRC must
    match (this reads the file once, holding one member at a time). A state_dict
    checkpoint must also fit its class: read memory-mapped and assigned to the class
    built on the meta device."""
    import torch

    spec.validate()
    if not spec.path:
        return
    path = _existing(spec.path)
    _check_archive(path, spec.loader)
    if spec.loader != "pytorch_state_dict":
        return
    args = {
        k: v for k, v in spec.load_model_args.items() if k not in ("weights_only", "map_location", "mmap")
    }
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True, **args)
    except Exception as exc:
        if "mmap can only be used" in str(exc):
            return  # an old-format checkpoint: only a real load can tell
        raise ModelLoadError(f"cannot read checkpoint {path}: {_first_line(exc)}") from None
    name = (spec.model_class or {}).get("name")
    with torch.device("meta"):
        module = _build(spec)
    try:
        module.load_state_dict(state, assign=True)
    except Exception as exc:
        raise ModelLoadError(f"checkpoint {path} does not fit {name}: {_first_line(exc)}") from None
    finally:
        del state, module


def _check_archive(path: str, loader: str) -> None:
    if not zipfile.is_zipfile(path):
        if loader == "torchscript":  # always an archive
            raise ModelLoadError(f"TorchScript file {path} is corrupt: not a complete zip archive")
        return  # maybe an old-format (pre-zip) checkpoint: only a real load can tell
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ModelLoadError(f"model file {path} is corrupt: {exc}") from None
    if bad is not None:
        raise ModelLoadError(f"model file {path} is corrupt: member {bad} fails its CRC check")


def _build_with_state(spec: ModelSpec, factory: Any, state: Any, path: str) -> Any:
    """Build the module around the checkpoint's tensors without allocating its weights
    twice: construct it on the meta device and assign the loaded tensors. A class that
    cannot be built on meta, or that keeps tensors outside its state_dict, is built the
    ordinary way instead (briefly holding two copies)."""
    import torch

    name = (spec.model_class or {}).get("name")
    module = None
    try:
        with torch.device("meta"):
            module = _build(spec, factory)
        module.load_state_dict(state, assign=True)
        if any(t.is_meta for t in [*module.parameters(), *module.buffers()]):
            module = None
    except ModelLoadError:
        raise
    except Exception:
        module = None
    if module is None:
        module = _build(spec, factory)
        try:
            module.load_state_dict(state)
        except Exception as exc:
            raise ModelLoadError(f"checkpoint {path} does not fit {name}: {_first_line(exc)}") from None
    return module


def _build(spec: ModelSpec, factory: Any = None) -> Any:
    import torch

    ref = spec.model_class or {}
    if factory is None:
        try:
            factory = userclass.resolve(ref)
        except Exception as exc:
            raise ModelLoadError(f"cannot import model class {ref.get('name')!r}: {exc}") from None
    try:
        module = factory(**spec.model_params)
    except Exception as exc:
        raise ModelLoadError(
            f"{ref.get('name')}(**{spec.model_params!r:.120}) raised {type(exc).__name__}: {exc}"
        ) from None
    if not isinstance(module, torch.nn.Module):
        raise ModelLoadError(f"{ref.get('name')} built a {type(module).__name__}, not a torch.nn.Module")
    return module


def _existing(path: str | None) -> str:
    if not path or not os.path.exists(path):
        raise ModelLoadError(f"model file not found: {path}")
    return path


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def tensor_bytes(module: Any) -> int:
    """Bytes held by a module's parameters and buffers (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        ptr = t.data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        total += t.numel() * t.element_size()
    return total


def run(loaded: LoadedModel, inputs: Any, kwargs: dict[str, Any]) -> Any:
    """Call the model on one batch: ``module(inputs, **kwargs)``, or ``module(**inputs,
    **kwargs)`` when inputs is a map of named tensors (keyed tensors). Outputs come back on
    the CPU. A model that rejects its input raises BadInput naming what it got."""
    import torch

    with torch.inference_mode():
        moved = _to_device(inputs, loaded.device)
        try:
            if isinstance(moved, dict):
                out = loaded.module(**moved, **kwargs)
            else:
                out = loaded.module(moved, **kwargs)
        except torch.cuda.OutOfMemoryError:
            raise
        except (RuntimeError, TypeError, ValueError, IndexError) as exc:
            raise BadInput(
                f"model {loaded.model_id} rejected input {describe_value(inputs)}: {_first_line(exc)}"
            ) from None
        return _to_device(out, "cpu")


def _to_device(value: Any, device: str) -> Any:
    import numpy as np
    import torch

    if isinstance(value, torch.Tensor):
        return value if value.device.type == torch.device(device).type else value.to(device)
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value).to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def describe_value(value: Any) -> str:
    """A short description of an input for error messages: dtype[shape] per tensor."""
    import numpy as np
    import torch

    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')}{list(value.shape)}"
    if isinstance(value, np.ndarray):
        return f"{value.dtype}{list(value.shape)}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {describe_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(describe_value(v) for v in value) + "]"
    return type(value).__name__
