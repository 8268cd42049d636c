"""A real `parley serve` killed or stopped while clients send: nothing confirmed is lost or repeated."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

from websockets.exceptions import ConnectionClosed

from conftest import ServerProcess
from wsclient import Client, Frame, assert_in_order_once, close_all, members, stored_messages

FAST_SENDS = ("--send-rate", "10000", "--send-burst", "10000")
MAX_SENDS = 400
"""Maximum number of sends per client. The server is stopped long before a client reaches it."""


def body_of(message_id: str) -> str:
    return f"body of {message_id}"


async def send_steadily(client: Client, user: str, attempted: list[str]) -> None:
    """Send up to MAX_SENDS messages, five every few milliseconds, until the connection closes."""
    for index in range(MAX_SENDS):
        message_id = f"{user}-{index}"
        attempted.append(message_id)
        try:
            await client.send(
                {"type": "send", "room": "lobby", "id": message_id, "body": body_of(message_id)}
            )
        except ConnectionClosed:
            return
        if index % 5 == 4:
            await asyncio.sleep(0.005)


def confirmed(client: Client) -> dict[str, int]:
    """Map each id the server confirmed with `sent` on this connection to its seq."""
    return {frame["id"]: frame["seq"] for frame in client.frames if frame.get("type") == "sent"}


def check_stored(
    stored: list[Frame], attempted: dict[str, list[str]], confirmations: dict[str, dict[str, int]]
) -> None:
    """Check that the store contains each confirmed id at its seq, each id at most once, in sender order."""
    assert [message["seq"] for message in stored] == list(range(1, len(stored) + 1))
    by_id = {(message["from"], message["id"]): message for message in stored}
    assert len(by_id) == len(stored), "an id is stored twice"

    for user, ids in attempted.items():
        for message_id, seq in confirmations[user].items():
            message = by_id.get((user, message_id))
            assert message is not None, f"{message_id} got sent seq {seq} but is not stored"
            assert message["seq"] == seq
            assert message["body"] == body_of(message_id)
        own = [message["id"] for message in stored if message["from"] == user]
        assert own == ids[: len(own)], f"{user}'s stored messages are not a prefix of what it sent"


async def test_sigkill_during_traffic(server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory(*FAST_SENDS)
    users = ("alice", "bob", "carol")
    clients = dict(zip(users, await members(server.url, "lobby", *users), strict=True))
    attempted: dict[str, list[str]] = {user: [] for user in users}

    senders = [asyncio.create_task(send_steadily(clients[user], user, attempted[user])) for user in users]
    await clients["alice"].wait_for("sent", id="alice-49")
    await asyncio.to_thread(server.stop, signal.SIGKILL)
    await asyncio.gather(*senders)
    for client in clients.values():
        await client.wait_closed()

    confirmations = {user: confirmed(client) for user, client in clients.items()}
    before_kill = {user: client.seqs("lobby") for user, client in clients.items()}
    acked_before_kill = {user: client.acked.get("lobby", 0) for user, client in clients.items()}
    for user in users:
        assert_in_order_once(before_kill[user], 1, len(before_kill[user]))

    await asyncio.to_thread(server.start)
    again: dict[str, Client] = {}
    cursors: dict[str, int] = {}
    for user in users:
        again[user] = await Client.login_as(server.url, user)
        joined = await again[user].wait_for("joined", room="lobby")
        cursors[user] = joined["since"]
        assert cursors[user] >= acked_before_kill[user], f"{user}'s acknowledged cursor went back"
        assert cursors[user] <= len(before_kill[user]), f"{user}'s cursor passed what it received"

    for user in users:
        for message_id in attempted[user]:
            if message_id not in confirmations[user]:
                await again[user].send(
                    {"type": "send", "room": "lobby", "id": message_id, "body": body_of(message_id)}
                )
    for user in users:
        for message_id in attempted[user]:
            if message_id not in confirmations[user]:
                reply = await again[user].wait_for("sent", id=message_id)
                confirmations[user][message_id] = reply["seq"]

    stored = await stored_messages(server.port, "lobby")
    total = sum(len(ids) for ids in attempted.values())
    assert len(stored) == total
    check_stored(stored, attempted, confirmations)

    for user in users:
        client = again[user]
        await client.wait_messages("lobby", total - cursors[user])
        await client.sync()
        assert_in_order_once(client.seqs("lobby"), cursors[user] + 1, total)
        assert client.messages["lobby"] == stored[cursors[user] :]
    await close_all(*again.values())


async def test_sigterm_while_pipelining(server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory(*FAST_SENDS)
    alice, bob = await members(server.url, "lobby", "alice", "bob")
    attempted: list[str] = []

    sender = asyncio.create_task(send_steadily(alice, "alice", attempted))
    await alice.wait_for("sent", id="alice-29")
    exit_code = await asyncio.to_thread(server.stop, signal.SIGTERM)
    await sender

    assert exit_code == 0
    assert await alice.wait_closed() == 1001
    assert await bob.wait_closed() == 1001
    confirmations = confirmed(alice)
    assert len(confirmations) >= 30
    received = bob.seqs("lobby")
    assert_in_order_once(received, 1, len(received))

    await asyncio.to_thread(server.start)
    stored = await stored_messages(server.port, "lobby")
    check_stored(stored, {"alice": attempted}, {"alice": confirmations})
    assert len(stored) >= len(received)
    assert bob.messages["lobby"] == stored[: len(received)]
