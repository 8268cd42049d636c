"""Resends against a real `parley serve`: sends stored once, server redeliveries dropped as duplicates.

A TCP proxy between the client and the server holds back the server's bytes on demand, so a `send` can be
stored while its `sent` never reaches the client, which is the case that idempotent resends exist for.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from conftest import ServerProcess
from parley.client import Client, Message

FAST_RECONNECT = {"backoff_base": 0.05, "backoff_cap": 0.5}


class HoldingProxy:
    """A TCP proxy on 127.0.0.1 that can hold back server-to-client bytes and cut every connection."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.downstream_open = asyncio.Event()
        self.downstream_open.set()
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def start(self) -> HoldingProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def hold(self) -> None:
        self.downstream_open.clear()

    def release(self) -> None:
        self.downstream_open.set()

    def cut(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [client_writer, server_writer]
        for task in (
            asyncio.create_task(self._pipe(client_reader, server_writer, None)),
            asyncio.create_task(self._pipe(server_reader, client_writer, self.downstream_open)),
        ):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _pipe(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, gate: asyncio.Event | None
    ) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                if gate is not None:
                    await gate.wait()
                writer.write(data)
                await writer.drain()
        writer.transport.abort()


@contextlib.asynccontextmanager
async def connected(url: str, user: str, **options: object) -> AsyncIterator[Client]:
    client = Client(url, user=user, **{**FAST_RECONNECT, **options})  # type: ignore[arg-type]
    try:
        await client.connect()
        yield client
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def proxy_to(server: ServerProcess) -> AsyncIterator[HoldingProxy]:
    proxy = await HoldingProxy(server.port).start()
    try:
        yield proxy
    finally:
        await proxy.close()


async def receive(client: Client, count: int) -> list[Message]:
    stream = client.messages()
    return [await anext(stream) for _ in range(count)]


async def wait_until(condition: Callable[[], bool]) -> None:
    # Client counters have no event to wait on, so poll; every caller bounds the wait with a timeout.
    while not condition():  # noqa: ASYNC110
        await asyncio.sleep(0.02)


async def test_unconfirmed_send_resent_after_reconnect_stored_once(server: ServerProcess) -> None:
    async with (
        asyncio.timeout(30),
        proxy_to(server) as proxy,
        connected(proxy.url, "alice") as alice,
        connected(server.url, "bob") as bob,
    ):
        await alice.join("lobby")
        await bob.join("lobby")

        proxy.hold()
        pending = alice.send_nowait("lobby", "exactly once")
        stored = await receive(bob, 1)
        proxy.cut()
        proxy.release()
        sent = await pending
        await alice.send("lobby", "marker")
        after = await receive(bob, 1)
        history = await bob.history("lobby", after=0)

        assert [message.body for message in stored] == ["exactly once"]
        assert sent.dup is True
        assert sent.seq == stored[0].seq
        assert [message.body for message in after] == ["marker"]
        assert [message.body for message in history.messages] == ["exactly once", "marker"]
        assert alice.statistics().resends >= 1
        assert alice.statistics().reconnects >= 1


async def test_send_resent_after_timeout_stored_once(server: ServerProcess) -> None:
    async with (
        asyncio.timeout(30),
        proxy_to(server) as proxy,
        connected(proxy.url, "alice", send_timeout=0.2) as alice,
        connected(server.url, "bob") as bob,
    ):
        await alice.join("lobby")
        await bob.join("lobby")

        proxy.hold()
        pending = alice.send_nowait("lobby", "slow confirmation")
        await wait_until(lambda: alice.statistics().resends >= 2)
        proxy.release()
        sent = await pending
        await alice.send("lobby", "marker")
        received = await receive(bob, 2)

        assert sent.dup is False
        assert [message.body for message in received] == ["slow confirmation", "marker"]
        assert alice.statistics().reconnects == 0


async def test_server_redelivery_dropped_as_duplicate(server_factory: Callable[..., ServerProcess]) -> None:
    """With a short ack timeout, messages the application has not handled yet come again from the server."""
    server = server_factory("--ack-timeout", "0.1")
    async with (
        asyncio.timeout(60),
        connected(server.url, "alice") as alice,
        connected(server.url, "bob") as bob,
    ):
        await alice.join("lobby")
        await bob.join("lobby")
        for index in range(5):
            await alice.send("lobby", f"d{index}")

        await wait_until(lambda: bob.statistics().duplicates >= 5)
        await alice.send("lobby", "marker")
        received = await receive(bob, 6)

        assert [message.body for message in received] == [f"d{index}" for index in range(5)] + ["marker"]
        assert [message.seq for message in received] == list(range(1, 7))


async def test_stalled_application_resumes_after_4008(server_factory: Callable[..., ServerProcess]) -> None:
    """An application that stops reading stops acking; the server closes with 4008 and nothing is lost."""
    server = server_factory("--ack-timeout", "0.1")
    async with (
        asyncio.timeout(60),
        connected(server.url, "alice") as alice,
        connected(server.url, "bob") as bob,
    ):
        await alice.join("lobby")
        await bob.join("lobby")
        for index in range(5):
            await alice.send("lobby", f"s{index}")

        await wait_until(lambda: bob.statistics().reconnects >= 1)
        await alice.send("lobby", "marker")
        received = await receive(bob, 6)

        assert [message.body for message in received] == [f"s{index}" for index in range(5)] + ["marker"]
