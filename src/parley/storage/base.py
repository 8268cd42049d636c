"""The durable store: the contract every backend keeps.

The store is the source of truth. The cache and the bus may lose data, the store may not.

Contract:

- `append` stores a message exactly once per `(room, sender, id)`. It assigns the room's next `seq`
  inside the transaction that stores the message, so a room's seqs are 1, 2, 3, … with no gap, and no
  later seq is visible to readers before an earlier one. Appends submitted by one caller for one room
  get seqs in submission order. `append` returns only after the commit is durable.
- Concurrent appends and cursor updates may share one commit (group commit). Every committed new
  message is reported, in seq order per room, to the commit listener before the callers' awaits return.
  An operation that fails raises `StoreError` to its own caller and leaves the other operations of
  the commit unaffected.
- `advance_cursor` and `advance_read` only ever move a marker forward: an older or repeated value
  changes nothing, and the call returns the stored value after the update. A marker never passes the
  room's head: these two and `set_cursor_if_unset` store a larger `seq` as the head, and raise
  `NotMemberError` when the user is not a member of the room.
- Membership outlives connections. `join` creates the room (with a fresh epoch) when it does not exist.
- Reads (`read_after`, `read_before`, `room_info`, `memberships`) may run beside the writer and never
  block it.
- After `close()` has begun, every operation raises `StoreError`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from parley.protocol.model import AppendResult, Membership, Message, RoomInfo

CommitListener = Callable[[Sequence[Message]], None]


class StoreError(Exception):
    """The store failed to carry out an operation (I/O error, closed store, corrupt data)."""


class NotMemberError(StoreError):
    """A cursor or read marker update named a user who is not a member of the room."""

    def __init__(self, user: str, room: str) -> None:
        super().__init__(f"user {user!r} is not a member of room {room!r}")
        self.user = user
        self.room = room


@dataclass(frozen=True, slots=True)
class StoreStats:
    """Counts of the writer's work since the store opened."""

    commits: int
    operations: int
    failed_operations: int
    largest_batch: int


class Store(Protocol):
    """A durable store of rooms, messages, memberships and cursors.

    Writes return an awaitable that is already queued when the call returns, so calls made one after
    another without awaiting are applied in call order.
    """

    def set_commit_listener(self, listener: CommitListener) -> None:
        """Call `listener` on the event loop with the new messages of each commit, in seq order."""

    async def open(self) -> None:
        """Create the schema if needed and start the writer."""

    async def close(self) -> None:
        """Finish every accepted write, then release the files and threads."""

    def append(
        self, room: str, sender: str, id: str, body: str, meta: dict[str, Any] | None, ts: int
    ) -> Awaitable[AppendResult]:
        """Store a message once, assigning the room's next seq; see the module contract."""

    def join(self, user: str, room: str) -> Awaitable[tuple[RoomInfo, Membership, bool]]:
        """Make `user` a member of `room`, creating the room if needed.

        Returns the room, the membership, and whether the user was a member before this call.
        """

    def leave(self, user: str, room: str) -> Awaitable[bool]:
        """End the membership; return whether the user was a member."""

    async def memberships(self, user: str) -> list[Membership]:
        """List every room the user is a member of, with its cursor."""

    async def is_member(self, user: str, room: str) -> bool:
        """Tell whether `user` is a member of `room`."""

    async def room_info(self, room: str) -> RoomInfo | None:
        """Return the room's epoch and head, or None when the room does not exist."""

    def advance_cursor(self, user: str, room: str, seq: int) -> Awaitable[int]:
        """Move the user's delivery cursor forward to `seq`; return the stored cursor after the update."""

    def advance_cursors(self, updates: Sequence[tuple[str, str, int]]) -> Awaitable[None]:
        """Move many `(user, room, seq)` cursors forward in one write; non-members are skipped."""

    def set_cursor_if_unset(self, user: str, room: str, seq: int) -> Awaitable[int]:
        """Store `seq` as the cursor where the member has none yet; return the stored cursor."""

    def advance_read(self, user: str, room: str, seq: int) -> Awaitable[int]:
        """Move the user's read marker forward to `seq`; return the stored marker after the update."""

    async def read_after(self, room: str, after: int, limit: int) -> list[Message]:
        """Return up to `limit` messages with seq > `after`, in ascending seq order."""

    async def read_before(self, room: str, before: int, limit: int) -> list[Message]:
        """Return the `limit` highest messages with seq < `before`, in ascending seq order."""

    async def members(self, room: str) -> list[Membership]:
        """List the room's members with their cursors and read markers (for receipts)."""

    def statistics(self) -> StoreStats:
        """Return a snapshot of the writer's counters."""
