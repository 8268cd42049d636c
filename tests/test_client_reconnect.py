"""The client library against a real `parley serve`: reconnect and resume without loss or duplicates."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Callable

import pytest

from conftest import ServerProcess
from parley.client import Client, Message, Sent, Unauthorized

FAST_RECONNECT = {"backoff_base": 0.05, "backoff_cap": 0.5}


@contextlib.asynccontextmanager
async def connected(url: str, user: str, **options: object) -> AsyncIterator[Client]:
    client = Client(url, user=user, **{**FAST_RECONNECT, **options})  # type: ignore[arg-type]
    try:
        await client.connect()
        yield client
    finally:
        await client.close()


class Collector:
    """Consumes a client's messages in the background, as an application would."""

    def __init__(self, client: Client) -> None:
        self.messages: list[Message] = []
        self.arrived = asyncio.Event()
        self._task = asyncio.create_task(self._consume(client))

    async def _consume(self, client: Client) -> None:
        async for message in client.messages():
            self.messages.append(message)
            self.arrived.set()

    async def wait_for(self, predicate: Callable[[list[Message]], bool]) -> None:
        while not predicate(self.messages):
            self.arrived.clear()
            await self.arrived.wait()

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def bodies(messages: list[Message], room: str = "lobby") -> list[str]:
    return [message.body for message in messages if message.room == room]


async def restart(server: ServerProcess, sig: int) -> None:
    await asyncio.to_thread(server.restart, sig)


async def test_send_and_receive_in_order(server: ServerProcess) -> None:
    async with (
        asyncio.timeout(30),
        connected(server.url, "alice") as alice,
        connected(server.url, "bob") as bob,
    ):
        await alice.join("lobby")
        await bob.join("lobby")
        collector = Collector(bob)

        confirmations = [await alice.send("lobby", f"m{index}", meta={"n": index}) for index in range(10)]
        await collector.wait_for(lambda messages: len(messages) >= 10)
        await collector.stop()

        assert [sent.seq for sent in confirmations] == list(range(1, 11))
        assert not any(sent.dup for sent in confirmations)
        assert bodies(collector.messages) == [f"m{index}" for index in range(10)]
        assert [message.seq for message in collector.messages] == list(range(1, 11))
        assert collector.messages[3].meta == {"n": 3}
        assert collector.messages[3].sender == "alice"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_server_restart_loses_and_repeats_nothing(server: ServerProcess, sig: int) -> None:
    async with (
        asyncio.timeout(60),
        connected(server.url, "alice") as alice,
        connected(server.url, "bob") as bob,
    ):
        await alice.join("lobby")
        await bob.join("lobby")
        collector = Collector(bob)

        first = [alice.send_nowait("lobby", f"m{index}") for index in range(30)]
        await asyncio.gather(*first)
        await collector.wait_for(lambda messages: len(messages) >= 30)

        # These sends go out while the server stops and starts again, so some are stored without their
        # `sent` reaching alice, and the outbox must resend them on the new connection.
        during = [alice.send_nowait("lobby", f"m{index}") for index in range(30, 60)]
        await restart(server, sig)
        after = [alice.send_nowait("lobby", f"m{index}") for index in range(60, 80)]
        confirmations: list[Sent] = await asyncio.gather(*during, *after)
        await collector.wait_for(lambda messages: len(messages) >= 80)

        history = await bob.history("lobby", after=0, limit=200)
        await collector.stop()

        expected = [f"m{index}" for index in range(80)]
        assert bodies(collector.messages) == expected
        assert [message.seq for message in collector.messages] == list(range(1, 81))
        assert [message.body for message in history.messages] == expected
        assert sorted(sent.seq for sent in confirmations) == list(range(31, 81))
        assert alice.statistics().reconnects >= 1
        assert bob.statistics().reconnects >= 1


async def test_messages_sent_while_offline_arrive_after_restart(server: ServerProcess) -> None:
    async with (
        asyncio.timeout(60),
        connected(server.url, "alice") as alice,
        connected(server.url, "bob") as bob,
    ):
        await alice.join("lobby")
        await bob.join("lobby")
        collector = Collector(bob)
        await alice.send("lobby", "before")
        await collector.wait_for(lambda messages: len(messages) >= 1)

        await asyncio.to_thread(server.stop, signal.SIGKILL)
        offline = [alice.send_nowait("lobby", f"offline {index}") for index in range(5)]
        await asyncio.to_thread(server.start)
        await asyncio.gather(*offline)
        await collector.wait_for(lambda messages: len(messages) >= 6)
        await collector.stop()

        assert bodies(collector.messages) == ["before"] + [f"offline {index}" for index in range(5)]
        assert alice.statistics().sends_pending == 0


async def test_restart_twice_in_a_row(server: ServerProcess) -> None:
    async with (
        asyncio.timeout(60),
        connected(server.url, "alice") as alice,
        connected(server.url, "bob") as bob,
    ):
        await alice.join("lobby")
        await bob.join("lobby")
        collector = Collector(bob)

        pending = []
        for round_number, sig in enumerate([signal.SIGKILL, signal.SIGTERM]):
            pending += [alice.send_nowait("lobby", f"r{round_number}-{index}") for index in range(10)]
            await restart(server, sig)
        pending += [alice.send_nowait("lobby", f"r2-{index}") for index in range(10)]
        await asyncio.gather(*pending)
        await collector.wait_for(lambda messages: len(messages) >= 30)
        await collector.stop()

        expected = [f"r{round_number}-{index}" for round_number in range(3) for index in range(10)]
        assert bodies(collector.messages) == expected


async def test_batch_client_receives_arrays(server: ServerProcess) -> None:
    async with (
        asyncio.timeout(30),
        connected(server.url, "alice", batch=True) as alice,
        connected(server.url, "bob", batch=True) as bob,
    ):
        await alice.join("lobby")
        await bob.join("lobby")
        collector = Collector(bob)

        futures = [alice.send_nowait("lobby", f"b{index}") for index in range(100)]
        await asyncio.gather(*futures)
        await collector.wait_for(lambda messages: len(messages) >= 100)
        await collector.stop()

        assert bodies(collector.messages) == [f"b{index}" for index in range(100)]


async def test_rejoin_after_restart_needs_no_join_call(server: ServerProcess) -> None:
    """After a reconnect the server resumes the user's rooms from the positions in `hello`."""
    async with (
        asyncio.timeout(60),
        connected(server.url, "alice") as alice,
        connected(server.url, "bob") as bob,
    ):
        for room in ("lobby", "kitchen"):
            await alice.join(room)
            await bob.join(room)
        collector = Collector(bob)

        await restart(server, signal.SIGTERM)
        await alice.send("kitchen", "k1")
        await alice.send("lobby", "l1")
        await collector.wait_for(lambda messages: len(messages) >= 2)
        await collector.stop()

        assert bodies(collector.messages, "kitchen") == ["k1"]
        assert bodies(collector.messages, "lobby") == ["l1"]


async def test_history_pages(server: ServerProcess) -> None:
    async with asyncio.timeout(30), connected(server.url, "alice") as alice:
        await alice.join("lobby")
        for index in range(7):
            await alice.send("lobby", f"h{index}")

        newest = await alice.history("lobby", before=8, limit=3)
        oldest = await alice.history("lobby", after=0, limit=3)
        rest = await alice.history("lobby", after=6, limit=3)

        assert [message.seq for message in newest.messages] == [5, 6, 7]
        assert newest.more is True
        assert [message.body for message in oldest.messages] == ["h0", "h1", "h2"]
        assert [message.seq for message in rest.messages] == [7]
        assert rest.more is False


async def test_join_last_replays_recent(server: ServerProcess) -> None:
    async with asyncio.timeout(30), connected(server.url, "alice") as alice:
        await alice.join("lobby")
        for index in range(10):
            await alice.send("lobby", f"x{index}")

        async with connected(server.url, "carol") as carol:
            joined = await carol.join("lobby", last=3)
            collector = Collector(carol)
            await collector.wait_for(lambda messages: len(messages) >= 3)
            await alice.send("lobby", "live")
            await collector.wait_for(lambda messages: len(messages) >= 4)
            await collector.stop()

        assert joined.since == 7
        assert joined.head == 10
        assert bodies(collector.messages) == ["x7", "x8", "x9", "live"]


async def test_acks_reach_server_cursor(server: ServerProcess) -> None:
    """A second client of the same user, without positions, starts after what the first one handled."""
    async with asyncio.timeout(30), connected(server.url, "alice") as alice:
        await alice.join("lobby")
        async with connected(server.url, "bob") as bob:
            await bob.join("lobby")
            for index in range(5):
                await alice.send("lobby", f"a{index}")
            stream = bob.messages()
            for _ in range(5):
                bob.handled(await anext(stream))

        for index in range(5, 8):
            await alice.send("lobby", f"a{index}")
        async with connected(server.url, "bob") as bob_again:
            collector = Collector(bob_again)
            await collector.wait_for(lambda messages: len(messages) >= 3)
            await collector.stop()

        assert bodies(collector.messages) == ["a5", "a6", "a7"]


async def test_wrong_token_stops_with_unauthorized(server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory("--secret", "correct horse battery staple")
    client = Client(server.url, token="not-a-valid-token", **FAST_RECONNECT)  # type: ignore[arg-type]
    try:
        async with asyncio.timeout(30):
            with pytest.raises(Unauthorized):
                await client.connect()
            with pytest.raises(Unauthorized):
                await client.send("lobby", "never stored")
    finally:
        await client.close()

    assert client.statistics().connections == 0
