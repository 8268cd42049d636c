"""A real `parley serve` fed bad input: each case gets its error or close code, stores nothing,
leaves the connection usable where the contract keeps it open, and never disturbs another client."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from conftest import ServerProcess
from wsclient import Client, Frame, close_all, get_json, http_get, members, stored_messages

MAX_BODY = 16384
MAX_META = 2048


class Pair:
    """Alice, who sends the bad input, and Bob, a bystander, both in a room of their own on the shared server.

    Each test gets fresh user and room names, so tests sharing the server see nothing of each other.
    """

    def __init__(self, server: ServerProcess, suffix: int, alice: Client, bob: Client) -> None:
        self.server = server
        self.room = f"lobby{suffix}"
        self.alice_name = f"alice{suffix}"
        self.bob_name = f"bob{suffix}"
        self.suffix = suffix
        self.alice = alice
        self.bob = bob

    async def expect_error(self, code: str, **ref: Any) -> Frame:
        """Take Alice's next error frame and check its code and, when given, its `ref` fields."""
        error = await self.alice.wait_for("error")
        assert error["code"] == code, error
        assert isinstance(error.get("message"), str)
        for key, value in ref.items():
            assert error.get("ref", {}).get(key) == value, error
        return error

    async def stored(self, room: str | None = None) -> list[Frame]:
        return await stored_messages(self.server.port, room or self.room)

    async def check_nothing_stored_and_usable(self) -> None:
        """Check that the room is empty, that Alice can still send, and that Bob still receives."""
        assert await self.stored() == []
        sent = await self.alice.publish(self.room, "after-error", "still here")
        assert sent["seq"] == 1
        await self.check_bystander(expected=[1])

    async def check_bystander(self, expected: list[int]) -> None:
        await self.bob.wait_messages(self.room, len(expected))
        await self.bob.sync()
        assert self.bob.seqs(self.room) == expected
        assert not self.bob.closed
        assert not self.bob.take_all("error")


SUFFIXES = itertools.count()


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Start one server for the module: these tests change no setting, and a start per test would dominate."""
    server = ServerProcess(tmp_path_factory.mktemp("errors")).start()
    yield server
    server.stop()


@pytest.fixture
async def pair(shared_server: ServerProcess) -> AsyncIterator[Pair]:
    suffix = next(SUFFIXES)
    alice, bob = await members(shared_server.url, f"lobby{suffix}", f"alice{suffix}", f"bob{suffix}")
    yield Pair(shared_server, suffix, alice, bob)
    await close_all(alice, bob)


def nested_meta(levels: int) -> dict[str, Any]:
    """Build a meta of `levels` objects nested inside each other, the innermost containing a number."""
    meta: dict[str, Any] = {"leaf": 1}
    for _ in range(levels - 1):
        meta = {"next": meta}
    return meta


# Frames that are not JSON objects


async def test_invalid_json(pair: Pair) -> None:
    await pair.alice.send_raw('{"type": "send", "room": ')
    await pair.expect_error("bad_frame")
    await pair.check_nothing_stored_and_usable()


async def test_binary_message(pair: Pair) -> None:
    frame = {"type": "send", "room": pair.room, "id": "b1", "body": "binary"}
    await pair.alice.send_raw(json.dumps(frame).encode())
    await pair.expect_error("bad_frame")
    await pair.check_nothing_stored_and_usable()


async def test_json_scalar_frame(pair: Pair) -> None:
    await pair.alice.send_raw("42")
    await pair.expect_error("bad_frame")
    await pair.check_nothing_stored_and_usable()


async def test_array_with_non_object_elements(pair: Pair) -> None:
    await pair.alice.send(
        [
            {"type": "send", "room": pair.room, "id": "a1", "body": "first"},
            42,
            "text",
            {"type": "send", "room": pair.room, "id": "a2", "body": "second"},
            {"type": "ping"},
        ]
    )
    sent_first = await pair.alice.wait_for("sent", id="a1")
    sent_second = await pair.alice.wait_for("sent", id="a2")
    assert sent_first["seq"] == 1
    assert sent_second["seq"] == 2
    await pair.expect_error("bad_frame")
    await pair.expect_error("bad_frame")
    await pair.alice.wait_for("pong")
    await pair.alice.sync()
    assert not pair.alice.take_all("error"), "exactly one bad_frame per bad element"

    assert [message["id"] for message in await pair.stored()] == ["a1", "a2"]
    await pair.check_bystander(expected=[1, 2])


@pytest.mark.parametrize(
    "frame",
    [{"id": "x", "body": "no type"}, {"type": 5}, {"type": None}],
    ids=["missing", "number", "null"],
)
async def test_type_not_a_string(pair: Pair, frame: Frame) -> None:
    await pair.alice.send({"room": pair.room, **frame})
    await pair.expect_error("bad_frame")
    await pair.check_nothing_stored_and_usable()


async def test_unknown_type(pair: Pair) -> None:
    await pair.alice.send({"type": "shout", "room": pair.room, "id": "s1", "body": "loud"})
    await pair.expect_error("unknown_type", type="shout", room=pair.room, id="s1")
    await pair.check_nothing_stored_and_usable()


# Field validation

BAD_NAMES = ["", "x" * 65, "has space", "slash/room", "caf\u00e9", "tab\t", "semi;colon"]


@pytest.mark.parametrize("bad", BAD_NAMES, ids=range(len(BAD_NAMES)))
async def test_join_bad_room_name(pair: Pair, bad: str) -> None:
    await pair.alice.send({"type": "join", "room": bad})
    await pair.expect_error("invalid_field", type="join")
    await pair.check_nothing_stored_and_usable()


@pytest.mark.parametrize("bad", BAD_NAMES, ids=range(len(BAD_NAMES)))
async def test_send_bad_room_name(pair: Pair, bad: str) -> None:
    await pair.alice.send({"type": "send", "room": bad, "id": "m1", "body": "hi"})
    await pair.expect_error("invalid_field", type="send", id="m1")
    await pair.check_nothing_stored_and_usable()


@pytest.mark.parametrize("bad", BAD_NAMES, ids=range(len(BAD_NAMES)))
async def test_send_bad_id(pair: Pair, bad: str) -> None:
    await pair.alice.send({"type": "send", "room": pair.room, "id": bad, "body": "hi"})
    await pair.expect_error("invalid_field", type="send", room=pair.room)
    await pair.check_nothing_stored_and_usable()


@pytest.mark.parametrize("bad", [None, 5, ["x"], {"x": 1}], ids=["missing", "number", "array", "object"])
async def test_send_id_not_a_string(pair: Pair, bad: Any) -> None:
    frame: Frame = {"type": "send", "room": pair.room, "body": "hi"}
    if bad is not None:
        frame["id"] = bad
    await pair.alice.send(frame)
    await pair.expect_error("invalid_field", type="send", room=pair.room)
    await pair.check_nothing_stored_and_usable()


@pytest.mark.parametrize("bad", ["", "x" * 65, "has space", "caf\u00e9"], ids=range(4))
async def test_hello_bad_user_name(shared_server: ServerProcess, bad: str) -> None:
    client = await Client.open(shared_server.url)
    await client.send({"type": "hello", "user": bad})
    error = await client.wait_for("error")
    assert error["code"] == "invalid_field", error
    assert error.get("ref", {}).get("type") == "hello"

    user = f"alice{next(SUFFIXES)}"
    welcome = await client.login(user=user)
    assert welcome["user"] == user
    await client.sync()
    await close_all(client)


async def test_names_at_limit_accepted(pair: Pair) -> None:
    room = f"R{pair.suffix}".ljust(64, "R")
    message_id = "i" * 64
    joined = await pair.alice.join(room)
    assert joined["room"] == room
    sent = await pair.alice.publish(room, message_id, "long names")
    assert sent["seq"] == 1
    assert [message["id"] for message in await pair.stored(room)] == [message_id]

    odd = f"a.b_c:d-E9.{pair.suffix}"
    await pair.alice.join(odd)
    assert (await pair.alice.publish(odd, odd, "every allowed character class"))["seq"] == 1


async def test_body_over_max_body(pair: Pair) -> None:
    await pair.alice.send({"type": "send", "room": pair.room, "id": "big", "body": "x" * (MAX_BODY + 1)})
    await pair.expect_error("too_large", type="send", room=pair.room, id="big")
    # Two-byte characters: under max_body characters, over max_body bytes.
    wide = "\u00e9" * (MAX_BODY // 2 + 1)
    await pair.alice.send({"type": "send", "room": pair.room, "id": "wide", "body": wide})
    await pair.expect_error("too_large", id="wide")
    await pair.check_nothing_stored_and_usable()


async def test_body_at_max_body_accepted(pair: Pair) -> None:
    body = "\u00e9" * (MAX_BODY // 2)
    sent = await pair.alice.publish(pair.room, "exact", body)
    assert sent["seq"] == 1
    await pair.bob.wait_messages(pair.room, 1)
    assert pair.bob.messages[pair.room][0]["body"] == body


async def test_empty_body_accepted(pair: Pair) -> None:
    sent = await pair.alice.publish(pair.room, "empty", "")
    assert sent["seq"] == 1
    await pair.bob.wait_messages(pair.room, 1)
    assert pair.bob.messages[pair.room][0]["body"] == ""


async def test_body_with_nul(pair: Pair) -> None:
    await pair.alice.send({"type": "send", "room": pair.room, "id": "nul", "body": "before\u0000after"})
    await pair.expect_error("invalid_field", type="send", id="nul")
    await pair.check_nothing_stored_and_usable()


@pytest.mark.parametrize("bad", ["\\ud800", "a\\udfffb", "\\ud800\\u0041"], ids=["high", "low", "unpaired"])
async def test_body_with_lone_surrogate(pair: Pair, bad: str) -> None:
    # json.dumps refuses to write a lone surrogate, so the frame is built as text by hand.
    await pair.alice.send_raw('{"type":"send","room":"' + pair.room + '","id":"sur","body":"' + bad + '"}')
    error = await pair.alice.wait_for("error")
    # The contract allows either code: bad_frame when the JSON parser rejects the whole message.
    assert error["code"] in ("bad_frame", "invalid_field"), error
    await pair.check_nothing_stored_and_usable()


async def test_unicode_outside_bmp_round_trips(pair: Pair) -> None:
    body = "emoji \U0001f600, escaped pair \U0001f680, private use \U0010fffd, bom \ufeff"
    await pair.alice.send_raw(
        '{"type":"send","room":"' + pair.room + '","id":"u1",'
        '"body":"emoji \U0001f600, escaped pair \\ud83d\\ude80, private use \U0010fffd, bom \ufeff",'
        '"meta":{"k":"\\ud83d\\ude00"}}'
    )
    await pair.alice.wait_for("sent", id="u1")
    await pair.bob.wait_messages(pair.room, 1)
    delivered = pair.bob.messages[pair.room][0]
    assert delivered["body"] == body
    assert delivered["meta"] == {"k": "\U0001f600"}
    assert (await pair.stored())[0]["body"] == body


async def test_meta_nested_too_deep(pair: Pair) -> None:
    await pair.alice.send(
        {"type": "send", "room": pair.room, "id": "deep", "body": "x", "meta": nested_meta(9)}
    )
    await pair.expect_error("invalid_field", type="send", id="deep")
    deep_list: Any = [1]
    for _ in range(9):
        deep_list = [deep_list]
    await pair.alice.send(
        {"type": "send", "room": pair.room, "id": "deep2", "body": "x", "meta": {"l": deep_list}}
    )
    await pair.expect_error("invalid_field", id="deep2")
    await pair.check_nothing_stored_and_usable()


async def test_meta_nested_eight_levels_accepted(pair: Pair) -> None:
    meta = nested_meta(8)
    sent = await pair.alice.publish(pair.room, "eight", "x", meta=meta)
    assert sent["seq"] == 1
    assert (await pair.stored())[0]["meta"] == meta


@pytest.mark.parametrize("meta", [[1, 2], "text", 5], ids=["array", "string", "number"])
async def test_meta_not_an_object(pair: Pair, meta: Any) -> None:
    await pair.alice.send({"type": "send", "room": pair.room, "id": "m", "body": "x", "meta": meta})
    await pair.expect_error("invalid_field", id="m")
    await pair.check_nothing_stored_and_usable()


async def test_meta_over_max_meta(pair: Pair) -> None:
    meta = {"k": "v" * MAX_META}
    await pair.alice.send({"type": "send", "room": pair.room, "id": "fat", "body": "x", "meta": meta})
    await pair.expect_error("too_large", type="send", id="fat")
    await pair.check_nothing_stored_and_usable()


async def test_meta_at_max_meta_accepted(pair: Pair) -> None:
    meta = {"k": "v" * (MAX_META - len('{"k":""}'))}
    assert len(json.dumps(meta, separators=(",", ":"))) == MAX_META
    sent = await pair.alice.publish(pair.room, "full", "x", meta=meta)
    assert sent["seq"] == 1


async def test_largest_legal_frame_accepted(pair: Pair) -> None:
    # Every character of the body escaped as \uXXXX: the frame is over 6 x max_body bytes.
    body = "\u0001" * MAX_BODY
    meta = {"k": "v" * (MAX_META - len('{"k":""}'))}
    frame = json.dumps({"type": "send", "room": pair.room, "id": "huge", "body": body, "meta": meta})
    assert len(frame) > 6 * MAX_BODY + MAX_META
    await pair.alice.send_raw(frame)
    sent = await pair.alice.wait_for("sent", id="huge")
    assert sent["seq"] == 1
    await pair.bob.wait_messages(pair.room, 1)
    assert pair.bob.messages[pair.room][0]["body"] == body


# Errors that close the connection


async def test_frame_over_max_frame_closes_1009(pair: Pair) -> None:
    welcome = next(frame for frame in pair.alice.frames if frame["type"] == "welcome")
    max_frame = welcome["max_frame"]
    assert max_frame >= 6 * welcome["max_body"] + welcome["max_meta"] + 1024
    frame = json.dumps({"type": "send", "room": pair.room, "id": "over", "body": "x" * max_frame})
    assert len(frame.encode()) > max_frame
    await pair.alice.send_raw(frame)
    assert await pair.alice.wait_closed() == 1009
    await pair.check_bystander(expected=[])
    assert await pair.stored() == []


async def test_invalid_utf8_closes_1007(pair: Pair) -> None:
    frame = b'{"type":"send","room":"' + pair.room.encode() + b'","id":"u","body":"\xff\xfe"}'
    await pair.alice.send_raw(frame, text=True)
    assert await pair.alice.wait_closed() == 1007
    await pair.check_bystander(expected=[])
    assert await pair.stored() == []


async def test_overlong_utf8_closes_1007(pair: Pair) -> None:
    # 0xC0 0xAF is an overlong encoding of "/", which UTF-8 forbids.
    await pair.alice.send_raw(b'{"type":"ping","x":"\xc0\xaf"}', text=True)
    assert await pair.alice.wait_closed() == 1007
    await pair.check_bystander(expected=[])


@pytest.mark.parametrize("kind", ["ping", "join", "send"])
async def test_first_frame_not_hello_closes_1008(pair: Pair, kind: str) -> None:
    first: Frame = {"type": kind, "room": pair.room, "id": "x", "body": "x"}
    client = await Client.open(pair.server.url)
    await client.send(first)
    assert await client.wait_closed() == 1008
    await pair.check_nothing_stored_and_usable()


async def test_array_without_hello_first_closes_1008(pair: Pair) -> None:
    client = await Client.open(pair.server.url)
    await client.send([{"type": "ping"}, {"type": "hello", "user": f"late{pair.suffix}"}])
    assert await client.wait_closed() == 1008
    assert not any(frame["type"] == "welcome" for frame in client.frames)
    await pair.check_bystander(expected=[])


async def test_first_frame_invalid_json_closes_1008(shared_server: ServerProcess) -> None:
    client = await Client.open(shared_server.url)
    await client.send_raw("not json")
    assert await client.wait_closed() == 1008


async def test_hello_first_in_array_then_frames(shared_server: ServerProcess) -> None:
    suffix = next(SUFFIXES)
    room = f"lobby{suffix}"
    client = await Client.open(shared_server.url)
    await client.send(
        [
            {"type": "hello", "user": f"alice{suffix}"},
            {"type": "join", "room": room},
            {"type": "send", "room": room, "id": "m1", "body": "pipelined"},
        ]
    )
    await client.wait_for("welcome")
    await client.wait_for("joined", room=room)
    sent = await client.wait_for("sent", id="m1")
    assert sent["seq"] == 1
    await close_all(client)


async def test_second_hello(pair: Pair) -> None:
    await pair.alice.send({"type": "hello", "user": f"mallory{pair.suffix}"})
    await pair.expect_error("invalid_field", type="hello")
    await pair.check_nothing_stored_and_usable()
    sender = pair.bob.messages[pair.room][0]["from"]
    assert sender == pair.alice_name, "a second hello must not change the user"


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "send", "id": "m1", "body": "not a member"},
        {"type": "ack", "seq": 0},
        {"type": "read", "seq": 0},
    ],
    ids=["send", "ack", "read"],
)
async def test_room_not_joined(pair: Pair, frame: Frame) -> None:
    other = f"other{pair.suffix}"
    await pair.bob.join(other)
    await pair.alice.send({**frame, "room": other})
    await pair.expect_error("not_joined", type=frame["type"], room=other)
    assert await pair.stored(other) == []
    await pair.check_nothing_stored_and_usable()


async def test_room_never_created_not_joined(pair: Pair) -> None:
    nowhere = f"nowhere{pair.suffix}"
    await pair.alice.send({"type": "send", "room": nowhere, "id": "m1", "body": "hello?"})
    await pair.expect_error("not_joined", room=nowhere)
    await pair.check_nothing_stored_and_usable()


async def test_left_room_not_joined(pair: Pair) -> None:
    await pair.alice.send({"type": "leave", "room": pair.room})
    await pair.alice.wait_for("left", room=pair.room)
    await pair.alice.send({"type": "send", "room": pair.room, "id": "m1", "body": "gone"})
    await pair.expect_error("not_joined", room=pair.room)
    assert await pair.stored() == []


async def test_private_room_forbidden(pair: Pair) -> None:
    room = f"dm:{pair.alice_name}:{pair.bob_name}"
    carol_name = f"carol{pair.suffix}"
    assert (await pair.alice.join(room))["room"] == room
    await pair.alice.publish(room, "secret", "for bob only")

    carol = await Client.login_as(pair.server.url, carol_name)
    await carol.send({"type": "join", "room": room})
    error = await carol.wait_for("error")
    assert error["code"] == "forbidden"
    assert error["ref"] == {"type": "join", "room": room}
    await carol.send({"type": "history", "room": room, "after": 0, "id": "peek"})
    error = await carol.wait_for("error")
    assert error["code"] == "forbidden"
    await carol.send({"type": "send", "room": room, "id": "c1", "body": "let me in"})
    error = await carol.wait_for("error")
    assert error["code"] in ("forbidden", "not_joined")
    await carol.sync()
    assert carol.seqs(room) == []

    status, _body = await asyncio.to_thread(
        http_get, pair.server.port, f"/api/rooms/{room}/messages", {"after": 0, "user": carol_name}
    )
    assert status == 403
    page = await get_json(
        pair.server.port, f"/api/rooms/{room}/messages", {"after": 0, "user": pair.bob_name}
    )
    assert [message["id"] for message in page["messages"]] == ["secret"]
    assert (await pair.bob.join(room))["head"] == 1
    await close_all(carol)


async def test_too_many_errors_close_1008(pair: Pair) -> None:
    for index in range(20):
        await pair.alice.send({"type": "shout", "id": f"e{index}"})
    await pair.alice.sync()
    assert len(pair.alice.take_all("error")) == 20
    assert not pair.alice.closed

    await pair.alice.send({"type": "shout", "id": "e20"})
    assert await pair.alice.wait_closed() == 1008
    await pair.check_bystander(expected=[])


async def test_rate_limited_sends(server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory("--send-rate", "1", "--send-burst", "3")
    (alice,) = await members(server.url, "lobby", "alice")
    for index in range(10):
        await alice.send({"type": "send", "room": "lobby", "id": f"m{index}", "body": "fast"})
    # Rate limiting happens on arrival, so every error arrives before the pong.
    # A `sent` waits for the store and may come later.
    await alice.sync()
    limited = alice.take_all("error")
    assert all(error["code"] == "rate_limited" for error in limited), limited
    limited_ids = {error["ref"]["id"] for error in limited}
    sent = [
        await alice.wait_for("sent", id=f"m{index}") for index in range(10) if f"m{index}" not in limited_ids
    ]
    assert 3 <= len(sent) < 10
    for error in limited:
        assert isinstance(error["retry_after"], int)
        assert error["retry_after"] > 0
        assert error["ref"]["type"] == "send"
    stored = await stored_messages(server.port, "lobby")
    assert sorted(message["id"] for message in stored) == sorted(frame["id"] for frame in sent)
    await close_all(alice)


# Liveness


async def test_websocket_ping_gets_pong(pair: Pair) -> None:
    waiter = await pair.alice.ws.ping(b"are you there")
    latency = await asyncio.wait_for(waiter, 10)
    assert latency >= 0
    assert not pair.alice.closed


async def test_ping_frame_gets_pong_frame(pair: Pair) -> None:
    await pair.alice.send({"type": "ping"})
    pong = await pair.alice.wait_for("pong")
    assert pong == {"type": "pong"}
