"""RemoteModel: a model that lives in the model server, used as if it were local.

``load_model()`` of a ``large_model=True`` handler returns one. It stands in for the
module: ``model(x, **kwargs)``, ``model(**named_tensors)`` and the model's other public
methods by name (``model.generate(x)``, what Beam's ``make_tensor_model_fn("generate")``
calls) each send one batch to the server and return its outputs.

What is the batch and what is beside it. The server may merge this request with other
clients' requests for the same model, concatenating their batch inputs along dim 0; it
never concatenates side arguments, and merges only requests whose side arguments are
equal. So the proxy must tell them apart:

- a positional argument is the batch; every keyword argument is a side argument;
- with keyword arguments only (keyed tensors: ``model(**batched, **inference_args)``),
  inside a handler's ``run_inference`` the proxy knows the examples being run
  (``RemoteModel.batch``): a keyword that names a key of the examples and holds a tensor
  with one row per example is batch input; everything else (``inference_args``) is a
  side argument;
- outside ``run_inference``, keyword arguments are all side arguments: the request runs
  alone, so its results are exactly the model's, whatever else the server is doing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from modelserver.loaders import ModelSpec

log = logging.getLogger("beamlet.remote")


class RemoteModel:
    """A model in the model server. Thread-safe: every call takes its own pooled
    connection. ``last_model_id`` is, per thread, the version that ran this thread's last
    call; ``methods`` the public methods the server lets a client call.

    ``replace``: swap the key to ``spec`` (an update), or attach to the version the key
    already serves (a worker joining a running job), loading ``spec`` only when the key
    is new to the server. ``sequence``: the update's place in the key's order; a swap to
    a version older than the served one attaches to the served one instead, and ``spec``
    and ``model_id`` then name that. ``batching``: how the server merges the key's
    requests from every caller (``ServerClient.load``); ``copies``: how many copies of
    the model the server holds (``model_copies``).
    """

    def __init__(
        self,
        server: Any,
        key: str,
        spec: ModelSpec,
        *,
        replace: bool = False,
        batching: dict[str, Any] | None = None,
        sequence: tuple[int, int] | None = None,
        copies: int = 1,
    ):
        self._server = server
        self.key = key
        self._local = threading.local()
        info = server.load(key, spec, replace=replace, batching=batching, sequence=sequence, copies=copies)
        served = info.get("spec")
        self.spec = ModelSpec.from_wire(served) if isinstance(served, dict) else spec
        self.model_id: str = info.get("model_id") or self.spec.model_id
        self.device = info.get("device")
        self.nbytes = info.get("nbytes", 0)
        self.methods: frozenset[str] = frozenset(info.get("methods") or ("forward",))
        if spec.device.upper() == "GPU" and self.device == "cpu":
            log.warning("model %s asked for a GPU; the model server runs it on the CPU", key)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call("forward", args, kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._call("forward", args, kwargs)

    def __getattr__(self, name: str) -> Any:
        # Only reached for names the class does not define. Read __dict__, never
        # attributes: an object being unpickled has no 'methods' yet.
        methods = self.__dict__.get("methods")
        if name.startswith("_") or methods is None or name not in methods:
            raise AttributeError(
                f"remote model {self.__dict__.get('key')!r} has no public method {name!r}"
                + (f"; it has: {', '.join(sorted(methods))}" if methods else "")
            )

        def method(*args: Any, **kwargs: Any) -> Any:
            return self._call(name, args, kwargs)

        method.__name__ = name
        return method

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *self.__dict__.get("methods", ())})

    @contextmanager
    def batch(self, examples: Sequence[Any]) -> Iterator[None]:
        """Calls made by this thread inside the block run ``examples``: a keyword argument
        named after a key of the examples, holding one row per example, is batch input."""
        first = examples[0] if len(examples) else None
        keys = frozenset(first) if isinstance(first, dict) else frozenset()
        saved = getattr(self._local, "batch", None)
        self._local.batch = (len(examples), keys)
        try:
            yield
        finally:
            self._local.batch = saved

    def _call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if len(args) > 1:
            raise TypeError(
                "a remote model takes its batch as one positional argument (a tensor, or a map "
                "of tensors) and side arguments by keyword"
            )
        if args:
            inputs: Any = args[0]
            side = kwargs
        else:
            rows, keys = getattr(self._local, "batch", None) or (0, frozenset())
            inputs = {k: v for k, v in kwargs.items() if k in keys and _has_rows(v, rows)}
            side = {k: v for k, v in kwargs.items() if k not in inputs}
        reply = self._server.infer(self.key, inputs, side, method)
        self._local.model_id = reply.get("model_id") or self.model_id
        return reply["outputs"]

    @property
    def last_model_id(self) -> str:
        return getattr(self._local, "model_id", self.model_id)


def _has_rows(value: Any, rows: int) -> bool:
    import torch

    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows
