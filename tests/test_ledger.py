"""The bundle ledger alone: exactly-once and the retry rules, with no process, no socket
and no clock (time is passed in)."""

from __future__ import annotations

import pytest

from runtime.ledger import BundleExhausted, BundleLedger


def ledger(window: int = 8, max_attempts: int = 3, timeout: float = 10.0) -> BundleLedger:
    return BundleLedger(window, max_attempts, timeout)


def read(book: BundleLedger, *bundles: list) -> None:
    for elements in bundles:
        assert book.has_room()
        book.admit(elements)


def hand_out(book: BundleLedger, worker: int, now: float = 0.0) -> int:
    bundle = book.take()
    assert bundle is not None
    book.assign(bundle, worker, now)
    return bundle.index


def committed(book: BundleLedger) -> list[tuple[int, list, list]]:
    return [(c.bundle, c.outputs, c.dead_letters) for c in book.commit()]


def test_bundles_commit_in_input_order_each_once_whatever_order_they_finish_in():
    book = ledger()
    read(book, ["a"], ["b"], ["c"])
    book.end_of_input()
    for worker in (0, 1, 2):
        hand_out(book, worker)
    assert book.complete(2, 2, 0, ["C"], [])
    assert book.complete(1, 1, 0, ["B"], [{"dead": 1}])
    assert committed(book) == []  # bundle 0 is still running: nothing may pass it
    assert book.complete(0, 0, 0, ["A"], [])
    assert committed(book) == [(0, ["A"], []), (1, ["B"], [{"dead": 1}]), (2, ["C"], [])]
    assert committed(book) == []  # handed out once, then forgotten
    assert book.finished()


def test_the_window_bounds_what_is_held_including_done_bundles_waiting_for_a_slow_one():
    book = ledger(window=3)
    read(book, [0], [1], [2])
    assert not book.has_room()
    for worker in (0, 1, 2):
        hand_out(book, worker)
    book.complete(1, 1, 0, [1], [])
    book.complete(2, 2, 0, [2], [])
    assert committed(book) == [] and not book.has_room()  # 1 and 2 wait for 0
    book.complete(0, 0, 0, [0], [])
    assert len(committed(book)) == 3 and book.has_room()
    book.end_of_input()
    assert not book.has_room() and book.finished()


def test_a_lost_worker_s_bundles_run_again_first_in_input_order_and_its_late_result_is_ignored():
    book = ledger()
    read(book, ["a"], ["b"], ["c"], ["d"])
    assert [hand_out(book, 0), hand_out(book, 0), hand_out(book, 1)] == [0, 1, 2]
    assert book.running_on(0) == 2 and book.running_on(1) == 1
    assert book.lose(0, "worker 0 was killed by SIGKILL") == [0, 1]
    assert book.running_on(0) == 0 and book.retries == 2
    again = book.take()
    assert again is not None and (again.index, again.attempt) == (0, 1)  # before bundle 3
    book.assign(again, 2, 0.0)
    assert not book.complete(0, 0, 0, ["stale"], [])  # the dead worker's attempt: superseded
    assert not book.complete(2, 0, 0, ["stale"], [])  # right worker, old attempt
    assert book.complete(2, 0, 1, ["A"], [])
    assert committed(book) == [(0, ["A"], [])]


def test_a_bundle_that_cannot_be_sent_is_first_in_line_again_on_the_same_attempt():
    book = ledger()
    read(book, ["a"], ["b"])
    bundle = book.take()
    assert bundle is not None
    book.put_back(bundle)
    again = book.take()
    assert again is bundle and again.attempt == 0 and book.retries == 0


def test_user_failures_retry_then_exhaust_with_the_error():
    book = ledger(max_attempts=3)
    read(book, ["x"])
    for attempt in (0, 1):
        hand_out(book, 0)
        assert not book.fail(0, 0, attempt + 5, "ValueError: old")  # not the current attempt
        assert book.fail(0, 0, attempt, "ValueError: thirteen")
    hand_out(book, 0)
    with pytest.raises(BundleExhausted, match="^bundle 0 failed 3 times: ValueError: thirteen$"):
        book.fail(0, 0, 2, "ValueError: thirteen")
    assert book.retries == 2


def test_a_bundle_lost_too_often_exhausts_with_each_cause():
    book = ledger(max_attempts=2)
    read(book, ["x"], ["y"])
    hand_out(book, 0)
    book.lose(0, "worker 0 (pid 10) was killed by SIGKILL")
    hand_out(book, 1)
    with pytest.raises(BundleExhausted) as err:
        book.lose(1, "worker 1 (pid 11) exited with code 6")
    assert str(err.value) == (
        "bundle 0 was lost 2 times with its worker: worker 0 (pid 10) was killed by SIGKILL; "
        "worker 1 (pid 11) exited with code 6"
    )
    assert "timed out" not in str(err.value)


def test_a_bundle_that_keeps_timing_out_says_so_and_after_how_long():
    book = ledger(max_attempts=3, timeout=2.5)
    read(book, ["slow"], ["fast"])
    now = 100.0
    for worker in (0, 1, 2):
        index = hand_out(book, worker, now)
        assert index == 0
        assert book.overdue(now + 2.0) == []
        assert book.overdue(now + 3.0) == [(worker, 0)]
        book.time_out(0)
        assert book.overdue(now + 3.0) == []  # marked once; its worker is being killed
        if worker < 2:
            book.lose(worker, f"worker {worker} was killed by SIGKILL (bundle 0 ran past 2.5s)")
        now += 10
    with pytest.raises(BundleExhausted) as err:
        book.lose(2, "worker 2 was killed by SIGKILL (bundle 0 ran past 2.5s)")
    assert (
        str(err.value) == "bundle 0 timed out 3 times (timed out after 2.5s, each time its worker was killed)"
    )


def test_bundles_lost_beside_a_timed_out_one_are_lost_not_timed_out():
    book = ledger(max_attempts=1, timeout=1.0)
    read(book, ["slow"], ["bystander"])
    hand_out(book, 0)
    hand_out(book, 0, now=5.0)  # a later deadline
    assert book.overdue(2.0) == [(0, 0)]
    book.time_out(0)
    with pytest.raises(BundleExhausted) as err:
        book.lose(0, "worker 0 was killed by SIGKILL (bundle 0 ran past 1s)")
    assert str(err.value).startswith("bundle 0 timed out once (")  # the first exhausted, in order
    bystander = [b for b in book.pending if b.index == 1][0]
    assert bystander.losses == ["worker 0 was killed by SIGKILL (bundle 0 ran past 1s)"]


def test_abandoned_bundles_are_not_run_again():
    book = ledger()
    read(book, ["a"], ["b"], ["c"])
    hand_out(book, 0)
    hand_out(book, 1)
    assert book.abandon(0) == 1
    assert book.uncommitted() == 2 and book.take() is not None and book.retries == 0
    assert not book.complete(0, 0, 0, ["late"], [])
