"""The in-process hot cache, driven by a fake clock."""

from __future__ import annotations

import pytest

from parley.cache import CacheStats, Entry, MemoryCache
from parley.protocol.model import Message

START = 1_765_000_000.0
"""The fake clock's start, in seconds."""


class FakeClock:
    """A clock that moves only when the test moves it."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_entry(room: str, seq: int, ts_ms: int) -> Entry:
    message = Message(room, seq, f"m{seq}", "alice", ts_ms, f"body {seq}")
    return Entry(message, message.encode())


def fill(cache: MemoryCache, clock: FakeClock, room: str, seqs: range) -> None:
    for seq in seqs:
        cache.add(make_entry(room, seq, int(clock.now * 1000)))


def seqs_of(entries: list[Entry] | None) -> list[int] | None:
    return None if entries is None else [entry.message.seq for entry in entries]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def cache(clock: FakeClock) -> MemoryCache:
    return MemoryCache(window_seconds=3600, max_per_room=100, clock=clock)


def test_read_after_returns_range(cache: MemoryCache, clock: FakeClock) -> None:
    fill(cache, clock, "lobby", range(1, 21))

    assert seqs_of(cache.read_after("lobby", 5, 3, 20)) == [6, 7, 8]
    assert seqs_of(cache.read_after("lobby", 15, 50, 20)) == [16, 17, 18, 19, 20]
    assert seqs_of(cache.read_after("lobby", 0, 50, 20)) == list(range(1, 21))


def test_read_after_stops_at_head(cache: MemoryCache, clock: FakeClock) -> None:
    fill(cache, clock, "lobby", range(1, 21))

    assert seqs_of(cache.read_after("lobby", 5, 50, 8)) == [6, 7, 8]


def test_read_after_empty_range_is_hit(cache: MemoryCache) -> None:
    assert cache.read_after("lobby", 20, 50, 20) == []
    assert cache.read_after("lobby", 5, 0, 20) == []
    assert cache.stats() == CacheStats(hits=2, misses=0, rooms=0, entries=0)


def test_read_after_returns_same_entries(cache: MemoryCache, clock: FakeClock) -> None:
    entry = make_entry("lobby", 1, int(clock.now * 1000))
    cache.add(entry)

    [read] = cache.read_after("lobby", 0, 1, 1) or []

    assert read is entry
    assert read.frame == entry.message.encode()


def test_read_after_misses_on_any_gap(cache: MemoryCache, clock: FakeClock) -> None:
    fill(cache, clock, "lobby", range(10, 21))

    assert cache.read_after("lobby", 8, 5, 20) is None
    assert cache.read_after("lobby", 18, 5, 22) is None
    assert cache.read_after("kitchen", 0, 5, 3) is None
    assert seqs_of(cache.read_after("lobby", 9, 2, 20)) == [10, 11]


def test_read_before_returns_range(cache: MemoryCache, clock: FakeClock) -> None:
    fill(cache, clock, "lobby", range(1, 21))

    assert seqs_of(cache.read_before("lobby", 21, 3)) == [18, 19, 20]
    assert seqs_of(cache.read_before("lobby", 5, 10)) == [1, 2, 3, 4]
    assert cache.read_before("lobby", 1, 10) == []
    assert cache.read_before("lobby", 10, 0) == []


def test_read_before_misses_on_any_gap(cache: MemoryCache, clock: FakeClock) -> None:
    fill(cache, clock, "lobby", range(10, 21))

    assert cache.read_before("lobby", 12, 5) is None
    assert cache.read_before("lobby", 25, 3) is None
    assert cache.read_before("kitchen", 5, 3) is None
    assert seqs_of(cache.read_before("lobby", 15, 5)) == [10, 11, 12, 13, 14]


def test_hits_and_misses_counted(cache: MemoryCache, clock: FakeClock) -> None:
    fill(cache, clock, "lobby", range(5, 11))
    fill(cache, clock, "kitchen", range(1, 4))

    cache.read_after("lobby", 5, 2, 10)
    cache.read_after("lobby", 0, 2, 10)
    cache.read_before("lobby", 11, 2)
    cache.read_before("lobby", 6, 2)
    cache.read_after("nowhere", 0, 2, 10)

    assert cache.stats() == CacheStats(hits=2, misses=3, rooms=2, entries=9)


def test_trim_by_count(clock: FakeClock) -> None:
    cache = MemoryCache(window_seconds=3600, max_per_room=5, clock=clock)

    fill(cache, clock, "lobby", range(1, 9))

    assert cache.stats().entries == 5
    assert cache.read_after("lobby", 2, 10, 8) is None
    assert seqs_of(cache.read_after("lobby", 3, 10, 8)) == [4, 5, 6, 7, 8]


def test_trim_by_count_many_entries(clock: FakeClock) -> None:
    cache = MemoryCache(window_seconds=3600, max_per_room=100, clock=clock)

    fill(cache, clock, "lobby", range(1, 5001))

    assert cache.stats().entries == 100
    assert cache.read_after("lobby", 4899, 10, 5000) is None
    assert seqs_of(cache.read_after("lobby", 4900, 3, 5000)) == [4901, 4902, 4903]
    assert seqs_of(cache.read_before("lobby", 5001, 2)) == [4999, 5000]


def test_trim_by_age_on_add(clock: FakeClock) -> None:
    cache = MemoryCache(window_seconds=60, max_per_room=100, clock=clock)
    fill(cache, clock, "lobby", range(1, 4))
    clock.advance(30)
    fill(cache, clock, "lobby", range(4, 6))

    clock.advance(31)
    fill(cache, clock, "lobby", range(6, 7))

    assert cache.read_after("lobby", 2, 10, 6) is None
    assert seqs_of(cache.read_after("lobby", 3, 10, 6)) == [4, 5, 6]
    assert cache.stats().entries == 3


def test_trim_by_age_keeps_entry_at_cutoff(clock: FakeClock) -> None:
    cache = MemoryCache(window_seconds=60, max_per_room=100, clock=clock)
    fill(cache, clock, "lobby", range(1, 2))

    clock.advance(60)
    fill(cache, clock, "lobby", range(2, 3))

    assert seqs_of(cache.read_after("lobby", 0, 10, 2)) == [1, 2]


def test_expire_drops_quiet_rooms(clock: FakeClock) -> None:
    cache = MemoryCache(window_seconds=60, max_per_room=100, clock=clock)
    fill(cache, clock, "quiet", range(1, 4))
    fill(cache, clock, "busy", range(1, 2))

    clock.advance(61)
    fill(cache, clock, "busy", range(2, 3))

    assert cache.stats().rooms == 1
    assert cache.stats().entries == 1
    assert cache.read_after("quiet", 0, 3, 3) is None


def test_expire_returns_dropped_count(clock: FakeClock) -> None:
    cache = MemoryCache(window_seconds=60, max_per_room=100, clock=clock)
    fill(cache, clock, "lobby", range(1, 4))
    clock.advance(10)
    fill(cache, clock, "kitchen", range(1, 3))

    clock.advance(55)

    assert cache.expire() == 3
    assert cache.stats() == CacheStats(hits=0, misses=0, rooms=1, entries=2)


def test_non_consecutive_seq_restarts_room(cache: MemoryCache, clock: FakeClock) -> None:
    fill(cache, clock, "lobby", range(1, 4))

    fill(cache, clock, "lobby", range(5, 6))

    assert cache.stats().entries == 1
    assert cache.read_after("lobby", 0, 5, 5) is None
    assert seqs_of(cache.read_after("lobby", 4, 5, 5)) == [5]


def test_seq_restart_from_one_restarts_room(cache: MemoryCache, clock: FakeClock) -> None:
    fill(cache, clock, "lobby", range(1, 4))

    fill(cache, clock, "lobby", range(1, 3))

    assert cache.stats().entries == 2
    assert seqs_of(cache.read_after("lobby", 0, 5, 2)) == [1, 2]


def test_restart_keeps_other_rooms(cache: MemoryCache, clock: FakeClock) -> None:
    fill(cache, clock, "lobby", range(1, 4))
    fill(cache, clock, "kitchen", range(1, 4))

    fill(cache, clock, "lobby", range(9, 10))

    assert seqs_of(cache.read_after("kitchen", 0, 5, 3)) == [1, 2, 3]


@pytest.mark.parametrize(("window_seconds", "max_per_room"), [(0, 10), (-1, 10), (60, 0)])
def test_rejects_invalid_limits(window_seconds: float, max_per_room: int) -> None:
    with pytest.raises(ValueError, match="must be"):
        MemoryCache(window_seconds=window_seconds, max_per_room=max_per_room)
