"""The hot cache: the recent window of each room, kept so that resume and history skip the store.

Contract:

- `add` is called with every new message of a room, in seq order, right after its commit. A cache may
  drop anything at any time (age, size, restart); it never reorders or invents messages.
- A read returns the requested range only when the cache contains all of it, with no gap. Otherwise it
  returns None and the caller reads the store. So a miss costs time, never messages.
- Every entry carries the message's encoded `msg` frame, so catch-up writes it without encoding again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from parley.protocol.model import Message


@dataclass(frozen=True, slots=True)
class Entry:
    """A cached message and its encoded `msg` frame (JSON bytes)."""

    message: Message
    frame: bytes


@dataclass(frozen=True, slots=True)
class CacheStats:
    """Counts of reads the cache served (hits) and sent on to the store (misses), and of its contents.

    `size_bytes` is the cache's own count of the bytes its entries take, 0 for a cache that does not
    count them.
    """

    hits: int
    misses: int
    rooms: int
    entries: int
    size_bytes: int = 0


class HotCache(Protocol):
    """A per-room window of recent messages."""

    def add(self, entry: Entry) -> None:
        """Append a room's next message; a seq that does not follow the cached head restarts the room."""

    def read_after(self, room: str, after: int, limit: int, head: int) -> list[Entry] | None:
        """Return the entries with seq in (after, min(after + limit, head)], or None unless all are held."""

    def read_before(self, room: str, before: int, limit: int) -> list[Entry] | None:
        """Return the `limit` highest entries below `before`, or None unless all are held.

        Fewer than `limit` entries are returned only when the range reaches seq 1.
        """

    def stats(self) -> CacheStats:
        """Return a snapshot of the hit and miss counts."""
