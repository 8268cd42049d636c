"""The in-process hot cache: for each room, the recent messages in consecutive seq order.

Each room keeps a list of entries and the index of its oldest live entry, so that a read of k entries
is one slice found by index arithmetic (seq minus the oldest cached seq), O(k) whatever the window
size. Dropping from the left only moves that index, and the dropped slots are released in one step
once they make up half of the list.

The cache is not thread-safe: call it from the event loop thread only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

from parley.cache.base import CacheStats, Entry

SWEEP_FRACTION: Final = 0.25
"""All rooms are trimmed by age once per this fraction of the window, during an `add`."""

COMPACT_MIN_DROPPED: Final = 256
"""Dropped slots are released only when at least this many have piled up (and they are half the list)."""


class _RoomWindow:
    """A room's cached entries: `entries[start:]` contains consecutive seqs, oldest first."""

    __slots__ = ("entries", "start")

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self.start = 0

    def __len__(self) -> int:
        return len(self.entries) - self.start

    @property
    def first_seq(self) -> int:
        return self.entries[self.start].message.seq

    @property
    def last_seq(self) -> int:
        return self.entries[-1].message.seq

    def append(self, entry: Entry) -> None:
        self.entries.append(entry)

    def clear(self) -> None:
        self.entries.clear()
        self.start = 0

    def slice(self, first: int, last: int) -> list[Entry]:
        """Return the entries with seq from `first` to `last` inclusive; the caller checks they are held."""
        offset = self.start - self.first_seq
        return self.entries[first + offset : last + offset + 1]

    def drop_oldest(self, count: int) -> None:
        self.start += count
        self._compact()

    def drop_older_than(self, cutoff_ms: float) -> int:
        """Drop the leading entries whose message ts is before `cutoff_ms`; return how many were dropped."""
        entries = self.entries
        index = self.start
        while index < len(entries) and entries[index].message.ts < cutoff_ms:
            index += 1
        dropped = index - self.start
        self.start = index
        self._compact()
        return dropped

    def _compact(self) -> None:
        if self.start == len(self.entries):
            self.clear()
        elif self.start >= COMPACT_MIN_DROPPED and self.start * 2 >= len(self.entries):
            del self.entries[: self.start]
            self.start = 0


class MemoryCache:
    """A hot cache in this process's memory that keeps, per room, the messages of the last `window_seconds`.

    A room keeps at most `max_per_room` entries. Entries older than the window are trimmed from the
    left when the room gets a new message, and in every room at least once per quarter window while
    any room gets messages. Message `ts` values are milliseconds, and `clock` returns seconds.
    """

    def __init__(
        self, window_seconds: float, max_per_room: int, clock: Callable[[], float] = time.time
    ) -> None:
        if window_seconds <= 0:
            raise ValueError(f"window_seconds must be positive, got {window_seconds}")
        if max_per_room < 1:
            raise ValueError(f"max_per_room must be at least 1, got {max_per_room}")

        self._window_ms = window_seconds * 1000
        self._max_per_room = max_per_room
        self._clock = clock
        self._rooms: dict[str, _RoomWindow] = {}
        self._entries = 0
        self._hits = 0
        self._misses = 0
        self._next_sweep = clock() + window_seconds * SWEEP_FRACTION
        self._sweep_interval = window_seconds * SWEEP_FRACTION

    def add(self, entry: Entry) -> None:
        """Append a room's next message; a seq that does not follow the cached head restarts the room."""
        room = entry.message.room
        window = self._rooms.get(room)
        if window is None:
            window = self._rooms[room] = _RoomWindow()
        elif window.last_seq + 1 != entry.message.seq:
            self._entries -= len(window)
            window.clear()

        window.append(entry)
        self._entries += 1

        now = self._clock()
        self._trim(room, window, now * 1000 - self._window_ms)
        if now >= self._next_sweep:
            self.expire()

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
        for room, window in list(self._rooms.items()):
            self._trim(room, window, cutoff_ms)
        return before - self._entries

    def stats(self) -> CacheStats:
        return CacheStats(hits=self._hits, misses=self._misses, rooms=len(self._rooms), entries=self._entries)

    def _read(self, room: str, first: int, last: int) -> list[Entry] | None:
        window = self._rooms.get(room)
        if window is None or first < window.first_seq or last > window.last_seq:
            self._misses += 1
            return None
        self._hits += 1
        return window.slice(first, last)

    def _trim(self, room: str, window: _RoomWindow, cutoff_ms: float) -> None:
        dropped = window.drop_older_than(cutoff_ms)
        excess = len(window) - self._max_per_room
        if excess > 0:
            window.drop_oldest(excess)
            dropped += excess

        self._entries -= dropped
        if not len(window):
            del self._rooms[room]
