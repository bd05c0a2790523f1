"""Windows, the watermark and per-key combines (runtime/windows.py): pure tests against
hand-computed expectations and Beam's own window functions, and two real harness runs."""

from __future__ import annotations

import math
import os
import time
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from client import PytorchModelHandlerTensor
from runtime import (
    Collect,
    CombinePerKey,
    CountPerKey,
    Create,
    Filter,
    FixedWindows,
    Harness,
    HarnessSteps,
    IntervalWindow,
    Map,
    PipelineError,
    RunInference,
    SlidingWindows,
    WatchFilePattern,
    WindowedResult,
    WindowInto,
)
from runtime.pipeline import BundleOutput, Pipeline, to_jsonable
from runtime.windows import GLOBAL_WINDOW, Grouping, WindowFn
from tests.models import MLP, make_checkpoint


def at(kv: Any) -> float:
    """The event time of a ``(key, t)`` element: its value."""
    return kv[1]


def grouping(step: Any, windowfn: WindowFn | None, lateness: float = 0.0, timestamp_fn: Any = at) -> Grouping:
    windowing = WindowInto(windowfn, timestamp_fn, lateness) if windowfn is not None else None
    return step.bind(windowing)


def W(key: Any, value: Any, start: float, end: float) -> WindowedResult:
    return WindowedResult(key, value, IntervalWindow(start, end))


# -- the window functions are Beam's ---------------------------------------------------
def test_fixed_and_sliding_windows_assign_by_hand():
    assert FixedWindows(10).assign(7) == [IntervalWindow(0, 10)]
    assert FixedWindows(10).assign(10) == [IntervalWindow(10, 20)]
    assert FixedWindows(10).assign(-0.5) == [IntervalWindow(-10, 0)]
    assert FixedWindows(10, offset=3).assign(12.5) == [IntervalWindow(3, 13)]
    assert FixedWindows(10, offset=13).offset == FixedWindows(10, offset=3).offset
    assert SlidingWindows(10, 5).assign(7) == [IntervalWindow(5, 15), IntervalWindow(0, 10)]
    assert SlidingWindows(30, 10).assign(25) == [
        IntervalWindow(20, 50),
        IntervalWindow(10, 40),
        IntervalWindow(0, 30),
    ]
    assert SlidingWindows(5, 10).assign(7) == []  # in the gap between [0, 5) and [10, 15)
    for bad in (lambda: FixedWindows(0), lambda: SlidingWindows(10, 0), lambda: SlidingWindows(-1, 5)):
        with pytest.raises(ValueError):
            bad()
    with pytest.raises(TypeError):
        WindowInto(10)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        WindowInto(FixedWindows(10), allowed_lateness=-1)


# Up to year 2096: microseconds stay below 2**53, where a float still holds each one
times = st.floats(-1e9, 4e9, allow_nan=False)


@st.composite
def size_period(draw: Any) -> tuple[float, float]:
    """Seconds to the microsecond, up to 100 s, with at most 20 windows per time."""
    period = draw(st.integers(1, 10**8))
    size = draw(st.integers(1, 20 * period))
    return size / 10**6, period / 10**6


@settings(max_examples=300, deadline=None, derandomize=True)
@given(size_period=size_period(), offset=st.floats(-1e4, 1e4), t=times)
def test_windows_are_beams_windows(size_period, offset, t):
    size, period = size_period
    beam_window = pytest.importorskip("apache_beam.transforms.window")
    from apache_beam.utils.timestamp import Timestamp

    def beam(fn: Any) -> list[tuple[float, float]]:
        windows = fn.assign(beam_window.WindowFn.AssignContext(Timestamp.of(t)))
        return [(float(w.start), float(w.end)) for w in windows]

    assert FixedWindows(size, offset).assign(t) == beam(beam_window.FixedWindows(size, offset))
    ours = SlidingWindows(size, period, offset).assign(t)
    assert ours == beam(beam_window.SlidingWindows(size, period, offset))
    micros = int(t * 10**6) / 10**6  # Beam's (and our) time: truncated toward zero
    assert all(w.start <= micros < w.end for w in ours)


# -- fixed windows, the watermark, lateness ------------------------------------------------
def test_fixed_windows_count_per_key_over_bundles_emitted_exactly_when_the_watermark_passes_the_end():
    g = grouping(CountPerKey(), FixedWindows(10))
    assert g.process([("a", 1), ("b", 3), ("a", 9)], arrived=0) == ([], [])
    assert g.watermark == 9 and g.open_windows == 1
    # 9.5 is not late: the watermark moves after the whole bundle is in
    assert g.process([("a", 12), ("b", 9.5)], arrived=0) == ([W("a", 2, 0, 10), W("b", 2, 0, 10)], [])
    out, dead = g.process([("b", 5), ("a", 19.999)], arrived=0)
    assert out == [] and g.watermark == 19.999  # just short of [10, 20)'s end
    assert [d["element"] for d in dead] == [("b", 5)]
    assert dead[0]["error"].startswith("late: event time 5.0 is behind the watermark 12.0")
    assert dead[0]["step"] == "CountPerKey()"
    assert g.late == 1
    assert g.process([("c", 20)], arrived=0) == ([W("a", 2, 10, 20)], [])
    assert g.open_windows == 1
    assert g.finish() == [W("c", 1, 20, 30)]
    assert to_jsonable(W("c", 1, 20, 30)) == {"key": "c", "value": 1, "window": {"start": 20, "end": 30}}
    assert g.open_windows == 0 and g.watermark == math.inf
    assert g.process([("c", 1e9)], arrived=0)[1][0]["error"].startswith("late:")


@pytest.mark.parametrize("lateness, late", [(0, 1), (5, 0)])
def test_allowed_lateness_keeps_a_window_open_longer(lateness, late):
    g = grouping(CountPerKey(), FixedWindows(10), lateness=lateness)
    first, _ = g.process([("k", 12)], arrived=0)  # watermark 12 - lateness
    _, dead = g.process([("k", 8)], arrived=0)
    second, _ = g.process([("k", 15)], arrived=0)  # watermark 15 - lateness
    assert g.late == late and len(dead) == late
    if lateness == 0:
        assert first == [] and second == []  # [0, 10) held nothing: it never opened
    else:
        assert first == [] and second == [W("k", 1, 0, 10)]
    assert g.finish() == [W("k", 2, 10, 20)]


def test_windows_come_out_in_order_of_end_keys_in_first_seen_order():
    g = grouping(CountPerKey(), FixedWindows(10))
    assert g.process([("z", 35), ("y", 5), ("x", 15), ("y", 25), ("z", 25), ("x", 5)], arrived=0)[0] == [
        W("y", 1, 0, 10),
        W("x", 1, 0, 10),
        W("x", 1, 10, 20),
        W("y", 1, 20, 30),
        W("z", 1, 20, 30),
    ]
    assert g.finish() == [W("z", 1, 30, 40)]


# -- sliding windows ---------------------------------------------------------------------
def test_sliding_windows_by_hand_a_straggler_goes_only_in_its_open_windows():
    g = grouping(CountPerKey(), SlidingWindows(10, 5))
    assert g.process([("k", 3), ("k", 7)], arrived=0) == ([W("k", 1, -5, 5)], [])
    assert g.process([("k", 12)], arrived=0) == ([W("k", 2, 0, 10)], [])
    # 8 is in [0, 10), closed, and [5, 15), open: counted in the open one, not late
    assert g.process([("k", 8)], arrived=0) == ([], [])
    assert g.late == 0
    assert g.finish() == [W("k", 3, 5, 15), W("k", 1, 10, 20)]


def test_sliding_windows_count_an_element_in_size_over_period_windows():
    g = grouping(CountPerKey(), SlidingWindows(30, 10))
    g.process([("k", 25)], arrived=0)
    assert g.finish() == [W("k", 1, 0, 30), W("k", 1, 10, 40), W("k", 1, 20, 50)]


def test_an_element_in_no_sliding_window_is_a_dead_letter_not_dropped():
    g = grouping(CountPerKey(), SlidingWindows(5, 10))
    out, dead = g.process([("k", 7), ("k", 3)], arrived=0)
    assert [d["element"] for d in dead] == [("k", 7)]
    assert dead[0]["error"].startswith("no window: event time 7.0")
    assert g.unwindowed == 1 and g.late == 0
    assert g.finish() == [W("k", 1, 0, 5)]


# -- combines ------------------------------------------------------------------------------
class MeanFn:
    """A CombineFn-like object (not a Beam class)."""

    def create_accumulator(self) -> tuple[float, int]:
        return 0.0, 0

    def add_input(self, acc: tuple[float, int], value: float) -> tuple[float, int]:
        return acc[0] + value, acc[1] + 1

    def merge_accumulators(self, accs: Any) -> tuple[float, int]:
        sums, counts = zip(*accs, strict=True)
        return sum(sums), sum(counts)

    def extract_output(self, acc: tuple[float, int]) -> float:
        return acc[0] / acc[1]


def keyed(values: range, key: str) -> list[tuple[str, int]]:
    return [(key, v) for v in values]


@pytest.mark.parametrize(
    "fn, expect_a, expect_b",
    [(sum, sum(range(25)), 100 * 25), (max, 24, 100), (MeanFn(), 12.0, 100.0)],
    ids=["sum", "max", "combinefn"],
)
def test_combine_per_key_with_a_callable_or_a_combine_fn(fn, expect_a, expect_b):
    g = grouping(CombinePerKey(fn), None)  # more than the 10 values a callable buffers
    elements = [kv for pair in zip(keyed(range(25), "a"), [("b", 100)] * 25, strict=True) for kv in pair]
    assert g.process(elements[:17], arrived=0) == ([], [])
    assert g.process(elements[17:], arrived=0) == ([], [])
    assert g.finish() == [
        WindowedResult("a", expect_a, GLOBAL_WINDOW),
        WindowedResult("b", expect_b, GLOBAL_WINDOW),
    ]


def test_combine_per_key_takes_a_beam_combine_fn():
    combiners = pytest.importorskip("apache_beam.transforms.combiners")
    g = grouping(CombinePerKey(combiners.MeanCombineFn()), FixedWindows(10), timestamp_fn=lambda kv: kv[1])
    g.process([("a", 1), ("a", 2), ("b", 4)], arrived=0)
    assert g.finish() == [W("a", 1.5, 0, 10), W("b", 4.0, 0, 10)]


def test_combine_per_key_needs_a_callable_and_its_errors_propagate():
    with pytest.raises(TypeError):
        CombinePerKey(42)
    g = grouping(CombinePerKey(sum), FixedWindows(10), timestamp_fn=None)
    assert g.process([("a", 1), ("a", "x")], arrived=0) == ([], [])
    with pytest.raises(TypeError):
        g.finish()


def test_elements_that_cannot_be_grouped_are_typed_dead_letters_not_late():
    def stamp(kv: Any) -> Any:
        return kv[1]["t"]

    g = grouping(CountPerKey(), FixedWindows(10), timestamp_fn=stamp)
    bad = ["ab", ("k", {"t": 1}, 3), ([1], {"t": 1}), ("k", {}), ("k", {"t": "1"}), ("k", {"t": math.nan})]
    out, dead = g.process([*bad, ("k", {"t": 1})], arrived=0)
    assert [d["element"] for d in dead] == bad
    errors = [d["error"] for d in dead]
    assert errors[0] == "TypeError: CountPerKey() takes (key, value) pairs, not a str"
    assert errors[1] == "TypeError: CountPerKey() takes (key, value) pairs, not a tuple of 3"
    assert errors[2] == "TypeError: the key [1] is not hashable"
    assert errors[3] == "timestamp: KeyError: 't'"
    assert errors[4] == "timestamp: TypeError: the event time must be a number of seconds, not str"
    assert errors[5] == "timestamp: ValueError: the event time must be finite, not nan"
    assert g.late == 0
    assert g.finish() == [W("k", 1, 0, 10)]


# -- event time by default: arrival ----------------------------------------------------------
def test_without_timestamp_fn_the_event_time_is_the_bundles_arrival():
    g = grouping(CountPerKey(), FixedWindows(10), timestamp_fn=None)
    assert g.process([("k", 0), ("k", 0)], arrived=101.5) == ([], [])
    assert g.process([("k", 0)], arrived=110.0) == ([W("k", 2, 100, 110)], [])
    assert g.advance(120) == [W("k", 1, 110, 120)]  # an idle stream's clock
    before = time.time()
    g.process([("now", 0)], arrived=None)
    (result,) = g.finish()
    assert result.key == "now" and result.window.start <= before + 10 and result.window.end > before


def test_without_window_into_one_global_window_closes_at_finish():
    g = grouping(CountPerKey(), None)
    for n in range(5):
        assert g.process([("k", n), ("j", n)], arrived=n * 1000.0) == ([], [])
    assert g.finish() == [WindowedResult("k", 5, GLOBAL_WINDOW), WindowedResult("j", 5, GLOBAL_WINDOW)]


# -- the harness's part: Pipeline.split and HarnessSteps ----------------------------------------
def test_split_without_a_grouping_step_leaves_every_step_to_the_workers():
    steps = Map(str) | WindowInto(FixedWindows(10)) | Filter(bool)
    workers, harness = steps.split()
    assert workers == steps.steps and not harness
    assert harness.process([1, 2], arrived=0) == ([1, 2], [])
    assert harness.finish() == ([], []) and harness.late == 0


def test_split_cuts_at_the_grouping_step_and_binds_the_last_window_into():
    ten, five = WindowInto(FixedWindows(10), at), WindowInto(FixedWindows(5), at)
    pipeline = Create([]) | Map(tuple) | five | ten | CountPerKey() | Map(lambda r: (r.key, r.value))
    pipeline |= Filter(lambda kv: kv[0] != "skip")
    workers, harness = pipeline.split()
    assert workers == pipeline.steps[:3] and harness.steps == pipeline.steps[3:]
    assert harness and harness.grouping is not None and harness.grouping.windowfn is ten.windowfn
    assert harness.process([("a", 1), ("skip", 2), ("a", 3), ["bad"]], arrived=0) == (
        [],
        [{"step": "CountPerKey()", "element": ["bad"], "error": "TypeError: CountPerKey() takes "
          "(key, value) pairs, not a list of 1"}],
    )  # fmt: skip
    assert harness.process([("b", 10), ("a", 2)], arrived=0) == ([("a", 3)], [])
    _, dead = harness.process([("a", 4)], arrived=0)
    assert dead[0]["error"].startswith("late:") and harness.late == 1
    assert harness.advance(25) == ([("b", 1)], [])
    assert harness.finish() == ([], [])


def test_split_refuses_what_the_harness_cannot_run():
    with pytest.raises(ValueError, match="one grouping step"):
        (CountPerKey() | Map(str) | CombinePerKey(sum)).split()
    handler = PytorchModelHandlerTensor("/nonexistent/model.pt", MLP, {})
    with pytest.raises(ValueError, match="run inference before grouping"):
        (CountPerKey() | RunInference(handler)).split()
    with pytest.raises(TypeError):
        HarnessSteps([Map(str)])


def test_harness_steps_set_up_the_later_steps_once():
    class Counting(Map):
        setups = 0

        def setup(self) -> None:
            Counting.setups += 1

    _, harness = Pipeline(steps=[CountPerKey(), Counting(lambda r: r.value)]).split()
    assert harness.process([("k", 1)], arrived=0) == ([], [])
    assert harness.finish() == ([1], [])
    assert Counting.setups == 1


def test_a_grouping_step_refuses_to_run_in_a_worker():
    with pytest.raises(PipelineError, match="runs in the harness"):
        CountPerKey().process([("k", 1)], BundleOutput())


# -- real harness runs -----------------------------------------------------------------------------
def test_window_into_in_a_worker_is_the_identity():
    sink = Collect()
    Harness(workers=1, threads=2, progress=False, bundle_size=7).run(
        Create(range(20)) | WindowInto(FixedWindows(10)) | Map(lambda x: x * 2) | sink
    )
    assert sink.values == [x * 2 for x in range(20)]


def to_tensor(i: int) -> torch.Tensor:
    return torch.randn(8, generator=torch.Generator().manual_seed(i))


def test_the_seed_pipeline_as_written_runs_in_the_workers(private_dir):
    path = os.path.join(private_dir, "model-1.pt")
    model = make_checkpoint(path)
    handler = PytorchModelHandlerTensor(path, MLP, {})
    watch = WatchFilePattern(os.path.join(private_dir, "model-*.pt"), interval=60)
    pipeline = (
        Create(range(6))
        | Map(to_tensor)
        | WindowInto(FixedWindows(10))
        | RunInference(handler, model_metadata_pcoll=watch)
        | Map(lambda r: r.inference.tolist())
    )
    workers, harness = pipeline.split()
    assert workers == pipeline.steps and not harness
    sink = Collect()
    Harness(workers=1, threads=1, progress=False).run(pipeline | sink)
    with torch.inference_mode():
        expected = [model(to_tensor(i)[None])[0].tolist() for i in range(6)]
    assert torch.allclose(torch.tensor(sink.values), torch.tensor(expected), atol=1e-6)


def test_worker_steps_in_a_harness_then_harness_steps_at_commit():
    pipeline = Map(lambda i: (f"k{i % 3}", i)) | WindowInto(FixedWindows(10), at) | CountPerKey()
    workers, harness = pipeline.split()
    bundles = [list(range(b, b + 5)) for b in range(0, 30, 5)]
    results: list[Any] = []
    for bundle in Harness(workers=2, threads=2, progress=False).process(bundles, Pipeline(steps=workers)):
        results += harness.process(bundle.outputs, arrived=0)[0]
    results += harness.finish()[0]
    expected = [
        W(f"k{k}", sum(1 for i in range(start, start + 10) if i % 3 == k), start, start + 10)
        for start in (0, 10, 20)
        for k in sorted({i % 3 for i in range(start, start + 10)}, key=lambda k: (k - start) % 3)
    ]
    assert results == expected


# -- properties --------------------------------------------------------------------------------------
def containing(t: int, size: int, period: int, offset: int) -> list[tuple[int, int]]:
    """Every window [N * period + offset, ... + size) that contains t, by brute force."""
    found = []
    for n in range((t - offset - size) // period - 2, (t - offset) // period + 3):
        start = n * period + offset
        if start <= t < start + size:
            found.append((start, start + size))
    return found


windowings = st.tuples(st.integers(1, 20), st.integers(1, 20), st.integers(0, 30)).map(
    lambda spo: (spo[0], spo[1], spo[2] % spo[1])
)
bundles_of = st.lists(
    st.lists(st.tuples(st.sampled_from("abc"), st.integers(-50, 200)), max_size=8), max_size=8
)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(windowing=windowings, lateness=st.integers(0, 40), bundles=bundles_of)
def test_each_element_counts_in_exactly_its_open_windows_or_is_a_dead_letter(windowing, lateness, bundles):
    size, period, offset = windowing
    g = grouping(CountPerKey(), SlidingWindows(size, period, offset), lateness=lateness)
    watermark: float = -math.inf
    counts: dict[tuple[int, int], dict[str, int]] = {}
    closes: dict[tuple[int, int], int] = {}  # window -> the call that must emit it
    dead_letters = 0
    emitted: list[tuple[int, WindowedResult]] = []
    for call, bundle in enumerate(bundles):
        latest: float = -math.inf
        dead_expected = []
        for key, t in bundle:
            open_ = [w for w in containing(t, size, period, offset) if w[1] > watermark]
            if not open_:
                dead_expected.append((key, t))
                continue
            for w in open_:
                counts.setdefault(w, {}).setdefault(key, 0)
                counts[w][key] += 1
            latest = max(latest, t)
        watermark = max(watermark, latest - lateness)
        for w in counts:
            if w not in closes and w[1] <= watermark:
                closes[w] = call
        out, dead = g.process(bundle, arrived=0)
        assert [d["element"] for d in dead] == dead_expected
        dead_letters += len(dead)
        emitted += [(call, r) for r in out]
    emitted += [(len(bundles), r) for r in g.finish()]
    assert dead_letters == g.late + g.unwindowed
    assert [r.window.end for _, r in emitted] == sorted(r.window.end for _, r in emitted)
    assert {(r.window.start, r.window.end, r.key): r.value for _, r in emitted} == {
        (w[0], w[1], k): n for w, keys in counts.items() for k, n in keys.items()
    }
    for call, r in emitted:
        assert call == closes.get((int(r.window.start), int(r.window.end)), len(bundles))
    assert g.open_windows == 0


@settings(max_examples=200, deadline=None, derandomize=True)
@given(windowing=windowings, bundles=bundles_of)
def test_with_lateness_over_the_disorder_every_window_counts_all_its_elements(windowing, bundles):
    size, period, offset = windowing
    g = grouping(CountPerKey(), SlidingWindows(size, period, offset), lateness=250)
    results = [r for b in bundles for r in g.process(b, arrived=0)[0]] + g.finish()
    elements = [kv for b in bundles for kv in b]
    expected: dict[tuple[int, int, str], int] = {}
    for key, t in elements:
        for start, end in containing(t, size, period, offset):
            expected[start, end, key] = expected.get((start, end, key), 0) + 1
    assert {(r.window.start, r.window.end, r.key): r.value for r in results} == expected
    assert g.late == 0
    if period == size:
        assert sum(r.value for r in results) == len(elements)


def test_run_groups_in_the_harness_windows_close_by_the_watermark_and_late_ones_are_dead_letters():
    """Harness.run with a grouping step: the workers run the steps before it, the harness
    counts per key and window at commit; an element later than the watermark minus the
    allowed lateness is a dead letter; the end of the input closes the rest."""
    # (key, event time) in input order, bundles of 4, lateness 2 s; the watermark moves
    # after each bundle: 9, then 19 (closes [0,10)), then 27 (closes [10,20))
    events = [("a", 1), ("b", 2), ("a", 11), ("a", 3)]
    events += [("b", 14), ("a", 21), ("a", 12), ("b", 8)]  # b@8: [0,10) still open
    events += [("b", 29), ("a", 25), ("b", 5), ("a", 22)]  # b@5: [0,10) closed: late
    sink = Collect()
    summary = Harness(workers=2, threads=1, bundle_size=4, progress=False).run(
        Create(events)
        | Map(lambda e: (e[0], e[1]))
        | WindowInto(FixedWindows(10), timestamp_fn=lambda kv: kv[1], allowed_lateness=2)
        | CountPerKey()
        | Map(lambda w: (w.key, w.value, w.window.start, w.window.end))
        | sink
    )
    assert sink.values == [
        *[("a", 2, 0, 10), ("b", 2, 0, 10)],
        *[("a", 2, 10, 20), ("b", 1, 10, 20)],
        *[("a", 3, 20, 30), ("b", 1, 20, 30)],  # closed by the end of the input
    ]
    assert [d["element"] for d in sink.dead_letters] == [["b", 5]] and "late" in sink.dead_letters[0]["error"]
    assert summary.dead_letter_count == 1 and summary.outputs == 6


def test_sliding_windows_in_a_run_count_each_element_in_every_window_that_holds_it():
    sink = Collect()
    Harness(workers=1, threads=2, bundle_size=3, progress=False).run(
        Create([("k", t) for t in (1, 4, 6, 9)])
        | WindowInto(SlidingWindows(6, 3), timestamp_fn=lambda kv: kv[1])
        | CombinePerKey(sum)
        | Map(lambda w: (w.window.start, w.window.end, w.value))
        | sink
    )
    # windows [-3,3) [0,6) [3,9) [6,12) [9,15): 1 | 1+4 | 4+6 | 6+9 | 9
    assert sink.values == [(-3, 3, 1), (0, 6, 5), (3, 9, 10), (6, 12, 15), (9, 15, 9)]
