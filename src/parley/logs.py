"""Log set-up: one line per record, with the ids a record carries (session, user, room, seq)."""

from __future__ import annotations

import logging

FIELDS = ("session", "user", "room", "seq", "id", "peer", "device", "ref", "error")


class IdsFormatter(logging.Formatter):
    """Appends `key=value` for each id field found in the record's `extra`."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = [
            f"{key}={getattr(record, key)}" for key in FIELDS if getattr(record, key, None) not in (None, "")
        ]
        return f"{line} [{' '.join(ids)}]" if ids else line


def configure(level: str = "INFO") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(IdsFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
