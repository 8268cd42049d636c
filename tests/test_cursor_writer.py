"""Coalesced cursor writes on a real SQLite store."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from parley.server.cursors import CursorWriter
from parley.storage.sqlite import SqliteStore


async def wait_until(done: Callable[[], bool]) -> None:
    """Yield to the loop until `done()` is true (the writer thread has replied), failing after 5 s."""
    async with asyncio.timeout(5):
        while not done():  # noqa: ASYNC110 - the writer thread sets no event this test could await
            await asyncio.sleep(0.005)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    store = SqliteStore(tmp_path / "parley.db")
    await store.open()
    for index in range(20):
        await store.append("lobby", "alice", f"m{index}", "x", None, 1000)
    for user in ("alice", "bob", "carol"):
        await store.join(user, "lobby")
        await store.set_cursor_if_unset(user, "lobby", 0)
    yield store
    await store.close()


async def test_acks_of_one_iteration_share_one_write(store: SqliteStore) -> None:
    stored_events: list[tuple[str, str, int]] = []
    writer = CursorWriter(store, on_stored=lambda user, room, seq: stored_events.append((user, room, seq)))
    for user in ("alice", "bob", "carol"):
        writer.load(user, "lobby", 0)
    replies: dict[str, list[int | None]] = {"alice": [], "bob": [], "carol": []}

    for user, seq in [("alice", 3), ("bob", 5), ("alice", 7), ("carol", 2), ("alice", 4)]:
        writer.advance(user, "lobby", seq, lambda stored, error, user=user: replies[user].append(stored))
    await wait_until(lambda: sum(len(values) for values in replies.values()) == 5)

    assert writer.writes == 1
    assert replies == {"alice": [7, 7, 7], "bob": [5], "carol": [2]}
    cursors = {member.user: member.cursor for member in await store.members("lobby")}
    assert cursors == {"alice": 7, "bob": 5, "carol": 2}
    assert sorted(stored_events) == [("alice", "lobby", 7), ("bob", "lobby", 5), ("carol", "lobby", 2)]


async def test_older_ack_is_answered_without_a_write(store: SqliteStore) -> None:
    writer = CursorWriter(store, on_stored=lambda user, room, seq: None)
    writer.load("alice", "lobby", 9)
    replies: list[int | None] = []

    writer.advance("alice", "lobby", 4, lambda stored, error: replies.append(stored))

    assert replies == [9]
    assert writer.writes == 0


async def test_unknown_member_learns_stored_cursor(store: SqliteStore) -> None:
    await store.advance_cursor("bob", "lobby", 12)
    writer = CursorWriter(store, on_stored=lambda user, room, seq: None)
    replies: list[int | None] = []

    writer.advance("bob", "lobby", 6, lambda stored, error: replies.append(stored))
    await wait_until(lambda: bool(replies))

    assert replies == [12]
    assert writer.stored[("bob", "lobby")] == 12
