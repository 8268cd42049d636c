"""SQLite-specific behaviour of the store: group commit, file settings, URLs and broken files."""

from __future__ import annotations

import asyncio
import errno
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from parley.protocol.model import AppendResult, Message
from parley.storage import SqliteStore, StoreError, open_store, sqlite_path
from parley.storage.sqlite import SCHEMA_VERSION, _Kind, _Write, merge_marker_updates


@contextmanager
def held_write_lock(path: Path) -> Iterator[None]:
    """Hold the database's write lock from another connection, so the store's writer waits for it."""
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("BEGIN IMMEDIATE")
        yield
        connection.execute("ROLLBACK")
    finally:
        connection.close()


async def test_failing_write_shares_transaction(tmp_path: Path) -> None:
    path = tmp_path / "parley.db"
    store = SqliteStore(path)
    calls: list[list[Message]] = []

    def record(messages: Sequence[Message]) -> None:
        calls.append(list(messages))

    store.set_commit_listener(record)
    await store.open()
    bodies = [f"text {index}" for index in range(100)]
    bodies[50] = "\ud800"

    # While the lock is held the writer can take at most one batch, so the 100 appends are queued
    # before it commits, and they land in at most two transactions.
    with held_write_lock(path):
        tasks = [
            asyncio.ensure_future(store.append("lobby", "alice", f"m{index}", body, None, 1000))
            for index, body in enumerate(bodies)
        ]
        await asyncio.sleep(0)
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    await store.close()

    assert len(calls) <= 2
    assert isinstance(outcomes[50], StoreError)
    seqs = [outcome.message.seq for outcome in outcomes if isinstance(outcome, AppendResult)]
    assert seqs == list(range(1, 100))
    assert [message.seq for call in calls for message in call] == list(range(1, 100))


async def wait_for_queued(store: SqliteStore, count: int) -> None:
    """Wait until the store's queue contains `count` writes, for tests that control batch contents."""
    for _ in range(10_000):
        if store._queue.qsize() == count:
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"the writer queue never reached {count} items")


async def test_close_commits_writes_queued_with_stop(tmp_path: Path) -> None:
    path = tmp_path / "parley.db"
    store = SqliteStore(path)
    await store.open()

    # The writer takes the first append and waits for the lock, so the other appends and the stop
    # signal from close() are queued together and taken in one drain.
    with held_write_lock(path):
        first = asyncio.ensure_future(store.append("lobby", "alice", "first", "x", None, 1000))
        await asyncio.sleep(0)
        await wait_for_queued(store, 0)
        tasks = [
            asyncio.ensure_future(store.append("lobby", "alice", f"m{index}", "x", None, 1000))
            for index in range(300)
        ]
        await asyncio.sleep(0)
        closing = asyncio.create_task(store.close())
        await wait_for_queued(store, 301)

    async with asyncio.timeout(60):
        await closing
        results = await asyncio.gather(first, *tasks)

    assert [result.message.seq for result in results] == list(range(1, 302))
    assert not path.with_name(path.name + "-wal").exists()


async def test_commit_listener_error_still_confirms(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "parley.db")

    def broken(messages: Sequence[Message]) -> None:
        raise RuntimeError("listener bug")

    store.set_commit_listener(broken)
    await store.open()
    try:
        result = await store.append("lobby", "alice", "m1", "hello", None, 1000)
    finally:
        await store.close()

    assert result.message.seq == 1


async def test_file_uses_wal_and_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "parley.db"
    store = SqliteStore(path)
    await store.open()
    await store.append("lobby", "alice", "m1", "hello", None, 1000)

    connection = sqlite3.connect(path)
    try:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        connection.close()
        await store.close()


async def test_open_rejects_non_database(tmp_path: Path) -> None:
    path = tmp_path / "parley.db"
    path.write_bytes(b"this is not an SQLite database, just some bytes" * 100)
    store = SqliteStore(path)

    with pytest.raises(StoreError, match="failed to open"):
        await store.open()
    await store.close()


async def test_open_rejects_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "parley.db"
    connection = sqlite3.connect(path)
    connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    connection.close()

    with pytest.raises(StoreError, match="newer"):
        await SqliteStore(path).open()


async def test_open_twice_raises(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "parley.db")
    await store.open()
    try:
        with pytest.raises(StoreError, match="already opened"):
            await store.open()
    finally:
        await store.close()


async def test_merge_marker_updates_keeps_highest() -> None:
    loop = asyncio.get_running_loop()

    def write(kind: _Kind, *args: object) -> _Write:
        return _Write(kind, args, loop.create_future())

    cursor_first = write(_Kind.ADVANCE_CURSOR, "alice", "lobby", 9)
    read = write(_Kind.ADVANCE_READ, "alice", "lobby", 4)
    cursor_last = write(_Kind.ADVANCE_CURSOR, "alice", "lobby", 3)
    other_user = write(_Kind.ADVANCE_CURSOR, "bob", "lobby", 2)
    separated = write(_Kind.ADVANCE_CURSOR, "carol", "lobby", 5)
    leave = write(_Kind.LEAVE, "carol", "lobby")
    separated_after = write(_Kind.ADVANCE_CURSOR, "carol", "lobby", 6)
    writes = [cursor_first, read, cursor_last, other_user, separated, leave, separated_after]

    runnable = merge_marker_updates(writes)

    assert runnable == [read, cursor_last, other_user, separated, leave, separated_after]
    assert cursor_first.leader is cursor_last
    assert cursor_last.args == ("alice", "lobby", 9)
    assert separated.leader is None
    assert separated_after.leader is None


def test_sqlite_path_forms() -> None:
    data_dir = Path("/var/lib/parley")

    assert sqlite_path("", data_dir) == data_dir / "parley.db"
    assert sqlite_path("sqlite://", data_dir) == data_dir / "parley.db"
    assert sqlite_path("sqlite:", data_dir) == data_dir / "parley.db"
    assert sqlite_path("sqlite:///srv/chat.db", data_dir) == Path("/srv/chat.db")
    assert sqlite_path("sqlite:////srv/chat.db", data_dir) == Path("/srv/chat.db")
    assert sqlite_path("sqlite:sub/chat%20room.db", data_dir) == data_dir / "sub" / "chat room.db"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql://127.0.0.1/test", "unsupported store URL"),
        ("sqlite://host/chat.db", "names host"),
        ("sqlite:///chat.db?mode=ro", "query"),
    ],
)
def test_sqlite_path_rejects(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sqlite_path(url, Path("/data"))


async def test_open_store_default_file(tmp_path: Path) -> None:
    store = open_store("", tmp_path / "data")
    await store.open()
    try:
        await store.join("alice", "lobby")
    finally:
        await store.close()

    assert (tmp_path / "data" / "parley.db").is_file()


PROC_FD = Path("/proc/self/fd")

needs_proc_fd = pytest.mark.skipif(not PROC_FD.is_dir(), reason="needs /proc/self/fd (Linux)")


def open_files(path: Path) -> list[str]:
    """Return the names of this process's open files that are `path` or its -wal and -shm files."""
    names = []
    for fd in os.listdir(PROC_FD):
        try:
            target = Path(os.readlink(PROC_FD / fd))
        except OSError:
            continue
        if target.parent == path.parent.resolve() and target.name.startswith(path.name):
            names.append(target.name)
    return sorted(names)


@contextmanager
def file_descriptors_exhausted() -> Iterator[None]:
    """Lower the open file limit to the highest fd in use and fill every free fd below it."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    highest = max(int(fd) for fd in os.listdir(PROC_FD))
    fillers: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1, hard))
    try:
        while True:
            try:
                fillers.append(os.open(os.devnull, os.O_RDONLY))
            except OSError as exc:
                assert exc.errno == errno.EMFILE
                break
        yield
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@needs_proc_fd
async def test_open_opens_reader_connections(tmp_path: Path) -> None:
    path = tmp_path / "parley.db"
    store = SqliteStore(path, reader_threads=3)
    await store.open()
    try:
        # The writer and each of the 3 readers keep the database and the WAL open. All connections of
        # the process share one -shm file descriptor.
        opened = open_files(path)
        assert opened.count("parley.db") == 4
        assert opened.count("parley.db-wal") == 4

        await store.append("lobby", "alice", "m1", "hello", None, 1000)
        reads = await asyncio.gather(*(store.read_after("lobby", 0, 10) for _ in range(12)))

        assert all([message.body for message in read] == ["hello"] for read in reads)
        assert open_files(path) == opened
    finally:
        await store.close()

    assert open_files(path) == []


@needs_proc_fd
async def test_reads_work_at_file_descriptor_limit(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "parley.db", reader_threads=3)
    await store.open()
    try:
        await store.append("lobby", "alice", "m1", "hello", None, 1000)

        with file_descriptors_exhausted():
            reads = await asyncio.gather(*(store.read_after("lobby", 0, 10) for _ in range(12)))
            info = await store.room_info("lobby")
    finally:
        await store.close()

    assert all([message.seq for message in read] == [1] for read in reads)
    assert info is not None
    assert info.head == 1


@needs_proc_fd
async def test_open_fails_on_reader_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "parley.db"
    connect = sqlite3.connect
    reader_connects = 0
    lock = threading.Lock()

    def fail_second_reader(database: Any, *args: Any, **kwargs: Any) -> sqlite3.Connection:
        nonlocal reader_connects
        if kwargs.get("uri"):
            with lock:
                reader_connects += 1
                if reader_connects == 2:
                    raise sqlite3.OperationalError("unable to open database file")
        return connect(database, *args, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", fail_second_reader)
    store = SqliteStore(path, reader_threads=3)

    with pytest.raises(StoreError, match=r"failed to open reader connections.*unable to open database file"):
        await store.open()

    assert reader_connects >= 2
    assert store._writer is not None
    assert not store._writer.is_alive()
    assert not [thread for thread in threading.enumerate() if thread.name.startswith("parley-sqlite")]
    assert open_files(path) == []
    with pytest.raises(StoreError, match="not open yet"):
        await store.room_info("lobby")
    await store.close()
