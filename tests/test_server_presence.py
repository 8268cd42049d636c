"""Presence and receipts: frames for small rooms, counts over HTTP for large ones."""

from __future__ import annotations

from collections.abc import Callable

from conftest import ServerProcess
from wsclient import Client, close_all, get_json, members


async def test_presence_follows_connections(server: ServerProcess) -> None:
    alice, bob = await members(server.url, "porch", "alice", "bob")
    try:
        online = await alice.wait_for("presence", user="bob")
        assert online["online"] is True
        joined = [frame for frame in bob.frames if frame.get("type") == "joined"]
        assert joined[0]["online"] == ["alice", "bob"]

        await bob.close()
        offline = await alice.wait_for("presence", user="bob", online=False)
        assert offline["room"] == "porch"
    finally:
        await close_all(alice, bob)


async def test_receipts_report_delivered_and_read(server: ServerProcess) -> None:
    alice, bob = await members(server.url, "porch", "alice", "bob")
    try:
        sent = await alice.publish("porch", "m1", "are you there?")
        await bob.wait_messages("porch", 1)
        await bob.send({"type": "read", "room": "porch", "seq": sent["seq"]})

        receipt = await alice.wait_for("receipt", user="bob", read=sent["seq"])
        assert receipt["delivered"] == sent["seq"]

        counts = await get_json(server.port, "/api/rooms/porch/receipts", {"seq": sent["seq"]})
        assert counts == {"room": "porch", "seq": sent["seq"], "delivered": 2, "read": 1, "members": 2}
    finally:
        await close_all(alice, bob)


async def test_large_room_gets_no_receipt_frames(server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory("--receipt-limit", "2", "--presence-limit", "2")
    clients = await members(server.url, "hall", "ann", "ben", "cat")
    ann = clients[0]
    try:
        sent = await ann.publish("hall", "m1", "hello hall")
        for client in clients:
            await client.wait_messages("hall", 1)
            await client.send({"type": "read", "room": "hall", "seq": sent["seq"]})
        late = await Client.login_as(server.url, "dan")
        await late.join("hall")
        clients.append(late)
        for client in clients:
            await client.sync()

        kinds = {frame.get("type") for client in clients for frame in client.frames}
        assert "receipt" not in kinds
        joined = [frame for frame in late.frames if frame.get("type") == "joined"]
        assert "online" not in joined[0]

        counts = await get_json(server.port, "/api/rooms/hall/receipts", {"seq": sent["seq"]})
        assert counts["members"] == 4
        assert counts["read"] == 3
    finally:
        await close_all(*clients)
