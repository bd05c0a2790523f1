"""Small real torch models made for the tests."""

from __future__ import annotations

import os
import time

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
    flight for as long as it needs, without sleeping in the test itself."""

    def __init__(self, gate: str, limit: float = 30.0, d: int = 0):
        super().__init__()
        self.gate = gate
        self.limit = limit
        self.scale = nn.Parameter(torch.ones(1))
        self.ballast = nn.Linear(d, d, bias=False) if d else None  # 4 * d * d bytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        deadline = time.monotonic() + self.limit
        while not os.path.exists(self.gate) and time.monotonic() < deadline:
            time.sleep(0.005)
        return x * self.scale


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
