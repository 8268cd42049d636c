"""Closing the client while its timer is woken: the timer task must still end."""

from __future__ import annotations

import asyncio

from conftest import ServerProcess
from parley.client import Client


async def test_timer_ends_when_cancelled_as_it_wakes(server: ServerProcess) -> None:
    client = Client(server.url, user="alice", send_timeout=30.0)
    await client.connect()
    await client.join("lobby")
    await client.send_nowait("lobby", "first")
    client.send_nowait("lobby", "second")
    await asyncio.sleep(0.05)
    timer = client._timer_task
    assert timer is not None

    # The wake event and the cancellation land in the same loop step, as when a frame arrives
    # while close() cancels the timer; asyncio.wait_for on Python 3.11 lost such a cancellation.
    client._wake.set()
    timer.cancel()
    done, _ = await asyncio.wait({timer}, timeout=5)

    assert timer in done
    await asyncio.wait_for(client.close(), 10)
