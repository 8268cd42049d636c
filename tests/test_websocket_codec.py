"""The RFC 6455 frame reader and writer, without sockets."""

from __future__ import annotations

import os

import pytest

from parley.protocol.errors import CLOSE_PROTOCOL_ERROR, CLOSE_TOO_LARGE, CloseConnection
from parley.server.websocket import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_TEXT,
    BinaryMessage,
    CloseReceived,
    FrameReader,
    Ping,
    TextMessage,
    accept_key,
    encode_close,
    encode_frame,
)


def client_frame(payload: bytes, opcode: int = OP_TEXT, final: bool = True, masked: bool = True) -> bytes:
    """Build a frame the way a client must: masked with a random key."""
    first = (0x80 if final else 0) | opcode
    length = len(payload)
    mask_bit = 0x80 if masked else 0
    if length < 126:
        header = bytes((first, mask_bit | length))
    elif length < 65536:
        header = bytes((first, mask_bit | 126)) + length.to_bytes(2, "big")
    else:
        header = bytes((first, mask_bit | 127)) + length.to_bytes(8, "big")
    if not masked:
        return header + payload
    key = os.urandom(4)
    masked_payload = bytes(byte ^ key[index % 4] for index, byte in enumerate(payload))
    return header + key + masked_payload


def test_accept_key_matches_rfc_example() -> None:
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize("size", [0, 5, 125, 126, 65535, 65536, 70000])
def test_text_roundtrip_every_length_form(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    reader = FrameReader(max_message=100_000)

    events = reader.feed(client_frame(payload))

    assert events == [TextMessage(payload)]


def test_frames_split_across_reads() -> None:
    data = client_frame(b'{"type":"ping"}') + client_frame(b"second")
    reader = FrameReader(max_message=1000)
    events = []
    for index in range(len(data)):
        events.extend(reader.feed(data[index : index + 1]))

    assert events == [TextMessage(b'{"type":"ping"}'), TextMessage(b"second")]


def test_fragments_join_with_control_frame_between() -> None:
    reader = FrameReader(max_message=1000)
    data = (
        client_frame(b"hel", OP_TEXT, final=False)
        + client_frame(b"beat", OP_PING)
        + client_frame(b"lo", OP_CONTINUATION)
    )

    assert reader.feed(data) == [Ping(b"beat"), TextMessage(b"hello")]


def test_oversized_message_rejected_from_header() -> None:
    reader = FrameReader(max_message=1000)
    header_only = client_frame(b"x" * 5000)[:8]

    with pytest.raises(CloseConnection) as raised:
        reader.feed(header_only)
    assert raised.value.code == CLOSE_TOO_LARGE


def test_oversized_fragments_rejected() -> None:
    reader = FrameReader(max_message=100)
    reader.feed(client_frame(b"x" * 60, OP_TEXT, final=False))

    with pytest.raises(CloseConnection) as raised:
        reader.feed(client_frame(b"x" * 60, OP_CONTINUATION))
    assert raised.value.code == CLOSE_TOO_LARGE


def test_unmasked_client_frame_is_a_protocol_error() -> None:
    reader = FrameReader(max_message=100)

    with pytest.raises(CloseConnection) as raised:
        reader.feed(client_frame(b"hi", masked=False))
    assert raised.value.code == CLOSE_PROTOCOL_ERROR


@pytest.mark.parametrize(
    "frame",
    [
        bytes((0x80 | 0x40 | OP_TEXT, 0x80)) + b"\0\0\0\0",
        client_frame(b"x" * 126, OP_PING),
        client_frame(b"x", OP_PING, final=False),
        client_frame(b"x", OP_CONTINUATION),
        client_frame(b"x", 0x3),
        client_frame(b"\x03", OP_CLOSE),
    ],
    ids=[
        "reserved-bit",
        "long-ping",
        "fragmented-ping",
        "stray-continuation",
        "unknown-opcode",
        "short-close",
    ],
)
def test_protocol_violations_close_1002(frame: bytes) -> None:
    with pytest.raises(CloseConnection) as raised:
        FrameReader(max_message=1000).feed(frame)
    assert raised.value.code == CLOSE_PROTOCOL_ERROR


def test_binary_and_close_events() -> None:
    reader = FrameReader(max_message=1000)
    close_payload = (1001).to_bytes(2, "big") + "bye 再见".encode()

    events = reader.feed(client_frame(b"\x00\x01", OP_BINARY) + client_frame(close_payload, OP_CLOSE))

    assert events == [BinaryMessage(2), CloseReceived(1001, "bye 再见")]


def test_server_frames_are_unmasked_and_final() -> None:
    frame = encode_frame(b"x" * 300)
    assert frame[0] == 0x80 | OP_TEXT
    assert frame[1] == 126
    assert int.from_bytes(frame[2:4], "big") == 300
    assert frame[4:] == b"x" * 300

    close = encode_close(4008, "acknowledgement timeout")
    assert close[0] == 0x80 | OP_CLOSE
    assert int.from_bytes(close[2:4], "big") == 4008
