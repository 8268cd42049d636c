"""A real `parley serve`: a retried `send` is stored and delivered once; a reused id is a conflict."""

from __future__ import annotations

import asyncio
import signal

import pytest

from conftest import ServerProcess
from wsclient import Client, close_all, members, stored_messages


def send_frame(message_id: str, body: str, **fields: object) -> dict[str, object]:
    return {"type": "send", "room": "lobby", "id": message_id, "body": body, **fields}


async def test_resend_on_same_socket(server: ServerProcess) -> None:
    alice, bob = await members(server.url, "lobby", "alice", "bob")
    await alice.send(send_frame("m1", "hello"))
    await alice.send(send_frame("m1", "hello"))

    first = await alice.wait_for("sent", id="m1")
    second = await alice.wait_for("sent", id="m1")
    assert not first.get("dup", False)
    assert second["dup"] is True
    assert first["seq"] == 1
    assert second["seq"] == first["seq"]
    assert second["ts"] == first["ts"]

    await bob.wait_messages("lobby", 1)
    await bob.sync()
    assert bob.seqs("lobby") == [1]
    stored = await stored_messages(server.port, "lobby")
    assert [(message["id"], message["body"]) for message in stored] == [("m1", "hello")]
    await close_all(alice, bob)


async def test_resend_after_reconnect(server: ServerProcess) -> None:
    alice, bob = await members(server.url, "lobby", "alice", "bob")
    original = await alice.publish("lobby", "m1", "hello")
    await alice.abort()

    alice = await Client.login_as(server.url, "alice")
    await alice.wait_for("joined", room="lobby")
    repeat = await alice.publish("lobby", "m1", "hello")
    assert repeat["dup"] is True
    assert repeat["seq"] == original["seq"]
    assert repeat["ts"] == original["ts"]

    await bob.wait_messages("lobby", 1)
    await bob.sync()
    assert bob.seqs("lobby") == [1]
    assert len(await stored_messages(server.port, "lobby")) == 1
    await close_all(alice, bob)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_resend_after_server_restart(server: ServerProcess, sig: signal.Signals) -> None:
    alice, bob = await members(server.url, "lobby", "alice", "bob")
    original = await alice.publish("lobby", "m1", "hello", meta={"reply_to": 0})
    await bob.wait_messages("lobby", 1)
    await bob.wait_for("acked", room="lobby", seq=1)

    await asyncio.to_thread(server.restart, sig)
    for client in (alice, bob):
        await client.wait_closed()

    alice = await Client.login_as(server.url, "alice")
    bob = await Client.login_as(server.url, "bob")
    joined = await bob.wait_for("joined", room="lobby")
    assert joined["since"] == 1, "bob's acknowledged cursor must survive the restart"
    assert joined["head"] == 1
    await alice.wait_for("joined", room="lobby")

    repeat = await alice.publish("lobby", "m1", "hello", meta={"reply_to": 0})
    assert repeat["dup"] is True
    assert repeat["seq"] == original["seq"]
    assert repeat["ts"] == original["ts"]

    following = await alice.publish("lobby", "m2", "after the restart")
    assert following["seq"] == 2
    await bob.wait_messages("lobby", 1)
    await bob.sync()
    assert bob.seqs("lobby") == [2]
    stored = await stored_messages(server.port, "lobby")
    assert [message["id"] for message in stored] == ["m1", "m2"]
    await close_all(alice, bob)


async def test_two_sends_in_flight_first_retried(server: ServerProcess) -> None:
    alice, bob = await members(server.url, "lobby", "alice", "bob")
    await alice.send(send_frame("m1", "first"))
    await alice.send(send_frame("m2", "second"))
    await alice.send(send_frame("m1", "first"))

    sent_m1 = await alice.wait_for("sent", id="m1")
    sent_m2 = await alice.wait_for("sent", id="m2")
    retried = await alice.wait_for("sent", id="m1")
    assert sent_m1["seq"] == 1
    assert sent_m2["seq"] == 2
    assert retried["seq"] == 1
    assert retried["dup"] is True
    assert not sent_m2.get("dup", False)

    await bob.wait_messages("lobby", 2)
    await bob.sync()
    assert bob.seqs("lobby") == [1, 2]
    stored = await stored_messages(server.port, "lobby")
    assert [message["id"] for message in stored] == ["m1", "m2"]
    await close_all(alice, bob)


async def test_unconfirmed_sends_resent_after_abort(server: ServerProcess) -> None:
    alice, bob = await members(server.url, "lobby", "alice", "bob")
    ids = [f"m{index}" for index in range(20)]
    for message_id in ids:
        await alice.send(send_frame(message_id, f"body of {message_id}"))
    await alice.abort()

    alice = await Client.login_as(server.url, "alice")
    await alice.wait_for("joined", room="lobby")
    for message_id in ids:
        await alice.send(send_frame(message_id, f"body of {message_id}"))
    replies = [await alice.wait_for("sent", id=message_id) for message_id in ids]

    assert [reply["seq"] for reply in replies] == list(range(1, 21))
    stored = await stored_messages(server.port, "lobby")
    assert [message["id"] for message in stored] == ids
    await bob.wait_messages("lobby", 20)
    await bob.sync()
    assert bob.seqs("lobby") == list(range(1, 21))
    await close_all(alice, bob)


async def test_reused_id_other_content_conflicts(server: ServerProcess) -> None:
    alice, bob = await members(server.url, "lobby", "alice", "bob")
    original = await alice.publish("lobby", "m1", "hello", meta={"a": 1})

    await alice.send(send_frame("m1", "a different body", meta={"a": 1}))
    error = await alice.wait_for("error")
    assert error["code"] == "id_conflict"
    assert error["ref"] == {"type": "send", "room": "lobby", "id": "m1"}

    await alice.send(send_frame("m1", "hello", meta={"a": 2}))
    error = await alice.wait_for("error")
    assert error["code"] == "id_conflict"

    await alice.send(send_frame("m1", "hello"))
    error = await alice.wait_for("error")
    assert error["code"] == "id_conflict", "dropping meta changes the message"

    repeat = await alice.publish("lobby", "m1", "hello", meta={"a": 1})
    assert repeat["dup"] is True
    assert repeat["seq"] == original["seq"]

    stored = await stored_messages(server.port, "lobby")
    assert [(message["id"], message["body"], message["meta"]) for message in stored] == [
        ("m1", "hello", {"a": 1})
    ]
    await bob.wait_messages("lobby", 1)
    await bob.sync()
    assert bob.seqs("lobby") == [1]

    following = await alice.publish("lobby", "m2", "still usable")
    assert following["seq"] == 2
    await close_all(alice, bob)


async def test_meta_compared_as_json_value(server: ServerProcess) -> None:
    (alice,) = await members(server.url, "lobby", "alice")
    first = await alice.publish("lobby", "m1", "hello", meta={"a": 1, "b": [1, 2]})
    await alice.send_raw(
        '{"type":"send","room":"lobby","id":"m1","body":"hello","meta":{ "b" : [1,2], "a" : 1 }}'
    )
    repeat = await alice.wait_for("sent", id="m1")
    assert repeat["dup"] is True
    assert repeat["seq"] == first["seq"]
    assert len(await stored_messages(server.port, "lobby")) == 1
    await close_all(alice)


async def test_same_id_other_sender_is_new(server: ServerProcess) -> None:
    alice, bob = await members(server.url, "lobby", "alice", "bob")
    from_alice = await alice.publish("lobby", "m1", "hello")
    from_bob = await bob.publish("lobby", "m1", "hello")
    assert from_bob["seq"] == from_alice["seq"] + 1
    assert not from_bob.get("dup", False)
    stored = await stored_messages(server.port, "lobby")
    assert [(message["from"], message["id"]) for message in stored] == [("alice", "m1"), ("bob", "m1")]
    await close_all(alice, bob)
