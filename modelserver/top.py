"""``python -m modelserver top``: a live view of a model server, refreshed every second.

It asks the server for its ``status`` over the same socket as ``python -m modelserver
status`` and shows, per model, what changed since the previous sample: requests per
second, the mean rows per forward pass, the forward pass's p50 and p99 and the queue
wait's p99 over the interval (from the server's stage histograms; ``-`` where the server
keeps none), and the share of its compute threads' time the model kept busy; and per
device, its budget and what the models use. ``q`` quits.

Three parts, so that the view is tested without a terminal:

- ``render(status, previous, interval)``: the frame, a list of text lines; pure.
- ``Poller``: takes a sample (status and the monotonic time it came), keeping one
  connection and reconnecting when it breaks. Every call is bounded by ``timeout``; a
  server that has gone is a ``ServerUnavailable`` for the caller to show and retry.
- ``watch`` (curses) and ``once`` (two samples one interval apart, printed as plain text)
  drive them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from modelserver import config
from modelserver.channel import Channel
from modelserver.errors import BeamletError, ServerUnavailable
from modelserver.histogram import Histogram

DEFAULT_INTERVAL = 1.0
KEY_WIDTH = 28
COLUMNS = (
    f"{'KEY':<{KEY_WIDTH}} {'DEVICE':<14} {'LOADED':<6} {'FOOTPRINT':>10} {'REQ/S':>8} {'BATCH':>6} "
    f"{'FWD p50':>8} {'FWD p99':>8} {'QUEUE p99':>9} {'BUSY':>5}"
)


@dataclass
class Sample:
    """A server's status and the time (``time.monotonic``) it arrived."""

    status: dict[str, Any]
    at: float


def render(status: dict[str, Any], previous: dict[str, Any] | None, interval: float) -> list[str]:
    """The frame for ``status``, with rates over the ``interval`` seconds since
    ``previous`` (None, or a server that restarted since: the rates show ``-``)."""
    if previous is not None and previous.get("pid") != status.get("pid"):
        previous = None
    rate = previous is not None and interval > 0
    before = {m["key"]: m for m in (previous or {}).get("models", [])}
    fmt = config.format_size
    requests = _delta(status, previous, "requests")
    lines = [
        f"beamlet top - server pid {status.get('pid')} on {status.get('socket')}, up "
        f"{_duration(status.get('uptime_seconds', 0))}, RSS {fmt(status.get('rss', 0))}, "
        f"{status.get('connections', 0)} connections, "
        + (f"{requests / interval:.1f} requests/s" if rate else "- requests/s"),
        "",
        f"{'DEVICE':<12} {'BUDGET':>10} {'USED':>10} {'USED %':>6}  MACHINE",
    ]
    for device, d in sorted((status.get("devices") or {}).items()):
        budget, used = d.get("budget"), d.get("used", 0)
        share = f"{100 * used / budget:.0f}%" if budget else "-"
        machine = f"{fmt(d['available'])} available" if "available" in d else ""
        if "nvml_total" in d:
            machine = f"NVML {fmt(d['nvml_used'])} used of {fmt(d['nvml_total'])}"
        lines.append(
            f"{device:<12} {fmt(budget) if budget else 'none':>10} {fmt(used):>10} {share:>6}  {machine}"
        )
    lines += ["", COLUMNS]
    models = status.get("models", [])
    if not models:
        lines.append("(no models registered)")
    for m in models:
        lines.append(_model_row(m, before.get(m["key"]) if rate else None, interval))
    return lines


def _model_row(m: dict[str, Any], before: dict[str, Any] | None, interval: float) -> str:
    devices = sorted({c["device"] for c in m.get("copies") or [] if c.get("device")})
    device = ",".join(devices) or str(m.get("device") or "-")
    if len(devices) > 1 and all(d.startswith("cuda:") for d in devices):
        device = "cuda:" + ",".join(d[5:] for d in devices)  # cuda:0,1
    if len(m.get("copies") or ()) > 1:
        device = f"{device} x{len(m['copies'])}"
    req_s = batch = busy = "-"
    if before is not None:
        req_s = f"{_delta(m, before, 'requests') / interval:.1f}"
        batches = _delta(m, before, "batches")
        if batches:
            batch = f"{_delta(m, before, 'rows') / batches:.1f}"
        threads = m.get("compute_threads") or 0
        if threads and m.get("loaded"):
            share = _delta(m, before, "busy_seconds") / interval / threads
            busy = f"{100 * min(share, 1.0):.0f}%"
    forward = _recent(m, before, "forward_us")
    queue = _recent(m, before, "queue_wait_us")
    return (
        f"{_fit(m['key'], KEY_WIDTH):<{KEY_WIDTH}} {_fit(device, 14):<14} "
        f"{'yes' if m.get('loaded') else 'no':<6} {config.format_size(m.get('footprint', 0)):>10} "
        f"{req_s:>8} {batch:>6} {_latency(forward, 50):>8} {_latency(forward, 99):>8} "
        f"{_latency(queue, 99):>9} {busy:>5}"
    )


def _delta(now: dict[str, Any], before: dict[str, Any] | None, name: str) -> float:
    """How much counter ``name`` grew; a counter that went back (its model was
    registered again) counts from zero."""
    value = now.get(name) or 0
    old = (before or {}).get(name) or 0
    return value - old if value >= old else value


def _recent(m: dict[str, Any], before: dict[str, Any] | None, name: str) -> Histogram | None:
    """The histogram ``name`` of what the model recorded since ``before`` (all of it when
    there is no ``before``); None when the server keeps none, or nothing was recorded."""
    wire = (m.get("histograms") or {}).get(name)
    if wire is None:
        return None
    now = Histogram.from_wire(wire)
    old_wire = ((before or {}).get("histograms") or {}).get(name)
    if old_wire is not None:
        old = Histogram.from_wire(old_wire)
        if old.count <= now.count:  # else the counts started again: all of now is recent
            counts = {b: n - old.counts.get(b, 0) for b, n in now.counts.items()}
            # min and max stay the whole run's: they only bound the percentiles
            now = Histogram(
                {b: n for b, n in counts.items() if n > 0},
                now.count - old.count,
                now.total - old.total,
                now.min,
                now.max,
            )
    return now if now.count > 0 else None


def _latency(h: Histogram | None, q: float) -> str:
    if h is None:
        return "-"
    us = h.percentile(q)
    if us < 1000:
        return f"{us:.0f}us"
    if us < 1_000_000:
        return f"{us / 1000:.1f}ms"
    return f"{us / 1_000_000:.2f}s"


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "~"


class Poller:
    """Samples one server's status over one connection, reconnecting after a failure.
    Each call waits at most ``timeout`` seconds to connect and as long for the reply."""

    def __init__(self, path: str, timeout: float):
        self.path = path
        self.timeout = timeout
        self._channel: Channel | None = None

    def sample(self) -> Sample:
        """The status now; ``ServerUnavailable`` when no server answers in time."""
        try:
            if self._channel is None:
                self._channel = Channel(
                    self.path, connect_timeout=self.timeout, request_timeout=self.timeout, shm_bytes=0
                )
            status = self._channel.request({"op": "status"}, timeout=self.timeout)["status"]
        except (OSError, BeamletError) as exc:
            self.close()
            if isinstance(exc, ServerUnavailable):
                raise
            raise ServerUnavailable(str(exc)) from None
        return Sample(status, time.monotonic())

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None


class View:
    """What the screen shows: the latest frame, from the latest two samples or the failure
    that kept a sample from coming."""

    def __init__(self, poller: Poller):
        self.poller = poller
        self.previous: Sample | None = None
        self.frame: list[str] = [f"beamlet top - connecting to {poller.path}"]

    def refresh(self) -> None:
        try:
            sample = self.poller.sample()
        except ServerUnavailable as exc:
            self.previous = None
            self.frame = ["server unavailable, retrying", f"  at {self.poller.path}: {exc}"]
            return
        prev = self.previous
        interval = sample.at - prev.at if prev is not None else 0.0
        self.frame = render(sample.status, prev.status if prev is not None else None, interval)
        self.previous = sample


def once(path: str, interval: float, timeout: float) -> list[str]:
    """One frame from two samples ``interval`` seconds apart (for scripts);
    ``ServerUnavailable`` when the server does not answer."""
    poller = Poller(path, timeout)
    try:
        first = poller.sample()
        time.sleep(interval)  # the rates are what happened over this interval
        second = poller.sample()
    finally:
        poller.close()
    return render(second.status, first.status, second.at - first.at)


def watch(path: str, interval: float, timeout: float) -> None:
    """The live view on this terminal until ``q`` (or Ctrl-C, which the caller catches)."""
    import curses

    poller = Poller(path, timeout)
    try:
        curses.wrapper(_loop, View(poller), interval)
    finally:
        poller.close()


def _loop(screen: Any, view: View, interval: float) -> None:
    import curses

    try:
        curses.curs_set(0)
    except curses.error:
        pass  # a terminal that cannot hide its cursor
    due = time.monotonic()
    while True:
        if time.monotonic() >= due:
            view.refresh()
            due = time.monotonic() + interval
            # Repaint every line, not only what changed: output that reached the terminal
            # from elsewhere does not stay on screen past one refresh.
            screen.redrawwin()
        _draw(screen, view.frame)
        screen.timeout(max(0, int((due - time.monotonic()) * 1000)))
        key = screen.getch()
        if key in (ord("q"), ord("Q")):
            return


def _draw(screen: Any, frame: list[str]) -> None:
    """``frame`` cut to the terminal's size: lines to its width, less the last column
    (writing the bottom-right cell is an error in curses), and to its height."""
    import curses

    screen.erase()
    height, width = screen.getmaxyx()
    for y, line in enumerate(frame[:height]):
        try:
            screen.addnstr(y, 0, line, max(0, width - 1))
        except curses.error:
            pass  # a terminal resized under us; the next frame fits the new size
    screen.refresh()
