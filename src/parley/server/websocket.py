"""RFC 6455 framing for the server side, free of IO: bytes in, events out; frames built as bytes.

The reader enforces what a server must: client frames are masked, no extension bits, control frames
are short and unfragmented, and a message longer than `max_message` is rejected from its header,
before its payload is buffered. Text payloads are returned as bytes; UTF-8 is checked by the caller,
which can skip the check when the JSON parser accepts the payload.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

from parley.protocol.errors import CLOSE_PROTOCOL_ERROR, CLOSE_TOO_LARGE, CloseConnection

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# Empty fragments add nothing to a message's size, so their count needs its own limit.
MAX_FRAGMENTS = 1024


@dataclass(frozen=True, slots=True)
class TextMessage:
    payload: bytes


@dataclass(frozen=True, slots=True)
class BinaryMessage:
    size: int


@dataclass(frozen=True, slots=True)
class Ping:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    payload: bytes


@dataclass(frozen=True, slots=True)
class CloseReceived:
    code: int | None
    reason: str


Event = TextMessage | BinaryMessage | Ping | Pong | CloseReceived


def accept_key(key: str) -> str:
    """Compute `Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key`."""
    digest = hashlib.sha1(key.encode("ascii") + ACCEPT_GUID).digest()
    return base64.b64encode(digest).decode("ascii")


def encode_frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    """Build one unmasked, final server frame."""
    length = len(payload)
    if length < 126:
        header = bytes((0x80 | opcode, length))
    elif length < 65536:
        header = bytes((0x80 | opcode, 126)) + length.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 127)) + length.to_bytes(8, "big")
    return header + payload


def encode_close(code: int, reason: str = "") -> bytes:
    """Build a close frame; the reason is cut to fit the 125-byte control frame limit."""
    payload = code.to_bytes(2, "big") + reason.encode("utf-8")[:123]
    return encode_frame(payload, OP_CLOSE)


def is_valid_close_code(code: int) -> bool:
    """Tell whether a close code may appear in a close frame (RFC 6455, section 7.4)."""
    return (
        code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014)
        or 3000 <= code <= 4999
    )


def unmask(payload: bytes, mask: bytes) -> bytes:
    length = len(payload)
    if length == 0:
        return payload
    key = (mask * (length // 4 + 1))[:length]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(length, "little")


class FrameReader:
    """Incremental parser of client frames into complete messages and control events."""

    __slots__ = ("_buffer", "_fragments", "_fragments_opcode", "_fragments_size", "max_message")

    def __init__(self, max_message: int) -> None:
        self.max_message = max_message
        self._buffer = bytearray()
        self._fragments: list[bytes] | None = None
        self._fragments_opcode = OP_TEXT
        self._fragments_size = 0

    def feed(self, data: bytes) -> list[Event]:
        """Parse `data`; raise CloseConnection on a protocol violation or an oversized message."""
        buffer = self._buffer
        buffer += data
        events: list[Event] = []
        position = 0
        available = len(buffer)

        while available - position >= 2:
            first, second = buffer[position], buffer[position + 1]
            length = second & 0x7F
            cursor = position + 2
            if length == 126:
                if available < cursor + 2:
                    break
                length = int.from_bytes(buffer[cursor : cursor + 2], "big")
                cursor += 2
            elif length == 127:
                if available < cursor + 8:
                    break
                length = int.from_bytes(buffer[cursor : cursor + 8], "big")
                cursor += 8

            self._check_header(first, second, length)
            if available < cursor + 4 + length:
                break
            mask = bytes(buffer[cursor : cursor + 4])
            cursor += 4
            payload = unmask(bytes(buffer[cursor : cursor + length]), mask)
            position = cursor + length

            event = self._on_frame(first & 0x80 != 0, first & 0x0F, payload)
            if event is not None:
                events.append(event)

        if position:
            del buffer[:position]
        return events

    def _check_header(self, first: int, second: int, length: int) -> None:
        opcode = first & 0x0F
        if first & 0x70:
            raise CloseConnection(CLOSE_PROTOCOL_ERROR, "reserved bits set without an extension")
        if not second & 0x80:
            raise CloseConnection(CLOSE_PROTOCOL_ERROR, "client frames must be masked")
        if opcode >= OP_CLOSE:
            if length > 125 or not first & 0x80:
                raise CloseConnection(CLOSE_PROTOCOL_ERROR, "control frames must be short and final")
            return
        if opcode not in (OP_CONTINUATION, OP_TEXT, OP_BINARY):
            raise CloseConnection(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode}")
        already = self._fragments_size if opcode == OP_CONTINUATION else 0
        if already + length > self.max_message:
            raise CloseConnection(
                CLOSE_TOO_LARGE, f"message longer than max_frame ({self.max_message} bytes)"
            )

    def _on_frame(self, final: bool, opcode: int, payload: bytes) -> Event | None:
        if opcode >= OP_CLOSE:
            return self._on_control(opcode, payload)

        if opcode == OP_CONTINUATION:
            if self._fragments is None:
                raise CloseConnection(CLOSE_PROTOCOL_ERROR, "continuation frame without a message")
            if len(self._fragments) >= MAX_FRAGMENTS:
                raise CloseConnection(
                    CLOSE_TOO_LARGE, f"message split into more than {MAX_FRAGMENTS} fragments"
                )
            self._fragments.append(payload)
            self._fragments_size += len(payload)
            if not final:
                return None
            payload = b"".join(self._fragments)
            opcode = self._fragments_opcode
            self._fragments = None
            self._fragments_size = 0
        elif self._fragments is not None:
            raise CloseConnection(CLOSE_PROTOCOL_ERROR, "new message before the previous one ended")
        elif not final:
            self._fragments = [payload]
            self._fragments_opcode = opcode
            self._fragments_size = len(payload)
            return None

        if opcode == OP_BINARY:
            return BinaryMessage(len(payload))
        return TextMessage(payload)

    def _on_control(self, opcode: int, payload: bytes) -> Event:
        if opcode == OP_PING:
            return Ping(payload)
        if opcode == OP_PONG:
            return Pong(payload)
        if len(payload) == 1:
            raise CloseConnection(CLOSE_PROTOCOL_ERROR, "close frame with a one-byte payload")
        if not payload:
            return CloseReceived(None, "")
        code = int.from_bytes(payload[:2], "big")
        try:
            reason = payload[2:].decode("utf-8")
        except UnicodeDecodeError:
            raise CloseConnection(CLOSE_PROTOCOL_ERROR, "close reason is not valid UTF-8") from None
        return CloseReceived(code, reason)
