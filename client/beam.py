"""Apache Beam's ``RunInference`` on beamlet: one model server per VM, Beam's SDK workers
as its clients.

``BeamletModelHandler(handler)`` is a subclass of Beam's own
``apache_beam.ml.inference.base.ModelHandler`` that wraps any beamlet handler (a
``PytorchModelHandlerTensor``, ``PytorchModelHandlerKeyedTensor``, a beamlet
``KeyedModelHandler``; ``large_model`` on or off, with or without pre/post-processing)::

    import apache_beam as beam
    from apache_beam.ml.inference.base import RunInference

    handler = BeamletModelHandler(PytorchModelHandlerTensor(path, Net, params, large_model=True))
    results = examples | RunInference(handler)

What it promises:

- With ``large_model=True`` every batch goes to the VM's model server. The first SDK
  worker on the VM that loads the model starts it (beamlet's auto-start: however many
  race, exactly one server is started); every other worker on the VM uses that one. The
  server exits ``server_idle_timeout`` seconds (default 10) after its last client leaves:
  an SDK worker keeps its connection for as long as it lives, so the server lives as long
  as the VM's workers do (and a worker back within the timeout finds it), and nothing
  stays behind (its socket and lock files are removed on exit).
- Beam sees a model that is *not* shared across processes
  (``share_model_across_processes()`` is False): beamlet shares it, so Beam's own
  machinery for that (``multi_process_shared``: a pickled-RPC proxy per model, with
  ``<tag>.address``/``<tag>.lock`` files in the temp directory) stays out of the way.
  Beam keeps one ``RemoteModel`` per SDK-worker process, shared by its threads.
- Results are Beam's ``PredictionResult`` (``model_id``: the checkpoint path that
  produced them); keyed handlers yield ``(key, PredictionResult)``.
- Beam's batching arguments: the wrapped handler's ``batch_elements_kwargs()``, updated
  with the ones given here, go to Beam's ``BatchElements``.
- Metrics: Beam's RunInference DoFn reports its usual ones (``num_inferences``,
  ``inference_batch_latency_micro_secs``, ``failed_batches_counter``, ...) under the
  wrapped handler's namespace (``BeamML_PyTorch``, as Beam's own PyTorch handlers).
  Each model load adds ``beamlet_model_server_pid`` (a distribution: min == max means
  every SDK worker used the same server) and ``beamlet_model_byte_size`` (the footprint
  the server measured; Beam's ``model_byte_size`` reads this process's RSS, which a
  remote model barely moves).
- Model updates: Beam calls ``update_model_path`` / ``update_model_paths`` and then
  ``load_model`` when a ``model_metadata_pcoll`` side input fires; both are forwarded to
  the beamlet handler, and the server loads the new version beside the old one and
  swaps it in.

This module is the only one in beamlet that imports ``apache_beam`` (the ``beam`` extra).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from apache_beam.metrics.metric import Metrics
from apache_beam.ml.inference import base as beam_base

from client import autostart
from client.cache import models as inference_models
from client.handlers import ConfigurationError, RemoteModel
from client.handlers import ModelHandler as BeamletHandler
from client.keyed import KeyModelPathMapping, keyed_handler_of
from client.keyed import _KeyedModels as BeamletHandlerModels
from client.results import PredictionResult as BeamletResult
from client.serverclient import shared_client
from modelserver import config

log = logging.getLogger("beamlet.beam")

DEFAULT_SERVER_IDLE_TIMEOUT = 10.0  # gone ~11 s after the job; a worker back by then reuses it
SERVER_PID_METRIC = "beamlet_model_server_pid"
MODEL_BYTES_METRIC = "beamlet_model_byte_size"


class BeamletModelHandler(beam_base.ModelHandler[Any, Any, Any]):
    """Beam's ModelHandler contract, served by a beamlet handler and the VM's model server.

    ``handler``: any beamlet handler. ``server_idle_timeout``: seconds an auto-started
    server lives after its last client leaves. ``memory_budget``: the host memory an
    auto-started server may give to models ("8GiB"; default: 70% of the RAM available
    when it starts). Both apply only to a server this handler starts; a server already
    running on the socket keeps its own settings. ``min_batch_size``,
    ``max_batch_size``, ``max_batch_duration_secs`` and Beam's other batching arguments
    override the wrapped handler's.
    """

    def __init__(
        self,
        handler: BeamletHandler[Any, Any, Any],
        *,
        server_idle_timeout: float | None = DEFAULT_SERVER_IDLE_TIMEOUT,
        memory_budget: str | int | None = None,
        **beam_kwargs: Any,
    ):
        if not isinstance(handler, BeamletHandler):
            raise TypeError(
                f"BeamletModelHandler wraps a beamlet handler (client.ModelHandler), not {type(handler).__name__}"
            )
        if beam_kwargs.get("large_model") or beam_kwargs.get("model_copies"):
            raise ValueError(
                "large_model and model_copies belong to the beamlet handler: "
                "BeamletModelHandler(PytorchModelHandlerTensor(..., large_model=True))"
            )
        if beam_kwargs.get("env_vars"):
            raise ConfigurationError(
                "env_vars belong to the beamlet handler, which sets them in the SDK worker and "
                "in the model server: PytorchModelHandlerTensor(..., env_vars={...})"
            )
        super().__init__(**beam_kwargs)
        self._handler = handler
        # Beam's DoFn sets these in the SDK worker (set_environment_vars); the beamlet
        # handler sets them again before its load, in the worker and in the server.
        self._env_vars = dict(getattr(handler, "_env_vars", {}) or {})
        self._server_idle_timeout = server_idle_timeout
        self._memory_budget = None if memory_budget is None else str(memory_budget)
        self._pending: list[tuple[str, int]] = []  # metric readings from loads, not yet reported
        self._pending_lock = threading.Lock()

    # Beam pickles handlers to ship them to its workers; a lock does not pickle, and a
    # loaded model stays in the process that loaded it.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_pending"] = []
        del state["_pending_lock"]
        state.pop("_loaded_here", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pending_lock = threading.Lock()

    @property
    def handler(self) -> BeamletHandler[Any, Any, Any]:
        """The wrapped beamlet handler."""
        return self._handler

    def socket_paths(self) -> list[str]:
        """The model servers' sockets this handler's models live behind (none when every
        model runs in-process)."""
        return sorted({config.socket_path(p) for p in self._handler.socket_paths()})

    # -- loading -----------------------------------------------------------------------
    def load_model(self) -> Any:
        """Start the VM's model server if none answers, then load through the beamlet
        handler (a ``RemoteModel`` for large_model, the module itself otherwise)."""
        pids = []
        for path in self.socket_paths():
            extra = ["--memory-budget", self._memory_budget] if self._memory_budget else []
            client = shared_client(path)
            # A server this worker starts, now or after the server died, gets our settings.
            client.server_args, client.idle_timeout = extra, self._server_idle_timeout
            autostart.ensure_server(path, extra, idle_timeout=self._server_idle_timeout)
            with client.channel() as ch:
                pids.append(ch.server_pid)
        model = self._handler.load_model()
        self._loaded_here = (os.getpid(), model)
        # load_model runs in DoFn.setup, where Beam has no metrics context: hold the
        # readings until the next batch, which runs inside a bundle.
        with self._pending_lock:
            self._pending.extend((SERVER_PID_METRIC, pid) for pid in pids)
            if isinstance(model, RemoteModel):
                self._pending.append((MODEL_BYTES_METRIC, int(model.nbytes or 0)))
        return model

    def _report_loads(self) -> None:
        with self._pending_lock:
            pending, self._pending = self._pending, []
        namespace = self.get_metrics_namespace()
        for name, value in pending:
            Metrics.distribution(namespace, name).update(value)

    # -- inference ---------------------------------------------------------------------
    def run_inference(
        self, batch: Sequence[Any], model: Any, inference_args: dict[str, Any] | None = None
    ) -> Iterable[Any]:
        if self._pending:
            self._report_loads()
        model = self._unproxied(model)
        return [_to_beam(r) for r in self._handler.run_inference(batch, model, inference_args)]

    def _unproxied(self, model: Any) -> Any:
        """The model itself where Beam hands over a proxy of it: Beam's KeyedModelHandler
        with KeyModelMappings always wraps each model in ``multi_process_shared``. A
        beamlet model needs no such sharing (a large one lives in the VM's server), and a
        proxy of it hides what the handler must see (a RemoteModel's methods, a module's
        device). The model this handler loaded in this process serves instead; where the
        proxy's object lives in another process, this process loads its own."""
        if isinstance(model, (RemoteModel, BeamletHandlerModels)) or _is_module(model):
            return model
        if not type(model).__module__.startswith("apache_beam."):
            return model  # whatever a user's handler returns
        loaded = self.__dict__.get("_loaded_here")
        if loaded is not None and loaded[0] == os.getpid():
            return loaded[1]
        return inference_models.get(self._handler)

    def get_num_bytes(self, batch: Sequence[Any]) -> int:
        return self._handler.get_num_bytes(batch)

    def get_metrics_namespace(self) -> str:
        return self._handler.get_metrics_namespace()

    def batch_elements_kwargs(self) -> Mapping[str, Any]:
        kwargs = dict(self._handler.batch_elements_kwargs())
        kwargs.update(super().batch_elements_kwargs())
        return kwargs

    def validate_inference_args(self, inference_args: dict[str, Any] | None) -> None:
        self._handler.validate_inference_args(inference_args)

    def get_preprocess_fns(self) -> list[Callable[[Any], Any]]:
        return list(self._handler.get_preprocess_fns())

    def get_postprocess_fns(self) -> list[Callable[[Any], Any]]:
        return list(self._handler.get_postprocess_fns())

    def share_model_across_processes(self) -> bool:
        # beamlet shares the model (the VM's server); Beam's own sharing must stay out.
        return False

    def model_copies(self) -> int:
        return 1

    # -- model updates -----------------------------------------------------------------
    def update_model_path(self, model_path: str | None = None) -> None:
        self._handler.update_model_path(model_path)

    def update_model_paths(
        self,
        model: Any,
        model_paths: str | list[beam_base.KeyModelPathMapping[Any]] | None = None,
    ) -> None:
        """A path for a single model, or Beam's ``KeyModelPathMapping``s for a keyed
        handler (applied by ``client.keyed.KeyedModelHandler.update_model_paths``: each
        mapping's keys must all be served by one model of the handler)."""
        if model_paths is None or isinstance(model_paths, str):
            self._handler.update_model_path(model_paths)
            return
        keyed = keyed_handler_of(self._handler)
        if keyed is None:
            raise ValueError("per-key model paths need a beamlet KeyedModelHandler")
        keyed.update_model_paths(
            None, [KeyModelPathMapping(list(m.keys), m.update_path, m.model_id) for m in model_paths]
        )


def _is_module(model: Any) -> bool:
    import torch

    return isinstance(model, torch.nn.Module)


def _to_beam(result: Any) -> Any:
    """beamlet's PredictionResult as Beam's; ``(key, result)`` pairs keep their key."""
    if isinstance(result, BeamletResult):
        return beam_base.PredictionResult(result.example, result.inference, result.model_id)
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], BeamletResult):
        return (result[0], _to_beam(result[1]))
    return result
