"""Values that the client library returns: send confirmations, history pages and counters."""

from __future__ import annotations

from dataclasses import dataclass

from parley.protocol.model import Message


@dataclass(frozen=True, slots=True)
class Sent:
    """The server's confirmation that a message is stored: its `seq` in the room and its time in ms.

    `dup` is true when an earlier transmission of the same id had already been stored.
    """

    room: str
    id: str
    seq: int
    ts: int
    dup: bool


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """Messages of one history request in ascending seq order; `more` is true when that direction has more."""

    room: str
    messages: list[Message]
    more: bool


@dataclass(frozen=True, slots=True)
class ClientStatistics:
    """Counters since the client was created.

    `connections` counts `welcome` frames and `reconnects` those after the first. `resends` counts `send`
    frames transmitted again after a timeout or a reconnect. `duplicates` and `gaps` count `msg` frames
    dropped for those reasons, and `resets` the rooms whose history the server reset.
    """

    connections: int
    reconnects: int
    resends: int
    sends_confirmed: int
    sends_failed: int
    sends_pending: int
    delivered: int
    duplicates: int
    gaps: int
    resets: int
