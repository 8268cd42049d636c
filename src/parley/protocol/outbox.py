"""The unconfirmed sends of one client, free of IO: message ids, resend deadlines and resend order.

Theory of operation. Every `send` stays in the outbox from `add` until the server confirms it with `sent`
or rejects it with a final error. The caller transmits what `add`, `due` and `on_reconnect` return and
never anything else, so the outbox decides the order of sends on the wire. Each entry has a deadline:

    entry state    deadline          becomes
    waiting        None              in flight, when `due` or `on_reconnect` returns it
    in flight      resend time       in flight again (backoff doubled) at the deadline, or removed on
                                     `sent` or a final error
    held           retry time        in flight again at the retry time (after `rate_limited`, `overloaded`
                                     or `internal`)

An entry is waiting while the client is disconnected, and while its room is paused. A room is paused
from a retryable error until that error's retry time, so that the sends queued behind the rejected one
go out after it, in add order.

Times are `now` arguments in seconds from any monotonic clock; the outbox never reads a clock.
The outbox has no size limit and never gives up on an entry. It resends each one until the server confirms
it or rejects it with a final error.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

RETRYABLE_ERRORS = frozenset({"rate_limited", "overloaded", "internal"})
"""Error codes after which the same `send` is tried again; every other code is a final failure."""


@dataclass(slots=True)
class PendingSend:
    """One `send` frame that the server has not confirmed yet, with its resend bookkeeping."""

    room: str
    id: str
    body: str
    meta: dict[str, Any] | None
    deadline: float | None = None
    attempts: int = 0
    """Transmissions on the current connection, which set the backoff; 0 after a reconnect."""
    transmitted: bool = False
    """Whether the frame went out at least once, on any connection, so the next one is a resend."""

    def to_frame(self) -> dict[str, Any]:
        """Build the `send` frame for this entry, identical on every transmission."""
        frame: dict[str, Any] = {"type": "send", "room": self.room, "id": self.id, "body": self.body}
        if self.meta is not None:
            frame["meta"] = self.meta
        return frame


@dataclass(frozen=True, slots=True)
class OutboxStatistics:
    """Counters since the outbox was created."""

    pending: int
    resends: int
    confirmed: int
    confirmed_as_duplicate: int
    failed: int


class Outbox:
    """Unconfirmed sends in add order, with resend deadlines and exponential backoff.

    `send_timeout` is the wait in seconds for `sent` before the first resend. Each further resend on the
    same connection doubles the wait, up to `backoff_cap` seconds. `id_prefix` defaults to 16 random hex
    digits, so that ids from two client instances never collide.
    """

    def __init__(
        self, send_timeout: float = 10.0, backoff_cap: float = 60.0, id_prefix: str | None = None
    ) -> None:
        if send_timeout <= 0:
            raise ValueError(f"send_timeout must be positive, got {send_timeout}")
        if backoff_cap < send_timeout:
            raise ValueError(f"backoff_cap ({backoff_cap}) must be at least send_timeout ({send_timeout})")

        self.send_timeout = send_timeout
        self.backoff_cap = backoff_cap
        self.id_prefix = id_prefix if id_prefix is not None else secrets.token_hex(8)
        self._connected = False
        self._entries: dict[tuple[str, str], PendingSend] = {}
        self._paused_until: dict[str, float] = {}
        self._counter = 0
        self._resends = 0
        self._confirmed = 0
        self._confirmed_as_duplicate = 0
        self._failed = 0

    @property
    def connected(self) -> bool:
        """Whether the outbox transmits: true from `on_reconnect` until `on_disconnect`."""
        return self._connected

    def new_id(self) -> str:
        """Return a fresh message id of the form `c-<prefix>-<counter>`."""
        self._counter += 1
        return f"c-{self.id_prefix}-{self._counter}"

    def add(
        self, room: str, id: str, body: str, meta: dict[str, Any] | None, now: float
    ) -> PendingSend | None:
        """Queue a send and return it when it should be transmitted now.

        Returns None while the client is disconnected or the room is paused: `due` or `on_reconnect`
        returns the entry later. Raises ValueError when `(room, id)` is already pending.
        """
        key = (room, id)
        if key in self._entries:
            raise ValueError(f"message id {id!r} is already pending in room {room!r}")

        entry = PendingSend(room=room, id=id, body=body, meta=meta)
        self._entries[key] = entry

        # A paused room stays paused until `due` ends the pause, even when its time is over, because
        # `due` transmits the held entries first and this one must follow them.
        if not self._connected or room in self._paused_until:
            return None
        self._transmit(entry, now)
        return entry

    def on_sent(self, room: str, id: str, seq: int, dup: bool) -> PendingSend | None:
        """Remove the entry that a `sent` frame confirms and return it (None for an unknown id).

        A resend can make the server confirm the same id twice, so an unknown id is expected.
        """
        entry = self._entries.pop((room, id), None)
        if entry is None:
            return None

        self._confirmed += 1
        if dup:
            self._confirmed_as_duplicate += 1
        return entry

    def on_error(
        self, room: str, id: str, code: str, now: float, retry_after: float | None = None
    ) -> PendingSend | None:
        """Apply an `error` frame that refers to a pending send.

        A code in RETRYABLE_ERRORS keeps the entry and pauses its room until `now + retry_after` seconds,
        or until the entry's backoff deadline when `retry_after` is None, and returns None. Any other code
        is final: the entry is removed and returned. Returns None for an unknown id.
        """
        entry = self._entries.get((room, id))
        if entry is None:
            return None

        if code not in RETRYABLE_ERRORS:
            del self._entries[(room, id)]
            self._failed += 1
            return entry

        wait = retry_after if retry_after is not None else self._backoff(entry.attempts)
        retry_at = now + max(wait, 0.0)
        entry.deadline = retry_at
        self._paused_until[room] = max(retry_at, self._paused_until.get(room, retry_at))
        return None

    def due(self, now: float) -> list[PendingSend]:
        """Return the entries to transmit at `now`, in add order, and set their next deadlines."""
        if not self._connected:
            return []

        for room, until in list(self._paused_until.items()):
            if now >= until:
                del self._paused_until[room]

        ready: list[PendingSend] = []
        for entry in self._entries.values():
            if entry.room in self._paused_until:
                continue
            if entry.deadline is None or now >= entry.deadline:
                self._transmit(entry, now)
                ready.append(entry)
        return ready

    def on_disconnect(self) -> None:
        """Mark every entry as waiting: nothing is transmitted until `on_reconnect`."""
        self._connected = False
        for entry in self._entries.values():
            entry.deadline = None
            entry.attempts = 0

    def on_reconnect(self, now: float) -> list[PendingSend]:
        """Return every pending entry in add order for transmission on a new connection.

        Pauses from the previous connection end here, and every entry's backoff starts again.
        """
        self._connected = True
        self._paused_until.clear()

        entries = list(self._entries.values())
        for entry in entries:
            entry.attempts = 0
            self._transmit(entry, now)
        return entries

    def next_deadline(self) -> float | None:
        """Return the earliest time at which `due` has work, or None when there is none."""
        if not self._connected:
            return None

        deadlines = list(self._paused_until.values())
        for entry in self._entries.values():
            if entry.room in self._paused_until:
                continue
            deadlines.append(entry.deadline if entry.deadline is not None else -math.inf)
        return min(deadlines, default=None)

    def pending(self) -> list[PendingSend]:
        """Return the unconfirmed entries in add order."""
        return list(self._entries.values())

    def restore(self, entries: Iterable[tuple[str, str, str, dict[str, Any] | None]], now: float) -> None:
        """Queue `(room, id, body, meta)` sends saved by an earlier client, keeping their ids and order."""
        for room, id, body, meta in entries:
            self.add(room, id, body, meta, now)

    def statistics(self) -> OutboxStatistics:
        """Return a snapshot of the counters."""
        return OutboxStatistics(
            pending=len(self._entries),
            resends=self._resends,
            confirmed=self._confirmed,
            confirmed_as_duplicate=self._confirmed_as_duplicate,
            failed=self._failed,
        )

    def _transmit(self, entry: PendingSend, now: float) -> None:
        if entry.transmitted:
            self._resends += 1
        entry.transmitted = True
        entry.attempts += 1
        entry.deadline = now + self._backoff(entry.attempts)

    def _backoff(self, attempts: int) -> float:
        """Return the wait after `attempts` transmissions: send_timeout, doubled per resend, capped."""
        exponent = max(attempts - 1, 0)
        if exponent >= 64:
            return self.backoff_cap
        return float(min(self.send_timeout * 2**exponent, self.backoff_cap))
