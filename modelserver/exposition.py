"""An HTTP endpoint that serves Prometheus metrics, for the model server and the harness.

``MetricsEndpoint(address)`` checks the address at once: it must be a loopback one
(127.0.0.0/8, ::1, ``localhost``) unless ``allow_remote`` (the metrics name the models and
how they are used), and ``prometheus-client`` (the optional extra ``metrics``) must be
installed. ``start(collector)`` then binds it and serves ``/metrics`` from daemon threads
(one to accept, one per scrape, each read with a deadline); a scrape asks the collector,
which reads the process's counters without holding, for long, any lock that requests wait
on. Nothing here imports ``prometheus_client`` until an endpoint is asked for, so the
packages work without it.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("beamlet.metrics")

INSTALL_HINT = "pip install 'beamlet[metrics]'"
DEFAULT_HOST = "127.0.0.1"
SCRAPE_READ_TIMEOUT = 10.0  # seconds a scrape's request may take to arrive
POLL_INTERVAL = 0.1  # how soon the accept loop notices stop()


class MetricsError(Exception):
    """The metrics endpoint cannot be served as asked."""


class MetricsUnavailable(MetricsError, RuntimeError):
    """``prometheus-client`` is not installed."""


class MetricsAddressError(MetricsError, ValueError):
    """The address is malformed, not a loopback one (without ``allow_remote``), or cannot
    be bound."""


def require_prometheus() -> None:
    """MetricsUnavailable, naming the extra to install, when prometheus-client is missing."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise MetricsUnavailable(
            f"--metrics-address needs the prometheus-client package: {INSTALL_HINT}"
        ) from None


def parse_address(text: str, allow_remote: bool = False) -> tuple[str, int]:
    """``HOST:PORT``, ``[IPV6]:PORT`` or ``PORT`` (on 127.0.0.1) as (host, port); port 0
    picks a free one. MetricsAddressError when it is malformed, or not loopback and not
    ``allow_remote``."""
    text = text.strip()
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise MetricsAddressError(f"metrics address {text!r}: write an IPv6 address as [ADDR]:PORT")
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
        if ":" in host:
            raise MetricsAddressError(f"metrics address {text!r}: write an IPv6 address as [ADDR]:PORT")
    else:
        host, port_text = DEFAULT_HOST, text
    try:
        port = int(port_text)
    except ValueError:
        raise MetricsAddressError(f"metrics address {text!r}: the port must be a number") from None
    if not 0 <= port <= 65535:
        raise MetricsAddressError(f"metrics address {text!r}: port {port} is out of range (0-65535)")
    host = host or DEFAULT_HOST
    if not allow_remote and not is_loopback(host):
        raise MetricsAddressError(
            f"metrics address {text!r} is not a loopback address (127.0.0.0/8, ::1, localhost): "
            "other machines could read the metrics, which name your models and their use; "
            "pass --metrics-allow-remote to serve them there anyway"
        )
    return host, port


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


class MetricsEndpoint:
    """A ``/metrics`` endpoint at one address: checked when made, bound by ``start``,
    closed by ``stop`` (and may be started again, for the next run). ``announce`` is
    called with the URL once bound (port 0: the port picked)."""

    def __init__(
        self, address: str, *, allow_remote: bool = False, announce: Callable[[str], None] | None = None
    ):
        self.host, self.port = parse_address(address, allow_remote)
        require_prometheus()
        self.requested = address
        self.announce = announce
        self.bound: tuple[str, int] | None = None
        self._httpd: Any = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str | None:
        """``HOST:PORT`` as bound, None when not serving."""
        if self.bound is None:
            return None
        host, port = self.bound
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def url(self) -> str | None:
        return f"http://{self.address}/metrics" if self.bound is not None else None

    def start(self, collector: Any) -> str:
        """Bind and serve ``collector`` (an object with ``collect()``, as prometheus-client
        takes) with the process's own metrics (CPU, memory, open files); the URL.
        MetricsAddressError when the address cannot be bound."""
        from prometheus_client import CollectorRegistry, ProcessCollector

        self.stop()
        registry = CollectorRegistry()
        registry.register(collector)
        ProcessCollector(registry=registry)
        try:
            httpd = _make_server(self.host, self.port, registry)
        except OSError as exc:
            raise MetricsAddressError(f"cannot serve metrics on {self.requested}: {exc}") from None
        self._httpd = httpd
        self.bound = httpd.server_address[:2]
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": POLL_INTERVAL},
            name="metrics-http",
            daemon=True,
        )
        self._thread.start()
        url = self.url
        assert url is not None
        log.info("serving metrics on %s", url)
        if self.announce is not None:
            self.announce(url)
        return url

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent; returns within POLL_INTERVAL)."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None
        self.bound = None


def _make_server(host: str, port: int, registry: Any) -> Any:
    import socketserver
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from prometheus_client import make_wsgi_app
    from prometheus_client.exposition import ThreadingWSGIServer

    class Handler(WSGIRequestHandler):
        timeout = SCRAPE_READ_TIMEOUT  # a client that never sends its request frees the thread

        def log_message(self, format: str, *args: Any) -> None:
            pass  # no line per scrape on stderr (a pipe nobody reads would block the scrape)

    class Server(ThreadingWSGIServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        def server_bind(self) -> None:
            # Not HTTPServer's: it looks the host's name up (socket.getfqdn), which can
            # wait on DNS, for a SERVER_NAME nobody reads.
            socketserver.TCPServer.server_bind(self)
            self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]
            self.setup_environ()

    bind_host = DEFAULT_HOST if host.lower() == "localhost" else host
    return make_server(bind_host, port, make_wsgi_app(registry), Server, handler_class=Handler)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--metrics-address`` and ``--metrics-allow-remote`` (the harness takes them too)."""
    parser.add_argument(
        "--metrics-address",
        default=None,
        metavar="HOST:PORT",
        help="serve Prometheus metrics on http://HOST:PORT/metrics (port 0: a free one, logged); "
        f"needs prometheus-client ({INSTALL_HINT}); default: off",
    )
    parser.add_argument(
        "--metrics-allow-remote",
        action="store_true",
        help="let --metrics-address be other than a loopback address (127.0.0.0/8, ::1, localhost)",
    )


def from_arguments(
    args: argparse.Namespace, announce: Callable[[str], None] | None = None
) -> MetricsEndpoint | None:
    """The endpoint the command line asks for, checked now (MetricsError), or None."""
    if args.metrics_address is None:
        return None
    return MetricsEndpoint(args.metrics_address, allow_remote=args.metrics_allow_remote, announce=announce)
