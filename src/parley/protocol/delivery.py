"""Server-side delivery state: what each connection was sent and acknowledged, and when to resend.

Theory of operation. A connection that follows a room has a `Follow`: `sent` is the highest seq
written to it, `acked` the highest seq its client acknowledged. While `sent > acked` the follow is
armed in one process-wide timer wheel whose slots are `ack_timeout` wide, so a deadline falls between
one and two timeouts after the last progress, as the protocol allows. At each tick an armed follow
is in one of three cases:

    acked >= sent                   -> disarm (nothing outstanding)
    acked advanced since armed      -> re-arm from the time of that progress, tries = 0
    no progress, tries < max_tries  -> Resend(acked + 1 .. sent), tries + 1, wait doubles
    no progress, tries == max_tries -> GiveUp (the connection closes with 4008)

The wheel costs O(1) per send and per ack (an attribute write), and one set walk per tick, so
10,000 members acknowledging every 100 ms need no timer objects and no heap operations.
Nothing here does IO or reads a clock: callers pass `now` in seconds and act on the returned actions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


class Follow:
    """One connection's delivery position in one room."""

    __slots__ = ("acked", "armed_at", "owner", "progress_at", "room", "sent", "slot", "tries")

    def __init__(self, room: str, position: int, owner: Any = None) -> None:
        self.room = room
        self.sent = position
        self.acked = position
        self.tries = 0
        self.slot: int | None = None
        self.armed_at = position
        self.progress_at = 0.0
        self.owner = owner

    @property
    def outstanding(self) -> int:
        """Count of messages written to the connection and not yet acknowledged."""
        return self.sent - self.acked

    def __repr__(self) -> str:
        return f"Follow(room={self.room!r}, sent={self.sent}, acked={self.acked}, tries={self.tries})"


@dataclass(frozen=True, slots=True)
class Resend:
    """Write the follow's messages `first .. last` again."""

    follow: Follow
    first: int
    last: int


@dataclass(frozen=True, slots=True)
class GiveUp:
    """The client acknowledged nothing through every try: close its connection with 4008."""

    follow: Follow


Action = Resend | GiveUp


class DeliveryTracker:
    """The resend deadlines of every follow in the process, in one timer wheel."""

    def __init__(self, ack_timeout: float, max_tries: int = 3) -> None:
        if ack_timeout <= 0:
            raise ValueError(f"ack_timeout must be positive, got {ack_timeout}")
        self.ack_timeout = ack_timeout
        self.max_tries = max_tries
        self._slots: dict[int, set[Follow]] = {}

    def on_sent(self, follow: Follow, seq: int, now: float) -> None:
        """Record that `seq` was written to the follow's connection."""
        if seq > follow.sent:
            follow.sent = seq
        if follow.slot is None and follow.sent > follow.acked:
            follow.tries = 0
            follow.progress_at = now
            self._arm(follow, now, 1)

    def on_ack(self, follow: Follow, seq: int, now: float) -> bool:
        """Record a cumulative acknowledgement; return whether it moved the follow forward."""
        if seq <= follow.acked:
            return False
        follow.acked = seq
        follow.progress_at = now
        return True

    def rewind(self, follow: Follow, position: int) -> None:
        """Move `sent` back to `position` (a rejoin or a catch-up from the store starts there)."""
        follow.sent = position
        follow.acked = min(follow.acked, position)

    def forget(self, follow: Follow) -> None:
        """Drop the follow from the wheel (the connection left the room or closed)."""
        if follow.slot is not None:
            slot = self._slots.get(follow.slot)
            if slot is not None:
                slot.discard(follow)
            follow.slot = None

    def poll(self, now: float) -> list[Action]:
        """Handle every slot due by `now`; return what the caller must do."""
        actions: list[Action] = []
        current = self._slot_of(now)
        for index in sorted(index for index in self._slots if index <= current):
            for follow in self._slots.pop(index):
                follow.slot = None
                action = self._expire(follow, now)
                if action is not None:
                    actions.append(action)
        return actions

    def next_deadline(self) -> float | None:
        """Return when `poll` next has work, or None when nothing is armed."""
        if not self._slots:
            return None
        return min(self._slots) * self.ack_timeout

    def armed(self) -> int:
        """Count the follows waiting for an acknowledgement."""
        return sum(len(slot) for slot in self._slots.values())

    def _expire(self, follow: Follow, now: float) -> Action | None:
        if follow.acked >= follow.sent:
            follow.tries = 0
            return None

        if follow.acked > follow.armed_at:
            follow.tries = 0
            self._arm(follow, follow.progress_at, 1)
            return None

        if follow.tries >= self.max_tries:
            return GiveUp(follow)

        follow.tries += 1
        self._arm(follow, now, 2**follow.tries)
        return Resend(follow, follow.acked + 1, follow.sent)

    def _arm(self, follow: Follow, start: float, timeouts: int) -> None:
        # The slot after the one holding `start + timeouts * T` fires between that time and one T later.
        index = self._slot_of(start) + timeouts + 1
        follow.slot = index
        follow.armed_at = follow.acked
        self._slots.setdefault(index, set()).add(follow)

    def _slot_of(self, now: float) -> int:
        return math.floor(now / self.ack_timeout)
