"""Client frames: parse a WebSocket text message into validated frames, and encode server frames.

Validation follows the wire contract: names are 1 to 64 of `A-Z a-z 0-9 . _ : -`, bodies are at most
`max_body` UTF-8 bytes without U+0000, `meta` is an object of at most `max_meta` compact bytes nested
at most 8 levels. Anything else raises `FrameError` with the contract's code and a `ref` naming the frame.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from parley.protocol.errors import (
    BAD_FRAME,
    CLOSE_INVALID_UTF8,
    INVALID_FIELD,
    TOO_LARGE,
    UNKNOWN_TYPE,
    CloseConnection,
    FrameError,
)

NAME_PATTERN = re.compile(r"[A-Za-z0-9._:\-]{1,64}")
NAME_RULE = "must be 1 to 64 of A-Z a-z 0-9 . _ : -"
MAX_META_DEPTH = 8
HISTORY_DEFAULT_LIMIT = 50
HISTORY_MAX_LIMIT = 200


@dataclass(frozen=True, slots=True)
class Limits:
    """Sizes the server accepts, announced in `welcome`."""

    max_body: int = 16384
    max_meta: int = 2048

    @property
    def max_frame(self) -> int:
        # A legal body may grow six-fold when every character is escaped as \uXXXX.
        return 6 * self.max_body + self.max_meta + 4096


@dataclass(frozen=True, slots=True)
class Hello:
    token: str | None
    user: str | None
    device: str | None
    batch: bool
    resume: dict[str, tuple[int, str | None]]


@dataclass(frozen=True, slots=True)
class Join:
    room: str
    since: int | None
    epoch: str | None
    last: int | None


@dataclass(frozen=True, slots=True)
class Leave:
    room: str


@dataclass(frozen=True, slots=True)
class Send:
    room: str
    id: str
    body: str
    meta: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class Ack:
    room: str
    seq: int


@dataclass(frozen=True, slots=True)
class Read:
    room: str
    seq: int


@dataclass(frozen=True, slots=True)
class History:
    room: str
    before: int | None
    after: int | None
    limit: int
    id: str | None


@dataclass(frozen=True, slots=True)
class Ping:
    pass


ClientFrame = Hello | Join | Leave | Send | Ack | Read | History | Ping


class FrameParser:
    """Turns one decoded WebSocket text message into frames or errors, in array order."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits

    def parse_message(self, payload: bytes) -> list[ClientFrame | FrameError]:
        """Parse a text message holding one frame or an array of frames.

        Raises CloseConnection (1007) when the payload is not valid UTF-8.
        """
        try:
            value = orjson.loads(payload)
        except orjson.JSONDecodeError as error:
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError:
                raise CloseConnection(CLOSE_INVALID_UTF8, "text message is not valid UTF-8") from None
            return [FrameError(BAD_FRAME, f"not valid JSON: {error}")]

        if isinstance(value, list):
            return [self.parse_frame(item) for item in value]
        return [self.parse_frame(value)]

    def parse_frame(self, value: Any) -> ClientFrame | FrameError:
        """Validate one decoded frame; return the error instead of raising, so arrays go on."""
        if not isinstance(value, dict):
            return FrameError(BAD_FRAME, "a frame must be a JSON object")
        kind = value.get("type")
        if not isinstance(kind, str):
            return FrameError(BAD_FRAME, "a frame needs a string `type`", reference(value))
        parse = _PARSERS.get(kind)
        if parse is None:
            return FrameError(UNKNOWN_TYPE, f"unknown frame type {kind[:64]!r}", reference(value))
        try:
            return parse(self, value)
        except FrameError as error:
            if error.ref is None:
                error.ref = reference(value)
            return error

    def _hello(self, frame: dict[str, Any]) -> Hello:
        token = optional_str(frame, "token", 4096)
        user = frame.get("user")
        if user is not None:
            user = name(frame, "user")
        device = optional_str(frame, "device", 64)
        batch = frame.get("batch", False)
        if not isinstance(batch, bool):
            raise FrameError(INVALID_FIELD, "batch: must be true or false")
        return Hello(token, user, device, batch, parse_resume(frame.get("resume")))

    def _join(self, frame: dict[str, Any]) -> Join:
        room = name(frame, "room")
        since = optional_count(frame, "since")
        epoch = optional_str(frame, "epoch", 128)
        last = optional_count(frame, "last")
        return Join(room, since, epoch, last)

    def _leave(self, frame: dict[str, Any]) -> Leave:
        return Leave(name(frame, "room"))

    def _send(self, frame: dict[str, Any]) -> Send:
        room = name(frame, "room")
        message_id = name(frame, "id")
        body = frame.get("body")
        if not isinstance(body, str):
            raise FrameError(INVALID_FIELD, "body: must be a string")
        if len(body) * 4 > self.limits.max_body and len(body.encode()) > self.limits.max_body:
            raise FrameError(TOO_LARGE, f"body: longer than max_body ({self.limits.max_body} bytes)")
        if "\x00" in body:
            raise FrameError(INVALID_FIELD, "body: U+0000 is not allowed")
        meta = frame.get("meta")
        if meta is not None:
            check_meta(meta, self.limits.max_meta)
        return Send(room, message_id, body, meta)

    def _ack(self, frame: dict[str, Any]) -> Ack:
        return Ack(name(frame, "room"), required_count(frame, "seq"))

    def _read(self, frame: dict[str, Any]) -> Read:
        return Read(name(frame, "room"), required_count(frame, "seq"))

    def _history(self, frame: dict[str, Any]) -> History:
        room = name(frame, "room")
        before = optional_count(frame, "before")
        after = optional_count(frame, "after")
        if before is not None and after is not None:
            raise FrameError(INVALID_FIELD, "history: give `before` or `after`, not both")
        limit = optional_count(frame, "limit")
        if limit is None:
            limit = HISTORY_DEFAULT_LIMIT
        if limit < 1:
            raise FrameError(INVALID_FIELD, "limit: must be at least 1")
        request_id = optional_str(frame, "id", 64)
        return History(room, before, after, min(limit, HISTORY_MAX_LIMIT), request_id)

    def _ping(self, frame: dict[str, Any]) -> Ping:
        return Ping()


_PARSERS: dict[str, Callable[[FrameParser, dict[str, Any]], ClientFrame]] = {
    "hello": FrameParser._hello,
    "join": FrameParser._join,
    "leave": FrameParser._leave,
    "send": FrameParser._send,
    "ack": FrameParser._ack,
    "read": FrameParser._read,
    "history": FrameParser._history,
    "ping": FrameParser._ping,
}


def reference(frame: dict[str, Any]) -> dict[str, Any]:
    """Build the `ref` of an error: the frame's `type`, `room` and `id` where they are short strings."""
    ref: dict[str, Any] = {}
    for key in ("type", "room", "id"):
        value = frame.get(key)
        if isinstance(value, str) and len(value) <= 64:
            ref[key] = value
    return ref


_VALID_NAMES: set[str] = set()
_VALID_NAMES_MAX = 50_000


def name(frame: dict[str, Any], key: str) -> str:
    value = frame.get(key)
    if value.__class__ is str and value in _VALID_NAMES:
        return value
    if not isinstance(value, str) or NAME_PATTERN.fullmatch(value) is None:
        raise FrameError(INVALID_FIELD, f"{key}: {NAME_RULE}")
    # Rooms and users recur in nearly every frame (acks above all), so a set lookup replaces the regex.
    if key != "id":
        if len(_VALID_NAMES) >= _VALID_NAMES_MAX:
            _VALID_NAMES.clear()
        _VALID_NAMES.add(value)
    return value


def optional_str(frame: dict[str, Any], key: str, max_length: int) -> str | None:
    value = frame.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > max_length or "\x00" in value:
        raise FrameError(INVALID_FIELD, f"{key}: must be a string of at most {max_length} characters")
    return value


def optional_count(frame: dict[str, Any], key: str) -> int | None:
    value = frame.get(key)
    if value is None:
        return None
    if type(value) is not int or value < 0 or value > 2**53:
        raise FrameError(INVALID_FIELD, f"{key}: must be a non-negative integer")
    return value


def required_count(frame: dict[str, Any], key: str) -> int:
    value = optional_count(frame, key)
    if value is None:
        raise FrameError(INVALID_FIELD, f"{key}: missing, must be a non-negative integer")
    return value


def parse_resume(value: Any) -> dict[str, tuple[int, str | None]]:
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > 10_000:
        raise FrameError(INVALID_FIELD, "resume: must be an object of room positions")
    positions: dict[str, tuple[int, str | None]] = {}
    for room, position in value.items():
        if NAME_PATTERN.fullmatch(room) is None or not isinstance(position, dict):
            raise FrameError(INVALID_FIELD, f"resume: each key {NAME_RULE} and each value an object")
        since = optional_count(position, "since")
        epoch = optional_str(position, "epoch", 128)
        positions[room] = (since or 0, epoch)
    return positions


def check_meta(meta: Any, max_meta: int) -> None:
    """Reject `meta` unless it is an object within the size and depth limits, free of U+0000."""
    if not isinstance(meta, dict):
        raise FrameError(INVALID_FIELD, "meta: must be a JSON object")
    check_depth(meta, 1)
    if len(orjson.dumps(meta)) > max_meta:
        raise FrameError(TOO_LARGE, f"meta: longer than max_meta ({max_meta} bytes) as compact JSON")


def check_depth(value: Any, depth: int) -> None:
    """Count objects and arrays as levels; a scalar inside the deepest allowed level is fine."""
    if isinstance(value, dict | list) and depth > MAX_META_DEPTH:
        raise FrameError(INVALID_FIELD, f"meta: nested deeper than {MAX_META_DEPTH} levels")
    if isinstance(value, dict):
        for key, item in value.items():
            if "\x00" in key:
                raise FrameError(INVALID_FIELD, "meta: U+0000 is not allowed")
            check_depth(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            check_depth(item, depth + 1)
    elif isinstance(value, str) and "\x00" in value:
        raise FrameError(INVALID_FIELD, "meta: U+0000 is not allowed")


def encode(frame: dict[str, Any]) -> bytes:
    """Serialise a server frame to JSON bytes."""
    return orjson.dumps(frame)
