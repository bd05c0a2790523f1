"""``python -m modelserver serve|status|stop``: run, inspect or stop the per-machine server."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from modelserver import config, wire

BUDGET_ENV = "BEAMLET_MEMORY_BUDGET"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modelserver", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the model server in the foreground")
    _socket_arg(serve)
    serve.add_argument(
        "--memory-budget",
        type=config.parse_size,
        default=os.environ.get(BUDGET_ENV),
        metavar="SIZE",
        help=f"host memory the loaded models may use (512MiB, 8GiB; env {BUDGET_ENV})",
    )
    serve.add_argument(
        "--max-frame-bytes",
        type=config.parse_size,
        default=wire.DEFAULT_MAX_BODY,
        metavar="SIZE",
        help="largest request body accepted (default 1GiB)",
    )
    serve.add_argument(
        "--idle-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="exit after this long with no client connected (default: never)",
    )
    serve.add_argument("--log-level", default="INFO")

    status = sub.add_parser("status", help="what the server holds and has done")
    _socket_arg(status)
    status.add_argument("--json", action="store_true", help="print the raw status as JSON")

    stop = sub.add_parser("stop", help="ask the server to stop, and wait until it has")
    _socket_arg(stop)
    stop.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS")

    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "status":
        return _status(args)
    return _stop(args)


def _socket_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--socket",
        default=None,
        metavar="PATH",
        help=f"socket path (default: ${config.SOCKET_ENV}, else {config.default_socket_path()})",
    )


def _serve(args: argparse.Namespace) -> int:
    from modelserver.server import EXIT_ALREADY_RUNNING, AlreadyRunning, ModelServer

    budget = config.parse_size(args.memory_budget) if args.memory_budget is not None else None
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
    )
    server = ModelServer(
        args.socket,
        memory_budget=budget,
        max_frame_bytes=args.max_frame_bytes,
        idle_timeout=args.idle_timeout,
    )
    try:
        server.bind()
    except AlreadyRunning as exc:
        print(f"modelserver: {exc}", file=sys.stderr)
        return EXIT_ALREADY_RUNNING
    except PermissionError as exc:
        print(f"modelserver: {exc}", file=sys.stderr)
        return 2
    server.install_signal_handlers()
    server.warm_up()
    server.serve_forever()
    return 0


def _status(args: argparse.Namespace) -> int:
    from modelserver.channel import Channel
    from modelserver.errors import ServerUnavailable

    path = config.socket_path(args.socket)
    try:
        with Channel(path) as channel:
            status = channel.request({"op": "status"})["status"]
    except ServerUnavailable as exc:
        print(f"modelserver: no server at {path}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        print(_render_status(status))
    return 0


def _stop(args: argparse.Namespace) -> int:
    from modelserver.channel import Channel
    from modelserver.errors import ServerUnavailable

    path = config.socket_path(args.socket)
    try:
        with Channel(path) as channel:
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
    models = s.get("models", [])
    if not models:
        lines.append("  no models registered")
        return "\n".join(lines)
    header = f"  {'key':<20} {'device':<7} {'tensors':>10} {'footprint':>10} {'requests':>9} {'rows':>9} {'batches':>8} {'errors':>6} {'loads':>5}"
    lines.append(header)
    for m in models:
        lines.append(
            f"  {m['key'][:20]:<20} {str(m['device'] or '-'):<7} {fmt(m['nbytes']):>10} "
            f"{fmt(m['footprint']):>10} {m.get('requests', 0):>9} {m.get('rows', 0):>9} "
            f"{m.get('batches', 0):>8} {m.get('errors', 0):>6} {m['loads']:>5}"
        )
        lines.append(f"    model_id {m['model_id']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
