"""The durable store contract (see parley.storage.base), run against every backend.

A backend is a factory that returns a new, unopened store over the same data on each call, so a test
can close a store and reopen its data. Only SQLite exists so far; PostgreSQL will join the `backend`
fixture's parameters and run this same suite.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from parley.protocol.model import AppendResult, Message, RoomInfo
from parley.storage import NotMemberError, SqliteStore, Store, StoreError

StoreFactory = Callable[[], Store]

BAD_BODY = "\ud800"
"""A lone surrogate: no backend can encode it, so an append with it fails inside the store."""


def sqlite_backend(tmp_path: Path) -> StoreFactory:
    path = tmp_path / "store" / "parley.db"
    return lambda: SqliteStore(path)


BACKENDS = {"sqlite": sqlite_backend}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    factory: StoreFactory = BACKENDS[request.param](tmp_path)
    return factory


@pytest.fixture
async def store(backend: StoreFactory) -> AsyncIterator[Store]:
    store = backend()
    await store.open()
    yield store
    await store.close()


class Recorder:
    """A commit listener that keeps every call's messages."""

    def __init__(self) -> None:
        self.calls: list[list[Message]] = []

    def __call__(self, messages: Sequence[Message]) -> None:
        self.calls.append(list(messages))

    @property
    def messages(self) -> list[Message]:
        return [message for call in self.calls for message in call]

    def seqs(self, room: str) -> list[int]:
        return [message.seq for message in self.messages if message.room == room]


async def append(store: Store, room: str, id: str, body: str = "hello", **fields: Any) -> AppendResult:
    sender = fields.get("sender", "alice")
    meta = fields.get("meta")
    ts = fields.get("ts", 1_765_000_000_000)
    return await store.append(room, sender, id, body, meta, ts)


async def fill(store: Store, room: str, count: int) -> None:
    for index in range(count):
        await append(store, room, f"fill-{index}", f"message {index + 1}")


# Sequence numbers


async def test_concurrent_appenders_one_room_gap_free(store: Store) -> None:
    async def appender(sender: str) -> list[int]:
        results = [await append(store, "lobby", f"m{index}", sender=sender) for index in range(20)]
        return [result.message.seq for result in results]

    per_sender = await asyncio.gather(*(appender(f"user{number}") for number in range(50)))

    all_seqs = sorted(seq for seqs in per_sender for seq in seqs)
    assert all_seqs == list(range(1, 1001))
    for seqs in per_sender:
        assert seqs == sorted(seqs)
    info = await store.room_info("lobby")
    assert info is not None
    assert info.head == 1000
    stored = await store.read_after("lobby", 0, 2000)
    assert [message.seq for message in stored] == list(range(1, 1001))


async def test_concurrent_appenders_many_rooms_gap_free(store: Store) -> None:
    rooms = [f"room{number}" for number in range(5)]

    async def appender(number: int) -> list[AppendResult]:
        room = rooms[number % len(rooms)]
        return [await append(store, room, f"m{index}", sender=f"user{number}") for index in range(10)]

    per_appender = await asyncio.gather(*(appender(number) for number in range(50)))

    for room in rooms:
        seqs = sorted(
            result.message.seq
            for results in per_appender
            for result in results
            if result.message.room == room
        )
        assert seqs == list(range(1, 101))
        info = await store.room_info(room)
        assert info is not None
        assert info.head == 100


async def test_append_seq_follows_submission_order(store: Store) -> None:
    results = await asyncio.gather(*(append(store, "lobby", f"m{index}") for index in range(200)))

    assert [result.message.seq for result in results] == list(range(1, 201))
    stored = await store.read_after("lobby", 0, 500)
    assert [message.id for message in stored] == [f"m{index}" for index in range(200)]


async def test_append_creates_missing_room(store: Store) -> None:
    assert await store.room_info("new-room") is None

    result = await append(store, "new-room", "m1")

    assert result.message.seq == 1
    info = await store.room_info("new-room")
    assert info is not None
    assert info.head == 1
    assert info.epoch


# Idempotence


async def test_append_same_id_twice_is_dup(store: Store) -> None:
    first = await store.append("lobby", "alice", "c1", "hello", {"reply_to": 4}, 1000)
    second = await store.append("lobby", "alice", "c1", "hello", {"reply_to": 4}, 2000)

    assert not first.dup
    assert second.dup
    assert not second.conflict
    assert second.message == first.message
    assert second.message.ts == 1000
    info = await store.room_info("lobby")
    assert info is not None
    assert info.head == 1


async def test_append_same_id_concurrently_stores_once(backend: StoreFactory) -> None:
    store = backend()
    recorder = Recorder()
    store.set_commit_listener(recorder)
    await store.open()
    try:
        results = await asyncio.gather(*(append(store, "lobby", "c1") for _ in range(20)))
        stored = await store.read_after("lobby", 0, 10)
    finally:
        await store.close()

    assert sum(not result.dup for result in results) == 1
    assert {result.message.seq for result in results} == {1}
    assert not any(result.conflict for result in results)
    assert len(stored) == 1
    assert len(recorder.messages) == 1


async def test_append_dup_compares_meta_as_json(store: Store) -> None:
    await store.append("lobby", "alice", "c1", "x", {"a": 1, "b": [1, {"c": None}]}, 1000)
    await store.append("lobby", "alice", "c2", "x", {"flag": True}, 1000)
    await store.append("lobby", "alice", "c3", "x", None, 1000)
    await store.append("lobby", "alice", "c4", "x", {"n": 1}, 1000)

    reordered = await store.append("lobby", "alice", "c1", "x", {"b": [1, {"c": None}], "a": 1}, 1000)
    bool_as_number = await store.append("lobby", "alice", "c2", "x", {"flag": 1}, 1000)
    empty_for_none = await store.append("lobby", "alice", "c3", "x", {}, 1000)
    float_for_int = await store.append("lobby", "alice", "c4", "x", {"n": 1.0}, 1000)

    assert reordered.dup
    assert bool_as_number.conflict
    assert empty_for_none.conflict
    assert float_for_int.dup


async def test_append_id_conflict_stores_nothing(backend: StoreFactory) -> None:
    store = backend()
    recorder = Recorder()
    store.set_commit_listener(recorder)
    await store.open()
    try:
        original = await append(store, "lobby", "c1", "first text")
        conflict = await append(store, "lobby", "c1", "other text")
        following = await append(store, "lobby", "c2", "next")
        stored = await store.read_after("lobby", 0, 10)
    finally:
        await store.close()

    assert conflict.conflict
    assert not conflict.dup
    assert conflict.message == original.message
    assert following.message.seq == 2
    assert [message.body for message in stored] == ["first text", "next"]
    assert [message.seq for message in recorder.messages] == [1, 2]


async def test_append_id_per_sender_and_room(store: Store) -> None:
    first = await append(store, "lobby", "c1", sender="alice")
    other_sender = await append(store, "lobby", "c1", sender="bob")
    other_room = await append(store, "kitchen", "c1", sender="alice")

    assert not other_sender.dup
    assert other_sender.message.seq == first.message.seq + 1
    assert not other_room.dup
    assert other_room.message.seq == 1


# Failures


async def test_failing_append_fails_alone(store: Store) -> None:
    bodies = [f"text {index}" for index in range(101)]
    bodies[50] = BAD_BODY

    outcomes = await asyncio.gather(
        *(append(store, "lobby", f"m{index}", body) for index, body in enumerate(bodies)),
        return_exceptions=True,
    )

    failed = outcomes.pop(50)
    assert isinstance(failed, StoreError)
    assert all(isinstance(outcome, AppendResult) for outcome in outcomes)
    seqs = [outcome.message.seq for outcome in outcomes if isinstance(outcome, AppendResult)]
    assert seqs == list(range(1, 101))

    later = await append(store, "lobby", "after-failure")
    assert later.message.seq == 101
    stored = await store.read_after("lobby", 0, 200)
    assert len(stored) == 101


async def test_failing_append_leaves_no_room(store: Store) -> None:
    with pytest.raises(StoreError):
        await append(store, "fresh-room", "m1", BAD_BODY)

    assert await store.room_info("fresh-room") is None


# Cursors and read markers


async def test_cursor_never_moves_back(store: Store) -> None:
    await fill(store, "lobby", 200)
    await store.join("alice", "lobby")
    values = list(range(1, 201))
    random.Random(7).shuffle(values)

    results = await asyncio.gather(*(store.advance_cursor("alice", "lobby", value) for value in values))

    for value, result in zip(values, results, strict=True):
        assert result >= value
    assert results == sorted(results)
    assert results[-1] == 200
    assert await store.advance_cursor("alice", "lobby", 50) == 200
    [membership] = await store.memberships("alice")
    assert membership.cursor == 200


async def test_advance_cursors_in_one_write(store: Store) -> None:
    await fill(store, "lobby", 10)
    await fill(store, "den", 3)
    for user in ("alice", "bob"):
        await store.join(user, "lobby")
    await store.join("alice", "den")
    await store.advance_cursor("bob", "lobby", 8)

    await store.advance_cursors(
        [("alice", "lobby", 6), ("bob", "lobby", 4), ("alice", "den", 99), ("carol", "lobby", 5)]
    )

    cursors = {(m.user, m.room): m.cursor for m in await store.members("lobby") + await store.members("den")}
    assert cursors == {("alice", "lobby"): 6, ("bob", "lobby"): 8, ("alice", "den"): 3}


async def test_cursor_capped_at_head(store: Store) -> None:
    await fill(store, "lobby", 5)
    await store.join("alice", "lobby")

    assert await store.advance_cursor("alice", "lobby", 1000) == 5
    assert await store.advance_read("alice", "lobby", 1000) == 5


async def test_set_cursor_if_unset(store: Store) -> None:
    await fill(store, "lobby", 10)
    _, membership, _ = await store.join("alice", "lobby")
    assert membership.cursor is None

    assert await store.set_cursor_if_unset("alice", "lobby", 5) == 5
    assert await store.set_cursor_if_unset("alice", "lobby", 3) == 5
    assert await store.set_cursor_if_unset("alice", "lobby", 9) == 5
    assert await store.advance_cursor("alice", "lobby", 7) == 7
    assert await store.set_cursor_if_unset("alice", "lobby", 9) == 7


async def test_set_cursor_if_unset_capped_at_head(store: Store) -> None:
    await fill(store, "lobby", 4)
    await store.join("alice", "lobby")

    assert await store.set_cursor_if_unset("alice", "lobby", 40) == 4


async def test_read_marker_moves_forward_only(store: Store) -> None:
    await fill(store, "lobby", 10)
    await store.join("alice", "lobby")

    assert await store.advance_read("alice", "lobby", 6) == 6
    assert await store.advance_read("alice", "lobby", 2) == 6
    assert await store.advance_cursor("alice", "lobby", 8) == 8
    [membership] = await store.members("lobby")
    assert membership.read == 6
    assert membership.cursor == 8


async def test_marker_updates_need_membership(store: Store) -> None:
    await fill(store, "lobby", 3)

    with pytest.raises(NotMemberError):
        await store.advance_cursor("mallory", "lobby", 1)
    with pytest.raises(NotMemberError):
        await store.advance_read("mallory", "lobby", 1)
    with pytest.raises(NotMemberError):
        await store.set_cursor_if_unset("mallory", "lobby", 1)
    with pytest.raises(NotMemberError):
        await store.advance_cursor("mallory", "no-such-room", 1)


async def test_cursor_update_then_leave_keeps_order(store: Store) -> None:
    await fill(store, "lobby", 10)
    await store.join("alice", "lobby")

    before, left, after = await asyncio.gather(
        store.advance_cursor("alice", "lobby", 5),
        store.leave("alice", "lobby"),
        store.advance_cursor("alice", "lobby", 7),
        return_exceptions=True,
    )

    assert before == 5
    assert left is True
    assert isinstance(after, NotMemberError)


# Membership


async def test_join_creates_room_and_membership(store: Store) -> None:
    info, membership, was_member = await store.join("alice", "lobby")

    assert not was_member
    assert info.room == "lobby"
    assert info.head == 0
    assert info.epoch
    assert membership.user == "alice"
    assert membership.room == "lobby"
    assert membership.cursor is None
    assert membership.read == 0
    assert await store.room_info("lobby") == info


async def test_join_again_reports_member(store: Store) -> None:
    first, _, _ = await store.join("alice", "lobby")
    await fill(store, "lobby", 3)
    await store.advance_cursor("alice", "lobby", 2)

    info, membership, was_member = await store.join("alice", "lobby")

    assert was_member
    assert info.epoch == first.epoch
    assert info.head == 3
    assert membership.cursor == 2


async def test_join_concurrently_creates_once(store: Store) -> None:
    results = await asyncio.gather(*(store.join("alice", "lobby") for _ in range(10)))

    assert sum(not was_member for _, _, was_member in results) == 1
    assert len({info.epoch for info, _, _ in results}) == 1


async def test_rooms_get_distinct_epochs(store: Store) -> None:
    lobby, _, _ = await store.join("alice", "lobby")
    kitchen, _, _ = await store.join("alice", "kitchen")

    assert lobby.epoch != kitchen.epoch


async def test_leave_and_membership_queries(store: Store) -> None:
    await store.join("alice", "lobby")
    await store.join("alice", "kitchen")
    await store.join("bob", "lobby")

    assert await store.is_member("alice", "lobby")
    assert not await store.is_member("carol", "lobby")
    assert [m.room for m in await store.memberships("alice")] == ["kitchen", "lobby"]
    assert [m.user for m in await store.members("lobby")] == ["alice", "bob"]

    assert await store.leave("alice", "lobby")
    assert not await store.leave("alice", "lobby")
    assert not await store.is_member("alice", "lobby")
    assert [m.room for m in await store.memberships("alice")] == ["kitchen"]
    assert [m.user for m in await store.members("lobby")] == ["bob"]
    assert await store.room_info("lobby") is not None


async def test_rejoin_after_leave_starts_unset(store: Store) -> None:
    await fill(store, "lobby", 5)
    await store.join("alice", "lobby")
    await store.advance_cursor("alice", "lobby", 4)
    await store.leave("alice", "lobby")

    _, membership, was_member = await store.join("alice", "lobby")

    assert not was_member
    assert membership.cursor is None


async def test_room_info_missing_room(store: Store) -> None:
    assert await store.room_info("nowhere") is None
    assert await store.members("nowhere") == []
    assert await store.read_after("nowhere", 0, 10) == []


# Reads


async def test_read_after_pages_in_order(store: Store) -> None:
    await fill(store, "lobby", 25)

    pages = []
    after = 0
    while page := await store.read_after("lobby", after, 10):
        pages.append([message.seq for message in page])
        after = page[-1].seq

    assert pages == [list(range(1, 11)), list(range(11, 21)), list(range(21, 26))]
    assert await store.read_after("lobby", 25, 10) == []
    assert await store.read_after("lobby", 3, 0) == []


async def test_read_before_pages_in_order(store: Store) -> None:
    await fill(store, "lobby", 25)

    pages = []
    before = 26
    while page := await store.read_before("lobby", before, 10):
        pages.append([message.seq for message in page])
        before = page[0].seq

    assert pages == [list(range(16, 26)), list(range(6, 16)), list(range(1, 6))]
    assert await store.read_before("lobby", 1, 10) == []
    assert [m.seq for m in await store.read_before("lobby", 1000, 3)] == [23, 24, 25]


async def test_read_returns_stored_fields(store: Store) -> None:
    meta = {"reply_to": 40, "tags": ["a", "ü"], "nested": {"x": None, "y": 1.5, "z": True}}
    await store.append("lobby", "alice", "c1", 'héllo 👋 \n"quoted"', meta, 1_765_000_000_123)
    await store.append("lobby", "bob", "c2", "", None, 1_765_000_000_456)

    first, second = await store.read_after("lobby", 0, 10)

    assert first == Message("lobby", 1, "c1", "alice", 1_765_000_000_123, 'héllo 👋 \n"quoted"', meta)
    assert second == Message("lobby", 2, "c2", "bob", 1_765_000_000_456, "", None)
    assert await store.read_before("lobby", 3, 10) == [first, second]


async def test_reads_keep_rooms_apart(store: Store) -> None:
    await fill(store, "lobby", 3)
    await fill(store, "kitchen", 2)

    assert {m.room for m in await store.read_after("lobby", 0, 10)} == {"lobby"}
    assert len(await store.read_after("kitchen", 0, 10)) == 2


# Commit listener


async def test_listener_sees_each_message_once_in_order(backend: StoreFactory) -> None:
    store = backend()
    recorder = Recorder()
    store.set_commit_listener(recorder)
    await store.open()
    seen_before_return: list[bool] = []

    async def appender(number: int) -> None:
        room = f"room{number % 3}"
        for index in range(10):
            result = await append(store, room, f"m{index}", sender=f"user{number}")
            seen_before_return.append(result.message in recorder.messages)
            await append(store, room, f"m{index}", sender=f"user{number}")

    try:
        await asyncio.gather(*(appender(number) for number in range(30)))
    finally:
        await store.close()

    assert all(seen_before_return)
    assert len(seen_before_return) == 300
    assert len(recorder.messages) == 300
    for room in ("room0", "room1", "room2"):
        assert recorder.seqs(room) == list(range(1, 101))


# Lifecycle


async def test_data_survives_reopen(backend: StoreFactory) -> None:
    store = backend()
    await store.open()
    joined, _, _ = await store.join("alice", "lobby")
    await store.append("lobby", "alice", "c1", "kept", {"k": 1}, 1000)
    await store.advance_cursor("alice", "lobby", 1)
    await store.close()

    reopened = backend()
    await reopened.open()
    try:
        info = await reopened.room_info("lobby")
        stored = await reopened.read_after("lobby", 0, 10)
        memberships = await reopened.memberships("alice")
        dup = await reopened.append("lobby", "alice", "c1", "kept", {"k": 1}, 2000)
        following = await reopened.append("lobby", "alice", "c2", "next", None, 2000)
    finally:
        await reopened.close()

    assert info == RoomInfo("lobby", joined.epoch, 1)
    assert [(m.seq, m.body, m.meta) for m in stored] == [(1, "kept", {"k": 1})]
    assert [(m.room, m.cursor) for m in memberships] == [("lobby", 1)]
    assert dup.dup
    assert following.message.seq == 2


async def test_close_finishes_queued_appends(backend: StoreFactory) -> None:
    store = backend()
    await store.open()
    tasks = [asyncio.create_task(append(store, "lobby", f"m{index}")) for index in range(300)]
    await asyncio.sleep(0)

    # The bound turns a writer that drops queued writes into a failure instead of a hang.
    async with asyncio.timeout(60):
        await store.close()
        results = await asyncio.gather(*tasks)

    assert [result.message.seq for result in results] == list(range(1, 301))
    reopened = backend()
    await reopened.open()
    try:
        info = await reopened.room_info("lobby")
        assert info is not None
        assert info.head == 300
        assert len(await reopened.read_after("lobby", 0, 1000)) == 300
    finally:
        await reopened.close()


async def test_operations_after_close_raise(backend: StoreFactory) -> None:
    store = backend()
    await store.open()
    await store.close()

    with pytest.raises(StoreError, match="closed"):
        await append(store, "lobby", "m1")
    with pytest.raises(StoreError, match="closed"):
        await store.join("alice", "lobby")
    with pytest.raises(StoreError, match="closed"):
        await store.read_after("lobby", 0, 10)
    await store.close()


async def test_statistics_count_writes(store: Store) -> None:
    await asyncio.gather(*(append(store, "lobby", f"m{index}") for index in range(40)))
    with pytest.raises(StoreError):
        await append(store, "lobby", "bad", BAD_BODY)

    stats = store.statistics()

    assert stats.operations == 41
    assert stats.failed_operations == 1
    assert 1 <= stats.commits <= 41
    assert 1 <= stats.largest_batch <= 40
