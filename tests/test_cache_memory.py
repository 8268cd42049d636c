"""The in-process hot cache, driven by a fake clock."""

from __future__ import annotations

import random

import pytest

from parley.cache import CacheStats, Entry, MemoryCache
from parley.cache.memory import ENTRY_OVERHEAD_BYTES, entry_size
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


def make_entry(room: str, seq: int, ts_ms: int, body_bytes: int | None = None) -> Entry:
    """Build an entry; `body_bytes` pads the body to that many ASCII characters."""
    body = f"body {seq}" if body_bytes is None else f"body {seq} ".ljust(body_bytes, "x")
    message = Message(room, seq, f"m{seq}", "alice", ts_ms, body)
    return Entry(message, message.encode())


def make_sized_entry(room: str, seq: int, ts_ms: int, frame_bytes: int) -> Entry:
    """Build an entry whose encoded frame is exactly `frame_bytes` long, whatever the room and seq."""
    unpadded = len(make_entry(room, seq, ts_ms, 0).frame)
    entry = make_entry(room, seq, ts_ms, frame_bytes - unpadded + len(f"body {seq} "))
    assert len(entry.frame) == frame_bytes
    return entry


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

    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.rooms, stats.entries) == (2, 3, 2, 9)


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
    kitchen_bytes = sum(entry_size(entry) for entry in cache.read_after("kitchen", 0, 2, 2) or [])
    assert cache.stats() == CacheStats(hits=1, misses=0, rooms=1, entries=2, size_bytes=kitchen_bytes)


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


@pytest.mark.parametrize(
    ("window_seconds", "max_per_room", "max_bytes_per_room", "max_bytes"),
    [(0, 10, 1, 1), (-1, 10, 1, 1), (60, 0, 1, 1), (60, 10, 0, 1), (60, 10, 1, 0), (60, 10, 1, -5)],
)
def test_rejects_invalid_limits(
    window_seconds: float, max_per_room: int, max_bytes_per_room: int, max_bytes: int
) -> None:
    with pytest.raises(ValueError, match="must be"):
        MemoryCache(
            window_seconds=window_seconds,
            max_per_room=max_per_room,
            max_bytes_per_room=max_bytes_per_room,
            max_bytes=max_bytes,
        )


# Byte limits. Most entries below have frames of FRAME_BYTES, so each has the same size and a limit can
# be written as a number of entries.

FRAME_BYTES = 1000


def fill_sized(cache: MemoryCache, clock: FakeClock, room: str, seqs: range) -> None:
    """Add entries with FRAME_BYTES frames, moving the clock 1 ms per entry so every ts differs."""
    for seq in seqs:
        clock.advance(0.001)
        cache.add(make_sized_entry(room, seq, round(clock.now * 1000), FRAME_BYTES))


def sized_entry_bytes() -> int:
    return FRAME_BYTES + ENTRY_OVERHEAD_BYTES


def held_bytes(cache: MemoryCache) -> int:
    """Sum the sizes of every held entry, read from the cache's rooms."""
    return sum(
        entry_size(entry) for window in cache._rooms.values() for entry in window.entries[window.start :]
    )


def test_entry_size_counts_frame_and_overhead() -> None:
    entry = make_entry("lobby", 1, 0, 1000)

    assert entry_size(entry) == len(entry.frame) + ENTRY_OVERHEAD_BYTES


def test_stats_counts_bytes(cache: MemoryCache, clock: FakeClock) -> None:
    fill(cache, clock, "lobby", range(1, 4))
    fill(cache, clock, "kitchen", range(1, 3))

    held_entries = (cache.read_after("lobby", 0, 3, 3) or []) + (cache.read_after("kitchen", 0, 2, 2) or [])

    assert len(held_entries) == 5
    assert cache.stats().size_bytes == sum(len(entry.frame) + ENTRY_OVERHEAD_BYTES for entry in held_entries)


def test_stats_bytes_follow_restart_and_expiry(clock: FakeClock) -> None:
    cache = MemoryCache(window_seconds=60, max_per_room=100, clock=clock)
    fill(cache, clock, "lobby", range(1, 6))

    fill(cache, clock, "lobby", range(9, 11))

    held_entries = cache.read_after("lobby", 8, 2, 10) or []
    assert [entry.message.seq for entry in held_entries] == [9, 10]
    assert cache.stats().size_bytes == sum(entry_size(entry) for entry in held_entries)

    clock.advance(61)
    cache.expire()

    assert cache.stats() == CacheStats(hits=1, misses=0, rooms=0, entries=0, size_bytes=0)


def test_trim_by_room_bytes(clock: FakeClock) -> None:
    size = sized_entry_bytes()
    cache = MemoryCache(window_seconds=3600, max_per_room=100, clock=clock, max_bytes_per_room=3 * size)

    fill_sized(cache, clock, "lobby", range(1, 11))

    assert cache.stats().entries == 3
    assert cache.stats().size_bytes == 3 * size
    assert cache.read_after("lobby", 6, 10, 10) is None
    assert seqs_of(cache.read_after("lobby", 7, 10, 10)) == [8, 9, 10]
    assert seqs_of(cache.read_before("lobby", 11, 3)) == [8, 9, 10]
    assert cache.read_before("lobby", 11, 4) is None


def test_room_bytes_limit_not_multiple_of_size(clock: FakeClock) -> None:
    size = sized_entry_bytes()
    cache = MemoryCache(window_seconds=3600, max_per_room=100, clock=clock, max_bytes_per_room=3 * size - 1)

    fill_sized(cache, clock, "lobby", range(1, 11))

    assert cache.stats().entries == 2
    assert seqs_of(cache.read_after("lobby", 8, 10, 10)) == [9, 10]


def test_default_room_bytes_large_frames(clock: FakeClock) -> None:
    # With 16 kB bodies, the 20,000-entry cap alone would let the room keep about 340 MB of frames.
    cache = MemoryCache(window_seconds=3600, max_per_room=20_000, clock=clock)

    for seq in range(1, 1001):
        cache.add(make_entry("lobby", seq, round(clock.now * 1000), 16_384))

    stats = cache.stats()
    assert stats.size_bytes <= 8 * 1024 * 1024
    assert stats.size_bytes > 8 * 1024 * 1024 - 17_000 - ENTRY_OVERHEAD_BYTES
    assert stats.entries < 1000
    assert seqs_of(cache.read_before("lobby", 1001, 3)) == [998, 999, 1000]


def test_default_total_bytes_limit(clock: FakeClock) -> None:
    cache = MemoryCache(window_seconds=3600, max_per_room=20_000, clock=clock)
    # Only the frame's length is counted, so every entry shares one 256 KiB frame to keep the test small.
    frame = bytes(256 * 1024)

    for room in range(1100):
        clock.advance(0.001)
        message = make_entry(f"room{room}", 1, round(clock.now * 1000)).message
        cache.add(Entry(message, frame))
        assert cache.stats().size_bytes <= 256 * 1024 * 1024

    assert cache.stats().rooms < 1100
    assert seqs_of(cache.read_after("room1099", 0, 1, 1)) == [1]
    assert cache.read_after("room0", 0, 1, 1) is None


def test_entry_larger_than_room_bytes_dropped(clock: FakeClock) -> None:
    size = sized_entry_bytes()
    cache = MemoryCache(window_seconds=3600, max_per_room=100, clock=clock, max_bytes_per_room=size - 1)

    fill_sized(cache, clock, "lobby", range(1, 3))

    assert cache.stats() == CacheStats(hits=0, misses=0, rooms=0, entries=0, size_bytes=0)
    assert cache.read_after("lobby", 0, 2, 2) is None
    assert cache.read_before("lobby", 3, 1) is None


def test_total_bytes_trims_oldest_room_first(clock: FakeClock) -> None:
    size = sized_entry_bytes()
    cache = MemoryCache(window_seconds=3600, max_per_room=100, clock=clock, max_bytes=6 * size)
    fill_sized(cache, clock, "old", range(1, 5))
    fill_sized(cache, clock, "new", range(1, 3))

    fill_sized(cache, clock, "new", range(3, 6))

    assert cache.stats().size_bytes == 6 * size
    assert seqs_of(cache.read_after("new", 0, 5, 5)) == [1, 2, 3, 4, 5]
    assert cache.read_after("old", 2, 2, 4) is None
    assert seqs_of(cache.read_after("old", 3, 1, 4)) == [4]


def test_total_bytes_picks_room_by_oldest_ts(clock: FakeClock) -> None:
    size = sized_entry_bytes()
    cache = MemoryCache(window_seconds=3600, max_per_room=100, clock=clock, max_bytes=6 * size)
    fill_sized(cache, clock, "a", range(1, 3))
    fill_sized(cache, clock, "b", range(1, 3))
    fill_sized(cache, clock, "a", range(3, 5))
    fill_sized(cache, clock, "c", range(1, 3))

    # a1 a2 b1 b2 a3 a4 c1 c2 were added in that order, so a1 and a2 go first and then b1.
    assert seqs_of(cache.read_after("a", 2, 2, 4)) == [3, 4]
    assert cache.read_after("a", 0, 4, 4) is None
    assert seqs_of(cache.read_after("b", 0, 2, 2)) == [1, 2]

    fill_sized(cache, clock, "c", range(3, 4))

    assert cache.read_after("b", 0, 2, 2) is None
    assert seqs_of(cache.read_after("b", 1, 1, 2)) == [2]
    assert seqs_of(cache.read_after("a", 2, 2, 4)) == [3, 4]


def test_total_bytes_keeps_newest_entries(clock: FakeClock) -> None:
    size = sized_entry_bytes()
    cache = MemoryCache(window_seconds=3600, max_per_room=1000, clock=clock, max_bytes=25 * size)
    rooms = [f"room{index}" for index in range(7)]
    heads = dict.fromkeys(rooms, 0)
    added: list[tuple[str, int]] = []
    order = random.Random(7)

    for _ in range(400):
        room = order.choice(rooms)
        heads[room] += 1
        fill_sized(cache, clock, room, range(heads[room], heads[room] + 1))
        added.append((room, heads[room]))
        assert cache.stats().size_bytes <= 25 * size
        assert cache.stats().size_bytes == held_bytes(cache)

    newest = added[-25:]
    for room in rooms:
        expected_seqs = [seq for newest_room, seq in newest if newest_room == room]
        if expected_seqs:
            first = expected_seqs[0]
            count = len(expected_seqs)
            assert seqs_of(cache.read_after(room, first - 1, count, heads[room])) == expected_seqs
            assert cache.read_after(room, first - 2, count + 1, heads[room]) is None
        else:
            assert cache.read_after(room, heads[room] - 1, 1, heads[room]) is None
    assert cache.stats().entries == 25


def test_total_bytes_with_mixed_sizes(clock: FakeClock) -> None:
    max_bytes = 200_000
    cache = MemoryCache(
        window_seconds=5, max_per_room=40, clock=clock, max_bytes_per_room=60_000, max_bytes=max_bytes
    )
    rooms = [f"room{index}" for index in range(30)]
    heads = dict.fromkeys(rooms, 0)
    draw = random.Random(11)

    for _ in range(5000):
        room = draw.choice(rooms)
        if draw.random() < 0.02:
            heads[room] += draw.randint(2, 5)
        else:
            heads[room] += 1
        clock.advance(draw.random() * 0.01)
        cache.add(make_entry(room, heads[room], round(clock.now * 1000), draw.randint(0, 20_000)))

        stats = cache.stats()
        assert stats.size_bytes <= max_bytes
        assert stats.size_bytes == held_bytes(cache)
        assert stats.entries == sum(len(window) for window in cache._rooms.values())
        assert all(window.size_bytes <= 60_000 for window in cache._rooms.values())
        assert all(len(window) <= 40 for window in cache._rooms.values())


def test_oldest_first_heap_stays_bounded(clock: FakeClock) -> None:
    cache = MemoryCache(window_seconds=1, max_per_room=100, clock=clock, max_bytes=10_000_000)

    for index in range(2000):
        fill(cache, clock, f"room{index}", range(1, 2))
        clock.advance(0.01)

    # Rooms older than the window live until the next sweep, a quarter window later.
    assert cache.stats().rooms <= 126
    assert len(cache._oldest_first) <= 2 * cache.stats().rooms + 64 + 1
