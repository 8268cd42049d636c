"""A real `parley serve`: chatting, late joins with history, concurrent senders and HTTP history."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import orjson

from conftest import ServerProcess
from wsclient import (
    Client,
    Frame,
    assert_in_order_once,
    close_all,
    get_json,
    http_get,
    members,
    stored_messages,
)


async def test_chat_then_late_join_with_last(server: ServerProcess) -> None:
    alice, bob = await members(server.url, "lobby", "alice", "bob")
    for index in range(3):
        await alice.publish("lobby", f"a{index}", f"alice says {index}")
        await bob.publish("lobby", f"b{index}", f"bob says {index}")

    for client in (alice, bob):
        await client.wait_messages("lobby", 6)
        await client.sync()
        assert_in_order_once(client.seqs("lobby"), 1, 6)
    senders = [(frame["from"], frame["id"], frame["body"]) for frame in bob.messages["lobby"]]
    assert senders == [
        ("alice", "a0", "alice says 0"),
        ("bob", "b0", "bob says 0"),
        ("alice", "a1", "alice says 1"),
        ("bob", "b1", "bob says 1"),
        ("alice", "a2", "alice says 2"),
        ("bob", "b2", "bob says 2"),
    ]
    assert alice.messages["lobby"] == bob.messages["lobby"]

    carol = await Client.login_as(server.url, "carol")
    joined = await carol.join("lobby", last=4)
    assert joined["head"] == 6
    assert joined["since"] == 2
    assert not joined.get("reset", False)
    assert joined["epoch"] == (await alice.join("lobby"))["epoch"]
    await carol.wait_messages("lobby", 4)
    await carol.sync()
    assert_in_order_once(carol.seqs("lobby"), 3, 6)
    assert carol.messages["lobby"] == bob.messages["lobby"][2:]

    await bob.publish("lobby", "b-live", "after carol joined")
    await carol.wait_messages("lobby", 5)
    assert carol.messages["lobby"][-1]["id"] == "b-live"
    assert carol.messages["lobby"][-1]["seq"] == 7
    await close_all(alice, bob, carol)


async def test_join_without_position_starts_at_head(server: ServerProcess) -> None:
    (alice,) = await members(server.url, "lobby", "alice")
    for index in range(3):
        await alice.publish("lobby", f"m{index}", "before dave")

    dave = await Client.login_as(server.url, "dave")
    joined = await dave.join("lobby")
    assert joined["head"] == 3
    assert joined["since"] == 3
    await alice.publish("lobby", "m-live", "after dave")
    await dave.wait_messages("lobby", 1)
    await dave.sync()
    assert dave.seqs("lobby") == [4]
    await close_all(alice, dave)


async def test_join_last_beyond_history(server: ServerProcess) -> None:
    (alice,) = await members(server.url, "lobby", "alice")
    await alice.publish("lobby", "m1", "only one")

    erin = await Client.login_as(server.url, "erin")
    joined = await erin.join("lobby", last=50)
    assert joined["since"] == 0
    assert joined["head"] == 1
    await erin.wait_messages("lobby", 1)
    await erin.sync()
    assert erin.seqs("lobby") == [1]
    await close_all(alice, erin)


async def test_rejoin_replays_from_new_position(server: ServerProcess) -> None:
    alice, bob = await members(server.url, "lobby", "alice", "bob")
    for index in range(1, 6):
        await alice.publish("lobby", f"m{index}", f"body {index}")
    await bob.wait_messages("lobby", 5)

    joined = await bob.join("lobby", since=2)
    assert joined["since"] == 2
    assert joined["head"] == 5
    await bob.wait_messages("lobby", 8)
    await bob.sync()
    assert bob.seqs("lobby") == [1, 2, 3, 4, 5, 3, 4, 5]

    await alice.publish("lobby", "m6", "live after the rejoin")
    await bob.wait_messages("lobby", 9)
    await bob.sync()
    assert bob.seqs("lobby")[-1] == 6
    assert bob.seqs("lobby").count(6) == 1
    await close_all(alice, bob)


async def test_batch_client_gets_every_message(server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory("--send-rate", "10000", "--send-burst", "10000")
    (alice,) = await members(server.url, "lobby", "alice")
    batched = await Client.login_as(server.url, "bob", batch=True)
    await batched.join("lobby")
    await batched.close()
    for index in range(300):
        await alice.send({"type": "send", "room": "lobby", "id": f"m{index}", "body": f"body {index}"})
    for index in range(300):
        await alice.wait_for("sent", id=f"m{index}")

    batched = await Client.login_as(server.url, "bob", batch=True)
    live = await Client.login_as(server.url, "carol", batch=True)
    await live.join("lobby")
    await batched.wait_messages("lobby", 300)
    for index in range(300, 400):
        await alice.send({"type": "send", "room": "lobby", "id": f"m{index}", "body": f"body {index}"})
    await batched.wait_messages("lobby", 400)
    await live.wait_messages("lobby", 100)
    for client in (batched, live):
        await client.sync()
    assert_in_order_once(batched.seqs("lobby"), 1, 400)
    assert_in_order_once(live.seqs("lobby"), 301, 400)
    assert alice.array_messages == 0
    await close_all(alice, batched, live)


async def test_concurrent_senders_one_room(server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory("--send-rate", "2000", "--send-burst", "2000")
    senders, per_sender = 20, 50
    total = senders * per_sender
    clients = await members(server.url, "lobby", *[f"user{index}" for index in range(senders)])

    async def send_batch(client: Client, number: int) -> list[Frame]:
        for index in range(per_sender):
            await client.send(
                {"type": "send", "room": "lobby", "id": f"u{number}-{index}", "body": f"{number}/{index}"}
            )
        return [
            await client.wait_for("sent", room="lobby", id=f"u{number}-{index}")
            for index in range(per_sender)
        ]

    replies = await asyncio.gather(*[send_batch(client, number) for number, client in enumerate(clients)])

    sent_seqs = sorted(reply["seq"] for batch in replies for reply in batch)
    assert sent_seqs == list(range(1, total + 1))
    for batch in replies:
        own = [reply["seq"] for reply in batch]
        assert own == sorted(own), "one connection's sends must get seqs in the order they were sent"
        assert not any(reply.get("dup") for reply in batch)

    for client in clients:
        await client.wait_messages("lobby", total)
    for client in clients:
        await client.sync()
        assert_in_order_once(client.seqs("lobby"), 1, total)
        assert not client.take_all("error")
    reference = clients[0].messages["lobby"]
    for client in clients[1:]:
        assert client.messages["lobby"] == reference
    for client in clients:
        assert client.array_messages == 0, "arrays go only to clients that asked for `batch`"
    await close_all(*clients)


async def test_http_history_pages_with_more(server: ServerProcess) -> None:
    (alice,) = await members(server.url, "lobby", "alice")
    for index in range(1, 26):
        await alice.send({"type": "send", "room": "lobby", "id": f"m{index}", "body": f"body {index}"})
    for index in range(1, 26):
        await alice.wait_for("sent", id=f"m{index}")

    pages = [
        ({"after": 0, "limit": 10}, list(range(1, 11)), True),
        ({"after": 10, "limit": 10}, list(range(11, 21)), True),
        ({"after": 20, "limit": 10}, list(range(21, 26)), False),
        ({"after": 25, "limit": 10}, [], False),
        ({"before": 11, "limit": 5}, list(range(6, 11)), True),
        ({"before": 6, "limit": 10}, list(range(1, 6)), False),
        ({"limit": 3}, [23, 24, 25], True),
    ]
    for query, expected, more in pages:
        page = await get_json(server.port, "/api/rooms/lobby/messages", query)
        assert [message["seq"] for message in page["messages"]] == expected, query
        assert page["more"] is more, query

    stored = await stored_messages(server.port, "lobby")
    assert [message["body"] for message in stored] == [f"body {index}" for index in range(1, 26)]
    assert all(message["from"] == "alice" for message in stored)
    assert stored == alice.messages["lobby"]
    await close_all(alice)


async def test_history_limit_capped_at_200(server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory("--send-rate", "10000", "--send-burst", "10000")
    (alice,) = await members(server.url, "lobby", "alice")
    for index in range(1, 251):
        await alice.send({"type": "send", "room": "lobby", "id": f"m{index}", "body": f"body {index}"})
    for index in range(1, 251):
        await alice.wait_for("sent", id=f"m{index}")

    page = await get_json(server.port, "/api/rooms/lobby/messages", {"after": 0, "limit": 500})
    assert [message["seq"] for message in page["messages"]] == list(range(1, 201))
    assert page["more"] is True

    await alice.send({"type": "history", "room": "lobby", "before": 251, "limit": 500, "id": "big"})
    reply = await alice.wait_for("history", id="big")
    assert [message["seq"] for message in reply["messages"]] == list(range(51, 251))
    assert reply["more"] is True

    await alice.send({"type": "history", "room": "lobby", "after": 200, "id": "default"})
    reply = await alice.wait_for("history", id="default")
    assert [message["seq"] for message in reply["messages"]] == list(range(201, 251))
    assert reply["more"] is False
    await close_all(alice)


async def test_leave_stops_delivery(server: ServerProcess) -> None:
    alice, bob = await members(server.url, "lobby", "alice", "bob")
    await alice.publish("lobby", "m1", "before leaving")
    await bob.wait_messages("lobby", 1)

    await bob.send({"type": "leave", "room": "lobby"})
    await bob.wait_for("left", room="lobby")
    await alice.publish("lobby", "m2", "after leaving")
    await alice.wait_messages("lobby", 2)
    await bob.sync()
    assert bob.seqs("lobby") == [1]
    await bob.close()

    bob = await Client.login_as(server.url, "bob")
    await bob.sync()
    assert not bob.take_all("joined"), "a room left is not resumed at login"
    assert bob.seqs("lobby") == []
    await close_all(alice, bob)


async def test_http_history_unknown_room_empty(server: ServerProcess) -> None:
    page = await get_json(server.port, "/api/rooms/nowhere/messages", {"after": 0})
    assert page["messages"] == []
    assert page["more"] is False


async def test_http_history_rejects_bad_room_name(server: ServerProcess) -> None:
    status, body = await asyncio.to_thread(http_get, server.port, "/api/rooms/bad%20room/messages")
    assert status == 400
    assert orjson.loads(body)["error"] == "invalid_field"


async def test_healthz(server: ServerProcess) -> None:
    status, body = await asyncio.to_thread(http_get, server.port, "/healthz")
    assert status == 200
    assert body.strip() == b"ok"


async def test_history_frame_pages(server: ServerProcess) -> None:
    (alice,) = await members(server.url, "lobby", "alice", auto_ack=False)
    for index in range(1, 8):
        await alice.publish("lobby", f"m{index}", f"body {index}")

    await alice.send({"type": "history", "room": "lobby", "before": 6, "limit": 3, "id": "h1"})
    page = await alice.wait_for("history", id="h1")
    assert page["room"] == "lobby"
    assert [message["seq"] for message in page["messages"]] == [3, 4, 5]
    assert page["more"] is True

    await alice.send({"type": "history", "room": "lobby", "after": 5, "limit": 10, "id": "h2"})
    page = await alice.wait_for("history", id="h2")
    assert [message["seq"] for message in page["messages"]] == [6, 7]
    assert page["more"] is False
    assert page["messages"][0]["body"] == "body 6"

    await alice.send({"type": "history", "room": "lobby", "before": 3, "id": "h3"})
    page = await alice.wait_for("history", id="h3")
    assert [message["seq"] for message in page["messages"]] == [1, 2]
    assert page["more"] is False
    await alice.sync()
    assert alice.seqs("lobby") == list(range(1, 8)), "history must not deliver msg frames"
    await alice.close()

    again = await Client.login_as(server.url, "alice")
    joined = await again.wait_for("joined", room="lobby")
    assert joined["since"] == 0, "reading history must not move the delivery cursor"
    await close_all(again)


async def test_large_room_asks_for_slower_acks(server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory("--large-room", "2", "--large-room-ack-interval", "1.5")
    clients = await members(server.url, "hall", "ann", "ben", "cat")
    try:
        hints = [
            [frame.get("ack_interval") for frame in client.frames if frame.get("type") == "joined"]
            for client in clients
        ]
        assert hints == [[None], [None], [1500]]

        sent = await clients[0].publish("hall", "m1", "hello hall")
        acked = await clients[0].ack("hall", sent["seq"])
        assert acked["ack_interval"] == 1500
    finally:
        await close_all(*clients)
