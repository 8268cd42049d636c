"""Read what the server stored, for the checker: from the SQLite file (read-only) or over HTTP."""

from __future__ import annotations

import contextlib
import sqlite3
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import orjson

from parley.verify.checker import StoredMessage, StoreSnapshot

HTTP_PAGE = 200
"""Messages per history request: the server's maximum page size."""


@contextlib.contextmanager
def _read_only(path: Path) -> Iterator[sqlite3.Connection]:
    if not path.exists():
        raise FileNotFoundError(f"no database at {path}")
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10.0)
    try:
        yield connection
    finally:
        connection.close()


def read_sqlite_snapshot(path: Path) -> StoreSnapshot:
    """Read every room, message and delivery cursor from the SQLite database at `path`, read-only."""
    snapshot = StoreSnapshot(cursors={})
    with _read_only(path) as connection:
        # One transaction, so that heads, messages and cursors come from the same commit.
        connection.execute("BEGIN")
        for name, epoch, head in connection.execute("SELECT name, epoch, head FROM rooms"):
            snapshot.heads[name] = head
            snapshot.epochs[name] = epoch
            snapshot.messages[name] = []
        rows = connection.execute("SELECT room, seq, id, sender, body FROM messages ORDER BY room, seq")
        for room, seq, id, sender, body in rows:
            snapshot.messages.setdefault(room, []).append(StoredMessage(room, seq, id, sender, body))
        assert snapshot.cursors is not None
        for user, room, cursor in connection.execute("SELECT user, room, cursor FROM memberships"):
            snapshot.cursors[(user, room)] = cursor
        connection.execute("COMMIT")
    return snapshot


def read_sqlite_cursors(path: Path) -> list[tuple[str, str, int | None]]:
    """Read every `(user, room, cursor)` membership row, read-only."""
    with _read_only(path) as connection:
        return list(connection.execute("SELECT user, room, cursor FROM memberships"))


def read_sqlite_heads(path: Path) -> dict[str, int]:
    """Read each room's head, read-only."""
    with _read_only(path) as connection:
        return dict(connection.execute("SELECT name, head FROM rooms"))


def read_http_snapshot(base_url: str, rooms: list[str], timeout: float = 30.0) -> StoreSnapshot:
    """Page through `GET /api/rooms/{room}/messages` for each room; cursors and epochs stay unknown.

    `base_url` is the server's HTTP address, such as `http://127.0.0.1:8765`. A room's head is taken
    to be its highest seq, because the HTTP API does not report the head.
    """
    snapshot = StoreSnapshot(cursors=None)
    for room in rooms:
        messages: list[StoredMessage] = []
        after = 0
        while True:
            query = urllib.parse.urlencode({"after": after, "limit": HTTP_PAGE})
            url = f"{base_url.rstrip('/')}/api/rooms/{urllib.parse.quote(room)}/messages?{query}"
            with urllib.request.urlopen(url, timeout=timeout) as response:
                page = orjson.loads(response.read())
            for entry in page["messages"]:
                messages.append(StoredMessage(room, entry["seq"], entry["id"], entry["from"], entry["body"]))
            if not page["messages"] or not page.get("more"):
                break
            after = page["messages"][-1]["seq"]
        snapshot.messages[room] = messages
        snapshot.heads[room] = max((message.seq for message in messages), default=0)
    return snapshot
