"""Batch-1 traffic from several worker processes, each with several threads: every
``RunInference`` call carries one element (a streaming source, an online request per
element). Runs in spawned processes for ``bench.compare`` benchmark 5."""

from __future__ import annotations

import time
from typing import Any

import torch


def worker(
    conn: Any, barrier: Any, state: str, socket_path: str | None, threads: int, calls: int, width: int
) -> None:
    """Build the handler (large_model when ``socket_path`` is given), warm it up, wait for
    every worker at ``barrier``, then make ``threads`` x ``calls`` one-element calls and
    send back (calls made, start, end, each call's latency in microseconds), start and end
    on the machine-wide monotonic clock. ``width``: the model is ``WideMLP(width, 4)``
    (0: ``BenchMLP``)."""
    from bench import common
    from bench.common import BenchMLP, WideMLP
    from client import PytorchModelHandlerTensor, RunInference

    model_class: Any = WideMLP if width else BenchMLP
    params = {"width": width, "depth": 4} if width else {}
    d_in, d_out = (width, width) if width else (512, 16)

    try:
        handler = PytorchModelHandlerTensor(
            state,
            model_class,
            params,
            max_batch_size=64,
            large_model=socket_path is not None,
            socket_path=socket_path,
        )
        g = torch.Generator().manual_seed(1)
        xs = [torch.randn(d_in, generator=g) for _ in range(calls)]
        for x in xs[:20]:  # loads the model (here or in the server), warms the path
            list([x] | RunInference(handler))
        done = [0] * threads
        latencies: list[list[float]] = [[] for _ in range(threads)]

        def work(t: int) -> None:
            clock = time.perf_counter
            for x in xs:
                t0 = clock()
                (result,) = list([x] | RunInference(handler))
                latencies[t].append((clock() - t0) * 1e6)
                done[t] += result.inference.shape[0] == d_out

        barrier.wait(120)
        start = time.monotonic()
        common.run_threads(work, threads)
        end = time.monotonic()
        conn.send(("ok", (sum(done), start, end, [v for per in latencies for v in per])))
    except BaseException as exc:  # reported to the parent
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
