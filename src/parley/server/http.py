"""Plain HTTP routes beside the WebSocket: the browser client's files, history, receipts and stats."""

from __future__ import annotations

import logging
import mimetypes
import re
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from parley.protocol.frames import HISTORY_DEFAULT_LIMIT, HISTORY_MAX_LIMIT, NAME_PATTERN
from parley.server.auth import AuthError

if TYPE_CHECKING:
    from parley.server.app import App

log = logging.getLogger("parley.http")

Response = tuple[int, list[tuple[str, str]], bytes]
ROOM_ROUTE = re.compile(r"/api/rooms/([^/]+)/(messages|receipts)")
SECURITY_HEADERS = [
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
]
PAGE_POLICY = (
    "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; style-src 'self'; "
    "script-src 'self'; frame-ancestors 'none'"
)


def json_response(status: int, value: Any) -> Response:
    return status, [("content-type", "application/json"), *SECURITY_HEADERS], orjson.dumps(value)


def error_response(status: int, code: str, message: str) -> Response:
    return json_response(status, {"error": code, "message": message})


class HttpRoutes:
    """Handler of the HTTP requests that are not WebSocket upgrades."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.web_root = Path(str(resources.files("parley") / "web")).resolve()

    async def respond(
        self, method: str, path: str, query: dict[str, list[str]], headers: dict[str, str]
    ) -> Response:
        if method not in ("GET", "HEAD"):
            return error_response(405, "method_not_allowed", f"{method} is not supported here; use GET")

        route = ROOM_ROUTE.fullmatch(path)
        if route is not None:
            return await self.room_route(route.group(1), route.group(2), query, headers)
        if path == "/api/stats":
            return json_response(200, self.app.statistics())
        if path == "/healthz":
            return 200, [("content-type", "text/plain")], b"ok\n"
        if self.app.settings.web:
            return self.static_file(path)
        return error_response(404, "not_found", f"no route for {path}")

    async def room_route(
        self, room: str, kind: str, query: dict[str, list[str]], headers: dict[str, str]
    ) -> Response:
        if NAME_PATTERN.fullmatch(room) is None:
            return error_response(400, "invalid_field", "room: must be 1 to 64 of A-Z a-z 0-9 . _ : -")
        try:
            user = self.authenticate(query, headers)
        except AuthError as error:
            return error_response(401, "unauthorized", str(error))
        if user is not None and not self.app.may_join(user, room):
            return error_response(403, "forbidden", f"room {room}: private")
        if user is None and self.app.is_private(room):
            return error_response(403, "forbidden", f"room {room}: private; name a user")

        try:
            if kind == "messages":
                return await self.messages(room, query)
            return await self.receipts(room, query)
        except ValueError as error:
            return error_response(400, "invalid_field", str(error))

    def authenticate(self, query: dict[str, list[str]], headers: dict[str, str]) -> str | None:
        """Return the requesting user; None in open mode when no user is named."""
        authorization = headers.get("authorization", "")
        token = authorization[7:].strip() if authorization.lower().startswith("bearer ") else None
        token = token or first(query, "token")
        user = first(query, "user")
        if token is None and user is None and self.app.auth.open_mode:
            return None
        if user is not None and NAME_PATTERN.fullmatch(user) is None:
            raise AuthError("user: must be 1 to 64 of A-Z a-z 0-9 . _ : -")
        return self.app.auth.authenticate(token, user)

    async def messages(self, room: str, query: dict[str, list[str]]) -> Response:
        before = count(query, "before")
        after = count(query, "after")
        if before is not None and after is not None:
            raise ValueError("give before or after, not both")
        limit = count(query, "limit")
        if limit is None:
            limit = HISTORY_DEFAULT_LIMIT
        if limit < 1:
            raise ValueError("limit: must be at least 1")
        page, more = await self.app.read_history(room, before, after, min(limit, HISTORY_MAX_LIMIT))
        return json_response(200, {"room": room, "messages": page, "more": more})

    async def receipts(self, room: str, query: dict[str, list[str]]) -> Response:
        seq = count(query, "seq")
        if seq is None:
            raise ValueError("seq: missing, must be a non-negative integer")
        members = await self.app.store.members(room)
        delivered = sum(1 for member in members if (member.cursor or 0) >= seq)
        read = sum(1 for member in members if member.read >= seq)
        return json_response(
            200, {"room": room, "seq": seq, "delivered": delivered, "read": read, "members": len(members)}
        )

    def static_file(self, path: str) -> Response:
        relative = "index.html" if path in ("", "/") else path.lstrip("/")
        try:
            target = (self.web_root / relative).resolve()
            found = target.is_relative_to(self.web_root) and target.is_file()
        except (OSError, ValueError):
            found = False
        if not found:
            return error_response(404, "not_found", f"no file at {path[:200]}")
        content_type = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        if content_type.startswith("text/") or content_type.endswith("javascript"):
            content_type += "; charset=utf-8"
        headers = [("content-type", content_type), ("cache-control", "no-cache"), *SECURITY_HEADERS]
        if target.suffix == ".html":
            headers.append(("content-security-policy", PAGE_POLICY))
        return 200, headers, target.read_bytes()


def first(query: dict[str, list[str]], key: str) -> str | None:
    values = query.get(key)
    return values[0] if values else None


def count(query: dict[str, list[str]], key: str) -> int | None:
    value = first(query, key)
    if value is None:
        return None
    if not (value.isascii() and value.isdigit()) or len(value) > 15:
        raise ValueError(f"{key}: must be a non-negative integer, got {value[:20]!r}")
    return int(value)
