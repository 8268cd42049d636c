"""Error codes, close codes and the exceptions that carry them.

ParleyError
├── FrameError       the peer sent a frame we reject (its fault): an `error` frame goes back
└── CloseConnection  the connection must close with a WebSocket close code
"""

from __future__ import annotations

from typing import Any

BAD_FRAME = "bad_frame"
UNKNOWN_TYPE = "unknown_type"
INVALID_FIELD = "invalid_field"
TOO_LARGE = "too_large"
ID_CONFLICT = "id_conflict"
NOT_JOINED = "not_joined"
FORBIDDEN = "forbidden"
UNAUTHORIZED = "unauthorized"
RATE_LIMITED = "rate_limited"
OVERLOADED = "overloaded"
INTERNAL = "internal"

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_INVALID_UTF8 = 1007
CLOSE_POLICY = 1008
CLOSE_TOO_LARGE = 1009
CLOSE_INTERNAL = 1011
CLOSE_RESTART = 1012
CLOSE_UNAUTHORIZED = 4001
CLOSE_FORBIDDEN = 4003
CLOSE_ACK_TIMEOUT = 4008
CLOSE_TOO_SLOW = 4029


class ParleyError(Exception):
    """Base class of Parley's own exceptions."""


class FrameError(ParleyError):
    """A client frame that is rejected with an `error` frame; the connection stays open."""

    def __init__(self, code: str, message: str, ref: dict[str, Any] | None = None, **extra: Any) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.ref = ref
        self.extra = extra

    def to_frame(self) -> dict[str, Any]:
        """Build the `error` frame sent back to the client."""
        frame: dict[str, Any] = {"type": "error", "code": self.code, "message": self.message}
        if self.ref:
            frame["ref"] = self.ref
        frame.update(self.extra)
        return frame


class CloseConnection(ParleyError):
    """The connection must be closed with `code`; `reason` goes into the close frame."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"close {code}: {reason}")
        self.code = code
        self.reason = reason
