"""A stand-in for ``apache_beam.ml.inference.pytorch_inference`` backed by beamlet.

``tests/test_beam_compat.py`` runs Apache Beam's own ``pytorch_inference_test.py`` with
its imports of ``pytorch_inference`` pointed here. The handlers take Beam's constructor
arguments and are Beam ``ModelHandler``s (``client.beam.BeamletModelHandler``) wrapping
beamlet's own handler, built the way a Beam user moving to beamlet would write it::

    BeamletModelHandler(client.PytorchModelHandlerTensor(<the same arguments>))

Every constructor argument goes to beamlet's handler unchanged (``env_vars`` and
``model_copies`` included: beamlet's handler must accept or reject them itself); nothing
is re-implemented here, so a failure of the suite is a difference in beamlet.

``LARGE_MODEL``: None keeps each test's own ``large_model``; True or False forces it (the
suite's second run forces True, so every handler a test builds keeps its model in the
model server). The server's socket is ``BEAMLET_SOCKET`` (the suite gives each test its
own); a server a handler starts exits ``SERVER_IDLE_TIMEOUT`` seconds after its last
client leaves, and the suite also stops it at the end of each test.

Beam's test also subclasses the handlers with an ``__init__`` that sets only
``_device``, ``_inference_fn``, ``_state_dict_path`` and ``_torch_script_model_path`` and
then calls ``run_inference`` on a module of its own. There is no beamlet handler to
delegate to then, so ``run_inference`` calls the inference_fn the way beamlet's
``_PytorchHandler.run_inference`` calls it on an in-process module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from apache_beam.ml.inference import base as beam_base
from apache_beam.ml.inference import pytorch_inference as beam_pytorch

import client
from client import handlers as beamlet_handlers
from client.beam import BeamletModelHandler
from client.handlers import (
    default_keyed_tensor_inference_fn,
    default_tensor_inference_fn,
    make_keyed_tensor_model_fn,
    make_tensor_model_fn,
)
from client.results import PredictionResult as BeamletResult

# Beam's mock tests swap this out and assert Beam's handler called it (listed as exceptions
# in the suite); it has to exist for their setUp to run.
_load_model = beam_pytorch._load_model

__all__ = [
    "LARGE_MODEL",
    "SERVER_IDLE_TIMEOUT",
    "PytorchModelHandlerKeyedTensor",
    "PytorchModelHandlerTensor",
    "default_keyed_tensor_inference_fn",
    "default_tensor_inference_fn",
    "make_keyed_tensor_model_fn",
    "make_tensor_model_fn",
]

LARGE_MODEL: bool | None = None
SERVER_IDLE_TIMEOUT = 5.0

# Beam's optional constructor arguments: passed on only when given, so a beamlet handler
# that lacks one still builds where the test does not use it.
_OPTIONAL = (
    "min_batch_size",
    "max_batch_size",
    "max_batch_duration_secs",
    "model_copies",
    "load_model_args",
    "max_batch_weight",
    "element_size_fn",
    "batch_length_fn",
    "batch_bucket_boundaries",
)


class _BeamletPytorchHandler(BeamletModelHandler):
    _beamlet_class: type[beamlet_handlers.ModelHandler[Any, Any, Any]]
    _default_fn: Callable[..., Iterable[Any]]

    def __init__(
        self,
        state_dict_path: str | None = None,
        model_class: Callable[..., Any] | None = None,
        model_params: dict[str, Any] | None = None,
        device: str = "CPU",
        *,
        inference_fn: Callable[..., Iterable[Any]] | None = None,
        torch_script_model_path: str | None = None,
        large_model: bool = False,
        **kwargs: Any,
    ):
        forced = LARGE_MODEL
        args: dict[str, Any] = {
            "state_dict_path": state_dict_path,
            "model_class": model_class,
            "model_params": model_params,
            "device": device,
            "torch_script_model_path": torch_script_model_path,
            "large_model": large_model if forced is None else forced,
        }
        if inference_fn is not None:
            args["inference_fn"] = inference_fn
        for name in _OPTIONAL:
            if kwargs.get(name) is not None:
                args[name] = kwargs.pop(name)
            else:
                kwargs.pop(name, None)
        args.update(kwargs)  # env_vars and anything else: beamlet's handler decides
        super().__init__(self._beamlet_class(**args), server_idle_timeout=SERVER_IDLE_TIMEOUT)

    def _wrapped(self) -> beamlet_handlers.ModelHandler[Any, Any, Any] | None:
        return self.__dict__.get("_handler")

    def run_inference(
        self, batch: Sequence[Any], model: Any, inference_args: dict[str, Any] | None = None
    ) -> Iterable[Any]:
        if self._wrapped() is not None:
            return super().run_inference(batch, model, inference_args)
        # Beam's inference-only subclass: no beamlet handler, a module of the test's own.
        inference_fn = self.__dict__.get("_inference_fn") or self._default_fn
        model_id = self.__dict__.get("_torch_script_model_path") or self.__dict__.get("_state_dict_path")
        results = inference_fn(
            batch,
            model,
            _module_device(model),
            inference_args if inference_args is not None else {},
            model_id,
        )
        return [_to_beam(r) for r in results]

    def get_num_bytes(self, batch: Sequence[Any]) -> int:
        wrapped = self._wrapped()
        if wrapped is not None:
            return wrapped.get_num_bytes(batch)
        return self._bare_beamlet().get_num_bytes(batch)

    def get_metrics_namespace(self) -> str:
        wrapped = self._wrapped()
        if wrapped is not None:
            return wrapped.get_metrics_namespace()
        return self._bare_beamlet().get_metrics_namespace()

    def _bare_beamlet(self) -> beamlet_handlers.ModelHandler[Any, Any, Any]:
        # beamlet's answer for a handler of this class, with no configuration to read.
        return self._beamlet_class.__new__(self._beamlet_class)


class PytorchModelHandlerTensor(_BeamletPytorchHandler):
    """Beam's PytorchModelHandlerTensor, served by ``client.PytorchModelHandlerTensor``."""

    _beamlet_class = client.PytorchModelHandlerTensor
    _default_fn = staticmethod(default_tensor_inference_fn)


class PytorchModelHandlerKeyedTensor(_BeamletPytorchHandler):
    """Beam's PytorchModelHandlerKeyedTensor, served by ``client.PytorchModelHandlerKeyedTensor``."""

    _beamlet_class = client.PytorchModelHandlerKeyedTensor
    _default_fn = staticmethod(default_keyed_tensor_inference_fn)


def _module_device(model: Any) -> str:
    """The device of the module's parameters, as beamlet's in-process run_inference passes it."""
    parameters = getattr(model, "parameters", None)
    if parameters is not None:
        for p in parameters():
            return str(p.device)
    return "cpu"


def _to_beam(result: Any) -> Any:
    if isinstance(result, BeamletResult):
        return beam_base.PredictionResult(result.example, result.inference, result.model_id)
    return result
