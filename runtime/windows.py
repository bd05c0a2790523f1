"""Windows: event time, the watermark, and per-key combines per window, as in Beam.

    pipeline = (
        ReadFromJsonLines("clicks.jsonl")
        | Map(lambda e: (e["user"], e["t"]))
        | WindowInto(FixedWindows(60), timestamp_fn=lambda kv: kv[1], allowed_lateness=5)
        | CountPerKey()
        | Map(lambda r: {"user": r.key, "clicks": r.value, "minute": r.window.start})
        | WriteToJsonLines("counts.jsonl")
    )

``WindowInto`` is a plain step: in a worker it passes its elements on unchanged, so
``... | WindowInto(FixedWindows(10)) | RunInference(...)`` runs as before. It only says
how a later grouping step (``CombinePerKey``, ``CountPerKey``) cuts time.

A grouping step keeps state across bundles, so it runs in one place, the harness, over
each bundle's outputs at commit, in input order (``Pipeline.split`` cuts a pipeline into
the steps for the workers and the ``HarnessSteps`` for the harness). There, each element
gets an event time (``timestamp_fn(element)``, else the time its bundle arrived), goes
into every window of the window function that contains it, and the watermark moves: the
largest event time seen so far minus ``allowed_lateness``, once per bundle, after its
elements are in. A window closes when the watermark reaches its end; it then emits one
``WindowedResult`` per key and forgets its state. An element whose windows have all
closed is a dead letter (``late: ...``), counted in ``late``; nothing is dropped
silently. At the end of bounded input ``finish()`` closes every window still open.

Times are seconds since the epoch (numbers). Window arithmetic runs on whole
microseconds, converted as Beam's ``Timestamp`` converts them, so windows here are
Beam's windows exactly (tests/test_windows.py compares them).
"""

from __future__ import annotations

import heapq
import math
import numbers
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from runtime.errors import PipelineError
from runtime.pipeline import BundleOutput, InferenceStep, Step

__all__ = [
    "CombinePerKey",
    "CountPerKey",
    "FixedWindows",
    "GlobalWindows",
    "Grouping",
    "GroupingStep",
    "HarnessSteps",
    "IntervalWindow",
    "SlidingWindows",
    "WindowFn",
    "WindowInto",
    "WindowedResult",
    "split_steps",
]

_MICROS = 1_000_000

# A window in whole microseconds, (start, end); the global window is (-inf, inf).
_Span = tuple[float, float]


class IntervalWindow(NamedTuple):
    """A window ``[start, end)``, in seconds since the epoch (Beam's IntervalWindow)."""

    start: float
    end: float


GLOBAL_WINDOW = IntervalWindow(-math.inf, math.inf)


class WindowedResult(NamedTuple):
    """What a grouping step emits: for one ``key`` and one ``window``, the combined
    ``value`` of the key's values in that window (their count, for ``CountPerKey``).
    ``window`` is ``GLOBAL_WINDOW``, ``(-inf, inf)``, when no ``WindowInto`` came before
    the grouping step. A sink writes it as ``{"key", "value", "window": {"start", "end"}}``."""

    key: Any
    value: Any
    window: IntervalWindow


# -- window functions ------------------------------------------------------------------
def _micros(seconds: Any, what: str) -> int:
    """Seconds as whole microseconds, as Beam's ``Timestamp(seconds)`` has them (an
    integer exactly, a float truncated toward zero). TypeError/ValueError otherwise."""
    if isinstance(seconds, bool) or not isinstance(seconds, numbers.Real):
        raise TypeError(f"{what} must be a number of seconds, not {type(seconds).__name__}")
    if isinstance(seconds, numbers.Integral):
        return int(seconds) * _MICROS
    if not math.isfinite(seconds):
        raise ValueError(f"{what} must be finite, not {seconds}")
    return int(float(seconds) * _MICROS)


def _seconds(micros: float) -> float:
    return micros / _MICROS


class WindowFn:
    """Which windows an event time falls in (non-merging, as Beam's FixedWindows and
    SlidingWindows)."""

    def assign(self, timestamp: float) -> list[IntervalWindow]:
        """The windows that contain ``timestamp`` (seconds), in Beam's order."""
        return [
            IntervalWindow(_seconds(s), _seconds(e)) for s, e in self._assign(_micros(timestamp, "timestamp"))
        ]

    def _assign(self, t: int) -> list[_Span]:
        raise NotImplementedError


class GlobalWindows(WindowFn):
    """One window for all time; it closes only at the end of bounded input."""

    def _assign(self, t: int) -> list[_Span]:
        return [(-math.inf, math.inf)]

    def __repr__(self) -> str:
        return "GlobalWindows()"


class FixedWindows(WindowFn):
    """Windows of ``size`` seconds, one after the other: ``[N * size + offset, (N + 1) *
    size + offset)``; each time falls in exactly one. ``offset`` is taken modulo ``size``."""

    def __init__(self, size: float, offset: float = 0):
        self.size = _micros(size, "size")
        if self.size <= 0:
            raise ValueError("The size parameter must be strictly positive.")
        self.offset = _micros(offset, "offset") % self.size

    def _assign(self, t: int) -> list[_Span]:
        start = t - (t - self.offset) % self.size
        return [(start, start + self.size)]

    def __repr__(self) -> str:
        return f"FixedWindows({_seconds(self.size):g}, offset={_seconds(self.offset):g})"


class SlidingWindows(WindowFn):
    """Windows of ``size`` seconds starting every ``period`` seconds: ``[N * period +
    offset, N * period + offset + size)``. A time falls in every window that contains it:
    ``size / period`` of them when ``period`` divides ``size``; none at all in the gaps
    when ``period > size`` (such an element is a dead letter, ``no window``; Beam drops
    it). ``offset`` is taken modulo ``period``."""

    def __init__(self, size: float, period: float, offset: float = 0):
        self.size = _micros(size, "size")
        self.period = _micros(period, "period")
        if self.size <= 0:
            raise ValueError("The size parameter must be strictly positive.")
        if self.period <= 0:
            raise ValueError("The period parameter must be strictly positive.")
        self.offset = _micros(offset, "offset") % self.period

    def _assign(self, t: int) -> list[_Span]:
        last_start = t - (t - self.offset) % self.period
        return [(s, s + self.size) for s in range(last_start, t - self.size, -self.period)]

    def __repr__(self) -> str:
        return (
            f"SlidingWindows({_seconds(self.size):g}, {_seconds(self.period):g}, "
            f"offset={_seconds(self.offset):g})"
        )


class WindowInto(Step):
    """Windowing for the grouping step after it (Beam's ``WindowInto``).

    In a worker it is the identity. The grouping step that follows it takes from it the
    window function, the event time of each element (``timestamp_fn(element)``, seconds
    since the epoch; default: when the element's bundle arrived), and ``allowed_lateness``
    (seconds the watermark stays behind the largest event time seen, so that windows wait
    that long for stragglers). ``timestamp_fn`` is called in the harness, on the elements
    as they reach the grouping step (the ``(key, value)`` pairs), not on the elements as
    they pass here.
    """

    def __init__(
        self,
        windowfn: WindowFn,
        timestamp_fn: Callable[[Any], float] | None = None,
        allowed_lateness: float = 0.0,
        label: str | None = None,
    ):
        if not isinstance(windowfn, WindowFn):
            raise TypeError(f"WindowInto takes a window function (FixedWindows, ...), not {windowfn!r}")
        if _micros(allowed_lateness, "allowed_lateness") < 0:
            raise ValueError("allowed_lateness must not be negative")
        self.windowfn = windowfn
        self.timestamp_fn = timestamp_fn
        self.allowed_lateness = allowed_lateness
        self.label = label or f"WindowInto({windowfn!r})"

    def process(self, elements: list[Any], out: BundleOutput) -> list[Any]:
        return elements


# -- grouping --------------------------------------------------------------------------
class _CallableCombineFn:
    """A plain callable (``sum``, ``max``) as a CombineFn, as Beam wraps one: the values
    are buffered and, past 10, reduced to one, so the callable must accept its own
    results among its inputs (be associative and commutative)."""

    BUFFER = 10

    def __init__(self, fn: Callable[[Iterable[Any]], Any]):
        self.fn = fn

    def create_accumulator(self) -> list[Any]:
        return []

    def add_input(self, accumulator: list[Any], value: Any) -> list[Any]:
        accumulator.append(value)
        if len(accumulator) > self.BUFFER:
            return [self.fn(accumulator)]
        return accumulator

    def extract_output(self, accumulator: list[Any]) -> Any:
        return self.fn(accumulator)


class _CountCombineFn:
    def create_accumulator(self) -> int:
        return 0

    def add_input(self, accumulator: int, value: Any) -> int:
        return accumulator + 1

    def extract_output(self, accumulator: int) -> int:
        return accumulator


def _is_combine_fn(fn: Any) -> bool:
    return all(callable(getattr(fn, m, None)) for m in ("create_accumulator", "add_input", "extract_output"))


class GroupingStep(Step):
    """A step that combines ``(key, value)`` elements per key and window, across bundles.

    It holds state, so it runs once, in the harness, not in the workers:
    ``bind(windowing)`` makes the ``Grouping`` that does the work. In a worker,
    ``process`` fails (the harness must cut the pipeline with ``Pipeline.split``)."""

    def __init__(self, combine_fn: Any, label: str):
        self.combine_fn = combine_fn
        self.label = label

    def process(self, elements: list[Any], out: BundleOutput) -> list[Any]:
        raise PipelineError(
            f"{self.label} groups across bundles and runs in the harness, not in a worker: "
            "this harness does not cut pipelines at grouping steps (Pipeline.split)"
        )

    def bind(self, windowing: WindowInto | None) -> Grouping:
        """The state that runs this step, windowed by ``windowing`` (the last WindowInto
        before the step; None: one global window)."""
        return Grouping(self, windowing)


class CombinePerKey(GroupingStep):
    """Combine the values of each key in each window (Beam's ``CombinePerKey``).

    ``fn`` is a callable over an iterable of values (``sum``, ``max``; associative and
    commutative, since it is applied to partial results too, as in Beam), or a
    CombineFn-like object with ``create_accumulator()``, ``add_input(acc, value) -> acc``
    and ``extract_output(acc)`` (a Beam ``CombineFn`` works; ``merge_accumulators`` is
    not needed, as every key's values meet in one place)."""

    def __init__(self, fn: Any, label: str | None = None):
        if _is_combine_fn(fn):
            combine_fn = fn
        elif callable(fn):
            combine_fn = _CallableCombineFn(fn)
        else:
            raise TypeError(f"CombinePerKey takes a callable or a CombineFn, not {fn!r}")
        name = getattr(fn, "__qualname__", None) or type(fn).__name__
        super().__init__(combine_fn, label or f"CombinePerKey({name})")


class CountPerKey(GroupingStep):
    """The number of elements of each key in each window (Beam's ``Count.PerKey``)."""

    def __init__(self, label: str | None = None):
        super().__init__(_CountCombineFn(), label or "CountPerKey()")


class Grouping:
    """A grouping step at work: the open windows' accumulators and the watermark.

    ``process`` takes each committed bundle's elements in commit order; ``advance``
    moves the watermark without elements (an idle stream whose event times are arrival
    times); ``finish`` ends bounded input. Each returns the ``WindowedResult`` of the
    windows it closed, in order of window end, each window's keys in first-seen order.
    Only open windows hold state. Not thread-safe: one caller, the harness loop.

    An exception raised by the combine function propagates (the run fails, as a Map
    that keeps raising fails it); elements that cannot be grouped are dead letters."""

    def __init__(self, step: GroupingStep, windowing: WindowInto | None):
        self.step = step
        self.combine_fn = step.combine_fn
        self.windowfn: WindowFn = windowing.windowfn if windowing else GlobalWindows()
        self.timestamp_fn = windowing.timestamp_fn if windowing else None
        self.lateness = _micros(windowing.allowed_lateness, "allowed_lateness") if windowing else 0
        self.late = 0  # elements whose windows had all closed
        self.unwindowed = 0  # elements in no window (the gaps of SlidingWindows)
        self._watermark: float = -math.inf  # microseconds
        self._open: dict[_Span, dict[Any, Any]] = {}
        self._by_end: list[tuple[float, float]] = []  # heap of (end, start) of open windows
        setup = getattr(self.combine_fn, "setup", None)
        if callable(setup):
            setup()

    @property
    def watermark(self) -> float:
        """Seconds: the largest event time seen minus the allowed lateness (-inf before
        the first element, +inf after ``finish``)."""
        return _seconds(self._watermark)

    @property
    def open_windows(self) -> int:
        return len(self._open)

    def process(
        self, elements: Iterable[Any], arrived: float | None = None
    ) -> tuple[list[WindowedResult], list[dict[str, Any]]]:
        """Group one bundle's ``(key, value)`` elements; ``arrived`` (seconds; None: now)
        is their event time when the windowing has no ``timestamp_fn``. Returns the
        results of the windows that the bundle closed, and its dead letters: elements
        that are not pairs, whose key is not hashable, whose timestamp cannot be had,
        or that are late."""
        default = _micros(time.time() if arrived is None else arrived, "arrived")
        dead: list[dict[str, Any]] = []
        latest = -math.inf
        for element in elements:
            added = self._add(element, default)
            if isinstance(added, str):
                dead.append({"step": self.step.label, "element": element, "error": added})
            else:
                latest = max(latest, added)
        return self._advance(latest - self.lateness), dead

    def advance(self, event_time: float) -> list[WindowedResult]:
        """Move the watermark as if an element of ``event_time`` (seconds) had come."""
        return self._advance(_micros(event_time, "event_time") - self.lateness)

    def finish(self) -> list[WindowedResult]:
        """The end of bounded input: close every open window. Later elements are late."""
        return self._advance(math.inf)

    def _add(self, element: Any, default: int) -> int | str:
        """Put one element in its open windows: its event time, or why it cannot go."""
        if not isinstance(element, (tuple, list)) or len(element) != 2:
            return f"TypeError: {self.step.label} takes (key, value) pairs, not {_what(element)}"
        key, value = element
        try:
            hash(key)
        except TypeError:
            return f"TypeError: the key {key!r} is not hashable"
        t = default
        if self.timestamp_fn is not None:
            try:
                t = _micros(self.timestamp_fn(element), "the event time")
            except Exception as exc:
                return f"timestamp: {type(exc).__name__}: {exc}"
        windows = self._windows(t)
        if isinstance(windows, str):
            return windows
        fn = self.combine_fn
        for window in windows:
            accumulators = self._open.get(window)
            if accumulators is None:
                accumulators = self._open[window] = {}
                heapq.heappush(self._by_end, (window[1], window[0]))
            accumulator = accumulators[key] if key in accumulators else fn.create_accumulator()
            accumulators[key] = fn.add_input(accumulator, value)
        return t

    def _windows(self, t: int) -> list[_Span] | str:
        """The open windows of event time ``t``, or why there are none."""
        windows = self.windowfn._assign(t)
        if not windows:
            self.unwindowed += 1
            return f"no window: event time {_seconds(t)} falls in no window of {self.windowfn!r}"
        open_ = [w for w in windows if w[1] > self._watermark]
        if not open_:
            self.late += 1
            return (
                f"late: event time {_seconds(t)} is behind the watermark {self.watermark}; "
                f"its windows closed (allowed lateness {_seconds(self.lateness)}s)"
            )
        return open_

    def _advance(self, watermark: float) -> list[WindowedResult]:
        if watermark <= self._watermark:
            return []
        self._watermark = watermark
        results: list[WindowedResult] = []
        while self._by_end and self._by_end[0][0] <= watermark:
            end, start = heapq.heappop(self._by_end)
            window = IntervalWindow(_seconds(start), _seconds(end))
            extract = self.combine_fn.extract_output
            for key, accumulator in self._open.pop((start, end)).items():
                results.append(WindowedResult(key, extract(accumulator), window))
        return results


def _what(element: Any) -> str:
    if isinstance(element, (tuple, list)):
        return f"a {type(element).__name__} of {len(element)}"
    return f"a {type(element).__name__}"


# -- the harness's part of a pipeline ----------------------------------------------------
class HarnessSteps:
    """The steps of a pipeline that run in the harness: a grouping step and the
    element-wise steps after it, over each committed bundle's outputs, in commit order.

    Empty (falsy) when the pipeline has no grouping step: ``process`` then passes the
    outputs through. Each method returns ``(outputs, dead_letters)`` for the sink, to be
    committed with the bundle at hand (``finish``'s with the last one). Steps after the
    grouping step are set up (``Step.setup``) before their first use."""

    def __init__(self, steps: list[Step], windowing: WindowInto | None = None):
        self.steps = list(steps)
        self.grouping: Grouping | None = None
        if self.steps:
            first = self.steps[0]
            if not isinstance(first, GroupingStep):
                raise TypeError(f"the harness's steps start with a grouping step, not {first.label}")
            self.grouping = first.bind(windowing)
        self._set_up = False

    def __bool__(self) -> bool:
        return self.grouping is not None

    @property
    def late(self) -> int:
        """Elements dead-lettered as late so far."""
        return self.grouping.late if self.grouping is not None else 0

    def process(
        self, outputs: list[Any], arrived: float | None = None
    ) -> tuple[list[Any], list[dict[str, Any]]]:
        """One committed bundle's worker outputs; ``arrived`` as ``SourceBundle.arrived``
        (None: now)."""
        if self.grouping is None:
            return list(outputs), []
        return self._after(*self.grouping.process(outputs, arrived))

    def advance(self, event_time: float) -> tuple[list[Any], list[dict[str, Any]]]:
        """Move the watermark on an idle stream (``Grouping.advance``)."""
        if self.grouping is None:
            return [], []
        return self._after(self.grouping.advance(event_time), [])

    def finish(self) -> tuple[list[Any], list[dict[str, Any]]]:
        """The end of bounded input: the windows still open, through the later steps."""
        if self.grouping is None:
            return [], []
        return self._after(self.grouping.finish(), [])

    def _after(
        self, results: list[Any], dead: list[dict[str, Any]]
    ) -> tuple[list[Any], list[dict[str, Any]]]:
        if not self._set_up:
            for step in self.steps[1:]:
                step.setup()
            self._set_up = True
        out = BundleOutput(dead_letters=dead)
        elements: list[Any] = results
        for step in self.steps[1:]:
            elements = step.process(elements, out)
        return elements, out.dead_letters


def split_steps(steps: list[Step]) -> tuple[list[Step], HarnessSteps]:
    """``Pipeline.split``: the steps before the first grouping step run in the workers;
    the grouping step, windowed by the last ``WindowInto`` before it, and the steps after
    it run in the harness. ValueError for a pipeline the harness cannot run: a second
    grouping step, or RunInference after a grouping step (models live in workers)."""
    cut = next((i for i, s in enumerate(steps) if isinstance(s, GroupingStep)), len(steps))
    workers, rest = list(steps[:cut]), list(steps[cut:])
    for step in rest[1:]:
        if isinstance(step, GroupingStep):
            raise ValueError(f"one grouping step per pipeline: {step.label} follows {rest[0].label}")
        if isinstance(step, InferenceStep):
            raise ValueError(
                f"{step.label} after {rest[0].label} would run in the harness; run inference before grouping"
            )
    windowing = next((s for s in reversed(workers) if isinstance(s, WindowInto)), None)
    return workers, HarnessSteps(rest, windowing)
