"""The receiving side of one client, free of IO: positions per room, dedup, gaps and coalesced acks.

Theory of operation. For every room it follows, the receiver keeps three marks that never move backwards
within one epoch:

    since      highest seq held: every message up to it was delivered to the application's queue
    handled    highest seq the application has finished with (the mark to acknowledge)
    acked      highest delivery cursor that the server confirmed with `acked`

and the room's epoch. A `msg` with seq <= since is a duplicate, seq == since + 1 is delivered and advances
since, and a larger seq is a gap: the caller sends `join` with the room's position and the server replays.
A `joined` reply whose epoch differs from the held one, or that carries `reset`, drops all three marks and
starts again from the reply's `since`. The room's generation then increases, so that late `handled` calls
for messages of the old history are ignored.

Acks are cumulative and coalesced: `acks_due` returns at most one ack per room per `ack_interval` seconds,
or per the room's longer `ack_interval` hint from `joined` or `acked`, in milliseconds (the server asks
members of large rooms to acknowledge less often).
Times are `now` arguments in seconds from any monotonic clock; the receiver never reads a clock.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from parley.protocol.model import Message


class MalformedFrame(ValueError):
    """A frame from the server lacks a field or has a field of the wrong type."""

    def __init__(self, frame_type: str, field: str) -> None:
        super().__init__(f"malformed {frame_type!r} frame: field {field!r} is missing or has the wrong type")
        self.frame_type = frame_type
        self.field = field


@dataclass(frozen=True, slots=True)
class Position:
    """A room position: the client has received every message up to and including `since` in `epoch`."""

    since: int
    epoch: str | None = None

    def to_fields(self) -> dict[str, Any]:
        """Return the `since` and `epoch` fields as `hello` resume entries and `join` frames carry them."""
        fields: dict[str, Any] = {"since": self.since}
        if self.epoch is not None:
            fields["epoch"] = self.epoch
        return fields


@dataclass(frozen=True, slots=True)
class Joined:
    """A `joined` reply as applied: `reset` is true when the receiver dropped what it held for the room."""

    room: str
    epoch: str
    head: int
    since: int
    reset: bool


@dataclass(frozen=True, slots=True)
class Deliver:
    """A new message, to hand to the application in this order."""

    message: Message
    generation: int


@dataclass(frozen=True, slots=True)
class Duplicate:
    """A message the client already holds, to drop."""

    room: str
    seq: int


@dataclass(frozen=True, slots=True)
class Gap:
    """A message beyond the next expected seq, to drop.

    `request_join` is true for the first gap since the room's last `joined`: the caller then sends `join`
    with `position`, and later gaps wait for that reply.
    """

    room: str
    expected: int
    received: int
    position: Position
    request_join: bool


@dataclass(frozen=True, slots=True)
class NotFollowed:
    """A message for a room the receiver does not follow (never joined, or left), to drop."""

    room: str
    seq: int


MsgOutcome = Deliver | Duplicate | Gap | NotFollowed


@dataclass(frozen=True, slots=True)
class ReceiverStatistics:
    """Counters since the receiver was created."""

    delivered: int
    duplicates: int
    gaps: int
    resets: int


@dataclass(slots=True)
class _RoomState:
    epoch: str | None
    since: int
    handled: int
    acked: int = 0
    ack_sent: int = 0
    ack_sent_at: float = -math.inf
    ack_interval: float = 0.0
    join_requested: bool = False
    generation: int = 0


def message_from_frame(frame: Mapping[str, Any], room: str | None = None) -> Message:
    """Build a Message from a `msg` frame or a history entry; `room` fills in a missing room field.

    Raises MalformedFrame when a field is missing or of the wrong type.
    """
    room_value = frame.get("room", room)
    meta = frame.get("meta")
    message = Message(
        room=_require(frame, "room", str, room_value),
        seq=_require(frame, "seq", int),
        id=_require(frame, "id", str),
        sender=_require(frame, "from", str),
        ts=_require(frame, "ts", int),
        body=_require(frame, "body", str),
        meta=meta if isinstance(meta, dict) else None,
    )
    return message


def _require(frame: Mapping[str, Any], name: str, kind: type, value: Any = None) -> Any:
    if value is None:
        value = frame.get(name)
    # bool is a subclass of int, but `true` is never a valid seq or time.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise MalformedFrame(str(frame.get("type", "msg")), name)
    return value


def interval_hint(value: Any) -> float:
    """Read a server's `ack_interval` hint (milliseconds) as seconds; 0 when absent or invalid."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value / 1000
    return 0.0


class Receiver:
    """Per-room positions, duplicate and gap detection, and coalesced cumulative acks."""

    def __init__(self, ack_interval: float = 0.1) -> None:
        if ack_interval < 0:
            raise ValueError(f"ack_interval must not be negative, got {ack_interval}")
        self.ack_interval = ack_interval
        self._rooms: dict[str, _RoomState] = {}
        self._delivered = 0
        self._duplicates = 0
        self._gaps = 0
        self._resets = 0

    def restore(self, room: str, position: Position) -> None:
        """Start following `room` from a position that an earlier client saved.

        The position counts as handled but not acknowledged, so the next `acks_due` repeats the ack.
        """
        self._rooms[room] = _RoomState(epoch=position.epoch, since=position.since, handled=position.since)

    def on_joined(self, frame: Mapping[str, Any]) -> Joined:
        """Apply a `joined` frame; raises MalformedFrame.

        A new room starts at the reply's `since`. A followed room keeps its own position when the reply
        starts earlier (replayed messages are then duplicates) or later (the next message is then a gap,
        which makes the caller ask again with its position). A reset or a different epoch drops the
        room's state and starts at the reply's `since`.
        """
        room = _require(frame, "room", str)
        epoch = _require(frame, "epoch", str)
        head = _require(frame, "head", int)
        since = _require(frame, "since", int)
        state = self._rooms.get(room)
        hinted = interval_hint(frame.get("ack_interval"))

        if state is None:
            self._rooms[room] = _RoomState(epoch=epoch, since=since, handled=since, ack_interval=hinted)
            return Joined(room=room, epoch=epoch, head=head, since=since, reset=frame.get("reset") is True)

        state.ack_interval = hinted
        reset = frame.get("reset") is True or (state.epoch is not None and state.epoch != epoch)
        if reset:
            self._resets += 1
            state.generation += 1
            state.since = since
            state.handled = since
            state.acked = 0
            state.ack_sent = 0
            state.ack_sent_at = -math.inf
        state.epoch = epoch
        state.join_requested = False
        return Joined(room=room, epoch=epoch, head=head, since=since, reset=reset)

    def on_msg(self, frame: Mapping[str, Any]) -> MsgOutcome:
        """Classify a `msg` frame and advance the room's position when it is the next one.

        Raises MalformedFrame.
        """
        message = message_from_frame(frame)
        state = self._rooms.get(message.room)
        if state is None:
            return NotFollowed(room=message.room, seq=message.seq)

        if message.seq <= state.since:
            self._duplicates += 1
            return Duplicate(room=message.room, seq=message.seq)

        if message.seq > state.since + 1:
            self._gaps += 1
            request_join = not state.join_requested
            state.join_requested = True
            return Gap(
                room=message.room,
                expected=state.since + 1,
                received=message.seq,
                position=Position(state.since, state.epoch),
                request_join=request_join,
            )

        state.since = message.seq
        self._delivered += 1
        return Deliver(message=message, generation=state.generation)

    def on_left(self, room: str) -> None:
        """Stop following `room` after `left`: its position is dropped."""
        self._rooms.pop(room, None)

    def handled(self, room: str, seq: int, generation: int | None = None) -> bool:
        """Record that the application finished with every message of `room` up to `seq`.

        The mark never passes `since` and never moves back. A `generation` other than the room's current
        one refers to a history dropped by a reset and is ignored. Returns whether the mark moved.
        """
        state = self._rooms.get(room)
        if state is None or (generation is not None and generation != state.generation):
            return False

        mark = min(seq, state.since)
        if mark <= state.handled:
            return False
        state.handled = mark
        return True

    def acks_due(self, now: float) -> list[tuple[str, int]]:
        """Return the `(room, seq)` acks to send at `now`: at most one per room per `ack_interval`."""
        acks: list[tuple[str, int]] = []
        for room, state in self._rooms.items():
            if not self._ack_pending(state):
                continue
            if now < state.ack_sent_at + max(self.ack_interval, state.ack_interval):
                continue
            state.ack_sent = state.handled
            state.ack_sent_at = now
            acks.append((room, state.handled))
        return acks

    def next_ack_deadline(self) -> float | None:
        """Return the earliest time at which `acks_due` returns an ack, or None when none is pending."""
        deadlines = [
            state.ack_sent_at + max(self.ack_interval, state.ack_interval)
            for state in self._rooms.values()
            if self._ack_pending(state)
        ]
        return min(deadlines, default=None)

    def on_acked(self, room: str, seq: int, ack_interval: Any = None) -> None:
        """Record the server's stored delivery cursor from an `acked` frame, and its `ack_interval` hint."""
        state = self._rooms.get(room)
        if state is None:
            return
        if seq > state.acked:
            state.acked = seq
        state.ack_interval = interval_hint(ack_interval)

    def on_disconnect(self) -> None:
        """Forget acks in flight and join requests: the next connection repeats what is still needed."""
        for state in self._rooms.values():
            state.ack_sent = state.acked
            state.ack_sent_at = -math.inf
            state.join_requested = False

    def position(self, room: str) -> Position | None:
        """Return the position held for `room`, or None when the room is not followed."""
        state = self._rooms.get(room)
        if state is None:
            return None
        return Position(state.since, state.epoch)

    def generation(self, room: str) -> int | None:
        """Return the number of resets of `room`'s history seen so far, or None when it is not followed."""
        state = self._rooms.get(room)
        return None if state is None else state.generation

    def resume_positions(self) -> dict[str, Position]:
        """Return the held position of every followed room, for `resume` in `hello`."""
        return {room: Position(state.since, state.epoch) for room, state in self._rooms.items()}

    def handled_positions(self) -> dict[str, Position]:
        """Return the handled mark of every followed room, the position to save for a restarted client."""
        return {room: Position(state.handled, state.epoch) for room, state in self._rooms.items()}

    def rooms(self) -> list[str]:
        """Return the followed rooms."""
        return list(self._rooms)

    def statistics(self) -> ReceiverStatistics:
        """Return a snapshot of the counters."""
        return ReceiverStatistics(
            delivered=self._delivered, duplicates=self._duplicates, gaps=self._gaps, resets=self._resets
        )

    @staticmethod
    def _ack_pending(state: _RoomState) -> bool:
        return state.handled > max(state.ack_sent, state.acked)
