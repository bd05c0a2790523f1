"""Small torch models for tests/test_server_hardening.py (importable by the server)."""

from __future__ import annotations

import os
import time

import torch
from torch import nn


class SlowLoad(nn.Module):
    """Its construction waits while the file ``hold`` exists (up to ``limit`` seconds):
    a test holds a load or reload open for as long as it needs, without sleeping itself.
    ``d``: a d x d ballast layer (4 * d * d bytes), for memory budgets."""

    def __init__(self, hold: str, d: int = 0, limit: float = 30.0):
        super().__init__()
        deadline = time.monotonic() + limit
        while os.path.exists(hold) and time.monotonic() < deadline:
            time.sleep(0.005)
        self.scale = nn.Parameter(torch.full((1,), 2.0))
        self.ballast = nn.Linear(d, d, bias=False) if d else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class GatedMLP(nn.Module):
    """An MLP whose forward waits for the file ``gate`` (up to ``limit`` seconds): requests
    sent meanwhile queue up behind the one it holds."""

    def __init__(self, gate: str, d_in: int = 8, hidden: int = 64, d_out: int = 5, limit: float = 30.0):
        super().__init__()
        self.gate = gate
        self.limit = limit
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        deadline = time.monotonic() + self.limit
        while not os.path.exists(self.gate) and time.monotonic() < deadline:
            time.sleep(0.002)
        return self.net(x)


class Faulty(nn.Module):
    """Raises from inside its own code, ``depth`` calls down (alternating between two
    methods, so that no traceback line repeats)."""

    def __init__(self, depth: int = 3):
        super().__init__()
        self.depth = depth
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._left(x, self.depth)

    def _left(self, x: torch.Tensor, depth: int) -> torch.Tensor:
        if depth > 0:
            return self._right(x, depth - 1)
        raise ZeroDivisionError(f"the model's own bug, on {x.shape[0]} rows")

    def _right(self, x: torch.Tensor, depth: int) -> torch.Tensor:
        return self._left(x, depth - 1)


class Wide(nn.Module):
    """``n`` small layers: a checkpoint of one width does not fit another in 2n ways."""

    def __init__(self, n: int = 300, d: int = 2):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class Slow(nn.Module):
    """Takes ``load_seconds`` to build and ``forward_seconds`` per batch: a model slower
    than a client's request deadline (the wait is the behaviour under test)."""

    def __init__(self, load_seconds: float = 0.0, forward_seconds: float = 0.0):
        super().__init__()
        time.sleep(load_seconds)
        self.forward_seconds = forward_seconds
        self.scale = nn.Parameter(torch.full((1,), 3.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.forward_seconds)
        return x * self.scale
