"""A long-lived harness for custom runners, and unbounded input (issue 13).

Real harness, real forked workers; unbounded sources here are small in-test sources
written to the ``Source`` interface (the Redis and file sources have tests of their own).
"""

from __future__ import annotations

import itertools
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

from runtime import Collect, Filter, FlatMap, Harness, Map, PipelineError
from runtime.pipeline import Source, SourceBundle
from tests.conftest import ROOT, server_env


def double(x: int) -> int:
    return 2 * x


STEPS = Map(double)


def test_process_over_an_infinite_generator_yields_before_the_generator_ends():
    pulled = itertools.count()

    def endless() -> Iterator[list[int]]:
        for i in itertools.count():
            next(pulled)
            yield [i, i + 1]

    with Harness(workers=2, threads=2, progress=False) as h:
        results = h.process(endless(), STEPS)
        first = next(results)
        assert first.index == 0 and first.outputs == [0, 2]
        got = [next(results) for _ in range(200)]
        assert [r.outputs for r in got] == [[2 * i, 2 * i + 2] for i in range(1, 201)]
        # bounded read-ahead: the generator was not read far beyond what was taken
        ahead = next(pulled) - 201
        assert ahead <= 2 * 2 * 2 + 2, f"{ahead} bundles read ahead of the caller"


def test_workers_outlive_a_process_call_inside_with():
    with Harness(workers=2, threads=2, progress=False) as h:
        first = [r.outputs for r in h.process([[1], [2]], STEPS)]
        pids = h.worker_pids()
        second = [r.outputs for r in h.process([[3], [4], [5]], STEPS)]
        assert h.worker_pids() == pids and len(pids) == 2
    assert first == [[2], [4]] and second == [[6], [8], [10]]
    assert h.worker_pids() == []  # the block ended: workers gone
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_other_steps_get_workers_of_their_own():
    other = Map(lambda x: x + 100)
    with Harness(workers=1, threads=2, progress=False) as h:
        assert [r.outputs for r in h.process([[1]], STEPS)] == [[2]]
        assert [r.outputs for r in h.process([[1]], other)] == [[101]]
        assert [r.outputs for r in h.process([[1]], other)] == [[101]]


def test_submit_gives_futures_that_commit_in_order():
    pipeline = Map(double) | FlatMap(lambda x: [x, x + 1]) | Filter(lambda x: x % 3 != 0)
    done: list[int] = []
    with Harness(workers=2, threads=2, progress=False) as h:
        futures = []
        for i in range(30):
            f = h.submit(range(i * 5, i * 5 + 5), pipeline)
            f.add_done_callback(lambda f: done.append(f.result().index))
            futures.append(f)
        results = [f.result(timeout=60) for f in futures]
    assert [r.index for r in results] == list(range(30)) and done == sorted(done)
    for i, r in enumerate(results):
        assert r.outputs == [y for x in range(i * 5, i * 5 + 5) for y in (2 * x, 2 * x + 1) if y % 3 != 0]


def test_submit_outside_with_is_refused():
    with pytest.raises(RuntimeError, match="with Harness"):
        Harness(workers=1, threads=1, progress=False).submit([1], STEPS)


def test_process_outside_with_still_works_and_stops_its_workers():
    h = Harness(workers=2, threads=2, progress=False)
    assert [r.outputs for r in h.process([[1], [2], [3]], STEPS)] == [[2], [4], [6]]
    assert h.worker_pids() == []


def boom(x: int) -> int:
    if x == 13:
        raise ValueError("thirteen")
    return x


def test_a_failing_bundle_fails_its_future_and_the_ones_after_it():
    with pytest.raises(PipelineError):
        with Harness(workers=1, threads=1, max_attempts=1, progress=False) as h:
            futures = [h.submit([i], Map(boom)) for i in range(10, 16)]
            assert futures[0].result(timeout=60).outputs == [10]
            with pytest.raises(PipelineError, match="thirteen"):
                futures[3].result(timeout=60)
            for f in futures[3:]:
                with pytest.raises(PipelineError):
                    f.result(timeout=60)


def test_a_worker_killed_inside_a_session_loses_nothing():
    with Harness(workers=2, threads=2, progress=False) as h:
        results = h.process(([i] for i in range(400)), Map(slow_double))
        got = [next(results) for _ in range(20)]
        os.kill(h.worker_pids()[0], signal.SIGKILL)
        got += list(results)
    assert [r.outputs for r in got] == [[2 * i] for i in range(400)]


def slow_double(x: int) -> int:
    time.sleep(0.002)
    return 2 * x


def test_rss_stays_flat_over_100000_bundles():
    """The harness process's memory does not grow with the number of bundles."""
    me = psutil.Process()
    samples: list[int] = []
    with Harness(workers=2, threads=2, progress=False) as h:
        for r in h.process(([i] for i in range(100_000)), STEPS):
            if r.index % 10_000 == 0:
                samples.append(me.memory_info().rss)
    assert r.index == 99_999
    growth = max(samples[2:]) - samples[1]
    assert growth < 20 << 20, [s >> 20 for s in samples]


# -- unbounded input -------------------------------------------------------------------------
class QueueSource(Source):
    """An unbounded in-test source: elements put on ``queue``; bundles closed when full or
    ``max_wait`` after their first element; acks recorded."""

    unbounded = True

    def __init__(self) -> None:
        self.queue: queue.Queue[Any] = queue.Queue()
        self.acked: list[Any] = []

    def bundles(self, size: int, max_wait: float | None = None) -> Iterator[SourceBundle]:
        wait = max_wait or 0.1
        n = 0
        while True:
            try:
                first = self.queue.get(timeout=wait)
            except queue.Empty:
                yield SourceBundle([])
                continue
            arrived = time.time()
            elements = [first]
            deadline = time.monotonic() + wait
            while len(elements) < size and (left := deadline - time.monotonic()) > 0:
                try:
                    elements.append(self.queue.get(timeout=left))
                except queue.Empty:
                    break
            yield SourceBundle(elements, ack=(n, len(elements)), arrived=arrived)
            n += 1

    def ack(self, acks: list[Any]) -> None:
        self.acked.extend(acks)


def test_a_trickle_commits_within_the_bundle_wait_and_a_stop_commits_what_is_in_flight():
    source = QueueSource()
    sink = Collect()
    h = Harness(workers=2, threads=2, bundle_size=64, max_bundle_wait=0.05, progress=False)
    summary_box: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: summary_box.update(s=h.run(source | Map(double) | sink)))
    runner.start()
    try:
        latencies = []
        for i in range(20):  # one event at a time: each must commit without 63 others
            sent = time.monotonic()
            source.queue.put(i)
            deadline = sent + 10
            while len(sink.values) <= i:
                assert time.monotonic() < deadline, "an event waited for a full bundle"
                time.sleep(0.001)
            latencies.append(time.monotonic() - sent)
        assert sorted(latencies)[len(latencies) // 2] < 0.5, latencies
    finally:
        h.request_stop(signal.SIGTERM)
        runner.join(60)
    summary = summary_box["s"]
    assert sink.values == [2 * i for i in range(20)]
    assert summary.interrupted == "SIGTERM" and summary.unbounded
    assert sum(n for _, n in source.acked) == 20  # every committed bundle acknowledged
    assert summary.latency and summary.latency.percentile(99) < 1.0


PIPELINE = """
import time
from runtime import Map, WriteToJsonLines
from tests.test_long_lived_harness import QueueSource

class Feeder(QueueSource):
    def __init__(self):
        super().__init__()
        for i in range(50):
            self.queue.put(i)

def build_pipeline(input, output):
    return Feeder() | Map(lambda x: x * 2) | WriteToJsonLines(output)
"""


def test_the_cli_runs_an_unbounded_source_until_sigterm_and_exits_128_plus_n(private_dir):
    job = os.path.join(private_dir, "job.py")
    out = os.path.join(private_dir, "out.jsonl")
    with open(job, "w") as f:
        f.write(PIPELINE)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "runtime",
            "run",
            job,
            "--output",
            out,
            "--workers",
            "1",
            "--threads",
            "1",
            "--no-progress",
            "--json",
        ],
        env=server_env(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        partial = out + ".partial"
        while not (os.path.exists(partial) and len(open(partial).read().splitlines()) >= 50):
            assert time.monotonic() < deadline and proc.poll() is None, (
                proc.stderr.read() if proc.poll() else ""
            )
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    with open(out) as f:
        assert [int(line) for line in f] == [2 * i for i in range(50)]
    assert '"interrupted": "SIGTERM"' in stdout and '"p99_ms"' in stdout


def test_a_followed_file_flows_through_the_harness_and_acks_what_committed(private_dir):
    """ReadFromTextTail -> Map -> Collect while lines are appended, including a rotation;
    SIGTERM ends the run with every line written once, in order, and acknowledged."""
    from runtime import ReadFromTextTail

    path = os.path.join(private_dir, "events.log")
    source = ReadFromTextTail(path, poll_interval=0.01)
    sink = Collect()
    h = Harness(workers=2, threads=1, bundle_size=16, max_bundle_wait=0.05, progress=False)
    box: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: box.update(s=h.run(source | Map(str.upper) | sink)))
    runner.start()
    try:
        with open(path, "w") as f:
            for i in range(300):
                f.write(f"event {i}\n")
                f.flush()
                if i == 150:  # rotated: the old file renamed away, a new one at the path
                    deadline = time.monotonic() + 30  # (once the source has seen the old one:
                    while not sink.values:  # a file at the path for less than a poll is missed)
                        assert time.monotonic() < deadline, "nothing committed"
                        time.sleep(0.01)
                    f.close()
                    os.rename(path, path + ".1")
                    f = open(path, "w")  # noqa: SIM115 - the writer keeps writing the new file
        deadline = time.monotonic() + 30
        while len(sink.values) < 300:
            assert time.monotonic() < deadline, f"{len(sink.values)} of 300 lines committed"
            time.sleep(0.01)
    finally:
        h.request_stop(signal.SIGTERM)
        runner.join(60)
    assert sink.values == [f"EVENT {i}" for i in range(300)]
    assert box["s"].interrupted == "SIGTERM" and box["s"].latency
    assert source.acked is not None and source.acked.offset == os.path.getsize(path)


def test_windows_by_arrival_time_close_on_an_idle_stream():
    """A stream windowed by arrival time: a window's count comes out once its end has
    passed, though nothing more arrives."""
    from runtime import CountPerKey, FixedWindows, WindowInto

    source = QueueSource()
    sink = Collect()
    h = Harness(workers=1, threads=1, bundle_size=8, max_bundle_wait=0.02, progress=False)
    box: dict[str, Any] = {}
    pipeline = source | Map(lambda x: ("k", x)) | WindowInto(FixedWindows(1)) | CountPerKey() | sink
    runner = threading.Thread(target=lambda: box.update(s=h.run(pipeline)))
    runner.start()
    try:
        for i in range(5):
            source.queue.put(i)
        deadline = time.monotonic() + 15
        while sum(w.value for w in list(sink.values)) < 5:
            assert time.monotonic() < deadline, f"windows not closed: {sink.values}"
            time.sleep(0.02)
    finally:
        h.request_stop(signal.SIGTERM)
        runner.join(60)
    assert all(w.key == "k" and w.window.end - w.window.start == 1 for w in sink.values)
    assert sum(w.value for w in sink.values) == 5 and box["s"].interrupted == "SIGTERM"
