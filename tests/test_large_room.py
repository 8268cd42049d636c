"""Large rooms and slow consumers, driven by the `parley bench` load generator against a real server.

These tests check behaviour only (counts, order, close codes, memory against the volume published);
none of them asserts on a wall-clock time. The 5,000 connections live in load-generator processes, so
this process stays far below its file-descriptor limit.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import connect

from conftest import ServerProcess
from parley.bench.clients import BenchConnection, Tally, open_connection
from parley.bench.proc import rss_kb
from parley.bench.runner import Case, CaseOptions
from parley.bench.wire import client_frame

QUIET_UNLIMITED = ("--log-level", "WARNING", "--send-rate", "100000", "--send-burst", "100000")
WAIT = 60.0
"""Upper bound in seconds for any single wait; a healthy run needs a small fraction of it."""


def pid_of(server: ServerProcess) -> int:
    assert server.proc is not None
    return server.proc.pid


async def test_big_room_and_small_room_both_complete(server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory(*QUIET_UNLIMITED, "--heartbeat", "0.5")
    options = CaseOptions(
        connections=5020,
        room_size=5000,
        rate=10,
        duration=3,
        warmup=0,
        settle=0.2,
        ack_interval=1.0,
        url=server.url,
        server_pid=pid_of(server),
    )

    result = await Case("parley", options, 0).run()

    assert "error" not in result, result["error"]
    assert result["connections"] == 5020
    assert result["lost"] == 0
    assert result["duplicates"] == 0
    assert result["out_of_order"] == 0
    assert result["unconfirmed_acks"] == 0
    assert result["open_at_end"] == 5020
    assert result["closes"] == {}
    big, small = result["per_room"]["r0"], result["per_room"]["r1"]
    assert big["connections"] == 5000
    assert small["connections"] == 20
    assert big["lowest"] == result["heads"]["r0"] > 0
    assert small["lowest"] == result["heads"]["r1"] > 0
    # Heartbeats every 0.5 s kept reaching the small room while the big one was fanned out.
    assert small["pings_min"] >= 2


class Member:
    """A benchmark connection that acknowledges what it received every 50 ms, as a client application does."""

    def __init__(self, connection: BenchConnection) -> None:
        self.connection = connection
        self._acks = asyncio.get_running_loop().create_task(self._acknowledge())

    @classmethod
    async def join(cls, server: ServerProcess, user: str, room: str, tally: Tally, **hello: Any) -> Member:
        connection = BenchConnection(
            "parley", "127.0.0.1", server.port, "/ws", user, [room], tally, hello=hello or None
        )
        await open_connection(asyncio.get_running_loop(), connection, "127.0.0.1", server.port, WAIT)
        return cls(connection)

    def since(self, room: str) -> int:
        return self.connection.positions[room].since

    async def wait_for_seq(self, room: str, seq: int) -> None:
        await asyncio.wait_for(asyncio.shield(self.connection.positions[room].until(seq)), WAIT)

    async def _acknowledge(self) -> None:
        while not self.connection.closed.done():
            await asyncio.sleep(0.05)
            self.connection.send_acks(time.monotonic())

    async def close(self) -> None:
        self._acks.cancel()
        self.connection.close()
        await asyncio.wait_for(asyncio.shield(self.connection.closed), WAIT)


async def publish(publisher: BenchConnection, room: str, first: int, count: int, body: str) -> None:
    """Send `count` messages with ids first..first+count-1 and wait until the server stored them all."""
    target = publisher.sent_replies + count
    frames = [
        client_frame(orjson.dumps({"type": "send", "room": room, "id": f"m{number}", "body": body}))
        for number in range(first, first + count)
    ]
    publisher.write(b"".join(frames))
    for _ in range(int(WAIT / 0.01)):
        if publisher.sent_replies >= target:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{publisher.sent_replies} of {target} sends confirmed within {WAIT} s")


async def test_stalled_reader_is_caught_up_in_bounded_memory(
    server_factory: Callable[..., ServerProcess],
) -> None:
    # No heartbeat or resend during the test, so the stalled reader stays connected and is caught up.
    # A hot cache of 50 messages makes its catch-up read the store.
    server = server_factory(
        *QUIET_UNLIMITED, "--heartbeat", "120", "--ack-timeout", "120", "--hot-max-per-room", "50"
    )
    body = "x" * 4000
    tally = Tally()
    readers = [await Member.join(server, f"reader{index}", "big", tally) for index in range(2)]
    slow = await Member.join(server, "slow", "big", tally)
    publisher = await Member.join(server, "publisher", "big", Tally())

    published = 0
    for _ in range(3):
        await publish(publisher.connection, "big", published + 1, 2000, body)
        published += 2000
        for member in (*readers, slow):
            await member.wait_for_seq("big", published)
    before = rss_kb(pid_of(server))

    assert slow.connection.transport is not None
    slow.connection.transport.pause_reading()
    for _ in range(10):
        await publish(publisher.connection, "big", published + 1, 2000, body)
        published += 2000
        for member in readers:
            await member.wait_for_seq("big", published)
    after = rss_kb(pid_of(server))

    # 10 x 2,000 x 4 KB = 80 MB went out while the reader was stalled. Holding it for the reader would
    # show in full; without a stalled reader the RSS of this run stays flat within a few MB.
    assert before is not None and after is not None
    assert after - before < 40_000, f"server RSS grew by {after - before} KB while a reader was stalled"

    slow.connection.transport.resume_reading()
    await slow.wait_for_seq("big", published)
    assert slow.since("big") == published
    assert tally.duplicates == 0
    assert tally.out_of_order == 0
    assert tally.delivered == 3 * published
    for member in (*readers, slow, publisher):
        await member.close()


async def test_stalled_reader_is_closed_and_resumes(server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory(*QUIET_UNLIMITED, "--heartbeat", "0.3", "--max-body", "60000")
    body = "x" * 59_000
    tally = Tally()
    reader = await Member.join(server, "reader", "big", tally)
    slow = await Member.join(server, "slow", "big", tally)
    publisher = await Member.join(server, "publisher", "big", Tally())

    assert slow.connection.transport is not None
    slow.connection.transport.pause_reading()
    published = 0
    for _ in range(3):
        await publish(publisher.connection, "big", published + 1, 100, body)
        published += 100
    await reader.wait_for_seq("big", published)

    # The server gives up on the stalled connection; resuming reading lets the client see the close.
    await asyncio.sleep(2.0)
    slow.connection.transport.resume_reading()
    await asyncio.wait_for(asyncio.shield(slow.connection.closed), WAIT)
    # NOTE: 4029 is the protocol's close code for a slow consumer. The heartbeat usually aborts a
    # stalled connection first, though, and the client then sees no close frame (1006).
    assert slow.connection.close_code in (4029, None)
    assert slow.since("big") < published

    resumed = await Member.join(server, "slow", "big", tally, resume={"big": {"since": slow.since("big")}})
    await resumed.wait_for_seq("big", published)
    assert tally.out_of_order == 0
    assert reader.since("big") == published
    for member in (reader, resumed, publisher):
        await member.close()


async def read_messages(
    url: str, user: str, batch: bool, count: int, joined: asyncio.Event, **join: Any
) -> list[Any]:
    """Log in, join `lobby`, set `joined` on the reply, and return every message until `count` msg frames."""
    received: list[Any] = []
    held = 0
    hello = {"type": "hello", "user": user, "batch": batch}
    async with connect(url, compression=None, max_size=None, proxy=None) as ws:
        await ws.send(orjson.dumps([hello, {"type": "join", "room": "lobby", **join}]).decode())
        while held < count:
            value = orjson.loads(await asyncio.wait_for(ws.recv(), WAIT))
            received.append(value)
            frames = value if isinstance(value, list) else [value]
            held += sum(1 for frame in frames if frame.get("type") == "msg")
            if any(frame.get("type") == "joined" for frame in frames):
                joined.set()
    return received


def msg_seqs(received: list[Any]) -> list[int]:
    seqs = []
    for value in received:
        for frame in value if isinstance(value, list) else [value]:
            if frame.get("type") == "msg":
                seqs.append(frame["seq"])
    return seqs


@pytest.mark.parametrize("catch_up", [False, True], ids=["live", "catch-up"])
async def test_merged_frames_only_for_batch_clients(
    server_factory: Callable[..., ServerProcess], catch_up: bool
) -> None:
    server = server_factory(*QUIET_UNLIMITED)
    count = 300
    publisher = await Member.join(server, "publisher", "lobby", Tally())
    if catch_up:
        await publish(publisher.connection, "lobby", 1, count, "hello")
    joined = [asyncio.Event(), asyncio.Event()]
    join = {"since": 0} if catch_up else {}
    readers = [
        asyncio.create_task(read_messages(server.url, user, batch, count, event, **join))
        for (user, batch), event in zip((("plain", False), ("merged", True)), joined, strict=True)
    ]
    if not catch_up:
        for event in joined:
            await asyncio.wait_for(event.wait(), WAIT)
        await publish(publisher.connection, "lobby", 1, count, "hello")
    plain, merged = await asyncio.gather(*readers)

    assert not any(isinstance(value, list) for value in plain)
    assert msg_seqs(plain) == list(range(1, count + 1))
    assert msg_seqs(merged) == list(range(1, count + 1))
    assert any(isinstance(value, list) for value in merged), "the batch client received no array frame"
    await publisher.close()
