"""A real `parley serve`: resends after the ack timeout, the stored cursor and offline catch-up."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import pytest

from conftest import ServerProcess
from wsclient import Client, FrameTimeout, assert_in_order_once, close_all, get_json, members

FAST_SENDS = ("--send-rate", "10000", "--send-burst", "10000")


async def publish_many(client: Client, room: str, count: int, prefix: str = "m") -> None:
    """Pipeline `count` sends, then wait for every `sent`."""
    for index in range(count):
        await client.send(
            {"type": "send", "room": room, "id": f"{prefix}{index}", "body": f"{prefix} {index}"}
        )
    for index in range(count):
        await client.wait_for("sent", room=room, id=f"{prefix}{index}")


@pytest.mark.parametrize("reconnect", ["stored-cursor", "hello-resume"])
async def test_unacked_messages_resent_then_closed(
    server_factory: Callable[..., ServerProcess], reconnect: str
) -> None:
    server = server_factory("--ack-timeout", "0.2")
    (alice,) = await members(server.url, "lobby", "alice")
    (bob,) = await members(server.url, "lobby", "bob", auto_ack=False)
    epoch = bob.epochs["lobby"]
    await alice.publish("lobby", "m1", "one")
    await bob.wait_messages("lobby", 1)
    assert (await bob.ack("lobby", 1))["seq"] == 1
    after_ack = len(bob.frames)

    await alice.send({"type": "send", "room": "lobby", "id": "m2", "body": "two"})
    await alice.send({"type": "send", "room": "lobby", "id": "m3", "body": "three"})
    code = await bob.wait_closed()
    assert code == 4008

    # Split what bob got after his ack into runs starting at seq 2: the first delivery, then each resend.
    seqs = [frame["seq"] for frame in bob.frames[after_ack:] if frame["type"] == "msg"]
    runs: list[list[int]] = []
    for seq in seqs:
        if seq == 2:
            runs.append([])
        assert runs, f"resends must start after the acknowledged seq 1: {seqs}"
        runs[-1].append(seq)
    assert all(run in ([2], [2, 3]) for run in runs), f"each resend must be 2..3 in order: {seqs}"
    assert runs[-1] == [2, 3]
    assert len(runs) >= 3, f"expected the first delivery and at least two resends: {seqs}"
    assert not alice.closed

    if reconnect == "stored-cursor":
        # The cursor stayed at bob's last ack, so 2..3 come again, once each.
        again = await Client.login_as(server.url, "bob")
        expected_since, expected = 1, [2, 3, 4]
    else:
        # Bob has received 1..3 (he only failed to acknowledge them) and sends that position in hello.
        again = await Client.login_as(server.url, "bob", resume={"lobby": {"since": 3, "epoch": epoch}})
        expected_since, expected = 3, [4]
    joined = await again.wait_for("joined", room="lobby")
    assert joined["since"] == expected_since
    assert joined["head"] == 3
    assert not joined.get("reset", False)
    await alice.publish("lobby", "m4", "four")
    await again.wait_messages("lobby", len(expected))
    await again.wait_for("acked", room="lobby", seq=4)
    await again.sync()
    assert again.seqs("lobby") == expected
    await close_all(alice, again)


async def test_acked_messages_are_not_resent(server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory("--ack-timeout", "0.5")
    alice, bob = await members(server.url, "lobby", "alice", "bob")
    await publish_many(alice, "lobby", 5)
    await bob.wait_messages("lobby", 5)
    await bob.wait_for("acked", room="lobby", seq=5)

    # Several ack timeouts pass with nothing outstanding, so any resend would arrive before the pong.
    await asyncio.sleep(1.5)
    await bob.sync()
    assert bob.seqs("lobby") == [1, 2, 3, 4, 5]
    assert not bob.closed
    stats = await get_json(server.port, "/api/stats")
    assert stats["resends"] == 0
    await close_all(alice, bob)


async def test_resume_from_hello_position(server: ServerProcess) -> None:
    alice, bob = await members(server.url, "lobby", "alice", "bob", auto_ack=False)
    epoch = bob.epochs["lobby"]
    await publish_many(alice, "lobby", 3)
    await bob.wait_messages("lobby", 3)
    await bob.ack("lobby", 1)
    await bob.abort()

    await alice.join("elsewhere")
    resume = {"lobby": {"since": 2, "epoch": epoch}, "elsewhere": {"since": 0}}
    bob = await Client.login_as(server.url, "bob", resume=resume)
    joined = await bob.wait_for("joined", room="lobby")
    assert joined["since"] == 2
    assert not joined.get("reset", False)
    await bob.wait_messages("lobby", 1)
    await bob.sync()
    assert bob.seqs("lobby") == [3]
    assert not bob.take_all("joined"), "resume entries for rooms bob is not a member of are ignored"
    await close_all(alice, bob)


async def test_resume_beyond_head_resets(server: ServerProcess) -> None:
    alice, bob = await members(server.url, "lobby", "alice", "bob")
    await publish_many(alice, "lobby", 3)
    await bob.wait_messages("lobby", 3)
    await bob.close()

    bob = await Client.login_as(server.url, "bob", resume={"lobby": {"since": 99}})
    joined = await bob.wait_for("joined", room="lobby")
    assert joined["reset"] is True
    assert joined["since"] == 0
    await bob.wait_messages("lobby", 3)
    await bob.sync()
    assert bob.seqs("lobby") == [1, 2, 3]
    await close_all(alice, bob)


async def test_resume_with_other_epoch_resets(server: ServerProcess) -> None:
    alice, bob = await members(server.url, "lobby", "alice", "bob")
    await publish_many(alice, "lobby", 2)
    await bob.wait_messages("lobby", 2)
    await bob.close()

    bob = await Client.login_as(server.url, "bob", resume={"lobby": {"since": 1, "epoch": "not-this-epoch"}})
    joined = await bob.wait_for("joined", room="lobby")
    assert joined["reset"] is True
    assert joined["since"] == 0
    assert joined["epoch"] != "not-this-epoch"
    await bob.wait_messages("lobby", 2)
    await bob.sync()
    assert bob.seqs("lobby") == [1, 2]
    await close_all(alice, bob)


async def test_acks_advance_stored_cursor(server: ServerProcess) -> None:
    alice, bob = await members(server.url, "lobby", "alice", "bob", auto_ack=False)
    await publish_many(alice, "lobby", 5)
    await bob.wait_messages("lobby", 5)

    assert (await bob.ack("lobby", 3))["seq"] == 3
    assert (await bob.ack("lobby", 1))["seq"] == 3, "an older ack must not move the cursor back"
    assert (await bob.ack("lobby", 3))["seq"] == 3
    assert (await bob.ack("lobby", 5))["seq"] == 5

    phone = await Client.login_as(server.url, "bob", auto_ack=False)
    joined = await phone.wait_for("joined", room="lobby")
    assert joined["since"] == 5
    assert (await phone.ack("lobby", 2))["seq"] == 5, "acked carries the stored cursor, not the ack's seq"
    await close_all(phone, bob)

    bob = await Client.login_as(server.url, "bob", auto_ack=False)
    joined = await bob.wait_for("joined", room="lobby")
    assert joined["since"] == 5
    assert joined["head"] == 5
    await bob.sync()
    assert bob.seqs("lobby") == []
    await close_all(alice, bob)


async def test_stalled_reader_gets_everything(server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory(*FAST_SENDS)
    alice, bob = await members(server.url, "lobby", "alice", "bob")
    # Bob's socket stops reading, so the server's writes to him back up in the kernel buffers.
    bob.ws.transport.pause_reading()
    body = "x" * 2000
    for index in range(3000):
        await alice.send({"type": "send", "room": "lobby", "id": f"m{index}", "body": body})
    for index in range(3000):
        await alice.wait_for("sent", id=f"m{index}")
    await alice.wait_messages("lobby", 3000)

    bob.ws.transport.resume_reading()
    # The contract lets the server either catch bob up in order or close him with 4029 to resume.
    with contextlib.suppress(FrameTimeout):
        await bob.wait_messages("lobby", 3000)
    if bob.closed:
        assert bob.close_code == 4029
        received_count = len(bob.seqs("lobby"))
        assert_in_order_once(bob.seqs("lobby"), 1, received_count)
        bob = await Client.login_as(server.url, "bob", resume={"lobby": {"since": received_count}})
        await bob.wait_messages("lobby", 3000 - received_count)
        first = received_count + 1
    else:
        first = 1
    await bob.sync()
    assert_in_order_once(bob.seqs("lobby"), first, 3000)
    await close_all(alice, bob)


async def offline_catch_up(server: ServerProcess, pause: float) -> Client:
    """Check that bob, offline while 500 messages (and one more after `pause` s) are sent, gets them all.

    Returns bob's new connection.
    """
    alice, bob = await members(server.url, "lobby", "alice", "bob")
    await bob.close()
    await publish_many(alice, "lobby", 500)
    total = 500
    if pause:
        await asyncio.sleep(pause)
        await alice.publish("lobby", "late", "after the pause")
        total += 1
    await alice.close()

    bob = await Client.login_as(server.url, "bob")
    joined = await bob.wait_for("joined", room="lobby")
    assert joined["since"] == 0
    assert joined["head"] == total
    await bob.wait_messages("lobby", total)
    await bob.sync()
    assert_in_order_once(bob.seqs("lobby"), 1, total)
    assert bob.messages["lobby"][0]["body"] == "m 0"
    assert bob.messages["lobby"][499]["body"] == "m 499"
    return bob


async def test_offline_member_gets_all_from_cache(server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory(*FAST_SENDS)
    before = (await get_json(server.port, "/api/stats"))["cache"]
    bob = await offline_catch_up(server, pause=0)
    after = (await get_json(server.port, "/api/stats"))["cache"]
    assert after["hits"] > before["hits"]
    assert after["misses"] == before["misses"], f"the whole range is hot, yet the cache missed: {after}"
    await close_all(bob)


@pytest.mark.parametrize(
    ("flags", "pause"),
    [(("--hot-max-per-room", "50"), 0.0), (("--hot-window", "0.5"), 0.8)],
    ids=["hot-max-per-room", "hot-window"],
)
async def test_offline_member_gets_all_from_store(
    server_factory: Callable[..., ServerProcess], flags: tuple[str, str], pause: float
) -> None:
    server = server_factory(*FAST_SENDS, *flags)
    before = (await get_json(server.port, "/api/stats"))["cache"]
    bob = await offline_catch_up(server, pause)
    after = (await get_json(server.port, "/api/stats"))["cache"]
    assert after["misses"] > before["misses"], f"the range left the hot cache, yet it never missed: {after}"
    assert after["entries"] <= 50
    await close_all(bob)
