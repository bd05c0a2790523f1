"""Code that runs in spawned test processes (importable by name, so spawn can find it)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def run_threads(work, n: int, errors: list[BaseException]) -> None:
    """Run work(0..n-1) on n threads; raise the first error any of them reported."""
    ts = [threading.Thread(target=work, args=(t,)) for t in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise errors[0]


@contextmanager
def keep_sending(client, key: str, x: torch.Tensor, n: int) -> Iterator[tuple[list, list]]:
    """``n`` threads send ``x`` to ``key`` without pause while the block runs; yields the
    (model_id, outputs) replies and the errors, as they come."""
    stop, seen, errors = threading.Event(), [], []

    def send() -> None:
        while not stop.is_set():
            try:
                reply = client.infer(key, x)
                seen.append((reply["model_id"], reply["outputs"]))
            except Exception as exc:
                errors.append(exc)

    threads = [threading.Thread(target=send) for _ in range(n)]
    for t in threads:
        t.start()
    try:
        yield seen, errors
    finally:
        stop.set()
        for t in threads:
            t.join(30)


def local_mlp(path: str):
    """The checkpoint's MLP, loaded in this process, for comparison."""
    from tests.models import MLP

    local = MLP()
    local.load_state_dict(torch.load(path, weights_only=True))
    return local.eval()


def infer_from_threads(path: str, sock: str, proc_index: int, threads: int, rows: int) -> dict:
    """M threads in this process each run RunInference(large_model=True) on their own data;
    returns the server's outputs and torch's in-process outputs for comparison."""
    from client import PytorchModelHandlerTensor, RunInference
    from tests.models import MLP

    handler = PytorchModelHandlerTensor(
        path, MLP, {}, max_batch_size=16, min_batch_size=16, large_model=True, socket_path=sock
    )
    local = local_mlp(path)
    out: dict = {}
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            g = torch.Generator().manual_seed(proc_index * 1000 + t)
            xs = [torch.randn(8, generator=g) for _ in range(rows)]
            results = list(xs | RunInference(handler))
            assert [r.example for r in results] == xs
            server = torch.stack([r.inference for r in results])
            with torch.inference_mode():
                expected = torch.cat([local(torch.stack(xs[i : i + 16])) for i in range(0, rows, 16)])
            out[t] = (server.numpy(), expected.numpy(), {r.model_id for r in results})
        except BaseException as exc:  # reported to the parent
            errors.append(exc)

    run_threads(work, threads, errors)
    return {t: (a, b, ids) for t, (a, b, ids) in out.items()}


def keyed_workload(sock: str, models: dict, seed: int, n: int) -> dict:
    """Random keys over several large-model Blobs through one KeyedModelHandler; compares
    every result with the same model run in this process."""
    import random

    from client import KeyedModelHandler, KeyModelMapping, PytorchModelHandlerTensor, RunInference
    from tests.models import Blob

    mappings = []
    local = {}
    for key, (path, d) in models.items():
        h = PytorchModelHandlerTensor(
            path, Blob, {"d": d}, large_model=True, socket_path=sock, min_batch_size=4, max_batch_size=4
        )
        mappings.append(KeyModelMapping([key], h))
        m = Blob(d)
        m.load_state_dict(torch.load(path, weights_only=True))
        local[key] = m.eval()
    keyed = KeyedModelHandler(mappings)
    rng = random.Random(seed)
    keys = list(models)
    examples = []
    for _ in range(n):
        key = rng.choice(keys)
        g = torch.Generator().manual_seed(rng.randrange(1 << 30))
        examples.append((key, torch.randn(models[key][1], generator=g)))
    results = list(examples | RunInference(keyed))
    bad = 0
    with torch.inference_mode():
        for (key, x), (rkey, r) in zip(examples, results):
            if rkey != key or not torch.allclose(r.inference, local[key](x[None])[0], atol=1e-4):
                bad += 1
    return {"n": len(results), "bad": bad}


def keyed_side_args(path: str, sock: str, proc_index: int, threads: int, calls: int) -> dict:
    """T threads, each making ``calls`` RunInference calls through one large-model
    PytorchModelHandlerKeyedTensor, every call with its own tensor ``offset`` and float
    ``scale`` inference_args; every result compared with the same call in this process."""
    from client import PytorchModelHandlerKeyedTensor, RunInference
    from tests.models import KeyedWithArgs

    handler = PytorchModelHandlerKeyedTensor(
        path, KeyedWithArgs, {}, min_batch_size=4, max_batch_size=4, large_model=True, socket_path=sock
    )
    local = KeyedWithArgs()
    local.load_state_dict(torch.load(path, weights_only=True))
    local.eval()
    counts = {"requests": 0, "rows": 0, "wrong": 0}
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            g = torch.Generator().manual_seed(proc_index * 1000 + t)
            for c in range(calls):
                args = {"offset": torch.randn(4, generator=g) * 100, "scale": float(1 + proc_index + t + c)}
                xs = [
                    {"k1": torch.randn(4, generator=g), "k2": torch.randn(4, generator=g)} for _ in range(12)
                ]
                results = list(xs | RunInference(handler, inference_args=args))
                wrong = 0
                with torch.no_grad():
                    for x, r in zip(xs, results, strict=True):
                        want = local(x["k1"][None], x["k2"][None], **args)[0]
                        if r.example is not x or not torch.allclose(r.inference, want, atol=1e-4):
                            wrong += 1
                with lock:
                    counts["requests"] += 1
                    counts["rows"] += len(results)
                    counts["wrong"] += wrong
        except BaseException as exc:  # reported to the parent
            errors.append(exc)

    run_threads(work, threads, errors)
    return counts


def one_element_calls(
    path: str, sock: str, proc_index: int, threads: int, calls: int, delay: float | None
) -> dict:
    """Each of ``threads`` threads makes ``calls`` RunInference calls of one element each
    (batch-1 traffic, as from a streaming source) on a large_model handler; returns, per
    thread, the server's rows and this process's own model's rows for the same inputs."""
    from client import PytorchModelHandlerTensor, RunInference
    from tests.models import MLP

    handler = PytorchModelHandlerTensor(
        path, MLP, {}, max_batch_size=64, max_batch_duration_secs=delay, large_model=True, socket_path=sock
    )
    local = local_mlp(path)
    out: dict = {}
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            g = torch.Generator().manual_seed(proc_index * 1000 + t)
            xs = [torch.randn(8, generator=g) for _ in range(calls)]
            got = []
            for x in xs:
                (result,) = list([x] | RunInference(handler))
                assert result.example is x
                got.append(result.inference)
            with torch.inference_mode():
                expected = local(torch.stack(xs))
            out[t] = (torch.stack(got).numpy(), expected.numpy())
        except BaseException as exc:  # reported to the parent
            errors.append(exc)

    run_threads(work, threads, errors)
    return out
