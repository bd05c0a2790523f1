"""Compute threads belong to whoever computes.

A worker whose RunInference steps all keep their models in the model server
(``large_model=True``) computes nothing heavy itself: the server owns the machine's
compute threads. Such a worker runs torch with one intra-op and one inter-op thread, and
``OMP_NUM_THREADS=1``, ``MKL_NUM_THREADS=1``, ``OMP_WAIT_POLICY=PASSIVE`` in its
environment, so that no OpenMP team of its own spins against the server's.

A worker that keeps a model in-process (or runs no RunInference at all) gets torch's
intra-op threads of the harness process (torch's default: the machine's cores) divided
among the run's workers, at least one each: every worker's threads together then match
the cores, as torch's default means for one process. Each Python thread of a worker that
runs a forward pass has an OpenMP team of that size of its own (OpenMP teams belong to the
thread that starts them), so ``--threads`` above one may still oversubscribe a small
machine: docs/runtime.md says what we measured. ``OMP_NUM_THREADS`` or
``MKL_NUM_THREADS`` set by the user win: such workers keep what those say.

When it takes effect: an exec'd worker gets the environment before Python starts, so
OpenMP reads it when it initialises; a forked worker inherits an OpenMP runtime that
initialised when the harness imported torch, with the harness's environment, so the
environment there only reaches what the worker starts; what counts is
``torch.set_num_threads``, which both apply before the worker boots. With one thread
torch never starts an OpenMP team, so OpenMP's wait policy has no thread to apply to.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("beamlet.worker")

USER_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
SERVER_ONLY_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


@dataclass(frozen=True)
class ComputeThreads:
    """How many torch threads a worker computes with: ``intra_op`` for
    ``torch.set_num_threads``, ``inter_op`` for ``torch.set_num_interop_threads`` (None:
    leave torch's), ``env`` for its environment, and ``why``, in words."""

    intra_op: int | None = None
    inter_op: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    why: str = "torch's defaults"

    def to_wire(self) -> dict[str, Any]:
        return {"intra_op": self.intra_op, "inter_op": self.inter_op, "env": self.env, "why": self.why}

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> ComputeThreads:
        return cls(
            data.get("intra_op"), data.get("inter_op"), dict(data.get("env") or {}), data.get("why", "")
        )


def for_workers(
    steps: Iterable[Any], workers: int, process_threads: int, environ: Mapping[str, str] = os.environ
) -> ComputeThreads:
    """The plan for every worker of a run of ``steps`` on ``workers`` workers, when this
    process would compute with ``process_threads`` threads."""
    from runtime.pipeline import InferenceStep

    inference = [s for s in steps if isinstance(s, InferenceStep)]
    if inference and all(s.transform.handler.share_model_across_processes() for s in inference):
        return ComputeThreads(1, 1, dict(SERVER_ONLY_ENV), "its models live in the model server")
    chosen = [f"{name}={environ[name]}" for name in USER_VARS if environ.get(name)]
    if chosen:
        return ComputeThreads(why=f"as {', '.join(chosen)} says")
    share = max(1, process_threads // workers)
    return ComputeThreads(
        share, None, {"OMP_NUM_THREADS": str(share)}, f"{process_threads} threads shared by {workers} workers"
    )


def process_threads() -> int:
    """The intra-op threads this process computes with: torch's, if torch is imported
    (its default: the machine's cores), else the CPUs this process may run on."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return int(torch.get_num_threads())
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def apply(plan: ComputeThreads) -> None:
    """In a worker, before it boots: set ``plan.env`` and torch's thread counts (torch only
    if the pipeline imported it: a pipeline without torch does not pay for its import)."""
    os.environ.update(plan.env)
    torch = sys.modules.get("torch")
    if torch is None:
        return
    if plan.intra_op is not None:
        torch.set_num_threads(plan.intra_op)
    if plan.inter_op is not None and torch.get_num_interop_threads() != plan.inter_op:
        try:
            torch.set_num_interop_threads(plan.inter_op)
        except RuntimeError as exc:  # the inter-op pool has started already: keep it
            log.info("cannot set torch's inter-op threads to %d: %s", plan.inter_op, exc)
