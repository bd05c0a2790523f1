"""Keyed examples and many models: Beam's KeyedModelHandler and KeyModelMapping.

Examples are ``(key, example)`` pairs and results come back as ``(key, result)``, in
input order. With one handler, every key uses the same model. With a list of
``KeyModelMapping(keys, handler)``, each key goes to the model mapped to it; examples of
the same model are batched together whatever their key.

Where the models live follows each mapped handler: ``large_model=True`` handlers keep
their model in the model server, whose manager decides by measured memory which stay
loaded; the others are loaded in this process, at most ``max_models_per_worker_hint`` at
a time (least recently used first out), as in Beam.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from client.base import with_sequence
from client.cache import ModelCache, models
from client.handlers import ModelHandler


@dataclass(frozen=True)
class KeyModelMapping:
    """These keys use this model handler."""

    keys: list[str]
    mh: ModelHandler[Any, Any, Any]

    def __post_init__(self) -> None:
        if not self.keys:
            raise ValueError("a KeyModelMapping needs at least one key")


@dataclass(frozen=True)
class KeyModelPathMapping:
    """A model update for a keyed handler (Beam's KeyModelPathMapping): the model that
    serves ``keys`` now loads from ``update_path``. ``model_id`` is informational."""

    keys: list[str]
    update_path: str
    model_id: str = ""

    def __post_init__(self) -> None:
        if not self.keys:
            raise ValueError("a KeyModelPathMapping needs at least one key")
        if not self.update_path:
            raise ValueError("a KeyModelPathMapping needs an update_path")


class _KeyedModels:
    """What KeyedModelHandler.load_model returns: the per-key models, loaded on demand.

    In-process models live in a cache of their own (``client.cache.ModelCache``: new
    versions load aside, rejected ones keep the current one serving), of which at most
    ``max_models_per_worker_hint`` are kept, least recently used first out."""

    def __init__(self, handler: KeyedModelHandler):
        self._handler = handler
        self._lock = threading.Lock()
        self._local: OrderedDict[int, None] = OrderedDict()  # mapping indexes held, oldest use first
        self._cache = ModelCache()
        self.evictions = 0

    def model_for(self, index: int) -> Any:
        mh = self._handler.mappings[index].mh
        if mh.share_model_across_processes():
            return models.get(mh)  # a RemoteModel: the server manages the memory
        model = self._cache.get(mh)
        dropped = []
        with self._lock:
            self._local[index] = None
            self._local.move_to_end(index)
            hint = self._handler.max_models_per_worker_hint
            while hint is not None and len(self._local) > hint:
                dropped.append(self._local.popitem(last=False)[0])
                self.evictions += 1
        for i in dropped:
            self._cache.drop(self._handler.mappings[i].mh)
        return model

    def wait_for_updates(self, timeout: float = 60.0) -> bool:
        """Wait until no new version is loading (for tests and tools); True if none is."""
        return self._cache.wait_idle(timeout)


class KeyedModelHandler(ModelHandler[tuple[str, Any], tuple[str, Any], _KeyedModels]):
    """Routes keyed examples to models by key (Beam's KeyedModelHandler)."""

    def __init__(
        self,
        unkeyed: ModelHandler[Any, Any, Any] | list[KeyModelMapping],
        max_models_per_worker_hint: int | None = None,
    ):
        super().__init__()
        if isinstance(unkeyed, ModelHandler):
            self.mappings = [KeyModelMapping(["*"], unkeyed)]
            self._route: dict[str, int] = {}
            self._default: int | None = 0
        else:
            self.mappings = list(unkeyed)
            if not self.mappings:
                raise ValueError("KeyedModelHandler needs a handler or at least one KeyModelMapping")
            self._route = {}
            for i, m in enumerate(self.mappings):
                for key in m.keys:
                    if key in self._route:
                        raise ValueError(f"key {key!r} is mapped to more than one model")
                    self._route[key] = i
            self._default = None
        if max_models_per_worker_hint is not None and max_models_per_worker_hint < 1:
            raise ValueError("max_models_per_worker_hint must be at least 1")
        self.max_models_per_worker_hint = max_models_per_worker_hint

    def model_index(self, key: str) -> int:
        index = self._route.get(key, self._default)
        if index is None:
            raise KeyError(f"no model is mapped to key {key!r}")
        return index

    def load_model(self) -> _KeyedModels:
        return _KeyedModels(self)

    def run_inference(
        self,
        batch: Sequence[tuple[str, Any]],
        model: _KeyedModels,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[tuple[str, Any]]:
        groups: dict[int, list[int]] = {}
        for pos, (key, _example) in enumerate(batch):
            groups.setdefault(self.model_index(key), []).append(pos)
        out: list[Any] = [None] * len(batch)
        for index, positions in groups.items():
            mh = self.mappings[index].mh
            examples = [batch[p][1] for p in positions]
            for fn in mh.get_preprocess_fns():  # a mapped handler's own, as its postprocess fns below
                examples = [fn(x) for x in examples]
            results = list(mh.run_inference(examples, model.model_for(index), inference_args))
            for fn in mh.get_postprocess_fns():
                results = [fn(r) for r in results]
            if len(results) != len(examples):
                raise RuntimeError(
                    f"model for keys {self.mappings[index].keys} returned {len(results)} results for {len(examples)} examples"
                )
            for p, r in zip(positions, results):
                out[p] = (batch[p][0], r)
        return out

    def get_num_bytes(self, batch: Sequence[tuple[str, Any]]) -> int:
        return sum(self.mappings[self.model_index(k)].mh.get_num_bytes([x]) for k, x in batch)

    def batch_elements_kwargs(self) -> Mapping[str, Any]:
        return self.mappings[0].mh.batch_elements_kwargs()

    def get_metrics_namespace(self) -> str:
        return "BeamML_Keyed"

    def share_model_across_processes(self) -> bool:
        return any(m.mh.share_model_across_processes() for m in self.mappings)

    def update_model_path(
        self, model_path: str | None = None, *, sequence: tuple[int, int] | None = None
    ) -> None:
        if len(self.mappings) == 1:
            with_sequence(self.mappings[0].mh.update_model_path, model_path, sequence=sequence)
        else:
            raise ValueError("a keyed handler with several models updates per key (KeyModelPathMapping)")

    def update_model_paths(
        self,
        model: Any = None,
        model_paths: list[KeyModelPathMapping] | None = None,
        *,
        sequence: tuple[int, int] | None = None,
    ) -> None:
        """Apply Beam's keyed update: each mapping's keys must all be served by one model,
        whose handler then loads from ``update_path`` (for all of its keys). ``model`` is
        unused (Beam passes the loaded models). ``sequence``: the update's place in the
        run's order (``client.base.with_sequence``), given to each model it moves."""
        plan: list[tuple[int, str]] = []
        for update in model_paths or []:
            indexes = set()
            for key in update.keys:
                if key not in self._route:
                    raise ValueError(f"model update for key {key!r}: no model is mapped to that key")
                indexes.add(self._route[key])
            if len(indexes) != 1:
                raise ValueError(
                    f"model update for keys {update.keys}: they are served by different models; "
                    "update each model's keys in their own KeyModelPathMapping"
                )
            plan.append((indexes.pop(), update.update_path))
        for index, path in plan:  # all checked first: an update applies whole or not at all
            with_sequence(self.mappings[index].mh.update_model_path, path, sequence=sequence)

    def socket_paths(self) -> set[str | None]:
        return set().union(*(m.mh.socket_paths() for m in self.mappings))


def keyed_handler_of(handler: Any) -> KeyedModelHandler | None:
    """The KeyedModelHandler under any pre/post-processing wrappers, if there is one."""
    while True:
        if isinstance(handler, KeyedModelHandler):
            return handler
        base = handler.__dict__.get("_base")
        if base is None:
            return None
        handler = base
