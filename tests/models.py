"""Small real torch models made for the tests."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, d_in: int = 8, hidden: int = 16, d_out: int = 3):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TwoInputs(nn.Module):
    """Keyed-tensor model: called as model(a=..., b=...)."""

    def __init__(self, d: int = 4):
        super().__init__()
        self.a = nn.Linear(d, 2)
        self.b = nn.Linear(d, 2)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.a(a) + self.b(b)


class Gate(nn.Module):
    """Holds each batch until the file ``gate`` exists: lets a test keep a request in
    flight for as long as it needs, without sleeping in the test itself. ``entered``: a
    file that gets a line each time a batch enters the forward pass (a test waits on it to
    know a batch is held, not merely taken off the queue and still gathering)."""

    def __init__(self, gate: str, limit: float = 30.0, d: int = 0, entered: str = ""):
        super().__init__()
        self.gate = gate
        self.limit = limit
        self.entered = entered
        self.scale = nn.Parameter(torch.ones(1))
        self.ballast = nn.Linear(d, d, bias=False) if d else None  # 4 * d * d bytes

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None, note: str = "") -> torch.Tensor:
        if self.entered:
            with open(self.entered, "a") as f:
                f.write(f"{len(x)}\n")
        deadline = time.monotonic() + self.limit
        while not os.path.exists(self.gate) and time.monotonic() < deadline:
            time.sleep(0.005)
        return x * self.scale + (0 if t is None else t.sum())


def make_checkpoint(path: str, seed: int = 0, **params: int) -> nn.Module:
    torch.manual_seed(seed)
    model = MLP(**params)
    torch.save(model.state_dict(), path)
    return model.eval()


class Blob(nn.Module):
    """A square linear layer: 4 * d * d bytes of weights, for memory tests."""

    def __init__(self, d: int = 1024):
        super().__init__()
        self.lin = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def blob_side(megabytes: float) -> int:
    return int((megabytes * (1 << 20) / 4) ** 0.5)


def make_blob(path: str, megabytes: float, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = Blob(blob_side(megabytes))
    torch.save(model.state_dict(), path)
    return model.eval()


class KeyedWithArgs(nn.Module):
    """Keyed-tensor model with side arguments (Beam's
    PytorchLinearRegressionKeyedBatchAndExtraInferenceArgs, with arguments that change the
    numbers): ``offset`` is a tensor of shape [4] (as many rows as the tests' batches, so a
    runtime that guessed "batch input" from the leading dimension would get it wrong)."""

    def __init__(self, d: int = 4):
        super().__init__()
        self.lin = nn.Linear(d, 4)

    def forward(self, k1: torch.Tensor, k2: torch.Tensor, offset: torch.Tensor, scale: float = 1.0):
        return (self.lin(k1) + self.lin(k2)) * scale + offset

    def generate(self, k1: torch.Tensor, k2: torch.Tensor, offset: torch.Tensor, scale: float = 1.0):
        return self.forward(k1, k2, offset, scale) + 0.5


class WithGenerate(MLP):
    """An MLP with a second public method, as Beam's test models have."""

    def generate(self, x: torch.Tensor, bias: float = 0.5) -> torch.Tensor:
        return self.forward(x) + bias

    def _private(self, x: torch.Tensor) -> torch.Tensor:
        return x


class EnvProbe(nn.Module):
    """Its output is x * float($BEAMLET_TEST_ENV) in the process that runs it."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Linear(1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * float(os.environ.get("BEAMLET_TEST_ENV", "0"))


class TypedParams(nn.Module):
    """Takes model_params that are not plain data: a torch dtype and a dataclass."""

    def __init__(self, dtype: torch.dtype, config: LayerConfig):
        super().__init__()
        if not isinstance(dtype, torch.dtype) or not isinstance(config, LayerConfig):
            raise TypeError(f"got {type(dtype).__name__} and {type(config).__name__}")
        self.lin = nn.Linear(config.d_in, config.d_out).to(dtype)
        self.dtype = dtype

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        y = self.lin(x.to(self.dtype))
        return y if out_dtype is None else y.to(out_dtype)


@dataclass(frozen=True)
class LayerConfig:
    d_in: int = 8
    d_out: int = 3


class PlainDict(dict):
    """A dict subclass torch.load(weights_only=True) refuses to unpickle."""


class HandsBack(nn.Module):
    """Returns its input, a slice of it, the input changed in place, and a new tensor: the
    outputs that alias the request's memory and one that does not."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        rows = x[1:3]
        twice = x * 2
        return {"same": x, "rows": rows, "twice": twice, "halved": x.mul_(0.5)}
