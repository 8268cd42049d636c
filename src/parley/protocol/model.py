"""Value types shared by every layer: a stored message and a room's position."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(frozen=True, slots=True)
class Message:
    """A message as stored: its room, its place in the room's order and what the sender wrote."""

    room: str
    seq: int
    id: str
    sender: str
    ts: int
    body: str
    meta: dict[str, Any] | None = None

    def to_frame(self) -> dict[str, Any]:
        """Build the `msg` frame that delivers this message."""
        frame: dict[str, Any] = {
            "type": "msg",
            "room": self.room,
            "seq": self.seq,
            "id": self.id,
            "from": self.sender,
            "ts": self.ts,
            "body": self.body,
        }
        if self.meta is not None:
            frame["meta"] = self.meta
        return frame

    def encode(self) -> bytes:
        """Serialise the `msg` frame once, so that fan-out can write the same bytes to every member."""
        return orjson.dumps(self.to_frame())


@dataclass(frozen=True, slots=True)
class RoomInfo:
    """A room's epoch and head (the highest stored `seq`, 0 for an empty room)."""

    room: str
    epoch: str
    head: int


@dataclass(frozen=True, slots=True)
class AppendResult:
    """The outcome of storing one `send`.

    `dup` is true when `(room, sender, id)` was already stored with the same body and meta, in which case
    `seq` and `ts` are the original ones. `conflict` is true when the id was stored with a different body
    or meta: nothing was stored and `seq` is the original message's.
    """

    message: Message
    dup: bool = False
    conflict: bool = False


@dataclass(frozen=True, slots=True)
class Membership:
    """A user's membership of a room, with the stored delivery cursor and read marker.

    `cursor` is None for a member whose first join has not stored one yet.
    """

    user: str
    room: str
    cursor: int | None
    read: int = 0
