"""The client side of RFC 6455 for the load generator, free of IO: handshake bytes, frames in and out.

The load generator has to parse hundreds of thousands of frames per second in Python, so this codec
does the least a client must. It masks what it sends with the all-zero key, which RFC 6455 allows and
which costs the server the same to unmask. That key gives no protection against cache poisoning through
proxies, so the codec is for loopback benchmarks only. Text payloads come back as bytes, with no UTF-8
check.
"""

from __future__ import annotations

import base64
import hashlib
import os

OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_HANDSHAKE_RESPONSE = 16 * 1024


class HandshakeError(Exception):
    """The server did not switch to WebSocket; `status` is its HTTP status (0 when unreadable)."""

    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


def handshake_request(host: str, port: int, path: str) -> tuple[bytes, bytes]:
    """Build an upgrade request; return it and the `Sec-WebSocket-Accept` value the server must send."""
    key = base64.b64encode(os.urandom(16))
    accept = base64.b64encode(hashlib.sha1(key + ACCEPT_GUID).digest())
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key.decode('ascii')}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode("ascii")
    return request, accept


def parse_handshake_response(buffer: bytes | bytearray, accept: bytes) -> int:
    """Check a complete or partial upgrade response; return the bytes it took, or 0 when incomplete.

    Raises HandshakeError when the response is not `101 Switching Protocols` with the expected accept key.
    """
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        if len(buffer) > MAX_HANDSHAKE_RESPONSE:
            raise HandshakeError(0, f"upgrade response longer than {MAX_HANDSHAKE_RESPONSE} bytes")
        return 0
    head = bytes(buffer[:end]).decode("latin-1")
    lines = head.split("\r\n")
    status_line = lines[0].split(" ", 2)
    status = int(status_line[1]) if len(status_line) > 1 and status_line[1].isdigit() else 0
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if status != 101:
        retry_after = headers.get("retry-after")
        raise HandshakeError(
            status,
            f"upgrade failed with HTTP {status}: {lines[0][:200]}",
            float(retry_after) if retry_after and retry_after.isdigit() else None,
        )
    if headers.get("sec-websocket-accept", "").encode("latin-1") != accept:
        raise HandshakeError(status, "upgrade response carries a wrong Sec-WebSocket-Accept")
    return end + 4


def client_frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    """Build one final client frame, masked with the all-zero key so the payload bytes stay as they are."""
    length = len(payload)
    if length < 126:
        header = bytes((0x80 | opcode, 0x80 | length))
    elif length < 65536:
        header = bytes((0x80 | opcode, 0x80 | 126)) + length.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + length.to_bytes(8, "big")
    return header + b"\0\0\0\0" + payload


def close_frame(code: int = 1000) -> bytes:
    return client_frame(code.to_bytes(2, "big"), OP_CLOSE)


def split_frames(buffer: bytearray) -> tuple[list[tuple[int, bytes]], int]:
    """Cut the complete server frames off the front of `buffer`; return (opcode, payload) pairs, bytes used.

    Server frames are unmasked. Fragmented messages are not reassembled: Parley and the baseline servers
    send every message as one final frame, and a continuation frame is returned with opcode 0.
    """
    frames: list[tuple[int, bytes]] = []
    position = 0
    available = len(buffer)
    while available - position >= 2:
        length = buffer[position + 1] & 0x7F
        start = position + 2
        if length == 126:
            if available < start + 2:
                break
            length = int.from_bytes(buffer[start : start + 2], "big")
            start += 2
        elif length == 127:
            if available < start + 8:
                break
            length = int.from_bytes(buffer[start : start + 8], "big")
            start += 8
        end = start + length
        if end > available:
            break
        frames.append((buffer[position] & 0x0F, bytes(buffer[start:end])))
        position = end
    return frames, position
