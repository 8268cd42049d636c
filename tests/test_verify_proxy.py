"""The fault-injecting proxy between a real TCP client and a real echo server on 127.0.0.1.

The checks that something did not happen wait a short while and expect nothing. The proxy cannot pass
data early, so a slow machine can only make them pass, never fail.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from parley.verify.proxy import FaultProxy, Link

QUIET = 0.3
"""Seconds to wait when checking that nothing arrives."""


@dataclass
class Upstream:
    """An echo server that also records what each connection received and whether it saw EOF."""

    server: asyncio.Server
    port: int
    received: bytearray = field(default_factory=bytearray)
    eof: asyncio.Event = field(default_factory=asyncio.Event)
    reset: asyncio.Event = field(default_factory=asyncio.Event)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    holder: list[Upstream] = []

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        target = holder[0]
        target.writers.append(writer)
        while True:
            try:
                data = await reader.read(65536)
            except ConnectionResetError:
                target.reset.set()
                return
            if not data:
                target.eof.set()
                return
            target.received += data
            writer.write(data)

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    holder.append(Upstream(server, int(server.sockets[0].getsockname()[1])))
    yield holder[0]
    for writer in holder[0].writers:
        writer.transport.abort()
    server.close()
    await server.wait_closed()


@pytest.fixture
async def proxy(upstream: Upstream) -> AsyncIterator[FaultProxy]:
    fault_proxy = FaultProxy(("127.0.0.1", upstream.port), rng=random.Random(7), black_hole_for=None)
    await fault_proxy.start()
    yield fault_proxy
    await fault_proxy.close()


async def connect(proxy: FaultProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Link]:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"hello")
    assert await asyncio.wait_for(reader.readexactly(5), 10) == b"hello"
    (link,) = proxy.open_links()
    return reader, writer, link


async def nothing_arrives(reader: asyncio.StreamReader) -> bool:
    """Wait QUIET seconds; tell whether neither data, EOF nor a reset arrived meanwhile."""
    try:
        await asyncio.wait_for(reader.read(1), QUIET)
    except TimeoutError:
        return True
    except ConnectionError:
        return False
    return False


async def test_proxy_forwards_both_ways(proxy: FaultProxy, upstream: Upstream) -> None:
    reader, writer, _ = await connect(proxy)
    payload = bytes(range(256)) * 1024
    writer.write(payload)

    echoed = await asyncio.wait_for(reader.readexactly(len(payload)), 10)

    assert echoed == payload
    assert bytes(upstream.received) == b"hello" + payload
    writer.close()


async def test_cut_with_fin_closes_both_sides(proxy: FaultProxy, upstream: Upstream) -> None:
    reader, writer, link = await connect(proxy)

    proxy.cut(link, reset=False)

    assert await asyncio.wait_for(reader.read(100), 10) == b""
    await asyncio.wait_for(upstream.eof.wait(), 10)
    assert proxy.faults["cut_fin"] == 1
    writer.close()


async def test_cut_with_rst_resets_both_sides(proxy: FaultProxy, upstream: Upstream) -> None:
    reader, writer, link = await connect(proxy)

    proxy.cut(link, reset=True)

    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(100), 10)
    await asyncio.wait_for(upstream.reset.wait(), 10)
    assert not upstream.eof.is_set()
    assert proxy.faults["cut_rst"] == 1
    writer.close()


async def test_delay_holds_data_then_forwards_in_order(proxy: FaultProxy) -> None:
    reader, writer, link = await connect(proxy)

    proxy.delay(link, seconds=2 * QUIET + 0.5, duration=None)
    writer.write(b"one ")
    writer.write(b"two ")
    writer.write(b"three")

    assert await nothing_arrives(reader)
    assert await asyncio.wait_for(reader.readexactly(13), 10) == b"one two three"
    assert proxy.faults["delay"] == 1
    writer.close()


async def test_stall_holds_data_until_healed(proxy: FaultProxy, upstream: Upstream) -> None:
    reader, writer, link = await connect(proxy)

    proxy.stall(link, "down", duration=None)
    writer.write(b"ping")

    assert await nothing_arrives(reader)
    await asyncio.sleep(0)
    assert bytes(upstream.received) == b"helloping"  # the other direction still flows

    proxy.heal()
    assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
    assert proxy.faults["stall_down"] == 1
    writer.close()


async def test_black_hole_sends_no_data_fin_or_rst(proxy: FaultProxy, upstream: Upstream) -> None:
    reader, writer, link = await connect(proxy)

    proxy.black_hole(link)
    writer.write(b"lost?")
    assert await nothing_arrives(reader)
    assert bytes(upstream.received) == b"hello"

    # The upstream talks: the client hears nothing of it.
    upstream.writers[0].write(b"from upstream")
    assert await nothing_arrives(reader)

    # The client closes its side: the upstream hears nothing of it either.
    writer.write_eof()
    await asyncio.sleep(QUIET)
    assert not upstream.eof.is_set()
    assert not upstream.reset.is_set()
    assert proxy.open_links() == []
    assert proxy.faults["black_hole"] == 1

    proxy.heal()
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(100), 10)
    writer.close()


async def test_black_hole_resets_after_timeout(upstream: Upstream) -> None:
    proxy = FaultProxy(("127.0.0.1", upstream.port), black_hole_for=0.2)
    await proxy.start()
    try:
        reader, writer, link = await connect(proxy)
        proxy.black_hole(link)

        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(100), 10)
        await asyncio.wait_for(upstream.reset.wait(), 10)
        writer.close()
    finally:
        await proxy.close()


async def test_refused_upstream_closes_client() -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = int(probe.sockets[0].getsockname()[1])
    probe.close()
    await probe.wait_closed()
    proxy = FaultProxy(("127.0.0.1", port))
    await proxy.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            data = await asyncio.wait_for(reader.read(100), 10)
        except ConnectionResetError:
            data = b""
        assert data == b""
        assert proxy.refused == 1
        writer.close()
    finally:
        await proxy.close()


async def test_same_seed_picks_same_links(upstream: Upstream) -> None:
    picks: list[list[int]] = []
    for _ in range(2):
        proxy = FaultProxy(("127.0.0.1", upstream.port), rng=random.Random(42))
        await proxy.start()
        writers = []
        for _ in range(5):
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"x")
            await asyncio.wait_for(reader.readexactly(1), 10)  # the link is up once the echo returns
            writers.append(writer)
        numbers = []
        for _ in range(10):
            link = proxy.pick()
            assert link is not None
            numbers.append(link.number)
        picks.append(numbers)
        for writer in writers:
            writer.close()
        await proxy.close()

    assert picks[0] == picks[1]
