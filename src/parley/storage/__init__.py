"""Durable stores of rooms, messages and memberships, chosen by URL."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

from parley.storage.base import CommitListener, NotMemberError, Store, StoreError, StoreStats
from parley.storage.sqlite import SqliteStore

__all__ = [
    "DEFAULT_SQLITE_FILE",
    "CommitListener",
    "NotMemberError",
    "SqliteStore",
    "Store",
    "StoreError",
    "StoreStats",
    "open_store",
    "sqlite_path",
]

DEFAULT_SQLITE_FILE = "parley.db"


def open_store(url: str, data_dir: Path) -> Store:
    """Create the store that `url` names; the caller must still `await store.open()`.

    See `sqlite_path` for the URLs accepted. Raises ValueError for any other URL.
    """
    return SqliteStore(sqlite_path(url, data_dir))


def sqlite_path(url: str, data_dir: Path) -> Path:
    """Return the database file that a store URL names.

    - an empty URL, `sqlite:` or `sqlite://`: `parley.db` in `data_dir`
    - `sqlite:///srv/parley/chat.db` (or with four slashes): that absolute path
    - `sqlite:chat.db`: a path relative to `data_dir`

    Raises ValueError for another scheme, a host part, or a query or fragment.
    """
    if not url:
        return data_dir / DEFAULT_SQLITE_FILE

    parts = urlsplit(url)
    if parts.scheme != "sqlite":
        raise ValueError(
            f"unsupported store URL {url!r}: expected sqlite:///ABSOLUTE/PATH, sqlite:RELATIVE/PATH or sqlite://"
        )
    if parts.netloc:
        raise ValueError(
            f"invalid SQLite URL {url!r}: it names host {parts.netloc!r}; "
            "use three slashes for an absolute path, as in sqlite:///srv/parley/chat.db"
        )
    if parts.query or parts.fragment:
        raise ValueError(f"invalid SQLite URL {url!r}: query strings and fragments are not supported")

    if not parts.path:
        return data_dir / DEFAULT_SQLITE_FILE
    path = unquote(parts.path)
    if path.startswith("/"):
        # Four slashes (SQLAlchemy's spelling of an absolute path) name the same file as three.
        return Path("/" + path.lstrip("/"))
    return data_dir / path
