"""``python -m runtime run PIPELINE``: the main job from the command line.

PIPELINE is a Python file or module defining ``build_pipeline(input, output)`` that
returns a ``runtime.Pipeline`` (a read step, steps, a write step). This process imports
it once; the workers (and the model server, if the run starts one) are forked from a
zygote forked from this process right after the import, so they import nothing again.
With ``--exec-workers``, or when importing the pipeline started a thread (an OpenMP team
that ran while it loaded, a thread of its own: forking from such a process is not safe),
the workers are started as ``python -m runtime.worker`` instead and import the file
themselves. A progress bar shows on a terminal; a summary prints at the end; dead
letters, if any, are written beside the output as ``<output>.dead_letters.jsonl``.
``--watch-model PATTERN`` swaps in new model versions while the job runs (docs/refresh.md).
``--deterministic``: the same input gives bitwise the same output in every run.
``--accelerator SPEC`` and ``--min-ram SIZE`` set Beam's resource hints on every
RunInference step. ``--metrics-address HOST:PORT`` serves the run's Prometheus metrics
while it runs (runtime/metrics.py). The input, the output and the machine (against every step's resource
hints) are checked before any process starts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import sys
import threading
import time

from modelserver import exposition, logformat
from runtime import startup
from runtime.errors import CannotStart, PipelineError
from runtime.harness import Harness
from runtime.processes import exit_now
from runtime.watch import DEFAULT_SETTLE, WatchFilePattern
from runtime.worker import load_pipeline

log = logging.getLogger("beamlet.harness")


def thread_count() -> int:
    """This process's threads, Python's and native ones (OpenMP's, OpenBLAS's)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def main(argv: list[str] | None = None) -> int:
    imported = startup.process_age()
    parser = argparse.ArgumentParser(prog="python -m runtime", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a pipeline file on a harness of SDK workers")
    run.add_argument("pipeline", help="pipeline file or module (defines build_pipeline(input, output))")
    run.add_argument("--input", default=None, help="passed to build_pipeline")
    run.add_argument("--output", default=None, help="passed to build_pipeline")
    run.add_argument("--workers", type=int, default=2)
    run.add_argument("--threads", type=int, default=4)
    run.add_argument("--bundle-size", type=int, default=256)
    run.add_argument(
        "--max-bundle-wait",
        type=float,
        default=0.1,
        metavar="SECONDS",
        help="an unbounded source closes a bundle this long after its first element arrived, "
        "full or not (default 0.1)",
    )
    run.add_argument("--bundle-timeout", type=float, default=600.0, metavar="SECONDS")
    run.add_argument(
        "--socket", default=None, help="model server socket (default: BEAMLET_SOCKET or per-user)"
    )
    run.add_argument(
        "--memory-budget", default=None, metavar="SIZE", help="for a model server this run starts"
    )
    run.add_argument(
        "--watch-model",
        default=None,
        metavar="PATTERN",
        help="while the job runs, swap in the newest model file matching PATTERN (every RunInference step)",
    )
    run.add_argument("--watch-interval", type=float, default=60.0, metavar="SECONDS")
    run.add_argument(
        "--deterministic",
        action="store_true",
        help="bitwise the same output in every run: no request merging in the model server, fixed batch sizes",
    )
    run.add_argument(
        "--checkpoint",
        default=None,
        metavar="DIR",
        help="record each committed bundle in DIR; the same command after a crash continues "
        "from the first uncommitted bundle (bounded input, file output)",
    )
    run.add_argument(
        "--server-args",
        default=None,
        metavar="ARGS",
        help="more options for the model server the run starts, as one string "
        "(e.g. '--threads 2 --compute-threads 1'; see python -m modelserver serve --help)",
    )
    run.add_argument(
        "--accelerator",
        default=None,
        metavar="SPEC",
        help="resource hint for every RunInference step, in Beam's syntax "
        "(e.g. 'type:nvidia-tesla-t4;count:1'): the run starts only on a machine that has it",
    )
    run.add_argument(
        "--min-ram",
        default=None,
        metavar="SIZE",
        help="resource hint for every RunInference step (e.g. 8GiB): the run starts only on a "
        "machine with at least this much RAM",
    )
    exposition.add_arguments(run)
    run.add_argument("--json", action="store_true", help="print the summary as JSON")
    run.add_argument("--no-progress", action="store_true")
    run.add_argument(
        "--exec-workers",
        action="store_true",
        help="start each worker (and the model server) as a new Python process that imports "
        "the pipeline itself, instead of forking them from this one",
    )
    run.add_argument("--log-level", default="WARNING")
    run.add_argument(
        "--log-format",
        type=logformat.parse_format,
        default=logformat.default_format(),
        metavar="{text,json}",
        help="text lines, or one JSON object a line, for this process, its workers and a model "
        f"server it starts (env {logformat.LOG_FORMAT_ENV}; default text)",
    )
    args = parser.parse_args(argv)
    try:  # checked before anything starts; served while the run runs
        metrics = exposition.from_arguments(args, announce=_announce_metrics)
    except exposition.MetricsError as exc:
        print(f"runtime: {exc}", file=sys.stderr)
        return 2

    logformat.basic_config(args.log_level.upper(), args.log_format)
    # The workers (forked ones inherit the handler; exec'd ones read it) and the model
    # server this run starts log the way this process does.
    os.environ[logformat.LOG_FORMAT_ENV] = args.log_format
    startup.step("harness import", imported, "process start to main")
    began = time.monotonic()
    threads = thread_count()
    try:
        pipeline = load_pipeline(args.pipeline, args.input, args.output)
    except Exception as exc:
        print(f"runtime: cannot load {args.pipeline}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    startup.step("pipeline import", time.monotonic() - began, args.pipeline)
    started = thread_count() - threads
    if started > 0 and not args.exec_workers:
        log.warning(
            "loading %s started %d thread(s) (an OpenMP team, or a thread of its own), and a "
            "process forked from this one could hang on what they hold: the workers start as "
            "python -m runtime.worker instead, and import the pipeline themselves",
            args.pipeline,
            started,
        )
    if args.watch_model:
        steps = pipeline.inference_steps()
        if not steps:
            print(f"runtime: --watch-model: {args.pipeline} has no RunInference step", file=sys.stderr)
            return 2
        for step in steps:  # the harness polls them and sends each new file to every worker
            step.transform.model_updates = WatchFilePattern(
                args.watch_model, args.watch_interval, settle=min(DEFAULT_SETTLE, args.watch_interval)
            )
    hints = {k: v for k, v in (("accelerator", args.accelerator), ("min_ram", args.min_ram)) if v is not None}
    if hints:
        steps = pipeline.inference_steps()
        if not steps:
            print(
                f"runtime: --accelerator/--min-ram: {args.pipeline} has no RunInference step", file=sys.stderr
            )
            return 2
        try:
            for step in steps:  # checked against this machine before anything starts
                step.transform.with_resource_hints(**hints)
        except ValueError as exc:
            print(f"runtime: {exc}", file=sys.stderr)
            return 2
    harness = Harness(
        args.workers,
        args.threads,
        bundle_size=args.bundle_size,
        max_bundle_wait=args.max_bundle_wait,
        bundle_timeout=args.bundle_timeout,
        socket_path=args.socket,
        server_args=(["--memory-budget", args.memory_budget] if args.memory_budget else [])
        + shlex.split(args.server_args or ""),
        progress=False if args.no_progress else None,
        pipeline_ref=args.pipeline if args.exec_workers or started > 0 else None,
        pipeline_args=(args.input, args.output),
        deterministic=args.deterministic,
        checkpoint=args.checkpoint,
        metrics=metrics,
    )
    try:
        summary = harness.run(pipeline)
    except CannotStart as exc:
        print(f"runtime: cannot start: {exc}", file=sys.stderr)
        return 1
    except PipelineError as exc:
        print(f"runtime: the run failed: {exc}", file=sys.stderr)
        return 1
    dead_letters_path = getattr(pipeline.sink, "dead_letters_path", None)
    if summary.dead_letter_count and dead_letters_path:
        print(f"dead letters: {dead_letters_path}", file=sys.stderr)
    print(json.dumps(summary.to_dict(), indent=2) if args.json else summary)
    if summary.interrupted:
        return 128 + int(signal.Signals[summary.interrupted])
    return 0


def _announce_metrics(url: str) -> None:
    print(f"runtime: metrics on {url}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    exit_now(main())  # without tearing torch down: the output is written, the children reaped
