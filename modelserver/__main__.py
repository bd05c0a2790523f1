"""``python -m modelserver serve|status|top|stop``: run, inspect, watch or stop the per-machine
server."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from modelserver import config, exposition, logformat, serverlog, wire
from modelserver.batcher import DEFAULT_MAX_QUEUE_BYTES, DEFAULT_MAX_QUEUE_ROWS, QueueLimits
from modelserver.connection import DEFAULT_MAX_BACKLOG, HEARTBEAT_INTERVAL
from modelserver.exposition import MetricsEndpoint, MetricsError

BUDGET_ENV = "BEAMLET_MEMORY_BUDGET"
DEFAULT_BUDGET_SHARE = 0.7  # of the RAM available at start, when no budget is given


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "status":
        return _status(args)
    if args.command == "top":
        return _top(args)
    return _stop(args)


def build_parser() -> argparse.ArgumentParser:
    """The command line; defaults that come from the environment are read now."""
    parser = argparse.ArgumentParser(prog="python -m modelserver", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the model server in the foreground")
    _socket_arg(serve)
    serve.add_argument(
        "--memory-budget",
        default=os.environ.get(BUDGET_ENV),
        metavar="SIZE",
        help=f"host memory the loaded models may use (512MiB, 8GiB; env {BUDGET_ENV}; "
        "default 70%% of the RAM available at start; 'none' for no limit)",
    )
    serve.add_argument(
        "--gpu-memory-fraction",
        type=float,
        default=0.9,
        metavar="F",
        help="share of each GPU's memory the models may use (default 0.9)",
    )
    serve.add_argument(
        "--load-wait",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long a load waits for models in use to go idle before failing out of memory",
    )
    serve.add_argument("--eviction-policy", choices=["gdsf", "lru"], default="gdsf")
    serve.add_argument(
        "--min-free-memory",
        type=config.parse_size,
        default=None,
        metavar="SIZE",
        help="evict idle models when the machine's available RAM drops below this (default 5%% of RAM)",
    )
    serve.add_argument(
        "--max-frame-bytes",
        type=config.parse_size,
        default=wire.DEFAULT_MAX_BODY,
        metavar="SIZE",
        help="largest request body accepted (default 1GiB)",
    )
    serve.add_argument(
        "--max-queue-rows",
        type=int,
        default=DEFAULT_MAX_QUEUE_ROWS,
        metavar="N",
        help="rows one model's queue may hold; more are refused with Overloaded "
        f"(default {DEFAULT_MAX_QUEUE_ROWS})",
    )
    serve.add_argument(
        "--max-queue-bytes",
        type=config.parse_size,
        default=DEFAULT_MAX_QUEUE_BYTES,
        metavar="SIZE",
        help="input bytes one model's queue may hold; more are refused with Overloaded (default 256MiB)",
    )
    serve.add_argument(
        "--max-reply-backlog",
        type=config.parse_size,
        default=DEFAULT_MAX_BACKLOG,
        metavar="SIZE",
        help="reply bytes a client may leave unread before the server stops reading its "
        "requests (default 64MiB)",
    )
    serve.add_argument(
        "--deterministic",
        action="store_true",
        default=config.deterministic(),
        help="never merge requests (each is its own forward pass) and use torch's deterministic "
        f"algorithms (env {config.DETERMINISTIC_ENV}=1)",
    )
    serve.add_argument(
        "--idle-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="exit after this long with no client connected (default: never)",
    )
    serve.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        metavar="N",
        help="the intra-op threads a CPU model's forwards share: one forward alone uses them "
        "all, n at once a share each (default: torch's, one per core this process may use)",
    )
    serve.add_argument(
        "--compute-threads",
        type=_positive_int,
        default=None,
        metavar="K",
        help="how many forwards of one CPU model may run at once, each on its own thread "
        "(default: as many as --threads; 1: one forward at a time over all threads)",
    )
    serve.add_argument(
        "--heartbeat",
        type=float,
        default=HEARTBEAT_INTERVAL,
        metavar="SECONDS",
        help="send a heartbeat to a client with requests in flight after this long with nothing "
        f"sent to it, so its request deadline catches only a stopped server (default {HEARTBEAT_INTERVAL:g}; 0: none)",
    )
    serve.add_argument(
        "--no-metrics",
        dest="record_metrics",
        action="store_false",
        help="record no stage times (replies carry no 'stages') and no per-model histograms "
        "(default: both recorded; they cost a few clock reads per request)",
    )
    exposition.add_arguments(serve)
    serve.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ... (default INFO)")
    serve.add_argument(
        "--log-file",
        default=None,
        metavar="PATH",
        help="append the log to PATH (created 0600) instead of writing it to stderr",
    )
    serve.add_argument(
        "--log-format",
        type=logformat.parse_format,
        default=logformat.default_format(),
        metavar="{text,json}",
        help=f"text lines, or one JSON object a line for log collectors (env {logformat.LOG_FORMAT_ENV}; "
        "default text)",
    )
    serve.add_argument(
        "--log-queue",
        type=int,
        default=serverlog.DEFAULT_CAPACITY,
        metavar="N",
        help="log records held while the log output is blocked; more are dropped and counted "
        f"(default {serverlog.DEFAULT_CAPACITY})",
    )

    status = sub.add_parser("status", help="what the server holds and has done")
    _socket_arg(status)
    status.add_argument("--json", action="store_true", help="print the raw status as JSON")

    top = sub.add_parser("top", help="a live view of the server's models and devices (q quits)")
    _socket_arg(top)
    top.add_argument(
        "--interval", type=_positive_float, default=1.0, metavar="SECONDS", help="refresh every (default 1)"
    )
    top.add_argument(
        "--timeout",
        type=_positive_float,
        default=2.0,
        metavar="SECONDS",
        help="how long to wait for the server at each refresh before saying it is unavailable (default 2)",
    )
    top.add_argument(
        "--once", action="store_true", help="print one frame as plain text (two samples an interval apart)"
    )

    stop = sub.add_parser("stop", help="ask the server to stop, and wait until it has")
    _socket_arg(stop)
    stop.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS")
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def _socket_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--socket",
        default=None,
        metavar="PATH",
        help=f"socket path (default: ${config.SOCKET_ENV}, else {config.default_socket_path()})",
    )


def _serve(args: argparse.Namespace) -> int:
    budget = _budget(args.memory_budget)
    try:
        metrics = exposition.from_arguments(args)
    except MetricsError as exc:
        print(f"modelserver: {exc}", file=sys.stderr)
        return 2
    # Every record goes through a bounded queue to a writer thread: a stderr pipe nobody
    # reads costs dropped records, never a blocked request or a server that cannot stop.
    pump = serverlog.install(
        args.log_level.upper(), args.log_file, capacity=args.log_queue, log_format=args.log_format
    )
    try:
        return _run_server(args, budget, metrics)
    finally:
        pump.close(timeout=2.0)


def _run_server(args: argparse.Namespace, budget: int | None, metrics: MetricsEndpoint | None) -> int:
    from modelserver.server import EXIT_ALREADY_RUNNING, AlreadyRunning, ModelServer

    server = ModelServer(
        args.socket,
        memory_budget=budget,
        max_frame_bytes=args.max_frame_bytes,
        idle_timeout=args.idle_timeout,
        max_reply_backlog=args.max_reply_backlog,
        heartbeat=args.heartbeat,
        record_metrics=args.record_metrics,
        limits=QueueLimits(args.max_queue_rows, args.max_queue_bytes),
        deterministic=args.deterministic,
        gpu_fraction=args.gpu_memory_fraction,
        load_wait=args.load_wait,
        policy=args.eviction_policy,
        min_free_bytes=args.min_free_memory,
        metrics=metrics,
    )
    try:
        server.bind()
    except AlreadyRunning as exc:
        print(f"modelserver: {exc}", file=sys.stderr)
        return EXIT_ALREADY_RUNNING
    except (PermissionError, MetricsError) as exc:
        print(f"modelserver: {exc}", file=sys.stderr)
        return 2
    server.install_signal_handlers()
    server.warm_up(threads=args.threads, compute_threads=args.compute_threads)
    server.serve_forever()
    return 0


def _budget(text: str | None) -> int | None:
    if text is None:
        import psutil

        return int(psutil.virtual_memory().available * DEFAULT_BUDGET_SHARE)
    if text.strip().lower() == "none":
        return None
    return config.parse_size(text)


def _status(args: argparse.Namespace) -> int:
    from modelserver.channel import Channel
    from modelserver.errors import ServerUnavailable

    path = config.socket_path(args.socket)
    try:
        with Channel(path, shm_bytes=0) as channel:
            status = channel.request({"op": "status"})["status"]
    except ServerUnavailable as exc:
        print(f"modelserver: no server at {path}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        print(_render_status(status))
    return 0


def _top(args: argparse.Namespace) -> int:
    from modelserver import top
    from modelserver.errors import ServerUnavailable

    path = config.socket_path(args.socket)
    try:
        if args.once:
            print("\n".join(top.once(path, args.interval, args.timeout)))
        else:
            top.watch(path, args.interval, args.timeout)
    except ServerUnavailable as exc:
        print(f"modelserver: no server at {path}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a live view ends too; curses has restored the terminal
    return 0


def _stop(args: argparse.Namespace) -> int:
    from modelserver.channel import Channel
    from modelserver.errors import ServerUnavailable

    path = config.socket_path(args.socket)
    try:
        with Channel(path, shm_bytes=0) as channel:
            pid = channel.server_pid
            channel.request({"op": "shutdown"})
    except ServerUnavailable as exc:
        print(f"modelserver: no server at {path}: {exc}", file=sys.stderr)
        return 1
    if not config.wait_for_exit(pid, args.timeout):  # return once it has really gone
        print(f"modelserver: server pid {pid} still running after {args.timeout:.0f}s", file=sys.stderr)
        return 1
    return 0


def _render_status(s: dict[str, Any]) -> str:
    fmt = config.format_size
    budget = fmt(s["memory_budget"]) if s.get("memory_budget") else "none"
    lines = [
        f"model server pid {s['pid']} on {s['socket']}",
        f"  up {s['uptime_seconds']:.0f}s, RSS {fmt(s['rss'])}, models {fmt(s['loaded_bytes'])} "
        f"of budget {budget}",
        f"  {s['connections']} connections from pids {s['client_pids']}, {s['requests']} requests",
    ]
    if s.get("metrics_address"):
        lines.append(f"  Prometheus metrics on http://{s['metrics_address']}/metrics")
    models = s.get("models", [])
    if not models:
        lines.append("  no models registered")
        return "\n".join(lines)
    for device, d in (s.get("devices") or {}).items():
        budget_d = fmt(d["budget"]) if d.get("budget") else "none"
        extra = f", {fmt(d['available'])} available" if "available" in d else ""
        if "nvml_free" in d:
            extra = f", NVML {fmt(d['nvml_used'])} used / {fmt(d['nvml_total'])}"
        lines.append(f"  {device}: models {fmt(d['used'])} of {budget_d}{extra}")
    lines.append(
        f"  eviction policy {s.get('eviction_policy')}, pressure evictions {s.get('pressure_evictions', 0)}"
    )
    if "max_queue_rows" in s:
        lines.append(
            f"  queues: up to {s['max_queue_rows']} rows, {fmt(s['max_queue_bytes'])} per model; "
            f"{fmt(s.get('reply_backlog_bytes', 0))} of replies unread; "
            f"{s.get('log_records_dropped', 0)} log records dropped"
            + ("; deterministic (no merging)" if s.get("deterministic") else "")
        )
    header = (
        f"  {'key':<20} {'state':<6} {'device':<7} {'tensors':>10} {'footprint':>10} {'requests':>9} "
        f"{'rows':>9} {'errors':>6} {'loads':>5} {'evicts':>6} {'hits':>7} {'load s':>7}"
    )
    lines.append(header)
    for m in models:
        lines.append(
            f"  {m['key'][:20]:<20} {'loaded' if m['loaded'] else 'out':<6} {str(m['device'] or '-'):<7} "
            f"{fmt(m['nbytes']):>10} {fmt(m['footprint']):>10} {m.get('requests', 0):>9} "
            f"{m.get('rows', 0):>9} {m.get('errors', 0):>6} {m['loads']:>5} {m['evictions']:>6} "
            f"{m['hits']:>7} {m['load_seconds']:>7.2f}"
        )
        lines.append(f"    model_id {m['model_id']}")
        if len(m.get("copies") or ()) > 1:
            lines.append(
                f"    {len(m['copies'])} copies: "
                + ", ".join(
                    f"{c['device']} {fmt(c['footprint'])} {c['requests']} requests" for c in m["copies"]
                )
            )
        if m.get("overloaded") or m.get("queued"):
            lines.append(f"    queued {m.get('queued', 0)}, refused (overloaded) {m.get('overloaded', 0)}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
