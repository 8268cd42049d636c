"""Parsing and validating client frames, without a server."""

from __future__ import annotations

import pytest

from parley.protocol.errors import CLOSE_INVALID_UTF8, CloseConnection, FrameError
from parley.protocol.frames import Ack, FrameParser, Hello, History, Join, Limits, Send

PARSER = FrameParser(Limits(max_body=4096, max_meta=256))


def parse_one(text: str | bytes) -> object:
    payload = text.encode() if isinstance(text, str) else text
    items = PARSER.parse_message(payload)
    assert len(items) == 1
    return items[0]


def error_code(text: str | bytes) -> str:
    item = parse_one(text)
    assert isinstance(item, FrameError), item
    return item.code


def test_valid_frames_parse() -> None:
    hello = parse_one(
        '{"type":"hello","user":"alice","batch":true,"resume":{"lobby":{"since":4,"epoch":"e1"}}}'
    )
    assert hello == Hello(None, "alice", None, True, {"lobby": (4, "e1")})
    assert parse_one('{"type":"join","room":"a.b_c:d-1","last":10}') == Join("a.b_c:d-1", None, None, 10)
    send = parse_one('{"type":"send","room":"r","id":"c-1","body":"你好 👋","meta":{"reply_to":3}}')
    assert send == Send("r", "c-1", "你好 👋", {"reply_to": 3})
    assert parse_one('{"type":"ack","room":"r","seq":7,"extra":"ignored"}') == Ack("r", 7)
    assert parse_one('{"type":"history","room":"r","before":9,"limit":999}') == History(
        "r", 9, None, 200, None
    )


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("{not json", "bad_frame"),
        ("42", "bad_frame"),
        ('{"room":"r"}', "bad_frame"),
        ('{"type":7}', "bad_frame"),
        ('{"type":"teleport"}', "unknown_type"),
        ('{"type":"join","room":""}', "invalid_field"),
        ('{"type":"join","room":"' + "r" * 65 + '"}', "invalid_field"),
        ('{"type":"join","room":"white space"}', "invalid_field"),
        ('{"type":"send","room":"r","id":"x/y","body":"b"}', "invalid_field"),
        ('{"type":"send","room":"r","id":"x","body":5}', "invalid_field"),
        ('{"type":"send","room":"r","id":"x","body":"' + "é" * 2049 + '"}', "too_large"),
        ('{"type":"send","room":"r","id":"x","body":"a\\u0000b"}', "invalid_field"),
        ('{"type":"send","room":"r","id":"x","body":"\\ud800"}', "bad_frame"),
        ('{"type":"send","room":"r","id":"x","body":"","meta":[1]}', "invalid_field"),
        (
            '{"type":"send","room":"r","id":"x","body":"","meta":' + '{"a":' * 9 + "1" + "}" * 9 + "}",
            "invalid_field",
        ),
        ('{"type":"send","room":"r","id":"x","body":"","meta":{"k":"' + "v" * 300 + '"}}', "too_large"),
        ('{"type":"send","room":"r","id":"x","body":"","meta":{"k\\u0000":1}}', "invalid_field"),
        ('{"type":"ack","room":"r","seq":-1}', "invalid_field"),
        ('{"type":"ack","room":"r","seq":1.5}', "invalid_field"),
        ('{"type":"ack","room":"r","seq":true}', "invalid_field"),
        ('{"type":"ack","room":"r"}', "invalid_field"),
        ('{"type":"history","room":"r","before":3,"after":1}', "invalid_field"),
        ('{"type":"hello","batch":"yes"}', "invalid_field"),
    ],
)
def test_invalid_frames_get_their_code(text: str, code: str) -> None:
    assert error_code(text) == code


def test_meta_at_max_depth_is_accepted() -> None:
    text = '{"type":"send","room":"r","id":"x","body":"","meta":' + '{"a":' * 7 + "[1]" + "}" * 7 + "}"
    item = parse_one(text)
    assert isinstance(item, Send)


def test_body_at_max_body_is_accepted() -> None:
    item = parse_one('{"type":"send","room":"r","id":"x","body":"' + "é" * 2048 + '"}')
    assert isinstance(item, Send)


def test_array_elements_fail_alone() -> None:
    items = PARSER.parse_message(b'[{"type":"ping"}, 3, {"type":"ack","room":"r","seq":1}]')

    assert len(items) == 3
    assert isinstance(items[1], FrameError)
    assert items[1].code == "bad_frame"
    assert items[2] == Ack("r", 1)


def test_error_ref_names_the_frame() -> None:
    item = parse_one('{"type":"send","room":"lobby","id":"c-9","body":7}')
    assert isinstance(item, FrameError)
    assert item.to_frame()["ref"] == {"type": "send", "room": "lobby", "id": "c-9"}


def test_invalid_utf8_closes_1007() -> None:
    with pytest.raises(CloseConnection) as raised:
        PARSER.parse_message(b'{"type":"send","body":"\xff"}')
    assert raised.value.code == CLOSE_INVALID_UTF8


def test_max_frame_leaves_room_for_escaped_body() -> None:
    limits = Limits(max_body=16384, max_meta=2048)
    assert limits.max_frame >= 6 * 16384 + 2048 + 1024
