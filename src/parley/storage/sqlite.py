"""The SQLite store: one writer thread with group commit, and a pool of reader threads.

Theory of operation:

- Writes (append, join, leave and the cursor and read marker updates) go from the event loop to one
  writer thread through a queue. The writer owns the only write connection. It takes everything
  queued, up to `MAX_BATCH` writes, and runs it in one transaction, each write inside its own
  SAVEPOINT so that a failing write is rolled back alone. After the COMMIT it schedules one callback
  on the loop, which calls the commit listener with the batch's new messages and then resolves the
  callers' futures in submission order.
- A room's head is read at most once per batch, advanced in memory as messages are inserted and
  written back just before the COMMIT, so an append runs one INSERT besides its SAVEPOINT.
- Reads run on a small thread pool, each thread with its own read-only connection. `open()` opens
  them all, so reads do not open the database files later, when the process may be at its file
  descriptor limit. In WAL mode a statement reads the last commit made before it began and never
  blocks the writer. A room's head and its messages are committed together, so `room_info` never
  returns a head that `read_after` cannot see.
- Durability: the writer runs with `synchronous=FULL`, which in WAL mode syncs the WAL at every
  commit, so a message confirmed with `sent` survives a power loss. With NORMAL, the last commits
  before a power loss (not a process crash) may roll back.

A store serves the event loop that opened it: call its methods from that loop only. Cancelling an
await does not withdraw a write that is already queued.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import queue
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final, TypeVar

import orjson

from parley.protocol.model import AppendResult, Membership, Message, RoomInfo
from parley.storage.base import CommitListener, NotMemberError, StoreError, StoreStats
from parley.storage.jsonvalue import json_equal

logger = logging.getLogger("parley.storage")

T = TypeVar("T")

MAX_BATCH: Final = 512
"""Maximum number of writes in one transaction."""

READER_THREADS: Final = 3
BUSY_TIMEOUT_MS: Final = 5000
"""How long a connection waits for a lock held by another process before failing with SQLITE_BUSY."""

SCHEMA_VERSION: Final = 1

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS rooms (
    name TEXT PRIMARY KEY,
    epoch TEXT NOT NULL,
    head INTEGER NOT NULL DEFAULT 0,
    created INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS messages (
    room TEXT NOT NULL,
    seq INTEGER NOT NULL,
    id TEXT NOT NULL,
    sender TEXT NOT NULL,
    ts INTEGER NOT NULL,
    body TEXT NOT NULL,
    meta TEXT,
    PRIMARY KEY (room, seq),
    UNIQUE (room, sender, id)
);

CREATE TABLE IF NOT EXISTS memberships (
    user TEXT NOT NULL,
    room TEXT NOT NULL,
    cursor INTEGER,
    read_marker INTEGER NOT NULL DEFAULT 0,
    joined INTEGER NOT NULL,
    PRIMARY KEY (user, room)
) WITHOUT ROWID;

CREATE INDEX IF NOT EXISTS memberships_by_room ON memberships (room, user);
"""

# Python's sqlite3 keeps a cache of prepared statements keyed by SQL text (the `cached_statements`
# argument of sqlite3.connect), so each constant below is prepared once per connection and reused.
SELECT_ROOM_HEAD: Final = "SELECT head FROM rooms WHERE name = ?"
SELECT_ROOM: Final = "SELECT epoch, head FROM rooms WHERE name = ?"
SELECT_EPOCH: Final = "SELECT epoch FROM rooms WHERE name = ?"
INSERT_ROOM: Final = "INSERT INTO rooms (name, epoch, head, created) VALUES (?, ?, 0, ?)"
UPDATE_ROOM_HEAD: Final = "UPDATE rooms SET head = ? WHERE name = ?"
INSERT_MESSAGE: Final = (
    "INSERT INTO messages (room, seq, id, sender, ts, body, meta) VALUES (?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (room, sender, id) DO NOTHING"
)
SELECT_MESSAGE_BY_ID: Final = (
    "SELECT seq, ts, body, meta FROM messages WHERE room = ? AND sender = ? AND id = ?"
)
SELECT_AFTER: Final = (
    "SELECT seq, id, sender, ts, body, meta FROM messages WHERE room = ? AND seq > ? ORDER BY seq LIMIT ?"
)
SELECT_BEFORE: Final = (
    "SELECT seq, id, sender, ts, body, meta FROM messages WHERE room = ? AND seq < ?"
    " ORDER BY seq DESC LIMIT ?"
)
INSERT_MEMBERSHIP: Final = (
    "INSERT INTO memberships (user, room, cursor, read_marker, joined) VALUES (?, ?, NULL, 0, ?)"
    " ON CONFLICT (user, room) DO NOTHING"
)
DELETE_MEMBERSHIP: Final = "DELETE FROM memberships WHERE user = ? AND room = ?"
SELECT_MEMBERSHIP: Final = "SELECT cursor, read_marker FROM memberships WHERE user = ? AND room = ?"
SELECT_IS_MEMBER: Final = "SELECT 1 FROM memberships WHERE user = ? AND room = ?"
SELECT_MEMBERSHIPS_OF_USER: Final = (
    "SELECT room, cursor, read_marker FROM memberships WHERE user = ? ORDER BY room"
)
SELECT_MEMBERS_OF_ROOM: Final = (
    "SELECT user, cursor, read_marker FROM memberships WHERE room = ? ORDER BY user"
)
ADVANCE_CURSOR: Final = (
    "UPDATE memberships SET cursor = ?1 WHERE user = ?2 AND room = ?3 AND (cursor IS NULL OR cursor < ?1)"
)
SET_CURSOR_IF_UNSET: Final = (
    "UPDATE memberships SET cursor = ?1 WHERE user = ?2 AND room = ?3 AND cursor IS NULL"
)
ADVANCE_READ: Final = (
    "UPDATE memberships SET read_marker = ?1 WHERE user = ?2 AND room = ?3 AND read_marker < ?1"
)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def message_from_row(room: str, row: tuple[Any, ...]) -> Message:
    seq, id, sender, ts, body, meta = row
    return Message(room, seq, id, sender, ts, body, None if meta is None else orjson.loads(meta))


class _Kind(enum.Enum):
    APPEND = "append"
    JOIN = "join"
    LEAVE = "leave"
    ADVANCE_CURSOR = "advance_cursor"
    ADVANCE_CURSORS = "advance_cursors"
    SET_CURSOR_IF_UNSET = "set_cursor_if_unset"
    ADVANCE_READ = "advance_read"


MERGEABLE_KINDS: Final = frozenset({_Kind.ADVANCE_CURSOR, _Kind.ADVANCE_READ})
MEMBERSHIP_KINDS: Final = frozenset({_Kind.JOIN, _Kind.LEAVE})


class _Write:
    """One queued write: what to run, the caller's future, and its outcome once the batch is done.

    `leader` is set when the write was merged into another one, whose outcome it then shares.
    """

    __slots__ = ("args", "error", "future", "kind", "leader", "result")

    def __init__(self, kind: _Kind, args: tuple[Any, ...], future: asyncio.Future[Any]) -> None:
        self.kind = kind
        self.args = args
        self.future = future
        self.result: Any = None
        self.error: BaseException | None = None
        self.leader: _Write | None = None

    def describe(self) -> str:
        """Return the write's kind and ids, for log lines and error messages."""
        if self.kind is _Kind.APPEND:
            room, sender, id = self.args[:3]
            return f"append room={room} sender={sender} id={id}"
        if self.kind is _Kind.ADVANCE_CURSORS:
            return f"advance_cursors count={len(self.args[0])}"
        user, room = self.args[:2]
        if self.kind in MEMBERSHIP_KINDS:
            return f"{self.kind.value} user={user} room={room}"
        return f"{self.kind.value} user={user} room={room} seq={self.args[2]}"


_STOP: Final = object()
"""Queued by `close()` after the last write: the writer finishes what precedes it and exits."""


def merge_marker_updates(writes: list[_Write]) -> list[_Write]:
    """Merge the cursor and read marker updates of each (kind, user, room) in a batch; return what to run.

    The merged write carries the largest seq and keeps the place of the group's last write, and the
    others share its result. Updates for a (user, room) that also joins or leaves in the same batch are
    left apart, because their order against the membership change matters.
    """
    groups: dict[tuple[_Kind, str, str], list[_Write]] = {}
    membership_changes: set[tuple[str, str]] = set()
    for write in writes:
        if write.kind in MERGEABLE_KINDS:
            groups.setdefault((write.kind, write.args[0], write.args[1]), []).append(write)
        elif write.kind in MEMBERSHIP_KINDS:
            membership_changes.add((write.args[0], write.args[1]))

    merged = False
    for (_, user, room), group in groups.items():
        if len(group) < 2 or (user, room) in membership_changes:
            continue
        leader = group[-1]
        leader.args = (user, room, max(write.args[2] for write in group))
        for write in group[:-1]:
            write.leader = leader
        merged = True

    if not merged:
        return writes
    return [write for write in writes if write.leader is None]


class _Transaction:
    """The writer's state inside one transaction: the room heads seen so far and the new messages.

    A write's changes to this state are staged and kept only when its SAVEPOINT is released, so a
    write that is rolled back leaves no trace here either.
    """

    def __init__(self, cursor: sqlite3.Cursor) -> None:
        self.cursor = cursor
        self.heads: dict[str, int] = {}
        self.changed_heads: set[str] = set()
        self.messages: list[Message] = []
        self.staged_heads: dict[str, int] = {}
        self.staged_message: Message | None = None

    def head(self, room: str) -> int | None:
        """Return the room's head within this transaction, or None when the room does not exist."""
        head = self.staged_heads.get(room)
        if head is None:
            head = self.heads.get(room)
        if head is None:
            row = self.cursor.execute(SELECT_ROOM_HEAD, (room,)).fetchone()
            if row is None:
                return None
            head = self.heads[room] = row[0]
        return head

    def create_room(self, room: str) -> None:
        self.cursor.execute(INSERT_ROOM, (room, secrets.token_hex(8), now_ms()))
        self.staged_heads[room] = 0

    def stage_message(self, message: Message) -> None:
        self.staged_heads[message.room] = message.seq
        self.staged_message = message

    def keep_staged(self) -> None:
        if self.staged_heads:
            self.heads.update(self.staged_heads)
            self.changed_heads.update(self.staged_heads)
            self.staged_heads.clear()
        if self.staged_message is not None:
            self.messages.append(self.staged_message)
            self.staged_message = None

    def drop_staged(self) -> None:
        self.staged_heads.clear()
        self.staged_message = None

    def write_heads(self) -> None:
        if self.changed_heads:
            self.cursor.executemany(
                UPDATE_ROOM_HEAD, [(self.heads[room], room) for room in self.changed_heads]
            )


class _ReaderPool:
    """Threads that run reads, each on its own read-only connection.

    `open()` starts every thread and opens its connection up front, because near the file descriptor
    limit a later open fails with "unable to open database file".
    """

    def __init__(self, path: Path, size: int) -> None:
        self._uri = path.resolve().as_uri() + "?mode=ro"
        self._size = size
        self._executor = ThreadPoolExecutor(size, thread_name_prefix="parley-sqlite-reader")
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    async def open(self) -> None:
        """Start all reader threads and open each one's connection.

        Raises sqlite3.Error when a connection fails to open, or RuntimeError when a thread fails to
        start. The caller then closes the pool.
        """
        # Every task waits at the barrier until all of them run, so no thread can take a second task,
        # and the executor has to start `size` threads.
        barrier = threading.Barrier(self._size)
        loop = asyncio.get_running_loop()
        tasks: list[asyncio.Future[None]] = []
        try:
            for _ in range(self._size):
                tasks.append(loop.run_in_executor(self._executor, self._open_connection, barrier))
        except RuntimeError:
            barrier.abort()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        errors = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
        # A thread whose open failed broke the barrier, so the others fail with BrokenBarrierError.
        # The open error is the one to report.
        for error in errors:
            if not isinstance(error, threading.BrokenBarrierError):
                raise error
        if errors:
            raise errors[0]

    def _open_connection(self, barrier: threading.Barrier) -> None:
        try:
            # check_same_thread=False only so that close() can close it from another thread.
            connection = sqlite3.connect(self._uri, uri=True, isolation_level=None, check_same_thread=False)
        except BaseException:
            barrier.abort()
            raise
        with self._lock:
            self._connections.append(connection)
        try:
            connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            # With SQLite 3.40 the first read also opens the WAL file, so run one now rather than
            # during a request.
            connection.execute("PRAGMA schema_version").fetchone()
        except BaseException:
            barrier.abort()
            raise
        self._local.connection = connection
        barrier.wait()

    def _call(self, read: Callable[[sqlite3.Connection], T]) -> T:
        connection: sqlite3.Connection = self._local.connection
        return read(connection)

    async def run(self, read: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._call, read)

    def close(self) -> None:
        """Wait for running reads, then close every connection (blocking)."""
        self._executor.shutdown(wait=True)
        with self._lock:
            for connection in self._connections:
                connection.close()
            self._connections.clear()


class _State(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class SqliteStore:
    """The durable store in one SQLite file (WAL mode), written by one thread with group commit."""

    def __init__(self, path: Path, *, reader_threads: int = READER_THREADS) -> None:
        self.path = path
        self._reader_threads = reader_threads
        self._state = _State.NEW
        self._listener: CommitListener | None = None
        self._queue: queue.SimpleQueue[_Write | object] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writer: threading.Thread | None = None
        self._readers: _ReaderPool | None = None
        self._closed = asyncio.Event()

        # Written by the writer thread only.
        self._commits = 0
        self._operations = 0
        self._failed_operations = 0
        self._largest_batch = 0

    # Lifecycle

    def set_commit_listener(self, listener: CommitListener) -> None:
        self._listener = listener

    async def open(self) -> None:
        """Create the file and schema if needed, then start the writer and the readers.

        Raises StoreError when the file cannot be opened as a Parley database, or when a reader
        connection fails to open (then the writer is stopped again).
        """
        if self._state is not _State.NEW:
            raise StoreError(f"SQLite store {self.path} was already opened; create a new store instead")

        self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = self._loop.create_future()
        self._writer = threading.Thread(
            target=self._run_writer, args=(ready,), name="parley-sqlite-writer", daemon=True
        )
        self._writer.start()
        await ready

        readers = _ReaderPool(self.path, self._reader_threads)
        try:
            await readers.open()
        except (sqlite3.Error, RuntimeError) as exc:
            await asyncio.to_thread(readers.close)
            self._queue.put(_STOP)
            await asyncio.to_thread(self._writer.join)
            raise StoreError(
                f"failed to open reader connections to SQLite store {self.path}: {exc};"
                " check that the file is readable and that the open file limit (ulimit -n) is not exhausted"
            ) from exc

        self._readers = readers
        self._state = _State.OPEN
        logger.info("opened SQLite store %s with %d reader connections", self.path, self._reader_threads)

    async def close(self) -> None:
        """Stop accepting operations, commit every queued write, then close the connections and threads."""
        if self._state is _State.NEW:
            self._state = _State.CLOSED
            return
        if self._state is not _State.OPEN:
            await self._closed.wait()
            return

        self._state = _State.CLOSING
        assert self._readers is not None and self._writer is not None
        await asyncio.to_thread(self._readers.close)
        self._queue.put(_STOP)
        await asyncio.to_thread(self._writer.join)

        self._state = _State.CLOSED
        self._closed.set()
        logger.info("closed SQLite store %s (%s)", self.path, self.statistics())

    def statistics(self) -> StoreStats:
        return StoreStats(
            commits=self._commits,
            operations=self._operations,
            failed_operations=self._failed_operations,
            largest_batch=self._largest_batch,
        )

    # Writes

    # Writes return the writer's future itself rather than a coroutine, so a caller that does not await
    # at once (the server pipelining sends) queues the write in call order without creating a task.

    def append(
        self, room: str, sender: str, id: str, body: str, meta: dict[str, Any] | None, ts: int
    ) -> asyncio.Future[AppendResult]:
        return self._submit(_Kind.APPEND, (room, sender, id, body, meta, ts))

    def join(self, user: str, room: str) -> asyncio.Future[tuple[RoomInfo, Membership, bool]]:
        return self._submit(_Kind.JOIN, (user, room))

    def leave(self, user: str, room: str) -> asyncio.Future[bool]:
        return self._submit(_Kind.LEAVE, (user, room))

    def advance_cursor(self, user: str, room: str, seq: int) -> asyncio.Future[int]:
        return self._submit(_Kind.ADVANCE_CURSOR, (user, room, seq))

    def advance_cursors(self, updates: Sequence[tuple[str, str, int]]) -> asyncio.Future[None]:
        return self._submit(_Kind.ADVANCE_CURSORS, (list(updates),))

    def set_cursor_if_unset(self, user: str, room: str, seq: int) -> asyncio.Future[int]:
        return self._submit(_Kind.SET_CURSOR_IF_UNSET, (user, room, seq))

    def advance_read(self, user: str, room: str, seq: int) -> asyncio.Future[int]:
        return self._submit(_Kind.ADVANCE_READ, (user, room, seq))

    def _submit(self, kind: _Kind, args: tuple[Any, ...]) -> asyncio.Future[Any]:
        try:
            self._check_open(kind.value)
        except StoreError as error:
            failed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            failed.set_exception(error)
            return failed
        assert self._loop is not None
        future: asyncio.Future[Any] = self._loop.create_future()
        self._queue.put(_Write(kind, args, future))
        return future

    def _check_open(self, operation: str) -> None:
        if self._state is _State.NEW:
            raise StoreError(
                f"{operation} failed: SQLite store {self.path} is not open yet; await open() first"
            )
        if self._state is not _State.OPEN:
            raise StoreError(f"{operation} failed: SQLite store {self.path} is {self._state.value}")

    # Reads

    async def read_after(self, room: str, after: int, limit: int) -> list[Message]:
        if limit <= 0:
            return []

        def read(connection: sqlite3.Connection) -> list[Message]:
            rows = connection.execute(SELECT_AFTER, (room, after, limit)).fetchall()
            return [message_from_row(room, row) for row in rows]

        return await self._read("read_after", read)

    async def read_before(self, room: str, before: int, limit: int) -> list[Message]:
        if limit <= 0:
            return []

        def read(connection: sqlite3.Connection) -> list[Message]:
            rows = connection.execute(SELECT_BEFORE, (room, before, limit)).fetchall()
            return [message_from_row(room, row) for row in reversed(rows)]

        return await self._read("read_before", read)

    async def room_info(self, room: str) -> RoomInfo | None:
        def read(connection: sqlite3.Connection) -> RoomInfo | None:
            row = connection.execute(SELECT_ROOM, (room,)).fetchone()
            return None if row is None else RoomInfo(room, row[0], row[1])

        return await self._read("room_info", read)

    async def memberships(self, user: str) -> list[Membership]:
        def read(connection: sqlite3.Connection) -> list[Membership]:
            rows = connection.execute(SELECT_MEMBERSHIPS_OF_USER, (user,)).fetchall()
            return [Membership(user, room, cursor, marker) for room, cursor, marker in rows]

        return await self._read("memberships", read)

    async def is_member(self, user: str, room: str) -> bool:
        def read(connection: sqlite3.Connection) -> bool:
            return connection.execute(SELECT_IS_MEMBER, (user, room)).fetchone() is not None

        return await self._read("is_member", read)

    async def members(self, room: str) -> list[Membership]:
        def read(connection: sqlite3.Connection) -> list[Membership]:
            rows = connection.execute(SELECT_MEMBERS_OF_ROOM, (room,)).fetchall()
            return [Membership(user, room, cursor, marker) for user, cursor, marker in rows]

        return await self._read("members", read)

    async def _read(self, operation: str, read: Callable[[sqlite3.Connection], T]) -> T:
        self._check_open(operation)
        assert self._readers is not None
        try:
            return await self._readers.run(read)
        except sqlite3.Error as exc:
            raise StoreError(f"{operation} failed on SQLite store {self.path}: {exc}") from exc

    # The writer thread

    def _run_writer(self, ready: asyncio.Future[None]) -> None:
        assert self._loop is not None
        try:
            connection = self._connect_writer()
        except Exception as exc:
            error = StoreError(f"failed to open SQLite store {self.path}: {exc}")
            error.__cause__ = exc
            self._loop.call_soon_threadsafe(_fail_unless_done, ready, error)
            return
        self._loop.call_soon_threadsafe(_succeed_unless_done, ready, None)

        try:
            self._write_until_stopped(connection)
        finally:
            connection.close()

    def _connect_writer(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self.path, isolation_level=None)
        try:
            connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise StoreError(
                    f"failed to enable WAL mode (journal_mode is {mode!r});"
                    " put the database on a local file system"
                )
            connection.execute("PRAGMA synchronous = FULL")
            connection.execute("PRAGMA journal_size_limit = 67108864")

            version = connection.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"schema version {version} is newer than this Parley supports ({SCHEMA_VERSION});"
                    " upgrade Parley or use another file"
                )
            if version < SCHEMA_VERSION:
                connection.executescript(f"BEGIN; {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
        except BaseException:
            connection.close()
            raise
        return connection

    def _write_until_stopped(self, connection: sqlite3.Connection) -> None:
        cursor = connection.cursor()
        while True:
            writes, stop = self._take_batch()
            if writes:
                try:
                    messages = self._run_batch(connection, cursor, writes)
                except Exception as exc:
                    # NOTE: this catches bugs in this module, and no test reaches it.
                    logger.exception("SQLite writer failed on a batch of %d writes", len(writes))
                    self._fail_batch(connection, writes, exc)
                    messages = []
                self._hand_to_loop(writes, messages)
            if stop:
                return

    def _take_batch(self) -> tuple[list[_Write], bool]:
        """Block for one write, then take the rest of the queue up to MAX_BATCH; tell whether to stop."""
        writes: list[_Write] = []
        item = self._queue.get()
        while item is not _STOP:
            assert isinstance(item, _Write)
            writes.append(item)
            if len(writes) >= MAX_BATCH:
                return writes, False
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return writes, False
        return writes, True

    def _run_batch(
        self, connection: sqlite3.Connection, cursor: sqlite3.Cursor, writes: list[_Write]
    ) -> list[Message]:
        """Run the writes in one transaction and return its new messages (none when the commit fails)."""
        transaction = _Transaction(cursor)
        runnable = merge_marker_updates(writes)
        self._operations += len(writes)
        self._largest_batch = max(self._largest_batch, len(writes))

        try:
            cursor.execute("BEGIN IMMEDIATE")
            for write in runnable:
                self._run_write(connection, transaction, write)
            transaction.write_heads()
            cursor.execute("COMMIT")
        except sqlite3.Error as exc:
            logger.error(
                "SQLite transaction of %d writes failed, so all of them fail (first: %s): %s",
                len(writes),
                writes[0].describe(),
                exc,
            )
            self._fail_batch(connection, writes, exc)
            return []

        self._commits += 1
        logger.debug(
            "committed %d writes (%d run, %d new messages)",
            len(writes),
            len(runnable),
            len(transaction.messages),
        )
        return transaction.messages

    def _run_write(self, connection: sqlite3.Connection, transaction: _Transaction, write: _Write) -> None:
        cursor = transaction.cursor
        try:
            cursor.execute("SAVEPOINT write")
            write.result = self._perform(transaction, write.kind, write.args)
            cursor.execute("RELEASE write")
            transaction.keep_staged()
        except Exception as exc:
            transaction.drop_staged()
            if not connection.in_transaction:
                # SQLite has rolled back the whole transaction (after disk full or an I/O error),
                # so the batch fails.
                raise
            cursor.execute("ROLLBACK TO write")
            cursor.execute("RELEASE write")
            write.error = self._write_error(write, exc)

    def _write_error(self, write: _Write, exc: Exception) -> StoreError:
        if isinstance(exc, NotMemberError):
            logger.info("%s rejected: not a member", write.describe())
            return exc

        logger.error("%s failed: %r", write.describe(), exc)
        if isinstance(exc, StoreError):
            return exc
        error = StoreError(f"{write.describe()} failed: {exc}")
        error.__cause__ = exc
        return error

    def _fail_batch(self, connection: sqlite3.Connection, writes: list[_Write], exc: Exception) -> None:
        """Roll back what is left of the transaction and fail every write that had not failed alone."""
        if connection.in_transaction:
            try:
                connection.execute("ROLLBACK")
            except sqlite3.Error as rollback_exc:
                logger.error("SQLite rollback failed: %s", rollback_exc)

        for write in writes:
            if write.leader is None and write.error is None:
                error = StoreError(f"{write.describe()} failed because its transaction failed: {exc}")
                error.__cause__ = exc
                write.error = error

    def _hand_to_loop(self, writes: list[_Write], messages: list[Message]) -> None:
        """Schedule one callback that calls the listener with `messages`, then resolves the futures."""
        self._failed_operations += sum(1 for write in writes if (write.leader or write).error is not None)
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._deliver, writes, messages)
        except RuntimeError:
            logger.warning("event loop closed before %d writes could be confirmed", len(writes))

    # Back on the loop

    def _deliver(self, writes: list[_Write], messages: list[Message]) -> None:
        if messages and self._listener is not None:
            try:
                self._listener(messages)
            except Exception:
                logger.exception(
                    "commit listener failed on %d messages (room=%s seq=%d)",
                    len(messages),
                    messages[0].room,
                    messages[0].seq,
                )

        for write in writes:
            if write.future.done():
                continue
            outcome = write.leader or write
            if outcome.error is not None:
                write.future.set_exception(outcome.error)
            else:
                write.future.set_result(outcome.result)

    def _perform(self, transaction: _Transaction, kind: _Kind, args: tuple[Any, ...]) -> Any:
        """Run one write inside its SAVEPOINT and return the caller's result."""
        if kind is _Kind.APPEND:
            return _append(transaction, *args)
        if kind is _Kind.JOIN:
            return _join(transaction, *args)
        if kind is _Kind.LEAVE:
            return _leave(transaction, *args)
        if kind is _Kind.ADVANCE_CURSOR:
            return _update_marker(transaction, ADVANCE_CURSOR, 0, *args)
        if kind is _Kind.ADVANCE_CURSORS:
            return _advance_cursors(transaction, *args)
        if kind is _Kind.SET_CURSOR_IF_UNSET:
            return _update_marker(transaction, SET_CURSOR_IF_UNSET, 0, *args)
        return _update_marker(transaction, ADVANCE_READ, 1, *args)


def _append(
    transaction: _Transaction,
    room: str,
    sender: str,
    id: str,
    body: str,
    meta: dict[str, Any] | None,
    ts: int,
) -> AppendResult:
    cursor = transaction.cursor
    meta_text = None if meta is None else orjson.dumps(meta).decode()

    head = transaction.head(room)
    if head is None:
        transaction.create_room(room)
        head = 0

    seq = head + 1
    cursor.execute(INSERT_MESSAGE, (room, seq, id, sender, ts, body, meta_text))
    if cursor.rowcount == 1:
        message = Message(room, seq, id, sender, ts, body, meta)
        transaction.stage_message(message)
        return AppendResult(message)

    stored_seq, stored_ts, stored_body, stored_meta = cursor.execute(
        SELECT_MESSAGE_BY_ID, (room, sender, id)
    ).fetchone()
    original = Message(
        room,
        stored_seq,
        id,
        sender,
        stored_ts,
        stored_body,
        None if stored_meta is None else orjson.loads(stored_meta),
    )
    same = stored_body == body and json_equal(original.meta, meta)
    return AppendResult(original, dup=same, conflict=not same)


def _join(transaction: _Transaction, user: str, room: str) -> tuple[RoomInfo, Membership, bool]:
    cursor = transaction.cursor
    head = transaction.head(room)
    if head is None:
        transaction.create_room(room)
        head = 0
    epoch = cursor.execute(SELECT_EPOCH, (room,)).fetchone()[0]

    cursor.execute(INSERT_MEMBERSHIP, (user, room, now_ms()))
    was_member = cursor.rowcount == 0
    stored_cursor, read = cursor.execute(SELECT_MEMBERSHIP, (user, room)).fetchone()
    return RoomInfo(room, epoch, head), Membership(user, room, stored_cursor, read), was_member


def _leave(transaction: _Transaction, user: str, room: str) -> bool:
    transaction.cursor.execute(DELETE_MEMBERSHIP, (user, room))
    return transaction.cursor.rowcount > 0


def _update_marker(
    transaction: _Transaction, update: str, column: int, user: str, room: str, seq: int
) -> int:
    """Run a forward-only marker `update` with `seq` capped at the room's head; return the stored value.

    `column` picks the marker in a SELECT_MEMBERSHIP row: 0 for the cursor, 1 for the read marker.
    """
    head = transaction.head(room)
    if head is None:
        raise NotMemberError(user, room)

    target = min(seq, head)
    transaction.cursor.execute(update, (target, user, room))
    row = transaction.cursor.execute(SELECT_MEMBERSHIP, (user, room)).fetchone()
    if row is None:
        raise NotMemberError(user, room)
    stored: int = row[column]
    return stored


def _advance_cursors(transaction: _Transaction, updates: list[tuple[str, str, int]]) -> None:
    """Move many cursors forward in one statement, each capped at its room's head; members only."""
    rows = []
    for user, room, seq in updates:
        head = transaction.head(room)
        if head is not None:
            rows.append((min(seq, head), user, room))
    transaction.cursor.executemany(ADVANCE_CURSOR, rows)


def _succeed_unless_done(future: asyncio.Future[T], result: T) -> None:
    if not future.done():
        future.set_result(result)


def _fail_unless_done(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
