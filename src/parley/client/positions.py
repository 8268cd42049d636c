"""The client's state file: room positions and unconfirmed sends, so a restarted client resumes.

The file is JSON, replaced atomically (a temporary file in the same folder, flushed to disk, then
`os.replace`), so a crash leaves either the old or the new content, never a mix. It is created with mode
0600 because it contains the bodies of unconfirmed messages.

    {"version": 1, "url": "ws://…/ws", "user": "alice",
     "rooms": {"lobby": {"since": 41, "epoch": "e1"}},
     "outbox": [{"room": "lobby", "id": "c-…-3", "body": "hi", "meta": null}]}
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from parley.client.errors import StateFileError
from parley.protocol.outbox import Outbox
from parley.protocol.receiver import Position, Receiver

FORMAT_VERSION = 1


@dataclass(frozen=True, slots=True)
class SavedSend:
    """An unconfirmed `send`, with the id it was first transmitted with."""

    room: str
    id: str
    body: str
    meta: dict[str, Any] | None = None


@dataclass(slots=True)
class ClientState:
    """The saved state of a client: its server URL and user, handled positions and unconfirmed sends."""

    url: str
    user: str | None = None
    rooms: dict[str, Position] = field(default_factory=dict)
    outbox: list[SavedSend] = field(default_factory=list)


class StateFile:
    """Loads and atomically saves a ClientState at `path`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def load(self, url: str) -> ClientState:
        """Read the state saved for `url`; a missing file gives an empty state.

        Raises StateFileError when the file is unreadable or malformed, or was written for another URL.
        """
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return ClientState(url=url)
        except OSError as error:
            raise StateFileError(self.path, f"cannot be read ({error.strerror})") from error

        try:
            state = _decode(orjson.loads(raw))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise StateFileError(self.path, f"malformed ({error})") from error

        if state.url != url:
            raise StateFileError(self.path, f"written for {state.url!r}, not {url!r}")
        return state

    def save(self, state: ClientState) -> None:
        """Replace the file with `state`, creating its folder when missing. Raises OSError.

        Blocks the caller, on the client's event loop, for one write and one fsync.
        """
        payload = orjson.dumps(_encode(state))
        self.path.parent.mkdir(parents=True, exist_ok=True)

        descriptor, temporary = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(descriptor, "wb") as file:
                file.write(payload)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise


def snapshot(url: str, user: str | None, receiver: Receiver, outbox: Outbox) -> ClientState:
    """Capture what a restarted client needs: handled positions (not held ones) and unconfirmed sends."""
    return ClientState(
        url=url,
        user=user,
        rooms=receiver.handled_positions(),
        outbox=[SavedSend(entry.room, entry.id, entry.body, entry.meta) for entry in outbox.pending()],
    )


def restore(state: ClientState, receiver: Receiver, outbox: Outbox) -> None:
    """Load saved positions into `receiver` and saved sends into `outbox`, keeping their ids and order."""
    for room, position in state.rooms.items():
        receiver.restore(room, position)
    outbox.restore([(send.room, send.id, send.body, send.meta) for send in state.outbox], now=0.0)


def _encode(state: ClientState) -> dict[str, Any]:
    return {
        "version": FORMAT_VERSION,
        "url": state.url,
        "user": state.user,
        "rooms": {room: position.to_fields() for room, position in state.rooms.items()},
        "outbox": [
            {"room": send.room, "id": send.id, "body": send.body, "meta": send.meta} for send in state.outbox
        ],
    }


def _decode(value: Any) -> ClientState:
    if not isinstance(value, dict):
        raise ValueError("the top level is not a JSON object")
    if value.get("version") != FORMAT_VERSION:
        raise ValueError(f"unsupported version {value.get('version')!r}, expected {FORMAT_VERSION}")

    url = _typed(value["url"], str, "url")
    user = value.get("user")
    if user is not None:
        user = _typed(user, str, "user")

    rooms: dict[str, Position] = {}
    for room, fields in _typed(value.get("rooms", {}), dict, "rooms").items():
        since = _typed(fields["since"], int, f"rooms.{room}.since")
        epoch = fields.get("epoch")
        rooms[room] = Position(since, None if epoch is None else _typed(epoch, str, f"rooms.{room}.epoch"))

    outbox: list[SavedSend] = []
    for entry in _typed(value.get("outbox", []), list, "outbox"):
        meta = entry.get("meta")
        outbox.append(
            SavedSend(
                room=_typed(entry["room"], str, "outbox.room"),
                id=_typed(entry["id"], str, "outbox.id"),
                body=_typed(entry["body"], str, "outbox.body"),
                meta=None if meta is None else _typed(meta, dict, "outbox.meta"),
            )
        )
    return ClientState(url=url, user=user, rooms=rooms, outbox=outbox)


def _typed(value: Any, kind: type, name: str) -> Any:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{name} must be of type {kind.__name__}")
    return value
