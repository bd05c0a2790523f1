"""The eviction policy, pure: no torch, no threads, no clock but the one it keeps."""

from __future__ import annotations

from modelserver.policy import GreedyDualSizeFrequency, LeastRecentlyUsed

MB = 1 << 20


def test_large_cheap_rarely_used_models_go_first():
    p = GreedyDualSizeFrequency()
    p.loaded("big-cheap", 400 * MB, 0.1)
    p.loaded("small-cheap", 40 * MB, 0.1)
    p.loaded("small-costly", 40 * MB, 2.0)
    assert p.choose_victims(["big-cheap", "small-cheap", "small-costly"], 1) == ["big-cheap"]
    assert p.choose_victims(["small-cheap", "small-costly"], 1) == ["small-cheap"]


def test_frequency_protects_popular_models():
    p = GreedyDualSizeFrequency()
    p.loaded("popular", 50 * MB, 0.5)
    p.loaded("once", 50 * MB, 0.5)
    for _ in range(10):
        p.hit("popular")
    assert p.choose_victims(["popular", "once"], 1) == ["once"]


def test_evictions_age_the_survivors():
    p = GreedyDualSizeFrequency()
    p.loaded("old-favourite", 50 * MB, 0.5)
    for _ in range(3):
        p.hit("old-favourite")
    # a stream of newcomers, each evicted in turn, raises the clock...
    for i in range(20):
        p.loaded(f"new{i}", 50 * MB, 0.5)
        (victim,) = p.choose_victims([f"new{i}"], 1)
        p.evicted(victim)
    # ...until a newcomer with one use outranks the old favourite that stopped being used
    p.loaded("fresh", 50 * MB, 0.5)
    assert p.choose_victims(["old-favourite", "fresh"], 1) == ["old-favourite"]


def test_victims_stop_once_enough_is_freed():
    p = GreedyDualSizeFrequency()
    for i, size in enumerate([10, 20, 30, 40]):
        p.loaded(f"m{i}", size * MB, 0.1)
    chosen = p.choose_victims([f"m{i}" for i in range(4)], 45 * MB)
    freed = sum({"m0": 10, "m1": 20, "m2": 30, "m3": 40}[k] for k in chosen) * MB
    assert freed >= 45 * MB
    assert len(chosen) == 2 and chosen[0] == "m3"  # largest first at equal cost and use
    assert p.choose_victims([], 10) == []


def test_lru_orders_by_last_use_only():
    p = LeastRecentlyUsed()
    p.loaded("a", 400 * MB, 9.0)
    p.loaded("b", 1 * MB, 0.001)
    p.hit("a")
    assert p.choose_victims(["a", "b"], 1) == ["b"]
