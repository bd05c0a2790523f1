"""The PyTorch handlers: the user's configuration of a model, with Beam's names and meaning.

They never load anything themselves: they describe the model as a ``ModelSpec`` and hand
it to ``modelserver.loaders`` in this process, or to the model server when
``large_model=True`` (``share_model_across_processes()``). The contract they implement,
``ModelHandler``, is in ``client.base`` (and importable from here).
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from client.base import ConfigurationError, ModelHandler
from client.remote import RemoteModel
from client.results import PredictionResult
from modelserver import loaders, userclass, wire
from modelserver.loaders import ModelSpec

log = logging.getLogger("beamlet.handlers")

__all__ = [
    "ConfigurationError",
    "ModelHandler",
    "PytorchModelHandlerKeyedTensor",
    "PytorchModelHandlerTensor",
    "RemoteModel",
    "default_keyed_tensor_inference_fn",
    "default_tensor_inference_fn",
    "make_keyed_tensor_model_fn",
    "make_tensor_model_fn",
]

InferenceFn = Callable[..., Iterable[PredictionResult]]


def make_tensor_model_fn(model_fn: str) -> InferenceFn:
    """An inference_fn that stacks the batch and calls the model's method ``model_fn``
    instead of forward (Beam's ``make_tensor_model_fn``); a large model's method runs in
    the model server. Runs under ``torch.no_grad()``, as Beam's: outputs are ordinary
    tensors a postprocess function may change in place."""
    return _method_fn(model_fn, keyed=False)


def make_keyed_tensor_model_fn(model_fn: str) -> InferenceFn:
    """The keyed-tensor inference_fn (each named tensor stacked across the batch, called
    as ``model.<model_fn>(**named, **inference_args)``): Beam's ``make_keyed_tensor_model_fn``."""
    return _method_fn(model_fn, keyed=True)


def _method_fn(model_fn: str, *, keyed: bool) -> InferenceFn:
    def attr_fn(
        batch: Sequence[Any],
        model: Any,
        device: str,
        inference_args: dict[str, Any] | None = None,
        model_id: str | None = None,
    ) -> Iterable[PredictionResult]:
        return _call_method(model_fn, keyed, batch, model, device, inference_args, model_id)

    return attr_fn


def default_tensor_inference_fn(
    batch: Sequence[Any],
    model: Any,
    device: str,
    inference_args: dict[str, Any] | None = None,
    model_id: str | None = None,
) -> Iterable[PredictionResult]:
    """Stack the batch, call the model once, pair each example with its row of output."""
    return _call_method("forward", False, batch, model, device, inference_args, model_id)


def default_keyed_tensor_inference_fn(
    batch: Sequence[dict[str, Any]],
    model: Any,
    device: str,
    inference_args: dict[str, Any] | None = None,
    model_id: str | None = None,
) -> Iterable[PredictionResult]:
    """Stack each named tensor across the batch and call ``model(**named, **inference_args)``."""
    return _call_method("forward", True, batch, model, device, inference_args, model_id)


def _call_method(
    model_fn: str,
    keyed: bool,
    batch: Sequence[Any],
    model: Any,
    device: str,
    inference_args: dict[str, Any] | None,
    model_id: str | None,
) -> list[PredictionResult]:
    import torch

    local = bool(device) and device != "cpu" and not isinstance(model, RemoteModel)
    fn = model if model_fn == "forward" else getattr(model, model_fn)
    with torch.no_grad():
        if keyed:
            named = {k: torch.stack([torch.as_tensor(x[k]) for x in batch]) for k in batch[0]}
            predictions = fn(
                **{k: v.to(device) if local else v for k, v in named.items()}, **(inference_args or {})
            )
        else:
            batched = stack_rows(batch)
            predictions = fn(batched.to(device) if local else batched, **(inference_args or {}))
    return _pair(batch, predictions, model_id or _remote_id(model))


def stack_rows(batch: Sequence[Any]) -> Any:
    """``torch.stack`` of the batch's rows, without the copy when they are consecutive
    rows of one array: a bundle read from a ``.npy`` file arrives in a worker as one array
    (``runtime.rows``), and each batch of it is then a slice of that array."""
    import torch

    view = _consecutive_rows(batch)
    if view is not None:
        return view
    return torch.stack([torch.as_tensor(x) for x in batch])


def _consecutive_rows(batch: Sequence[Any]) -> Any:
    """A tensor viewing the rows when they lie back to back, in order, in one numpy
    array or one tensor storage; None otherwise."""
    import torch

    first = batch[0] if len(batch) else None
    if type(first) is np.ndarray and first.flags.c_contiguous and first.flags.writeable:
        base = first.base
        if type(base) is not np.ndarray or not base.flags.c_contiguous or first.dtype.hasobject:
            return None
        step, start = first.nbytes, first.__array_interface__["data"][0]
        lo = base.__array_interface__["data"][0]
        if step == 0 or start + step * len(batch) > lo + base.nbytes:
            return None
        for i, x in enumerate(batch):
            if not (
                type(x) is np.ndarray
                and x.base is base
                and x.shape == first.shape
                and x.dtype == first.dtype
                and x.__array_interface__["data"][0] == start + i * step
            ):
                return None
        try:
            return torch.from_numpy(
                base.reshape(-1)
                .view(np.uint8)[start - lo : start - lo + step * len(batch)]
                .view(first.dtype)
                .reshape((len(batch), *first.shape))
            )
        except (TypeError, ValueError):  # a dtype torch does not have
            return None
    if isinstance(first, torch.Tensor) and first.layout == torch.strided and first.is_contiguous():
        storage, numel, offset = first.untyped_storage().data_ptr(), first.numel(), first.storage_offset()
        for i, x in enumerate(batch):
            if not (
                type(x) is type(first)
                and x.shape == first.shape
                and x.dtype == first.dtype
                and x.device == first.device
                and x.is_contiguous()
                and x.untyped_storage().data_ptr() == storage
                and x.storage_offset() == offset + i * numel
            ):
                return None
        if numel == 0:
            return None
        try:
            return first.as_strided((len(batch), *first.shape), (numel, *first.stride()), offset)
        except RuntimeError:  # beyond the storage
            return None
    return None


def _remote_id(model: Any) -> str | None:
    return model.last_model_id if isinstance(model, RemoteModel) else None


def _with_model_id(results: Iterable[Any], model_id: str | None) -> list[Any]:
    """Results of a remote model name the version that ran them, whatever the
    inference_fn put there (the server may have swapped versions since the load)."""
    return [
        r._replace(model_id=model_id) if isinstance(r, PredictionResult) and r.model_id != model_id else r
        for r in results
    ]


def _pair(batch: Sequence[Any], predictions: Any, model_id: str | None) -> list[PredictionResult]:
    """One PredictionResult per example, as Beam pairs them: a map of outputs becomes one
    map per row; a tuple of batch-shaped outputs (several heads) one tuple per row."""
    n = len(batch)
    if isinstance(predictions, dict):
        rows: list[Any] = [{k: v[i] for k, v in predictions.items()} for i in range(n)]
    elif (
        isinstance(predictions, (list, tuple))
        and predictions
        and all(
            getattr(p, "shape", None) is not None and len(p.shape) and p.shape[0] == n for p in predictions
        )
        and len(predictions) != n
    ):
        rows = [type(predictions)(p[i] for p in predictions) for i in range(n)]
    elif hasattr(predictions, "unbind"):
        rows = list(predictions.unbind(0))
    else:
        rows = [predictions[i] for i in range(n)]
    return [PredictionResult(x, y, model_id) for x, y in zip(batch, rows)]


class _PytorchHandler(ModelHandler[Any, PredictionResult, Any]):
    """What the tensor and keyed-tensor handlers share."""

    _default_fn: InferenceFn

    def __init__(
        self,
        state_dict_path: str | None = None,
        model_class: Callable[..., Any] | None = None,
        model_params: dict[str, Any] | None = None,
        device: str = "CPU",
        *,
        inference_fn: InferenceFn | None = None,
        torch_script_model_path: str | None = None,
        min_batch_size: int | None = None,
        max_batch_size: int | None = None,
        max_batch_duration_secs: float | None = None,
        large_model: bool = False,
        model_copies: int | None = None,
        load_model_args: dict[str, Any] | None = None,
        env_vars: dict[str, str] | None = None,
        socket_path: str | None = None,
        cpu_fallback: bool = True,
        **kwargs: Any,
    ):
        super().__init__()
        _check_sources(state_dict_path, model_class, torch_script_model_path)
        if not isinstance(cpu_fallback, bool):
            raise ConfigurationError(f"cpu_fallback must be True or False, got {cpu_fallback!r}")
        self._cpu_fallback = cpu_fallback
        if model_copies is not None and (type(model_copies) is not int or model_copies < 1):
            raise ConfigurationError(f"model_copies must be an int >= 1, got {model_copies!r}")
        # As in Beam, model_copies implies large_model: the copies live in the model server.
        large_model = large_model or model_copies is not None
        self._model_copies = model_copies or 1
        # The model server runs elsewhere (its working directory is /): the spec holds
        # absolute paths. Results name the path as the user gave it, as Beam's do.
        self._torchscript = bool(torch_script_model_path)
        given = torch_script_model_path or state_dict_path
        path = _absolute(given)
        # One immutable value, replaced whole by an update: a reader never sees a new path
        # with an old revision. ``updates`` > 0: loads swap the server's version (a first
        # load attaches to it), and every update is a new version for this process.
        self._version = _Version(path, loaders.file_revision(path), 0, given, None)
        self._loaded_ids: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
        self._past_ids: dict[str, str] = {}  # absolute -> given paths of earlier versions
        self._model_class = model_class
        self._model_params = dict(model_params or {})
        self._device = device
        self._inference_fn = inference_fn or type(self)._default_fn
        self._large_model = large_model
        self._load_model_args = dict(load_model_args or {})
        self._env_vars = _check_env_vars(env_vars)
        self._socket_path = socket_path
        self._batching = {
            k: v
            for k, v in (
                ("min_batch_size", min_batch_size),
                ("max_batch_size", max_batch_size),
                ("max_batch_duration_secs", max_batch_duration_secs),
            )
            if v is not None
        }
        self._batching.update(kwargs.pop("batch_elements_kwargs", {}) or {})
        if kwargs:
            raise TypeError(f"unexpected arguments: {sorted(kwargs)}")
        if large_model:
            _check_sendable("model_params", self._model_params)
            _check_sendable("load_model_args", self._load_model_args)
        self._class_ref = _class_ref(model_class, large_model)
        self._key = f"{self._name()}-{self.model_spec().digest()}"
        self._resolved_device: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Runners that ship handlers by pickling them (Beam) get the configuration; which
        # loaded module came from which file stays in this process.
        state = dict(self.__dict__)
        state.pop("_loaded_ids", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._loaded_ids = weakref.WeakKeyDictionary()

    def _name(self) -> str:
        if self._class_ref:
            return self._class_ref["name"].rsplit(":", 1)[-1]
        return "torchscript"

    def model_spec(self) -> ModelSpec:
        return self._spec(self._version)

    def _spec(self, version: _Version) -> ModelSpec:
        if self._torchscript:
            return ModelSpec(
                "torchscript",
                version.path,
                None,
                {},
                self._device,
                self._load_model_args,
                version.revision,
                self._env_vars,
                self._cpu_fallback,
            )
        return ModelSpec(
            "pytorch_state_dict",
            version.path,
            self._class_ref,
            self._model_params,
            self._device,
            self._load_model_args,
            version.revision,
            self._env_vars,
            self._cpu_fallback,
        )

    def model_key(self) -> str:
        return self._key

    def cache_slot(self) -> str:
        # A large model is one per server: the same model through two sockets is two.
        where = f":{self._socket_path or ''}" if self._large_model else ""
        return f"{self._key}:{int(self._large_model)}{where}"

    def cache_key(self) -> str:
        # Read every batch: built from the version alone (everything else in the spec is
        # fixed at construction and already in the key), with no digest to compute.
        v = self._version
        return f"{self.cache_slot()}:{v.updates}:{v.revision}:{v.path}"

    def share_model_across_processes(self) -> bool:
        return self._large_model

    def model_copies(self) -> int:
        """How many copies of the model the model server holds (Beam's ``model_copies``)."""
        return self._model_copies

    def socket_paths(self) -> set[str | None]:
        return {self._socket_path} if self._large_model else set()

    def server_batching(self) -> dict[str, int | float | None]:
        """How the model server merges this model's requests from every worker and thread:
        at most ``max_batch_size`` rows a batch, a short batch waiting at most
        ``max_batch_duration_secs`` for other callers (None: the server's defaults, 256
        rows and 5 ms; 0: no merging)."""
        return {
            "max_batch_size": self._batching.get("max_batch_size"),
            "max_batch_duration_secs": self._batching.get("max_batch_duration_secs"),
        }

    def load_model(self) -> Any:
        """The model: loaded here, or (large_model) a ``RemoteModel`` of the server's.
        ``env_vars`` are set in this process first, as Beam does, and in the server."""
        version = self._version
        spec = self._spec(version)
        if self._large_model:
            from client.serverclient import shared_client

            loaders.apply_env_vars(self._env_vars, self.cache_slot())
            server = shared_client(self._socket_path)
            return RemoteModel(
                server,
                self._key,
                spec,
                replace=version.updates > 0,
                batching=self.server_batching(),
                sequence=version.sequence,
                copies=self._model_copies,
            )
        loaded = loaders.load(spec, self._model_class, owner=self.cache_slot())
        self._resolved_device = loaded.device
        self._loaded_ids[loaded.module] = version.given or loaded.model_id
        return loaded.module

    def run_inference(
        self, batch: Sequence[Any], model: Any, inference_args: dict[str, Any] | None = None
    ) -> Iterable[PredictionResult]:
        """Run ``inference_fn(batch, model, device, inference_args, model_id)``;
        ``inference_args`` is ``{}`` when there are none, as in Beam."""
        inference_args = inference_args or {}
        if isinstance(model, RemoteModel):
            with model.batch(batch):
                results = self._inference_fn(
                    batch, model, "cpu", inference_args, self._given_id(model.model_id)
                )
            return _with_model_id(results, self._given_id(model.last_model_id))
        model_id = self._loaded_ids.get(model) or self._given_id(self.model_spec().model_id)
        return self._inference_fn(batch, model, _module_device(model), inference_args, model_id)

    def _given_id(self, model_id: str) -> str:
        """The path as the user gave it for a version the server names by absolute path."""
        v = self._version
        return v.given if v.given and model_id == v.path else self._past_ids.get(model_id, model_id)

    def validate_inference_args(self, inference_args: dict[str, Any] | None) -> None:
        """A large model's inference_args travel to the server: each must be data the wire
        carries (checked here, before anything runs). A side input (Beam's ``AsDict``)
        is only known per batch: the wire says then what it cannot carry."""
        if self._large_model and isinstance(inference_args, Mapping) and inference_args:
            _check_sendable("inference_args", dict(inference_args))

    def batch_elements_kwargs(self) -> Mapping[str, Any]:
        return dict(self._batching)

    def update_model_path(
        self, model_path: str | None = None, *, sequence: tuple[int, int] | None = None
    ) -> None:
        """Use the model file at ``model_path`` (None: the current file, re-read). Every
        update is a new version for this process, so it loads what the file holds now,
        also a version that failed before. The server's version is the file's identity
        (``loaders.file_revision``): the same path rewritten in place is a new one, and
        every process that updates to the same file sends the same spec, so the model
        server swaps once. ``sequence``: the update's place in the run's order, (epoch,
        n), as the harness gives it; the server refuses to swap back to an older version
        (None: no order, the last swap wins)."""
        current = self._version
        if model_path == "":
            # Beam keeps the current model when the path is empty (a ModelMetadata side
            # input with no model_id): no new version, and never a model without weights.
            log.warning("model update with an empty path ignored; %s keeps serving", current.given)
            return
        path = _absolute(model_path) if model_path is not None else current.path
        given = model_path if model_path is not None else current.given
        if current.given and current.path and current.path != path:
            self._past_ids[current.path] = current.given
            while len(self._past_ids) > 16:
                del self._past_ids[next(iter(self._past_ids))]
        self._version = _Version(path, loaders.file_revision(path), current.updates + 1, given, sequence)

    def get_metrics_namespace(self) -> str:
        return "BeamML_PyTorch"


class _Version(NamedTuple):
    path: str | None  # absolute: what the server loads and keys on
    revision: str
    updates: int
    given: str | None  # as the user gave it: what results name
    sequence: tuple[int, int] | None = None  # the update's place in the run's order (harness-given)


def _check_sources(state_dict_path: Any, model_class: Any, torch_script_model_path: Any) -> None:
    """Beam's rules, Beam's words: a state_dict needs its class and the class its
    state_dict (never a model built with random weights); TorchScript or state_dict."""
    message = (
        "A {0} has been supplied to the model handler, but the required {1} is missing. "
        "Please provide the {1} in order to successfully load the {0}."
    )
    if state_dict_path and not model_class:
        raise ConfigurationError(message.format("state_dict_path", "model_class"))
    if not state_dict_path and model_class:
        raise ConfigurationError(message.format("model_class", "state_dict_path"))
    if torch_script_model_path and state_dict_path:
        raise ConfigurationError(
            "Please specify either torch_script_model_path or (state_dict_path, model_class) "
            "to successfully load the model."
        )
    if not torch_script_model_path and not state_dict_path:
        raise ConfigurationError(
            "A PyTorch handler needs state_dict_path and model_class, or torch_script_model_path."
        )


def _check_env_vars(env_vars: Any) -> dict[str, str]:
    env = dict(env_vars or {})
    bad = [k for k, v in env.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise ConfigurationError(f"env_vars must map str to str; not: {bad}")
    return env


def _check_sendable(what: str, values: dict[str, Any]) -> None:
    """Each value must be data the wire carries to the model server; the error names the
    one that is not."""
    for name, value in values.items():
        try:
            wire.encode({name: value})
        except TypeError as exc:
            raise ConfigurationError(
                f"{what}[{name!r}] cannot travel to the model server (large_model=True): {exc}. "
                "Use plain data, arrays, torch dtypes and devices, or a dataclass of those."
            ) from None


def _absolute(path: str | None) -> str | None:
    return os.path.abspath(path) if path else path


def _class_ref(model_class: Any, large_model: bool) -> dict[str, Any] | None:
    """The class as data. A model kept in-process only needs a name (it loads from the
    live class), so a class the bundler cannot ship (typed at a REPL, say) still works."""
    if model_class is None:
        return None
    try:
        return userclass.describe(model_class)
    except userclass.ShipError:
        if large_model:
            raise
        name = f"{getattr(model_class, '__module__', '?')}:{getattr(model_class, '__qualname__', '?')}"
        return {"name": name, "source": None}


def _module_device(model: Any) -> str:
    for p in model.parameters():
        return str(p.device)
    return "cpu"


class PytorchModelHandlerTensor(_PytorchHandler):
    """A PyTorch model whose examples are tensors (Beam's PytorchModelHandlerTensor).

    Either ``state_dict_path`` + ``model_class`` (+ ``model_params``), or
    ``torch_script_model_path``. ``device`` "CPU", "GPU" or "cuda:N" (a GPU request falls
    back to the CPU with a warning where CUDA is unusable; ``cpu_fallback=False``: the
    load fails with ModelLoadError instead). ``large_model=True`` keeps one copy of the
    model per machine, in the model server; ``model_copies=N`` keeps N there (and implies
    ``large_model``; on GPUs spread by free budget), each request going to the least busy
    copy. ``inference_fn(batch, model, device, inference_args, model_id)`` replaces the
    default stack-and-call.
    """

    _default_fn = staticmethod(default_tensor_inference_fn)


class PytorchModelHandlerKeyedTensor(_PytorchHandler):
    """A PyTorch model whose examples are maps of named tensors, called as ``model(**named)``
    (Beam's PytorchModelHandlerKeyedTensor)."""

    _default_fn = staticmethod(default_keyed_tensor_inference_fn)
