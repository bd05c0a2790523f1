"""The ModelHandler contract (Beam's ``apache_beam.ml.inference.base.ModelHandler``) and
the pre/post-processing wrappers every handler gets from it.

A handler says how to load a model and how to run a batch through it. The PyTorch
handlers (``client.handlers``) describe their model as a ``ModelSpec`` and never load
anything themselves; a user's own subclass of ``ModelHandler`` runs in-process.
"""

from __future__ import annotations

import inspect
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from modelserver.loaders import ModelSpec


class ConfigurationError(ValueError, RuntimeError):
    """A handler was configured in a way that cannot work. A RuntimeError too, as Beam
    raises for the same mistakes, so code written against Beam catches it."""


ExampleT = TypeVar("ExampleT")
PredictionT = TypeVar("PredictionT")
ModelT = TypeVar("ModelT")


class ModelHandler(Generic[ExampleT, PredictionT, ModelT]):
    """How to load a model and run batches through it (Beam's ModelHandler contract)."""

    def __init__(self) -> None:
        self._cache_token = uuid.uuid4().hex

    def load_model(self) -> ModelT:
        """Load and return the model. Called once per process; its threads share it."""
        raise NotImplementedError

    def run_inference(
        self,
        batch: Sequence[ExampleT],
        model: ModelT,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[PredictionT]:
        """Run one batch through the model; one prediction per example, in order."""
        raise NotImplementedError

    def get_num_bytes(self, batch: Sequence[ExampleT]) -> int:
        """Bytes in a batch, for metrics."""
        total = 0
        for example in batch:
            total += _num_bytes(example)
        return total

    def get_metrics_namespace(self) -> str:
        return "RunInference"

    def batch_elements_kwargs(self) -> Mapping[str, Any]:
        """Keyword arguments for batching: min_batch_size, max_batch_size, ..."""
        return {}

    def validate_inference_args(self, inference_args: dict[str, Any] | None) -> None:
        """Raise ValueError when the handler cannot take these inference_args."""

    def update_model_path(self, model_path: str | None = None) -> None:
        """Point the handler at a new model file (None: the same file, re-read); the next
        load uses what the file holds then. In a running job ``RunInference`` swaps the
        model when the handler's ``cache_key`` changes. beamlet's own handlers also take
        a keyword ``sequence`` (see ``with_sequence``)."""

    def share_model_across_processes(self) -> bool:
        """True: one copy of the model per machine, in the model server (large_model)."""
        return False

    def socket_paths(self) -> set[str | None]:
        """The model-server sockets this handler's shared models use (None: the default
        socket); empty when every model runs in-process. Runners start or check a server
        at each."""
        return set()

    def model_spec(self) -> ModelSpec | None:
        """The model as data for the model server; None for handlers that only run in-process."""
        return None

    def model_key(self) -> str:
        """The key the model is registered under in the model server."""
        return self.cache_key()

    def cache_key(self) -> str:
        """Identifies the model version for the per-process cache: handlers with the same
        key share one loaded model; a new key in the same ``cache_slot`` is a new version."""
        return self._cache_token

    def cache_slot(self) -> str:
        """Identifies the model across its versions: one loaded version per slot."""
        return self.cache_key()

    def model_copies(self) -> int:
        return 1

    def get_preprocess_fns(self) -> list[Callable[[Any], Any]]:
        return []

    def get_postprocess_fns(self) -> list[Callable[[Any], Any]]:
        return []

    def with_preprocess_fn(self, fn: Callable[[Any], Any]) -> ModelHandler[Any, PredictionT, ModelT]:
        """A handler that applies ``fn`` to each example before batching."""
        return _PreProcessingModelHandler(self, fn)

    def with_postprocess_fn(self, fn: Callable[[Any], Any]) -> ModelHandler[ExampleT, Any, ModelT]:
        """A handler that applies ``fn`` to each prediction."""
        return _PostProcessingModelHandler(self, fn)


class _WrappingModelHandler(ModelHandler[Any, Any, Any]):
    """Delegates everything to the handler it wraps."""

    def __init__(self, base: ModelHandler[Any, Any, Any]):
        self._base = base

    def load_model(self) -> Any:
        return self._base.load_model()

    def run_inference(
        self, batch: Sequence[Any], model: Any, inference_args: dict[str, Any] | None = None
    ) -> Iterable[Any]:
        return self._base.run_inference(batch, model, inference_args)

    def get_num_bytes(self, batch: Sequence[Any]) -> int:
        return self._base.get_num_bytes(batch)

    def get_metrics_namespace(self) -> str:
        return self._base.get_metrics_namespace()

    def batch_elements_kwargs(self) -> Mapping[str, Any]:
        return self._base.batch_elements_kwargs()

    def validate_inference_args(self, inference_args: dict[str, Any] | None) -> None:
        self._base.validate_inference_args(inference_args)

    def update_model_path(
        self, model_path: str | None = None, *, sequence: tuple[int, int] | None = None
    ) -> None:
        with_sequence(self._base.update_model_path, model_path, sequence=sequence)

    def share_model_across_processes(self) -> bool:
        return self._base.share_model_across_processes()

    def socket_paths(self) -> set[str | None]:
        return self._base.socket_paths()

    def model_spec(self) -> ModelSpec | None:
        return self._base.model_spec()

    def model_key(self) -> str:
        return self._base.model_key()

    def cache_key(self) -> str:
        return self._base.cache_key()

    def cache_slot(self) -> str:
        return self._base.cache_slot()

    def model_copies(self) -> int:
        return self._base.model_copies()

    def get_preprocess_fns(self) -> list[Callable[[Any], Any]]:
        return self._base.get_preprocess_fns()

    def get_postprocess_fns(self) -> list[Callable[[Any], Any]]:
        return self._base.get_postprocess_fns()

    def __getattr__(self, name: str) -> Any:
        # Only for names this class lacks. Read __dict__: while unpickling, _base does
        # not exist yet, and self._base would call __getattr__ again, forever.
        base = self.__dict__.get("_base")
        if base is None:
            raise AttributeError(name)
        return getattr(base, name)


class _PreProcessingModelHandler(_WrappingModelHandler):
    def __init__(self, base: ModelHandler[Any, Any, Any], fn: Callable[[Any], Any]):
        super().__init__(base)
        self._fn = fn

    def get_preprocess_fns(self) -> list[Callable[[Any], Any]]:
        # Beam order: the most recently added preprocess fn runs first.
        return [self._fn, *self._base.get_preprocess_fns()]


class _PostProcessingModelHandler(_WrappingModelHandler):
    def __init__(self, base: ModelHandler[Any, Any, Any], fn: Callable[[Any], Any]):
        super().__init__(base)
        self._fn = fn

    def get_postprocess_fns(self) -> list[Callable[[Any], Any]]:
        return [*self._base.get_postprocess_fns(), self._fn]


def with_sequence(update: Callable[..., None], *args: Any, sequence: tuple[int, int] | None) -> None:
    """Call a handler's ``update_model_path`` (or ``update_model_paths``) for the update
    at ``sequence``: its place in the run's order of versions, (epoch, n), which the
    harness gives each update it applies (docs/refresh.md). beamlet's handlers record it
    and the model server refuses a swap to an older version; a handler whose method has
    no ``sequence`` (Beam's contract: a user's own) gets the update without it."""
    if sequence is not None and "sequence" in inspect.signature(update).parameters:
        update(*args, sequence=sequence)
    else:
        update(*args)


def _num_bytes(example: Any) -> int:
    if hasattr(example, "element_size") and hasattr(example, "nelement"):
        return int(example.element_size() * example.nelement())
    if hasattr(example, "nbytes"):
        return int(example.nbytes)
    if isinstance(example, dict):
        return sum(_num_bytes(v) for v in example.values())
    if isinstance(example, (list, tuple)):
        return sum(_num_bytes(v) for v in example)
    return len(str(example))
