"""An SDK worker: takes bundles from its harness, runs the pipeline's steps on a pool of
threads, and sends each bundle's outputs back whole.

The harness forks workers with the pipeline's steps already in memory (the user's
functions and handlers as they wrote them). A custom runner can start one itself::

    python -m runtime.worker --control /path/to/control.sock --pipeline my_pipeline.py

where the pipeline file (or module) defines ``build_pipeline(input=None, output=None)``
returning a ``runtime.Pipeline``; the worker runs its steps. See runtime/control.py for
the protocol and the exit codes, and docs/runtime.md.

A worker dies with its harness: its control connection closing ends it, and on Linux it
also asks the kernel for SIGKILL when its parent dies.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import signal
import socket
import sys
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from client import refresh
from modelserver import logformat
from runtime import computethreads, rows
from runtime.computethreads import ComputeThreads
from runtime.control import (
    EXIT_BOOT_FAILED,
    EXIT_CRASHED,
    EXIT_LOST_HARNESS,
    HEARTBEAT_SECONDS,
    ControlChannel,
)
from runtime.pipeline import Pipeline, Step, process_bundle
from runtime.processes import die_with_parent, exit_now, run_then_exit

log = logging.getLogger("beamlet.worker")


class Worker:
    """Runs bundles for one harness connection on ``threads`` threads."""

    def __init__(self, channel: ControlChannel, worker_id: int, steps: list[Step], threads: int):
        self.channel = channel
        self.worker_id = worker_id
        self.steps = steps
        self.threads = threads
        self._stopping = threading.Event()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix=f"worker{worker_id}")

    def boot(self) -> bool:
        """Set up every step (load models, as Beam's DoFn.setup does); on failure tell the
        harness why, so it fails the run instead of restarting us in a loop."""
        try:
            for step in self.steps:
                step.setup()
        except Exception as exc:
            log.error("worker %d cannot boot: %s", self.worker_id, exc)
            try:
                self.channel.send(
                    {
                        "op": "boot_failed",
                        "worker": self.worker_id,
                        "error": f"{type(exc).__name__}: {exc}",
                        "traceback": traceback.format_exc(limit=8),
                    }
                )
            except OSError:
                pass
            return False
        return True

    def serve(self) -> int:
        if not self.boot():
            return EXIT_BOOT_FAILED
        try:
            return self._serve()
        except Exception:
            log.exception("worker %d crashed", self.worker_id)
            return EXIT_CRASHED

    def _serve(self) -> int:
        self.channel.send(
            {"op": "hello", "worker": self.worker_id, "pid": os.getpid(), "threads": self.threads}
        )
        beat = threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True)
        beat.start()
        try:
            while True:
                try:
                    message = self.channel.read()
                except OSError:
                    message = None
                if message is None:
                    log.warning("worker %d: the harness went away", self.worker_id)
                    self._stopping.set()
                    self._pool.shutdown(wait=False, cancel_futures=True)
                    return EXIT_LOST_HARNESS
                op = message.get("op")
                if op == "bundle":
                    self._pool.submit(self._run_bundle, message)
                elif op == "update_model":
                    self._update_model(message)
                elif op == "stop":
                    self._pool.shutdown(wait=True)
                    return 0
                else:
                    log.error("worker %d: unknown control message %r", self.worker_id, op)
        finally:
            self._stopping.set()

    def _update_model(self, message: dict[str, Any]) -> None:
        """Point a RunInference step at a new model version; its new version starts
        loading now, and batches use it once loaded."""
        try:
            transform = self.steps[int(message["step"])].transform  # type: ignore[attr-defined]
            epoch, n = message["sequence"]
            transform.update_model(refresh.from_wire(message["update"]), sequence=(int(epoch), int(n)))
            transform.prefetch()
        except Exception:
            log.exception("worker %d: model update %r failed", self.worker_id, message.get("update"))

    def _heartbeat(self) -> None:
        while not self._stopping.wait(HEARTBEAT_SECONDS):
            try:
                self.channel.send({"op": "heartbeat"})
            except OSError:
                return

    def _run_bundle(self, message: dict[str, Any]) -> None:
        bundle_id, attempt = message["bundle"], message["attempt"]
        try:
            out = process_bundle(self.steps, rows.unpack(message["elements"]))
            reply = {
                "op": "result",
                "bundle": bundle_id,
                "attempt": attempt,
                "outputs": rows.pack(out.outputs),
                "dead_letters": out.dead_letters,
                "metrics": {k: m.to_wire() for k, m in out.metrics.items()},
            }
        except Exception as exc:
            reply = {
                "op": "bundle_failed",
                "bundle": bundle_id,
                "attempt": attempt,
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(limit=8),
            }
        try:
            self.channel.send(reply)
        except TypeError as exc:  # an output the wire cannot carry
            self.channel.send(
                {
                    "op": "bundle_failed",
                    "bundle": bundle_id,
                    "attempt": attempt,
                    "error": f"an output cannot be sent to the harness: {exc}",
                    "traceback": "",
                }
            )
        except OSError:
            pass  # the harness is gone; serve() notices


def worker_main(
    control_path: str, worker_id: int, steps: list[Step], threads: int, parent: int | None = None
) -> None:
    """The body of a forked worker process (never returns). ``parent``: the pid of the
    process that forked it, which it dies with."""
    if not die_with_parent(parent):
        os._exit(EXIT_LOST_HARNESS)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the harness decides when we stop
    signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def serve() -> int:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(control_path)
        return Worker(ControlChannel(sock), worker_id, steps, threads).serve()

    run_then_exit(serve, EXIT_BOOT_FAILED)


def load_pipeline(ref: str, input_path: str | None = None, output_path: str | None = None) -> Pipeline:
    """Import a pipeline file or module and call its ``build_pipeline(input, output)``."""
    if ref.endswith(".py") or os.path.sep in ref:
        path = os.path.abspath(ref)
        if not os.path.exists(path):
            raise FileNotFoundError(f"pipeline file not found: {ref}")
        sys.path.insert(0, os.path.dirname(path))
        spec = importlib.util.spec_from_file_location("beamlet_user_pipeline", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(ref)
    build = getattr(module, "build_pipeline", None)
    if build is None:
        raise AttributeError(f"{ref} does not define build_pipeline(input, output)")
    pipeline = build(input_path, output_path)
    if not isinstance(pipeline, Pipeline):
        raise TypeError(f"{ref}.build_pipeline returned {type(pipeline).__name__}, not a Pipeline")
    return pipeline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--control", required=True, help="the harness's control socket")
    parser.add_argument("--pipeline", required=True, help="pipeline file or module (defines build_pipeline)")
    parser.add_argument("--input", default=None)
    parser.add_argument("--output", default=None)
    parser.add_argument("--worker-id", type=int, default=0)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument("--log-format", type=logformat.parse_format, default=logformat.default_format())
    parser.add_argument(
        "--intra-op-threads",
        type=int,
        default=None,
        metavar="N",
        help="torch.set_num_threads(N) before booting",
    )
    parser.add_argument(
        "--inter-op-threads",
        type=int,
        default=None,
        metavar="N",
        help="torch.set_num_interop_threads(N) before booting",
    )
    args = parser.parse_args(argv)
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # whoever started us decides when we stop
    logformat.basic_config(args.log_level.upper(), args.log_format)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(args.control)
    except OSError as exc:
        print(f"runtime.worker: cannot reach the harness at {args.control}: {exc}", file=sys.stderr)
        return EXIT_BOOT_FAILED
    channel = ControlChannel(sock)
    try:
        steps, _ = load_pipeline(args.pipeline, args.input, args.output).split()  # the workers' part
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        print(f"runtime.worker: cannot boot: {error}", file=sys.stderr)
        try:
            channel.send(
                {
                    "op": "boot_failed",
                    "worker": args.worker_id,
                    "error": error,
                    "traceback": traceback.format_exc(),
                }
            )
        except OSError:
            pass
        return EXIT_BOOT_FAILED
    computethreads.apply(ComputeThreads(args.intra_op_threads, args.inter_op_threads))
    return Worker(channel, args.worker_id, steps, args.threads).serve()


if __name__ == "__main__":
    exit_now(main())
