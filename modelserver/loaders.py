"""How a model is described, loaded and run. The one copy of this code.

The model server uses it for large models; a worker that keeps a small model in-process
uses it too. A client-side handler never loads a model itself: it builds a ``ModelSpec``
(plain data that travels over the wire) and hands it here.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
import traceback
import zipfile
from dataclasses import dataclass, field, fields
from typing import Any

from modelserver import memory, placement, userclass, wire
from modelserver.errors import BadInput, BadRequest, ModelError, ModelLoadError
from modelserver.serverlog import DeferredLog

log = logging.getLogger("beamlet.loaders")

LOADERS = ("pytorch_state_dict", "torchscript")
MAX_ERROR_TEXT = 4000  # characters of a model's failure or a state_dict misfit in an error
_MODULE_CALL_FILE = os.path.join("torch", "nn", "modules", "module.py")
_cuda_warned = threading.Event()


@dataclass(frozen=True)
class ModelSpec:
    """A model as data: how to load it, from where, on which device.

    loader             "pytorch_state_dict" (model_class(**model_params), then the weights
                       at ``path`` if given) or "torchscript" (``path`` is a TorchScript file)
    path               checkpoint or TorchScript file; for state_dict, None means the
                       class (or factory) builds the whole model itself
    model_class        ``userclass.describe(cls)``: {"name": "mod:Qual", "source": ...}
    model_params       keyword arguments for model_class: plain data, torch dtypes and
                       devices, dataclasses (``wire``) when the spec travels to the
                       model server; anything the class takes when it loads in-process
    device             "CPU", "GPU" (the first CUDA device, falling back to CPU with a
                       warning when CUDA is unusable) or an explicit "cuda:N"
    load_model_args    extra keyword arguments for torch.load / torch.jit.load;
                       weights_only is True unless the user sets it to False (then the
                       checkpoint's own code runs, with a warning)
    revision           which version of the file at ``path``: its identity when the
                       handler was pointed at it (``file_revision``). A file rewritten in
                       place gets a new revision, so the spec differs and the model swaps.
    env_vars           environment variables set in the loading process before the model
                       loads (Beam's ``env_vars``); two models that need different values
                       of one variable cannot share a process (``apply_env_vars``)
    cpu_fallback       whether a GPU request may fall back to the CPU where CUDA is not
                       usable (False: the load fails instead). On the wire only when
                       False, so a spec without it means True and specs that allow the
                       fallback keep the digest (and model_id) they had before the field
    """

    loader: str
    path: str | None = None
    model_class: dict[str, Any] | None = None
    model_params: dict[str, Any] = field(default_factory=dict)
    device: str = "CPU"
    load_model_args: dict[str, Any] = field(default_factory=dict)
    revision: str = ""
    env_vars: dict[str, str] = field(default_factory=dict)
    cpu_fallback: bool = True

    def to_wire(self) -> dict[str, Any]:
        # Not dataclasses.asdict: it would turn a dataclass among model_params into a map.
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.cpu_fallback is True:
            del data["cpu_fallback"]  # the default: absent, as from a client that predates it
        return data

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
        if not isinstance(self.env_vars, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.env_vars.items()
        ):
            raise ModelLoadError("env_vars must be a map of str to str")
        if not isinstance(self.cpu_fallback, bool):
            raise ModelLoadError(f"cpu_fallback must be true or false, not {self.cpu_fallback!r}")
        if not isinstance(self.device, str):
            raise ModelLoadError(f"device must be a string ('CPU', 'GPU', 'cuda:N'), not {self.device!r}")

    def digest(self) -> str:
        """A stable fingerprint: two specs with the same digest load the same model. A
        parameter the wire cannot carry (a model kept in-process takes any object)
        counts by its type and identity."""
        return wire.fingerprint(self.to_wire(), fallback=_identity)[:16]

    @property
    def model_id(self) -> str:
        """What a PredictionResult names as the producer: the path, as in Beam."""
        if self.path:
            return self.path
        name = (self.model_class or {}).get("name", "model")
        return f"{name}@{self.digest()}"


def _identity(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}@{id(obj):x}"


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
    """A model in memory, ready to run. ``methods``: the public methods a client may call
    by name (``public_methods``)."""

    module: Any
    device: str
    nbytes: int
    model_id: str
    methods: frozenset[str] = frozenset({"forward"})
    signatures: dict[str, inspect.Signature | None] = field(default_factory=dict, repr=False)  # by method


def public_methods(module: Any) -> frozenset[str]:
    """The methods of a model a client may call by name: ``forward`` and the public
    methods its own classes define (a TorchScript module: its compiled ones). Never
    ``torch.nn.Module``'s own (``to``, ``load_state_dict``, ``register_buffer``...): a
    request can run the model, not reconfigure it."""
    import torch

    names = {"forward"}
    compiled = getattr(getattr(module, "_c", None), "_method_names", None)
    if isinstance(module, torch.jit.ScriptModule) and compiled is not None:
        names.update(compiled())
    else:
        for cls in type(module).__mro__:
            if cls is torch.nn.Module or not issubclass(cls, torch.nn.Module):
                break
            names.update(n for n, v in vars(cls).items() if callable(v) and not isinstance(v, type))
    return frozenset(n for n in names if not n.startswith("_"))


_env_lock = threading.Lock()
_env_owners: dict[str, tuple[str, str]] = {}  # variable -> (value, the model that set it)


def apply_env_vars(env_vars: dict[str, str], owner: str) -> None:
    """Set a model's environment variables in this process before it loads, as Beam's
    ``set_environment_vars`` does. A variable another model of this process already set
    to another value is a ModelLoadError: one process has one environment."""
    if not env_vars:
        return
    with _env_lock:
        for name, value in env_vars.items():
            held = _env_owners.get(name)
            if held is not None and held[0] != value and held[1] != owner:
                raise ModelLoadError(
                    f"env_vars: {owner} needs {name}={value!r}, but {held[1]} set {name}={held[0]!r} "
                    "in this process; models that need different values cannot share a process "
                    "(give them different model servers, socket_path=...)"
                )
        for name, value in env_vars.items():
            os.environ[name] = value
            _env_owners[name] = (value, owner)


def materialize(value: Any, home: tuple[str, Any] | None = None) -> Any:
    """``value`` with every ``wire.DataclassValue`` built into its dataclass. ``home``:
    (the module name the model class was described under, the module it was loaded
    into). A dataclass of that same module is taken from the model's module (a model
    shipped by source gets its own copy of its module, and ``isinstance`` in the model
    must see that copy's class); any other is resolved as model classes are."""
    if isinstance(value, wire.DataclassValue):
        cls = _home_class(value.ref, home)
        if cls is None:
            try:
                cls = userclass.resolve(value.ref)
            except Exception as exc:
                raise BadRequest(f"cannot import dataclass {value.ref.get('name')!r}: {exc}") from None
        return cls(**{k: materialize(v, home) for k, v in value.fields.items()})
    if isinstance(value, dict):
        return {k: materialize(v, home) for k, v in value.items()}
    if isinstance(value, list):
        return [materialize(v, home) for v in value]
    return value


def _home_class(ref: dict[str, Any], home: tuple[str, Any] | None) -> Any:
    name = ref.get("name")
    if home is None or not isinstance(name, str) or ":" not in name:
        return None
    module_name, qualname = name.split(":", 1)
    if module_name != home[0]:
        return None
    obj: Any = home[1]
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, type) else None


def _has_placeholders(value: Any) -> bool:
    if isinstance(value, wire.DataclassValue):
        return True
    if isinstance(value, dict):
        return any(_has_placeholders(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_placeholders(v) for v in value)
    return False


def resolve_device(
    requested: str, notes: DeferredLog | None = None, *, fallback: bool = True, what: str = "the model"
) -> str:
    """The torch device for a spec's device string, with Beam's GPU-to-CPU fall-back
    (``fallback`` False: a ModelLoadError instead, naming the model as ``what``).
    ``notes``: where to log, when the caller holds a lock (see ``serverlog``)."""
    import torch

    wanted = requested.strip()
    if wanted.upper() == "CPU":
        return "cpu"
    if wanted.upper() in ("GPU", "CUDA") or wanted.lower().startswith("cuda"):
        if torch.cuda.is_available():
            return "cuda" if wanted.upper() in ("GPU", "CUDA") else wanted.lower()
        if not fallback:
            raise placement.no_cpu_fallback(what, requested)
        if not _cuda_warned.is_set():
            _cuda_warned.set()
            _warn(notes, "device %r requested but CUDA is not usable here; using the CPU", requested)
        return "cpu"
    raise ModelLoadError(f"unknown device {requested!r}; use 'CPU', 'GPU' or 'cuda:N'")


def load(
    spec: ModelSpec,
    model_class: Any = None,
    *,
    owner: str | None = None,
    notes: DeferredLog | None = None,
    device: str | None = None,
) -> LoadedModel:
    """Load a model; any failure becomes a ModelLoadError that says what and where.

    ``model_class``: the live class (or factory) when the caller has it, as a worker
    loading its own small model does; otherwise the spec's class reference is resolved.
    ``owner``: who the model is in this process (its key), for ``apply_env_vars``.
    ``notes``: where its warnings go when the caller holds a lock (the server's load lock).
    ``device``: the torch device placement chose (``placement``), instead of the spec's."""
    import torch

    spec.validate()
    apply_env_vars(spec.env_vars, owner or spec.model_id)
    device = device or resolve_device(
        spec.device, notes, fallback=spec.cpu_fallback, what=f"model {spec.model_id}"
    )
    args = _load_args(spec, notes)
    if spec.loader == "torchscript":
        args.pop("weights_only", None)  # TorchScript archives hold no pickled code
        path = _existing(spec.path)
        try:
            module = torch.jit.load(path, map_location=device, **args)
        except Exception as exc:
            raise ModelLoadError(f"cannot load TorchScript file {path}: {exc}") from None
    else:
        if spec.path:
            path = _existing(spec.path)
            try:
                state = torch.load(path, map_location="cpu", **args)
            except Exception as exc:
                raise ModelLoadError(f"cannot read checkpoint {path}: {_load_failure(exc)}") from None
            module = _build_with_state(spec, model_class, state, path)
            del state
        else:
            module = _build(spec, model_class)
        module = module.to(device)
    module.eval()
    return LoadedModel(module, device, tensor_bytes(module), spec.model_id, public_methods(module))


def _load_args(spec: ModelSpec, notes: DeferredLog | None) -> dict[str, Any]:
    """torch.load's keyword arguments: the user's, with weights_only=True unless the user
    turned it off explicitly (said, loudly: the checkpoint's pickled code will run)."""
    args = {k: v for k, v in spec.load_model_args.items() if k != "map_location"}
    if args.get("weights_only", True) is False:
        _warn(
            notes,
            "loading %s with weights_only=False, as load_model_args asks: this runs code "
            "stored in the checkpoint, in this process",
            spec.path,
        )
    else:
        args["weights_only"] = True
    return args


def _warn(notes: DeferredLog | None, msg: str, *args: Any) -> None:
    if notes is not None:
        notes.warning(log, msg, *args)
    else:
        log.warning(msg, *args)


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
    weights_only = spec.load_model_args.get("weights_only", True) is not False
    try:
        state = torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True, **args)
    except Exception as exc:
        if "mmap can only be used" in str(exc):
            return  # an old-format checkpoint: only a real load can tell
        raise ModelLoadError(f"cannot read checkpoint {path}: {_load_failure(exc)}") from None
    name = (spec.model_class or {}).get("name")
    with torch.device("meta"):
        module = _build(spec)
    try:
        module.load_state_dict(state, assign=True)
    except Exception as exc:
        raise ModelLoadError(f"checkpoint {path} does not fit {name}: {_misfit(exc)}") from None
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
            raise ModelLoadError(f"checkpoint {path} does not fit {name}: {_misfit(exc)}") from None
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
        params = spec.model_params
        if _has_placeholders(params):
            home = (str(ref.get("name", "")).split(":", 1)[0], inspect.getmodule(factory))
            params = materialize(params, home)
        module = factory(**params)
    except BadRequest as exc:
        raise ModelLoadError(f"model_params of {ref.get('name')}: {exc}") from None
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


def _load_failure(exc: BaseException) -> str:
    """torch.load's failure in a line; for weights_only's refusal, what it refused and
    the way out."""
    text = str(exc)
    if "Weights only load failed" in text:
        refused = next((ln.strip() for ln in text.splitlines() if "Unsupported global" in ln), "")
        return (
            f"torch.load(weights_only=True) refused it ({refused or 'it holds pickled objects'}); "
            "if you trust this file, pass load_model_args={'weights_only': False}"
        )
    return _first_line(exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _misfit(exc: BaseException) -> str:
    """torch's whole complaint about a state_dict that does not fit its class (every
    missing and unexpected key, every shape mismatch), bounded in length."""
    return f"{type(exc).__name__}: {bounded(str(exc).strip(), MAX_ERROR_TEXT)}"


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


def run(loaded: LoadedModel, inputs: Any, kwargs: dict[str, Any], method: str = "forward") -> Any:
    """Call the model on one batch: ``module(inputs, **kwargs)``, or ``module(**inputs,
    **kwargs)`` when inputs is a map of named tensors (keyed tensors); ``method``: one of
    ``loaded.methods`` instead of forward. Outputs come back on the CPU, as ordinary
    tensors (``no_grad``, as Beam runs models: a postprocess may change them in place).

    Whose fault a failure is: arguments the method's signature does not take are the
    request's (BadInput, before the model runs); anything the model raises while it runs
    is ModelError, naming the input and carrying the model's traceback. Running out of
    memory (CUDA or host) is raised as it is, for the caller to free memory and retry."""
    import torch

    if method not in loaded.methods:
        raise BadRequest(
            f"model {loaded.model_id} has no public method {method!r}; it has: {', '.join(sorted(loaded.methods))}"
        )
    fn = loaded.module if method == "forward" else getattr(loaded.module, method)
    if _has_placeholders(kwargs):
        kwargs = materialize(kwargs)
    _check_arguments(loaded, method, inputs, kwargs)
    with torch.no_grad():
        moved = _to_device(inputs, loaded.device)
        kwargs = _to_device(kwargs, loaded.device, arrays=False)
        try:
            if isinstance(moved, dict):
                out = fn(**moved, **kwargs)
            else:
                out = fn(moved, **kwargs)
        except Exception as exc:
            if isinstance(exc, MemoryError) or memory.is_cuda_oom(exc):
                raise
            raise ModelError(_model_failure(loaded, method, inputs, exc)) from None
        return _to_device(out, "cpu")


def _check_arguments(loaded: LoadedModel, method: str, inputs: Any, kwargs: dict[str, Any]) -> None:
    """BadInput when ``method``'s signature does not take these arguments. A method whose
    signature Python cannot read (a TorchScript file's) is not checked here: TorchScript
    checks its arguments itself, inside the call."""
    if method not in loaded.signatures:
        fn = loaded.module.forward if method == "forward" else getattr(loaded.module, method)
        try:
            loaded.signatures[method] = inspect.signature(fn)
        except (TypeError, ValueError):
            loaded.signatures[method] = None
    signature = loaded.signatures[method]
    if signature is None:
        return
    try:
        if isinstance(inputs, dict):
            signature.bind(**inputs, **kwargs)
        else:
            signature.bind(inputs, **kwargs)
    except TypeError as exc:
        params = ", ".join(str(p.replace(annotation=p.empty)) for p in signature.parameters.values())
        raise BadInput(
            f"model {loaded.model_id}: {method}({params}) does not take input {describe_value(inputs)}"
            f"{' with ' + ', '.join(sorted(kwargs)) if kwargs else ''}: {exc}"
        ) from None


def _model_failure(loaded: LoadedModel, method: str, inputs: Any, exc: BaseException) -> str:
    """What ModelError says: the input, the exception, and the model's own frames (the
    first frame, this module's call, and torch's module-call wrappers left out), the
    innermost kept when it is too long."""
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)[1:]
        if not (f.filename.endswith(_MODULE_CALL_FILE) and f.name in ("_call_impl", "_wrapped_call_impl"))
    ]
    trace = "".join(traceback.format_list(frames)).rstrip()
    head = (
        f"model {loaded.model_id} raised {type(exc).__name__} in {method} on input {describe_value(inputs)}: "
        f"{bounded(str(exc).strip(), MAX_ERROR_TEXT // 2)}"
    )
    return (
        f"{head}\nthe model's traceback (innermost last):\n{bounded(trace, MAX_ERROR_TEXT // 2, keep='tail')}"
    )


def bounded(text: str, limit: int, *, keep: str = "head") -> str:
    """``text`` cut to about ``limit`` characters, saying how much was cut; ``keep``:
    which end stays ("head" or "tail")."""
    if len(text) <= limit:
        return text
    cut = len(text) - limit
    if keep == "tail":
        return f"[... {cut} characters cut]\n{text[cut:]}"
    return f"{text[:limit]}\n[... {cut} characters cut]"


def _to_device(value: Any, device: str, *, arrays: bool = True) -> Any:
    """Tensors moved to ``device``; numpy arrays become tensors too when ``arrays``
    (batch inputs), and stay as they are otherwise (side arguments)."""
    import numpy as np
    import torch

    if isinstance(value, torch.Tensor):
        return value if value.device.type == torch.device(device).type else value.to(device)
    if arrays and isinstance(value, np.ndarray):
        return torch.from_numpy(value).to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device, arrays=arrays) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device, arrays=arrays) for v in value)
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
