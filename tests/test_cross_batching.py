"""Batching across workers in the model server (issue 12): requests for one model from
different processes and threads share forward passes, bounded by the handler's
``max_batch_size`` and ``max_batch_duration_secs``; each caller gets its own rows back;
0 turns merging off; a lone caller never waits. Real processes, a real server."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from typing import Any

import numpy as np
import pytest
import torch

from client import PytorchModelHandlerTensor, RunInference
from modelserver import userclass
from modelserver.channel import Channel
from modelserver.errors import BadRequest
from modelserver.loaders import ModelSpec
from tests import workers
from tests.conftest import start_server
from tests.hardening_models import GatedMLP
from tests.models import MLP, make_checkpoint

TOLERANCE = 1e-5  # a row computed in a merged batch may differ in the last digits


def model_stats(sock: str) -> dict:
    with Channel(sock) as ch:
        (m,) = ch.request({"op": "status"})["status"]["models"]
    return m


@pytest.mark.parametrize("delay", [None, 0.0], ids=["default delay", "zero delay"])
def test_one_element_calls_from_4_processes_x_4_threads_get_their_own_rows(sock_path, private_dir, delay):
    path = os.path.join(private_dir, "mlp.pt")
    make_checkpoint(path, seed=5)
    srv = start_server(sock_path)
    procs, threads, calls = 4, 4, 40
    try:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(procs) as pool:
            results = pool.starmap(
                workers.one_element_calls, [(path, sock_path, p, threads, calls, delay) for p in range(procs)]
            )
        for per_thread in results:
            assert len(per_thread) == threads
            for server_rows, local_rows in per_thread.values():
                np.testing.assert_allclose(server_rows, local_rows, rtol=0, atol=TOLERANCE)
        stats = model_stats(sock_path)
        assert stats["requests"] == procs * threads * calls
        if delay == 0.0:
            assert stats["batches"] == stats["requests"], stats  # never merged
        else:
            # 16 callers, each with one request in flight at a time: merged batches
            assert stats["batches"] < stats["requests"] / 3, stats
        print(f"delay {delay}: {stats['requests']} requests in {stats['batches']} forward passes")
    finally:
        srv.stop()


def test_a_lone_caller_never_waits_for_the_queue_delay(sock_path, private_dir):
    """With a 0.5 s delay, a lone caller's 20 sequential one-element calls would take 10 s
    if each waited for company; nobody else is there, so none waits."""
    path = os.path.join(private_dir, "mlp.pt")
    model = make_checkpoint(path)
    srv = start_server(sock_path)
    handler = PytorchModelHandlerTensor(
        path, MLP, {}, max_batch_size=64, max_batch_duration_secs=0.5, large_model=True, socket_path=sock_path
    )
    try:
        list([torch.zeros(8)] | RunInference(handler))  # load
        xs = [torch.randn(8) for _ in range(20)]
        start = time.monotonic()
        got = [next(iter([x] | RunInference(handler))).inference for x in xs]
        took = time.monotonic() - start
        with torch.inference_mode():
            np.testing.assert_allclose(torch.stack(got), model(torch.stack(xs)), rtol=0, atol=TOLERANCE)
        assert took < 3.0, f"20 lone calls took {took:.2f}s: they waited for the queue delay"
    finally:
        srv.stop()


def test_batches_never_pass_the_handlers_max_batch_size(sock_path, private_dir):
    """Two callers pipeline 3-row requests at a held model whose handler allows 4 rows a
    batch: no forward pass ever sees more than one request. (One compute thread, so that
    all but the held request queue where they could merge.)"""
    gate = os.path.join(private_dir, "gate")
    srv = start_server(sock_path, "--compute-threads", "1")
    spec = ModelSpec("pytorch_state_dict", None, userclass.describe(GatedMLP), {"gate": gate})
    batching = {"max_batch_size": 4, "max_batch_duration_secs": 0.05}
    xs = [[torch.randn(3, 8) for _ in range(5)] for _ in range(2)]
    out: dict[int, list] = {}

    def send(c: int) -> None:
        with Channel(sock_path) as ch:
            out[c] = ch.request_many([{"op": "infer", "key": "g", "inputs": x} for x in xs[c]])

    try:
        with Channel(sock_path) as ch:
            ch.request({"op": "load", "key": "g", "spec": spec.to_wire(), "batching": batching})
        threads = [threading.Thread(target=send, args=(c,)) for c in range(2)]
        for t in threads:
            t.start()
        try:
            deadline = time.monotonic() + 20
            # one caller's first request is held by the gate (its reader reads no further
            # meanwhile), the other caller's five queue behind it
            while model_stats(sock_path)["in_flight"] < 6:
                assert time.monotonic() < deadline, model_stats(sock_path)
                time.sleep(0.01)
        finally:
            open(gate, "w").close()
            for t in threads:
                t.join(30)
        stats = model_stats(sock_path)
        assert stats["requests"] == stats["batches"] == 10, stats
        reference = GatedMLP(gate=gate).eval()
        with torch.inference_mode():
            for c in range(2):
                for x, reply in zip(xs[c], out[c]):
                    torch.testing.assert_close(reply["outputs"], reference(x), rtol=0, atol=TOLERANCE)
    finally:
        srv.stop()


def test_a_bad_batching_setting_is_refused_by_name(server, sock_path):
    spec = ModelSpec("pytorch_state_dict", None, {"name": "torch.nn:Identity", "source": None})
    with Channel(sock_path) as ch:
        for bad, field in (
            ({"max_batch_size": 0}, "max_batch_size"),
            ({"max_batch_size": 2.5}, "max_batch_size"),
            ({"max_batch_duration_secs": -1}, "max_batch_duration_secs"),
            ({"max_batch_duration_secs": "soon"}, "max_batch_duration_secs"),
            ({"delay": 1}, "batching"),
        ):
            with pytest.raises(BadRequest, match=field):
                ch.request({"op": "load", "key": "i", "spec": spec.to_wire(), "batching": bad})
        assert ch.request({"op": "status"})["status"]["models"] == []


def test_forwards_run_on_the_models_thread_not_on_one_team_per_connection(sock_path):
    """32 connections take turns running forwards of an MLP big enough for torch to use
    its intra-op threads, each finding the model idle. Forwards run only on the model's
    batcher thread, so the server gains a reader thread per connection and nothing more.
    (When an idle model's forward ran on the reader thread, each reader kept an OpenMP
    team of its own: this test then saw 33 more threads.)"""
    import psutil

    from modelserver import userclass
    from modelserver.loaders import ModelSpec as Spec

    srv = start_server(sock_path)
    server = psutil.Process(srv.proc.pid)
    spec = Spec(
        "pytorch_state_dict", None, userclass.describe(MLP), {"d_in": 256, "hidden": 1024, "d_out": 4}
    )
    try:
        with Channel(sock_path) as ch:
            ch.request({"op": "load", "key": "m", "spec": spec.to_wire()})
            ch.request({"op": "infer", "key": "m", "inputs": torch.randn(64, 256)})  # the batcher's team
        n = 32
        chans = [Channel(sock_path) for _ in range(n)]
        baseline = server.num_threads()  # now with a reader per channel
        for _ in range(3):  # one at a time: each finds the model idle
            for ch in chans:
                ch.request({"op": "infer", "key": "m", "inputs": torch.randn(64, 256)})
        grown = server.num_threads() - baseline
        for ch in chans:
            ch.close()
        assert grown <= 4, f"the server gained {grown} threads while {n} connections ran forwards"
    finally:
        srv.stop()


@pytest.mark.parametrize("compute_threads", [1, 2])
def test_forwards_of_one_model_run_on_as_many_compute_threads_as_the_server_is_given(
    sock_path, private_dir, compute_threads
):
    """Two callers' requests at a held model: with two compute threads both are computed
    at once (each on its own thread), with one the second waits; every reply is its own."""
    gate = os.path.join(private_dir, "gate")
    srv = start_server(sock_path, "--threads", "2", "--compute-threads", str(compute_threads))
    spec = ModelSpec("pytorch_state_dict", None, userclass.describe(GatedMLP), {"gate": gate})
    xs = [torch.randn(3, 8) for _ in range(2)]
    out: dict[int, Any] = {}

    def send(c: int) -> None:
        with Channel(sock_path) as ch:
            out[c] = ch.request({"op": "infer", "key": "g", "inputs": xs[c]})["outputs"]

    try:
        with Channel(sock_path) as ch:
            ch.request(
                {"op": "load", "key": "g", "spec": spec.to_wire(), "batching": {"max_batch_duration_secs": 0}}
            )
        threads = [threading.Thread(target=send, args=(c,)) for c in range(2)]
        for t in threads:
            t.start()
        try:
            deadline = time.monotonic() + 20
            # both requests arrived and the threads took what they can: K running, the rest queued
            while not (
                (stats := model_stats(sock_path))["in_flight"] == 2 and stats["running"] == compute_threads
            ):
                assert time.monotonic() < deadline, stats
                time.sleep(0.01)
            assert stats["compute_threads"] == compute_threads and stats["queued"] == 2 - compute_threads, (
                stats
            )
            for _ in range(5):  # and stays so while the gate holds them
                stats = model_stats(sock_path)
                assert stats["running"] == compute_threads and stats["in_flight"] == 2, stats
        finally:
            open(gate, "w").close()
            for t in threads:
                t.join(30)
        reference = GatedMLP(gate=gate).eval()
        with torch.inference_mode():
            for c in range(2):
                torch.testing.assert_close(out[c], reference(xs[c]), rtol=0, atol=TOLERANCE)
        assert model_stats(sock_path)["running"] == 0
    finally:
        srv.stop()
