"""The recorded history of a verify run: one JSON-lines file per client, and the stored cursors sampled.

Each line of a client's file is one event, a JSON object whose `e` field names its kind and whose `t`
field is the time in seconds since the run started (for reading a violation in context, never for
checking). The workload never sends the same body twice to one room, so `(room, sender, body)` names a
message from the moment the application requests the send, before the client library picks its id.
Events belong to the incarnation that the latest `start` opened: a client that crashes and
restarts from its state file writes a new `start`.

    e            fields                      meaning
    start        incarnation, positions      a client process began; `positions` maps each room to the
                                             `since` loaded from its state file ({} for a fresh client)
    joined       room, since, head, epoch,   the server's `joined` reply, as the client library applied it
                 reset
    send         room, body, id              the application asked the client library to send `body`;
                                             `id` is null when the library chooses it later
    sent         room, body, id, seq, dup    the server confirmed the send of `body` as message `id`
    send_failed  room, body, code            the server rejected a send with a final error
    dup_send     room, body, id, seq, dup    a fault replayed a confirmed send on another connection;
                                             `seq` is what the server's reply carried (null: no reply)
    deliver      room, seq, id, from         the client library handed a message to the application
    acked        room, seq                   the server reported the user's stored cursor
    stop         reason, final, stats        the incarnation ended: `reason` is `crash` or `close`,
                                             `final` is true for the drained end of the run

A cursor sample file holds lines `{"t": …, "user": …, "room": …, "cursor": …}`, read from the store
while the run goes on.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson


@dataclass(frozen=True, slots=True)
class Start:
    """A client incarnation began, resuming from `positions` (room to `since`) read from its state file."""

    incarnation: int
    positions: dict[str, int] = field(default_factory=dict)
    t: float = 0.0


@dataclass(frozen=True, slots=True)
class Joined:
    """The server's `joined` reply for `room`."""

    room: str
    since: int
    head: int
    epoch: str
    reset: bool = False
    t: float = 0.0


@dataclass(frozen=True, slots=True)
class Send:
    """The application asked to send `body` to `room`; `id` is None until the client library reports it."""

    room: str
    body: str
    id: str | None = None
    t: float = 0.0


@dataclass(frozen=True, slots=True)
class Sent:
    """The server confirmed that `body` is stored in `room` as message `id` with `seq`."""

    room: str
    body: str
    id: str
    seq: int
    dup: bool = False
    t: float = 0.0


@dataclass(frozen=True, slots=True)
class SendFailed:
    """The server rejected the send of `body` with the final error `code`; it must not be stored."""

    room: str
    body: str
    code: str
    t: float = 0.0


@dataclass(frozen=True, slots=True)
class DuplicateSend:
    """A fault transmitted a confirmed message again; `seq` is the reply's, None when none came."""

    room: str
    body: str
    id: str
    seq: int | None
    dup: bool = True
    t: float = 0.0


@dataclass(frozen=True, slots=True)
class Deliver:
    """The client library handed message `seq` of `room` to the application."""

    room: str
    seq: int
    id: str
    sender: str
    t: float = 0.0


@dataclass(frozen=True, slots=True)
class Acked:
    """The server reported `seq` as the user's stored delivery cursor for `room`."""

    room: str
    seq: int
    t: float = 0.0


@dataclass(frozen=True, slots=True)
class Stop:
    """The incarnation ended by `reason` (`crash` or `close`); `final` marks the drained end of the run."""

    reason: str
    final: bool = False
    stats: dict[str, int] = field(default_factory=dict)
    t: float = 0.0


Event = Start | Joined | Send | Sent | SendFailed | DuplicateSend | Deliver | Acked | Stop


@dataclass(frozen=True, slots=True)
class CursorSample:
    """A user's delivery cursor for a room as the store held it at time `t` (None: not set yet)."""

    user: str
    room: str
    cursor: int | None
    t: float = 0.0


# Each kind's name on the wire, and the JSON keys of its fields where they differ from the attribute.
KIND_NAMES: dict[type[Any], str] = {
    Start: "start",
    Joined: "joined",
    Send: "send",
    Sent: "sent",
    SendFailed: "send_failed",
    DuplicateSend: "dup_send",
    Deliver: "deliver",
    Acked: "acked",
    Stop: "stop",
}
KINDS_BY_NAME: dict[str, type[Any]] = {name: kind for kind, name in KIND_NAMES.items()}
RENAMED_FIELDS: dict[str, str] = {"sender": "from"}
ATTRIBUTES_BY_KEY: dict[str, str] = {key: attribute for attribute, key in RENAMED_FIELDS.items()}


class HistoryFormatError(ValueError):
    """A history line is not valid JSON or does not describe a known event."""

    def __init__(self, path: Path | None, line_number: int, reason: str) -> None:
        where = f"{path}:{line_number}" if path is not None else f"line {line_number}"
        super().__init__(f"invalid history event at {where}: {reason}")
        self.path = path
        self.line_number = line_number
        self.reason = reason


def encode_event(event: Event) -> bytes:
    """Serialise one event as a JSON object without the trailing newline."""
    fields: dict[str, Any] = {"e": KIND_NAMES[type(event)]}
    for name in event.__slots__:
        fields[RENAMED_FIELDS.get(name, name)] = getattr(event, name)
    fields["t"] = round(event.t, 3)
    return orjson.dumps(fields)


def decode_event(line: bytes | str, path: Path | None = None, line_number: int = 0) -> Event:
    """Parse one line written by `encode_event`; raises HistoryFormatError."""
    try:
        fields = orjson.loads(line)
    except orjson.JSONDecodeError as error:
        raise HistoryFormatError(path, line_number, f"not JSON ({error})") from error
    if not isinstance(fields, dict):
        raise HistoryFormatError(path, line_number, "not a JSON object")

    kind = KINDS_BY_NAME.get(fields.pop("e", None))
    if kind is None:
        raise HistoryFormatError(path, line_number, "field 'e' is missing or names no known event")
    arguments: dict[str, Any] = {
        ATTRIBUTES_BY_KEY.get(str(key), str(key)): value for key, value in fields.items()
    }
    try:
        event: Event = kind(**arguments)
    except TypeError as error:
        raise HistoryFormatError(path, line_number, f"wrong fields for {kind.__name__} ({error})") from error
    return event


def read_history(path: Path) -> list[Event]:
    """Read every event of one client's history file, in the order written.

    A truncated last line (the run was killed while writing it) is skipped; any other invalid line
    raises HistoryFormatError.
    """
    events: list[Event] = []
    lines = path.read_bytes().split(b"\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            events.append(decode_event(line, path, number))
        except HistoryFormatError:
            if number == len(lines):
                break
            raise
    return events


def read_histories(folder: Path) -> dict[str, list[Event]]:
    """Read every `*.jsonl` client history in `folder`, keyed by client name (the file's stem)."""
    return {path.stem: read_history(path) for path in sorted(folder.glob("*.jsonl"))}


def encode_sample(sample: CursorSample) -> bytes:
    fields = {"t": round(sample.t, 3), "user": sample.user, "room": sample.room, "cursor": sample.cursor}
    return orjson.dumps(fields)


def read_cursor_samples(path: Path) -> list[CursorSample]:
    """Read a cursor sample file; a missing file gives no samples."""
    if not path.exists():
        return []
    samples: list[CursorSample] = []
    for line in path.read_bytes().splitlines():
        if not line.strip():
            continue
        try:
            fields = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue  # the last line of a killed run may be cut short
        samples.append(CursorSample(fields["user"], fields["room"], fields["cursor"], fields.get("t", 0.0)))
    return samples


class HistoryWriter:
    """Appends one client's events to its JSON-lines file, timed from a shared run start.

    Lines are buffered and written by `flush`, which the workload calls often; `close` flushes. A
    simulated client crash does not lose events, because the writer lives in the verifying process.
    """

    def __init__(self, path: Path, started: float) -> None:
        self.path = path
        self.started = started
        self._file: IO[bytes] = open(path, "ab")  # noqa: SIM115 - closed by close()
        self._lines: list[bytes] = []

    def now(self) -> float:
        return time.monotonic() - self.started

    def write(self, event: Event) -> None:
        self._lines.append(encode_event(event))

    def flush(self) -> None:
        if self._lines:
            self._file.write(b"\n".join(self._lines) + b"\n")
            self._file.flush()
            self._lines.clear()

    def close(self) -> None:
        self.flush()
        self._file.close()


def events_of_kind(events: Iterable[Event], kind: type[Any]) -> Iterator[Any]:
    """Yield the events of one kind, in order."""
    return (event for event in events if isinstance(event, kind))
