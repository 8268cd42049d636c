"""The in-process hot cache: for each room, the recent messages in consecutive seq order.

Each room keeps a list of entries and the index of its oldest live entry, so that a read of k entries
is one slice found by index arithmetic (seq minus the oldest cached seq), O(k) whatever the window
size. Dropping from the left only moves that index, and the dropped slots are released in one step
once they make up half of the list.

The cache limits each room by age, entry count and bytes, and all rooms together by bytes. To meet the
process-wide byte limit it drops the globally oldest entries. It finds them through a min-heap with
one item per room, keyed by the ts of the room's oldest entry when the item was pushed. Later drops
and restarts in the room leave that key out of date, so a popped item whose key no longer matches the
room's oldest entry is pushed again with the current ts. Where ts values within a room do not rise
with seq, the order is approximate, but the byte limit still holds.

The cache is not thread-safe: call it from the event loop thread only.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable
from typing import Final

from parley.cache.base import CacheStats, Entry

SWEEP_FRACTION: Final = 0.25
"""All rooms are trimmed by age once per this fraction of the window, during an `add`."""

COMPACT_MIN_DROPPED: Final = 256
"""Dropped slots are released only when at least this many have piled up (and they are half the list)."""

ENTRY_OVERHEAD_BYTES: Final = 512
"""Bytes counted for each entry on top of its encoded frame.

An estimate of the Entry and Message objects, their strings and ints, and the list slot. Summing
sys.getsizeof on CPython 3.11 gives about 490 bytes beyond the frame for a message with an empty body,
a 26-character id and short room and sender names.
"""

DEFAULT_MAX_BYTES_PER_ROOM: Final = 8 * 1024 * 1024
DEFAULT_MAX_BYTES: Final = 256 * 1024 * 1024

HEAP_REBUILD_SLACK: Final = 64
"""The heap is rebuilt once it has more than twice as many items as there are rooms, plus this many."""


def entry_size(entry: Entry) -> int:
    """Return the bytes counted for `entry` against the byte limits."""
    # NOTE: the decoded message's body and meta are held as well, so for large bodies the memory in
    # use is up to about twice the counted size.
    return len(entry.frame) + ENTRY_OVERHEAD_BYTES


class _RoomWindow:
    """A room's cached entries: `entries[start:]` contains consecutive seqs, oldest first.

    `size_bytes` is the sum of `entry_size` over the live entries.
    """

    __slots__ = ("entries", "room", "size_bytes", "start")

    def __init__(self, room: str) -> None:
        self.room = room
        self.entries: list[Entry] = []
        self.start = 0
        self.size_bytes = 0

    def __len__(self) -> int:
        return len(self.entries) - self.start

    @property
    def first_seq(self) -> int:
        return self.entries[self.start].message.seq

    @property
    def first_ts(self) -> int:
        return self.entries[self.start].message.ts

    @property
    def last_seq(self) -> int:
        return self.entries[-1].message.seq

    def append(self, entry: Entry, size_bytes: int) -> None:
        """Append `entry`, which counts as `size_bytes` (its `entry_size`)."""
        self.entries.append(entry)
        self.size_bytes += size_bytes

    def clear(self) -> None:
        self.entries.clear()
        self.start = 0
        self.size_bytes = 0

    def slice(self, first: int, last: int) -> list[Entry]:
        """Return the entries with seq from `first` to `last` inclusive; the caller checks they are held."""
        offset = self.start - self.first_seq
        return self.entries[first + offset : last + offset + 1]

    def drop_oldest(self, count: int) -> None:
        self._drop_until(self.start + count)

    def drop_older_than(self, cutoff_ms: float) -> None:
        """Drop the leading entries whose message ts is before `cutoff_ms`."""
        entries = self.entries
        index = self.start
        while index < len(entries) and entries[index].message.ts < cutoff_ms:
            index += 1
        if index > self.start:
            self._drop_until(index)

    def drop_to_count(self, max_count: int) -> None:
        """Drop the oldest entries until at most `max_count` are left."""
        excess = len(self) - max_count
        if excess > 0:
            self._drop_until(self.start + excess)

    def drop_to_size(self, max_bytes: int) -> None:
        """Drop the oldest entries until `size_bytes` is at most `max_bytes`, which may drop them all."""
        if self.size_bytes <= max_bytes:
            return
        entries = self.entries
        index = self.start
        size_bytes = self.size_bytes
        while size_bytes > max_bytes:
            size_bytes -= entry_size(entries[index])
            index += 1
        self.start = index
        self.size_bytes = size_bytes
        self._compact()

    def _drop_until(self, index: int) -> None:
        """Drop the entries before `index` in `entries`."""
        for dropped in range(self.start, index):
            self.size_bytes -= entry_size(self.entries[dropped])
        self.start = index
        self._compact()

    def _compact(self) -> None:
        if self.start == len(self.entries):
            self.clear()
        elif self.start >= COMPACT_MIN_DROPPED and self.start * 2 >= len(self.entries):
            del self.entries[: self.start]
            self.start = 0


class MemoryCache:
    """A hot cache in this process's memory that keeps, per room, the messages of the last `window_seconds`.

    A room keeps at most `max_per_room` entries and `max_bytes_per_room` bytes, and all rooms together
    keep at most `max_bytes` bytes. An entry counts as its encoded frame plus ENTRY_OVERHEAD_BYTES, so
    an entry larger than a byte limit is dropped as soon as it is added. Entries older than the window
    are trimmed from the left when the room gets a new message, and in every room at least once per
    quarter window while any room gets messages. Each `add` then drops the oldest entries of all rooms
    (by message ts) until the total is within `max_bytes`. Message `ts` values are milliseconds, and
    `clock` returns seconds.
    """

    def __init__(
        self,
        window_seconds: float,
        max_per_room: int,
        clock: Callable[[], float] = time.time,
        *,
        max_bytes_per_room: int = DEFAULT_MAX_BYTES_PER_ROOM,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        if window_seconds <= 0:
            raise ValueError(f"window_seconds must be positive, got {window_seconds}")
        if max_per_room < 1:
            raise ValueError(f"max_per_room must be at least 1, got {max_per_room}")
        if max_bytes_per_room < 1:
            raise ValueError(f"max_bytes_per_room must be at least 1, got {max_bytes_per_room}")
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, got {max_bytes}")

        self._window_ms = window_seconds * 1000
        self._max_per_room = max_per_room
        self._max_bytes_per_room = max_bytes_per_room
        self._max_bytes = max_bytes
        self._clock = clock
        self._rooms: dict[str, _RoomWindow] = {}
        self._entries = 0
        self._size_bytes = 0
        self._hits = 0
        self._misses = 0
        self._next_sweep = clock() + window_seconds * SWEEP_FRACTION
        self._sweep_interval = window_seconds * SWEEP_FRACTION

        # Items are (ts of the room's oldest entry when pushed, push order, room). Every room in
        # `_rooms` has exactly one item. Items of forgotten rooms stay until popped or rebuilt away.
        self._oldest_first: list[tuple[int, int, _RoomWindow]] = []
        self._push_order = itertools.count()

    def add(self, entry: Entry) -> None:
        """Append a room's next message; a seq that does not follow the cached head restarts the room."""
        room = entry.message.room
        size_bytes = entry_size(entry)
        window = self._rooms.get(room)
        if window is None:
            window = self._rooms[room] = _RoomWindow(room)
            window.append(entry, size_bytes)
            self._push(window)
        else:
            if window.last_seq + 1 != entry.message.seq:
                self._entries -= len(window)
                self._size_bytes -= window.size_bytes
                window.clear()
            window.append(entry, size_bytes)
        self._entries += 1
        self._size_bytes += size_bytes

        now = self._clock()
        self._trim(window, now * 1000 - self._window_ms)
        if now >= self._next_sweep:
            self.expire()
        if self._size_bytes > self._max_bytes:
            self._trim_to_max_bytes()
        self._rebuild_heap_if_sparse()

    def read_after(self, room: str, after: int, limit: int, head: int) -> list[Entry] | None:
        """Return the entries with seq in (after, min(after + limit, head)], or None unless all are held."""
        last = min(after + limit, head)
        if last <= after:
            self._hits += 1
            return []
        return self._read(room, after + 1, last)

    def read_before(self, room: str, before: int, limit: int) -> list[Entry] | None:
        """Return the `limit` highest entries below `before`, or None unless all are held.

        Fewer than `limit` entries are returned only when the range reaches seq 1.
        """
        first = max(1, before - limit)
        last = before - 1
        if limit <= 0 or last < first:
            self._hits += 1
            return []
        return self._read(room, first, last)

    def expire(self) -> int:
        """Trim every room by age, forget rooms left empty, and return how many entries were dropped."""
        now = self._clock()
        self._next_sweep = now + self._sweep_interval
        cutoff_ms = now * 1000 - self._window_ms

        before = self._entries
        for window in list(self._rooms.values()):
            self._trim(window, cutoff_ms)
        self._rebuild_heap_if_sparse()
        return before - self._entries

    def stats(self) -> CacheStats:
        return CacheStats(
            hits=self._hits,
            misses=self._misses,
            rooms=len(self._rooms),
            entries=self._entries,
            size_bytes=self._size_bytes,
        )

    def _read(self, room: str, first: int, last: int) -> list[Entry] | None:
        window = self._rooms.get(room)
        if window is None or first < window.first_seq or last > window.last_seq:
            self._misses += 1
            return None
        self._hits += 1
        return window.slice(first, last)

    def _trim(self, window: _RoomWindow, cutoff_ms: float) -> None:
        """Apply the room's age, count and byte limits."""
        entries, size_bytes = len(window), window.size_bytes
        window.drop_older_than(cutoff_ms)
        window.drop_to_count(self._max_per_room)
        window.drop_to_size(self._max_bytes_per_room)
        if len(window) != entries:
            self._settle(window, entries, size_bytes)

    def _trim_to_max_bytes(self) -> None:
        """Drop the oldest entries of all rooms, one at a time, until the total is within `max_bytes`."""
        heap = self._oldest_first
        while self._size_bytes > self._max_bytes:
            key, _, window = heap[0]
            if self._rooms.get(window.room) is not window:
                heapq.heappop(heap)
                continue
            if key != window.first_ts:
                heapq.heapreplace(heap, (window.first_ts, next(self._push_order), window))
                continue

            entries, size_bytes = len(window), window.size_bytes
            window.drop_oldest(1)
            self._settle(window, entries, size_bytes)
            if len(window):
                heapq.heapreplace(heap, (window.first_ts, next(self._push_order), window))
            else:
                heapq.heappop(heap)

    def _settle(self, window: _RoomWindow, entries_before: int, size_bytes_before: int) -> None:
        """Subtract what `window` dropped from the totals, and forget the room once it is empty."""
        self._entries -= entries_before - len(window)
        self._size_bytes -= size_bytes_before - window.size_bytes
        if not len(window):
            del self._rooms[window.room]

    def _push(self, window: _RoomWindow) -> None:
        heapq.heappush(self._oldest_first, (window.first_ts, next(self._push_order), window))

    def _rebuild_heap_if_sparse(self) -> None:
        """Rebuild the heap from the live rooms once items of forgotten rooms make up most of it."""
        if len(self._oldest_first) <= 2 * len(self._rooms) + HEAP_REBUILD_SLACK:
            return
        self._oldest_first = [
            (window.first_ts, next(self._push_order), window) for window in self._rooms.values()
        ]
        heapq.heapify(self._oldest_first)
