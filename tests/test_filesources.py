"""The unbounded file sources, on real files in a temporary directory, with writer threads.

A reader thread takes bundles from ``bundles()`` as the harness's reader would; tests wait
on conditions with deadlines, and writers sleep only to make a trickle."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from runtime import CannotStart, ReadFromDirectory, ReadFromJsonLinesTail, ReadFromTextTail, TailPosition
from runtime.filesources import DEFAULT_MAX_WAIT
from runtime.pipeline import Source, SourceBundle

pytestmark = pytest.mark.timeout(30)


def wait_until(condition: Callable[[], Any], timeout: float = 5.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)


class Reader:
    """Takes bundles from a source on a thread of its own; records when each came."""

    def __init__(self, source: Source, size: int = 1000, max_wait: float | None = 0.1):
        self.source = source
        self.received: list[tuple[float, float, SourceBundle]] = []  # (monotonic, time.time(), bundle)
        self.error: BaseException | None = None
        self.thread = threading.Thread(
            target=self._run, args=(size, max_wait), name="test-reader", daemon=True
        )
        self.thread.start()

    def _run(self, size: int, max_wait: float | None) -> None:
        try:
            for bundle in self.source.bundles(size, max_wait):
                assert isinstance(bundle, SourceBundle)
                self.received.append((time.monotonic(), time.time(), bundle))
        except BaseException as exc:  # reported by the test, not lost on the thread
            self.error = exc

    @property
    def bundles(self) -> list[SourceBundle]:
        return [b for _, _, b in list(self.received)]

    def elements(self) -> list[Any]:
        return [e for b in self.bundles for e in b.elements]

    def wait_for(self, n: int, timeout: float = 5.0) -> list[Any]:
        wait_until(lambda: len(self.elements()) >= n or self.error, timeout, f"{n} elements")
        assert self.error is None
        return self.elements()

    def wait_for_empty_bundles(self, n: int, timeout: float = 5.0) -> None:
        """Until ``n`` more empty bundles came: the source has polled and found nothing."""
        start = sum(1 for b in self.bundles if not len(b.elements))
        wait_until(
            lambda: sum(1 for b in self.bundles if not len(b.elements)) >= start + n, timeout, "empty bundles"
        )

    def stop(self) -> None:
        self.source.close()
        self.thread.join(5)
        assert not self.thread.is_alive(), "bundles() did not end after close()"
        assert self.error is None


@pytest.fixture
def readers() -> Iterator[Callable[..., Reader]]:
    started: list[Reader] = []

    def start(source: Source, size: int = 1000, max_wait: float | None = 0.1) -> Reader:
        started.append(Reader(source, size, max_wait))
        return started[-1]

    yield start
    for reader in started:
        reader.stop()


def writer(target: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=target, name="test-writer", daemon=True)
    thread.start()
    return thread


def append(path: str | os.PathLike[str], text: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)


# -- a followed file --------------------------------------------------------------------
def test_lines_appended_after_the_start_arrive_in_order(tmp_path, readers):
    path = tmp_path / "log.txt"
    path.write_text("first\nsecond\n")
    reader = readers(ReadFromTextTail(str(path)))
    assert reader.wait_for(2) == ["first", "second"]

    def trickle() -> None:
        with open(path, "a", encoding="utf-8") as f:
            for i in range(200):
                f.write(f"line {i}\r\n" if i % 7 == 0 else f"line {i}\n")
                f.flush()
                if i % 20 == 0:
                    time.sleep(0.01)

    writer(trickle).join(5)
    assert reader.wait_for(202) == ["first", "second"] + [f"line {i}" for i in range(200)]


def test_a_partial_line_waits_for_its_newline(tmp_path, readers):
    path = tmp_path / "log.txt"
    path.write_text("one\nhal")
    source = ReadFromTextTail(str(path))
    reader = readers(source)
    assert reader.wait_for(1) == ["one"]
    reader.wait_for_empty_bundles(3)  # polled again and again: "hal" is not a line yet
    assert reader.elements() == ["one"]
    append(path, "f a line\n")
    assert reader.wait_for(2) == ["one", "half a line"]
    st = os.stat(path)
    assert reader.bundles[-1].ack == TailPosition((st.st_dev, st.st_ino), st.st_size)


def test_from_the_end_starts_after_what_was_there(tmp_path, readers):
    path = tmp_path / "log.txt"
    path.write_text("old\nolder\nin the mid")
    reader = readers(ReadFromTextTail(str(path), from_beginning=False))
    reader.wait_for_empty_bundles(1)  # the source has opened the file at its end
    append(path, "dle\nnew\n")
    assert reader.wait_for(1) == ["new"]


def test_rotation_loses_and_duplicates_nothing(tmp_path, readers):
    path = tmp_path / "app.log"
    path.write_text("")
    reader = readers(ReadFromTextTail(str(path)), size=7)
    expected = [f"{r}-{i}" for r in range(3) for i in range(40)]

    def write_and_rotate() -> None:
        for r in range(3):
            f = open(path, "a", encoding="utf-8")  # the writer's file; after the rename it is the old one
            for i in range(30):
                f.write(f"{r}-{i}\n")
                f.flush()
                if i % 10 == 0:
                    time.sleep(0.01)
            # A file must stand at the path for a poll to be seen (as with tail -F).
            wait_until(lambda n=r * 40: len(reader.elements()) > n, what="the reader to follow the file")
            os.rename(path, tmp_path / f"app.log.{r}")
            for i in range(30, 40):  # still writing to the renamed file, as a writer does until it reopens
                f.write(f"{r}-{i}\n")
                f.flush()
            f.close()
            if r < 2:
                wait_until(
                    lambda n=(r + 1) * 40: len(reader.elements()) >= n, what="the rotated file's lines"
                )

    writer(write_and_rotate).join(10)
    assert reader.wait_for(len(expected)) == expected
    reader.wait_for_empty_bundles(2)
    assert reader.elements() == expected


def test_rotation_mid_stream_to_a_new_file_at_the_path(tmp_path, readers):
    path = tmp_path / "app.log"
    source = ReadFromTextTail(str(path))
    reader = readers(source)

    def write_rotate_write() -> None:
        with open(path, "w", encoding="utf-8") as f:
            for i in range(50):
                f.write(f"old {i}\n")
                f.flush()
            wait_until(lambda: reader.elements(), what="the reader to follow the file")
            os.rename(path, tmp_path / "app.log.1")
            f.write("old 50\n")
            f.flush()
        with open(path, "w", encoding="utf-8") as f:  # the new file, right away
            for i in range(50):
                f.write(f"new {i}\n")
                f.flush()
                if i % 10 == 0:
                    time.sleep(0.01)

    writer(write_rotate_write).join(5)
    expected = [f"old {i}" for i in range(51)] + [f"new {i}" for i in range(50)]
    assert reader.wait_for(len(expected)) == expected
    st = os.stat(path)
    assert reader.bundles[-1].ack == TailPosition((st.st_dev, st.st_ino), st.st_size)


def test_a_new_file_rotated_away_before_it_was_followed_is_still_read(tmp_path):
    """Step by step (``_take``: one poll, no waiting): the file seen at the path is held
    open, so it is read in full even when it is itself rotated away before the switch."""
    path = tmp_path / "app.log"
    path.write_text("a1\n")
    source = ReadFromTextTail(str(path))
    take = lambda: [item.element for item in source._take(100)]  # noqa: E731
    assert take() == ["a1"]
    os.rename(path, tmp_path / "app.log.1")
    path.write_text("b1\n")
    append(tmp_path / "app.log.1", "a2\n")  # its writer had not moved yet
    assert take() == ["a2"]  # then a's end, and b is seen at the path and held open
    os.rename(path, tmp_path / "app.log.2")
    path.write_text("c1\n")
    append(tmp_path / "app.log.2", "b2\n")
    assert take() == ["b1", "b2"]  # a was quiet for a poll: on to b, though it is gone from the path
    assert take() == ["c1"]
    assert take() == []
    source.close()
    assert take() == []


def test_truncation_reads_again_from_the_start_and_warns(tmp_path, readers, caplog):
    caplog.set_level(logging.WARNING, logger="beamlet.filesources")
    path = tmp_path / "log.txt"
    path.write_text("a\nb\nc\n")
    reader = readers(ReadFromTextTail(str(path)))
    assert reader.wait_for(3) == ["a", "b", "c"]
    with open(path, "w", encoding="utf-8") as f:  # truncated in place, same file
        f.write("d\n")
    assert reader.wait_for(4) == ["a", "b", "c", "d"]
    append(path, "e\n")
    assert reader.wait_for(5) == ["a", "b", "c", "d", "e"]
    assert any(r.levelno == logging.WARNING and "truncated" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("from_beginning", [True, False])
def test_a_missing_file_is_waited_for_and_read_from_its_start(tmp_path, readers, from_beginning):
    path = tmp_path / "later" / "log.txt"  # not even its directory yet
    source = ReadFromTextTail(str(path), from_beginning=from_beginning)
    source.check()  # a missing file is not an error for a followed file
    reader = readers(source)
    reader.wait_for_empty_bundles(3)
    path.parent.mkdir()
    path.write_text("x\ny\n")
    assert reader.wait_for(2) == ["x", "y"]


def test_json_lines_skip_blank_lines_and_warn_about_bad_ones(tmp_path, readers, caplog):
    caplog.set_level(logging.WARNING, logger="beamlet.filesources")
    path = tmp_path / "events.jsonl"
    path.write_text('{"a": 1}\n\n   \nnot json\n')
    source = ReadFromJsonLinesTail(str(path))
    reader = readers(source)
    assert reader.wait_for(1) == [{"a": 1}]
    append(path, '[2, 3]\n{"a": \n"four"\n')
    assert reader.wait_for(3) == [{"a": 1}, [2, 3], "four"]
    assert source.skipped == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"{path}:4: not JSON" in w for w in warnings), warnings
    assert any(f"{path}:6: not JSON" in w for w in warnings), warnings


def test_max_wait_closes_a_short_bundle_and_a_full_one_closes_at_once(tmp_path, readers):
    path = tmp_path / "log.txt"
    path.write_text("")
    max_wait = 0.3
    reader = readers(ReadFromTextTail(str(path)), size=10, max_wait=max_wait)
    reader.wait_for_empty_bundles(1)
    append(path, "".join(f"{i}\n" for i in range(23)))
    written = time.time()
    reader.wait_for(23)
    got = [(wall, b) for _, wall, b in reader.received if len(b.elements)]
    assert [len(b.elements) for _, b in got] == [10, 10, 3]
    for wall, bundle in got[:2]:  # full: out as soon as read
        assert bundle.arrived is not None and wall - written < max_wait
    wall, short = got[2]
    assert short.arrived is not None
    assert max_wait - 0.02 <= wall - short.arrived <= max_wait + 0.2  # waited for more, then closed


def test_an_idle_source_yields_empty_bundles_every_max_wait(tmp_path, readers):
    reader = readers(ReadFromTextTail(str(tmp_path / "log.txt")), max_wait=0.1)
    reader.wait_for_empty_bundles(6)
    times = [t for t, _, _ in reader.received]
    assert all(not len(b.elements) and b.ack is None and b.arrived is None for b in reader.bundles)
    assert max(b - a for a, b in zip(times, times[1:])) <= 0.1 + 0.15


def test_the_default_max_wait(tmp_path, readers):
    start = time.monotonic()
    reader = readers(ReadFromTextTail(str(tmp_path / "log.txt")), max_wait=None)
    reader.wait_for_empty_bundles(1, timeout=DEFAULT_MAX_WAIT + 2)
    assert DEFAULT_MAX_WAIT - 0.05 <= reader.received[0][0] - start <= DEFAULT_MAX_WAIT + 0.5


def test_ack_records_the_position_and_a_new_source_resumes_from_it(tmp_path, readers):
    path = tmp_path / "log.txt"
    path.write_text("a\nb\nc\n")
    first = ReadFromTextTail(str(path))
    reader = readers(first, size=2)
    assert reader.wait_for(3) == ["a", "b", "c"]
    st = os.stat(path)
    identity = (st.st_dev, st.st_ino)
    acks = [b.ack for b in reader.bundles if len(b.elements)]
    assert acks == [TailPosition(identity, 4), TailPosition(identity, 6)]
    first.ack(acks[:1])
    assert first.acked == TailPosition(identity, 4)
    first.ack([None, acks[1]])
    assert first.acked == TailPosition(identity, 6)
    reader.stop()

    append(path, "d\ne\n")
    resumed = ReadFromTextTail(str(path), resume=first.acked)
    assert readers(resumed).wait_for(2) == ["d", "e"]

    replaced = tmp_path / "new.txt"
    replaced.write_text("f\n")
    os.replace(replaced, path)  # another file at the path now: the position does not apply
    assert readers(ReadFromTextTail(str(path), resume=first.acked)).wait_for(1) == ["f"]


def test_read_yields_elements_until_close(tmp_path):
    path = tmp_path / "log.txt"
    path.write_text("a\nb\n")
    source = ReadFromTextTail(str(path))
    it = source.read()
    assert [next(it), next(it)] == ["a", "b"]
    threading.Timer(0.1, append, (path, "c\n")).start()
    assert next(it) == "c"  # waits for it
    source.close()
    assert list(it) == []


def test_check_refuses_a_directory(tmp_path):
    with pytest.raises(CannotStart, match="is a directory"):
        ReadFromTextTail(str(tmp_path)).check()


# -- a directory ------------------------------------------------------------------------
def test_directory_yields_each_file_once_only_when_complete(tmp_path, readers):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "present.jsonl").write_text("{}\n")
    (inbox / "ignored.txt").write_text("not matched\n")
    source = ReadFromDirectory(str(inbox / "*.jsonl"), poll_interval=0.02, settle=0.3)
    finished: dict[str, float] = {}

    reader = readers(source, max_wait=0.05)
    assert reader.wait_for(1) == [str(inbox / "present.jsonl")]

    def slow_write() -> None:
        with open(inbox / "slow.jsonl", "w", encoding="utf-8") as f:
            for i in range(8):
                if i:
                    time.sleep(0.03)  # pauses well under settle
                f.write(json.dumps({"i": i}) + "\n")
                f.flush()
        finished["slow"] = time.monotonic()

    writer(slow_write).join(5)
    assert reader.wait_for(2)[1] == str(inbox / "slow.jsonl")
    came = next(t for t, _, b in reader.received if str(inbox / "slow.jsonl") in b.elements)
    assert came >= finished["slow"] + 0.3 - 0.01  # not before it stood still for settle

    append(inbox / "slow.jsonl", "{}\n")  # changed after it was yielded: not yielded again
    reader.wait_for_empty_bundles(15)
    assert reader.elements() == [str(inbox / "present.jsonl"), str(inbox / "slow.jsonl")]


def test_directory_takes_a_file_moved_in_whole_at_once(tmp_path, readers):
    inbox, staging = tmp_path / "inbox", tmp_path / "staging"
    inbox.mkdir()
    staging.mkdir()
    source = ReadFromDirectory(str(inbox / "*.csv"), poll_interval=0.02, settle=10.0)
    reader = readers(source, max_wait=0.05)
    (inbox / "in_place.csv").write_text("a,b\n")  # written in place: waits 10 s to settle
    (staging / "moved.csv").write_text("c,d\n")
    time.sleep(0.02)  # the writer pauses: the rename comes a clock tick after the last write
    os.rename(staging / "moved.csv", inbox / "moved.csv")
    assert reader.wait_for(1) == [str(inbox / "moved.csv")]
    reader.wait_for_empty_bundles(3)
    assert reader.elements() == [str(inbox / "moved.csv")]


def test_directory_with_existing_false_ignores_what_was_there(tmp_path, readers):
    (tmp_path / "old.txt").write_text("old\n")
    source = ReadFromDirectory(str(tmp_path / "*.txt"), poll_interval=0.02, settle=0.05, existing=False)
    reader = readers(source, max_wait=0.05)
    reader.wait_for_empty_bundles(2)
    (tmp_path / "new.txt").write_text("new\n")
    assert reader.wait_for(1) == [str(tmp_path / "new.txt")]


def test_directory_ack_records_paths_and_resume_skips_them(tmp_path, readers):
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.txt").write_text(name)
    source = ReadFromDirectory(str(tmp_path / "*.txt"), poll_interval=0.02, settle=0.05)
    reader = readers(source, size=2, max_wait=0.05)
    paths = sorted(reader.wait_for(3))
    assert paths == [str(tmp_path / f"{n}.txt") for n in "abc"]
    acks = [b.ack for b in reader.bundles if len(b.elements)]
    assert [p for ack in acks for p in ack] == reader.elements()
    source.ack(acks)
    assert sorted(source.acked) == paths
    reader.stop()

    (tmp_path / "d.txt").write_text("d")
    resumed = ReadFromDirectory(str(tmp_path / "*.txt"), poll_interval=0.02, settle=0.05, resume=source.acked)
    assert readers(resumed, max_wait=0.05).wait_for(1) == [str(tmp_path / "d.txt")]


def test_directory_defaults_and_check(tmp_path):
    source = ReadFromDirectory(str(tmp_path / "*.txt"))
    assert (source.poll_interval, source.settle, source.unbounded) == (0.5, 1.0, True)
    source.check()
    ReadFromDirectory(str(tmp_path / "**" / "*.txt")).check()
    with pytest.raises(CannotStart, match="does not exist"):
        ReadFromDirectory(str(tmp_path / "missing" / "*.txt")).check()
