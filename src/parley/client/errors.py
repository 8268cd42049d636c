"""Exceptions raised by the client library.

ParleyError (parley.protocol.errors)
└── ClientError
    ├── ClientClosed      the client was closed, by `close()` or after a fatal error
    ├── Unauthorized      the server rejected the credentials (close code 4001 or HTTP 401)
    ├── StateFileError    the state file cannot be read, or belongs to another server or user
    └── RequestFailed     the server rejected a request with an `error` frame
        └── SendFailed    ... a `send`, with a final error code such as id_conflict or invalid_field
"""

from __future__ import annotations

from pathlib import Path

from parley.protocol.errors import ParleyError


class ClientError(ParleyError):
    """Base class of the client library's exceptions."""


class ClientClosed(ClientError):
    """The client is closed: no further requests are accepted, and pending ones are abandoned."""

    def __init__(self) -> None:
        super().__init__("the client is closed; create a new Client to connect again")


class Unauthorized(ClientError):
    """The server rejected the credentials; the client stops reconnecting until given new ones."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"unauthorized: {detail}; check --user or the token")
        self.detail = detail


class StateFileError(ClientError):
    """The state file is unreadable, malformed or was written for another server URL or user."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"state file {path}: {reason}; fix or delete the file, or use another state file")
        self.path = path
        self.reason = reason


class RequestFailed(ClientError):
    """The server rejected a request with an `error` frame carrying `code` and `message`."""

    def __init__(self, request: str, room: str | None, code: str, message: str) -> None:
        where = f" in room {room!r}" if room is not None else ""
        super().__init__(f"{request}{where} failed: {code}: {message}")
        self.request = request
        self.room = room
        self.code = code
        self.message = message


class SendFailed(RequestFailed):
    """The server rejected a `send` with a final error; the message was not stored."""

    def __init__(self, room: str, id: str, code: str, message: str) -> None:
        super().__init__(f"send {id!r}", room, code, message)
        self.id = id
