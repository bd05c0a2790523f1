"""What the benchmarks share: the models, the data, and starting/stopping the processes
they measure (a model server, a msgpack echo server, memory-benchmark workers).

Model classes live at the top level of this module so the model server can load them
(``bench`` is not an installed package, so the client ships their source by value).
Every helper that starts a process stops and reaps it, even when the benchmark fails.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from client import autostart
from modelserver import config, userclass
from modelserver.channel import Channel
from modelserver.loaders import ModelSpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "bench", "results")
START_TIMEOUT = 60.0


# -- models and data -----------------------------------------------------------------
class BenchMLP(nn.Module):
    """The throughput model: 512 -> 2048 -> 2048 -> 16 with ReLUs (about 21 MB of weights)."""

    def __init__(self, d_in: int = 512, hidden: int = 2048, d_out: int = 16):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_in, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, d_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class WideMLP(nn.Module):
    """The memory model: ``depth`` square layers of ``width`` (4096 x 4 is 256 MiB of float32)."""

    def __init__(self, width: int = 4096, depth: int = 4):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(depth):
            if i:
                layers.append(nn.ReLU())
            layers.append(nn.Linear(width, width))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def make_rows(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """``n`` rows of ``d`` float32 features, the same for a given seed."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen, dtype=torch.float32)


def save_state_dict(model_class: type[nn.Module], params: dict[str, Any], path: str, seed: int = 0) -> int:
    """Build ``model_class(**params)`` with a fixed seed, save its state_dict; returns its bytes."""
    torch.manual_seed(seed)
    model = model_class(**params)
    torch.save(model.state_dict(), path)
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def identity_spec() -> ModelSpec:
    """``torch.nn.Identity`` as a spec: a model that costs nothing, so only the path is timed."""
    return ModelSpec("pytorch_state_dict", None, userclass.describe(nn.Identity), {}, "CPU")


# -- private directories and the model server ------------------------------------------
@contextmanager
def private_dir(prefix: str = "blb-") -> Iterator[str]:
    """A short private (0700) directory, removed afterwards (AF_UNIX paths stay < 108 bytes)."""
    path = tempfile.mkdtemp(prefix=prefix)
    os.chmod(path, 0o700)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def child_env() -> dict[str, str]:
    """The environment for a child that must import beamlet and ``bench`` from this checkout."""
    return config.child_env()  # beamlet's root is this checkout's, where bench lives


def stop_process(proc: subprocess.Popen[bytes], grace: float = 20.0) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL; always reaps."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


@dataclass
class ServerProcess:
    """A model server this benchmark started, on a socket in its own private directory."""

    path: str
    proc: subprocess.Popen[bytes]
    log_path: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    def channel(self) -> Channel:
        return Channel(self.path)

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""


@contextmanager
def model_server(*args: str) -> Iterator[ServerProcess]:
    """Run ``python -m modelserver serve`` on a fresh private socket for the block's duration."""
    with private_dir() as directory:
        path = os.path.join(directory, "ms.sock")
        log_path = os.path.join(directory, "modelserver.log")
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "modelserver",
                    "serve",
                    "--socket",
                    path,
                    "--log-level",
                    "WARNING",
                    *args,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=child_env(),
                cwd=ROOT,
            )
        server = ServerProcess(path, proc, log_path)
        try:
            autostart.wait_until_serving(path, proc, START_TIMEOUT)
            yield server
        except BaseException:
            tail = server.log_tail()
            if tail:
                print(f"--- model server log ---\n{tail}", file=sys.stderr)
            raise
        finally:
            stop_process(proc)


@dataclass
class EchoProcess:
    """The msgpack echo server (``bench.echo``) in its own process."""

    path: str
    proc: subprocess.Popen[bytes]


@contextmanager
def echo_server() -> Iterator[EchoProcess]:
    """Run ``python -m bench.echo PATH`` for the block's duration; ready once it accepts."""
    with private_dir() as directory:
        path = os.path.join(directory, "echo.sock")
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.echo", path], stdin=subprocess.DEVNULL, env=child_env(), cwd=ROOT
        )
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while True:
                try:
                    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                        s.connect(path)
                    break
                except OSError:
                    if proc.poll() is not None:
                        raise RuntimeError(f"echo server exited with code {proc.returncode}") from None
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"echo server did not listen at {path}") from None
                    time.sleep(0.02)
            yield EchoProcess(path, proc)
        finally:
            stop_process(proc, grace=5.0)


# -- the memory benchmark's worker ---------------------------------------------------------
def memory_worker(
    conn: Any,
    large_model: bool,
    state_path: str,
    params: dict[str, Any],
    socket_path: str | None,
    batches: int,
    batch_size: int,
) -> None:
    """A worker process of the memory benchmark: run ``batches`` batches through WideMLP
    (in-process, or via the model server with large_model=True), report ``("ready", n)``
    on ``conn``, then stay alive, holding whatever it loaded, until the parent sends
    ``"exit"`` (or closes the pipe)."""
    try:
        from client import PytorchModelHandlerTensor, RunInference

        torch.manual_seed(os.getpid())
        handler = PytorchModelHandlerTensor(
            state_path,
            WideMLP,
            params,
            min_batch_size=batch_size,
            max_batch_size=batch_size,
            large_model=large_model,
            socket_path=socket_path,
        )
        rows = make_rows(batches * batch_size, params.get("width", 4096), seed=1)
        n = len(list(list(rows) | RunInference(handler)))
        conn.send(("ready", n))
    except BaseException as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        raise
    try:
        conn.recv()
    except EOFError:
        pass


def run_threads(work: Any, n: int) -> None:
    """Run ``work(0..n-1)`` on ``n`` threads, all started before any is joined."""
    import threading

    pool = [threading.Thread(target=work, args=(t,)) for t in range(n)]
    for p in pool:
        p.start()
    for p in pool:
        p.join()


class Progress:
    """One line per step on stderr, with the time since the run began."""

    def __init__(self, quiet: bool = False):
        self.started = time.monotonic()
        self.quiet = quiet

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"[{time.monotonic() - self.started:6.1f}s] {message}", file=sys.stderr, flush=True)


def spawn_worker(
    ctx: Any, target: Any, args: tuple[Any, ...], name: str, *, daemon: bool = False
) -> tuple[Any, Any]:
    """Start ``target(conn, *args)`` in a process of ``ctx``: (the process, this end of
    its pipe). The worker reports over ``conn`` (``report_of``)."""
    parent, child = ctx.Pipe()
    process = ctx.Process(target=target, args=(child, *args), name=name, daemon=daemon)
    process.start()
    child.close()
    return process, parent


def report_of(conn: Any, who: str, expected: str, timeout: float) -> Any:
    """A spawned worker's (status, detail) report: its detail, or why there is none."""
    if not conn.poll(timeout):
        raise TimeoutError(f"{who} did not report within {timeout:.0f}s")
    status, detail = conn.recv()
    if status != expected:
        raise RuntimeError(f"{who} failed: {detail}")
    return detail


def stop_workers(pipes: list[Any], procs: list[Any], goodbye: Any) -> None:
    """Send each spawned worker ``goodbye`` on its pipe, join it (killing one that does
    not end within 30 s), and close the pipes."""
    for conn in pipes:
        try:
            conn.send(goodbye)
        except OSError:
            pass
    for p in procs:
        p.join(30)
        if p.is_alive():
            p.kill()
            p.join()
    for conn in pipes:
        conn.close()


def write_results(out: str | None, name: str, started: float, payload: dict[str, Any]) -> str:
    """Write ``payload`` as JSON to ``out``, else to bench/results/<name>-<started>.json;
    the path written."""
    path = out or os.path.join(
        RESULTS_DIR, time.strftime(f"{name}-%Y%m%d-%H%M%S.json", time.localtime(started))
    )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
    return path


# -- statistics and the machine ----------------------------------------------------------
class LoadMeter:
    """How much of the machine other processes took while a benchmark ran.

    ``start()`` then ``stop()`` returns {"foreign": share of all CPUs busy in processes
    outside this one and its children (the servers and workers it started), "steal":
    share taken by the hypervisor}. On a shared 2-vCPU machine a foreign share above a
    few percent means the figures of that run are disturbed."""

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self._me = psutil.Process()
        self._ncpu = psutil.cpu_count() or 1
        self._t0 = 0.0
        self._sys0: Any = None
        self._own0 = 0.0

    def _own_cpu(self) -> float:
        """CPU seconds of this process, its live descendants, and the descendants that
        already ended and were reaped (the kernel adds those to this process's
        children_user/children_system: a worker that starts and ends within the window
        is ours too)."""
        t = self._me.cpu_times()
        total = t.user + t.system + t.children_user + t.children_system
        for p in self._me.children(recursive=True):
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except self._psutil.Error:
                pass
        return total

    def start(self) -> LoadMeter:
        self._t0 = time.monotonic()
        self._sys0 = self._psutil.cpu_times()
        self._own0 = self._own_cpu()
        return self

    def stop(self) -> dict[str, float]:
        wall = max(1e-9, time.monotonic() - self._t0)
        sys1 = self._psutil.cpu_times()
        own = self._own_cpu() - self._own0
        busy = sum(
            getattr(sys1, f) - getattr(self._sys0, f) for f in ("user", "nice", "system", "irq", "softirq")
        )
        steal = sys1.steal - self._sys0.steal
        capacity = wall * self._ncpu
        return {"foreign": max(0.0, (busy - own) / capacity), "steal": steal / capacity}


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between closest ranks."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def median(values: list[float]) -> float:
    return percentile(values, 50.0)


def machine_info() -> dict[str, Any]:
    """What the figures were measured on."""
    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import psutil

        mem = psutil.virtual_memory().total
    except Exception:  # pragma: no cover - psutil is a dependency
        mem = 0
    return {
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "memory_bytes": mem,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
