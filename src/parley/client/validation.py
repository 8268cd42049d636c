"""Checks that reject, before anything is queued, arguments and messages that the server would reject."""

from __future__ import annotations

from typing import Any

import orjson
from websockets.exceptions import InvalidURI
from websockets.uri import parse_uri

from parley.protocol.frames import NAME_PATTERN, NAME_RULE


def check_name(field: str, value: str) -> None:
    """Raise ValueError unless `value` is a valid room or user name."""
    if not isinstance(value, str) or NAME_PATTERN.fullmatch(value) is None:
        raise ValueError(f"{field} {value!r}: {NAME_RULE}")


def check_message(room: str, body: str, meta: dict[str, Any] | None, max_body: int | None) -> None:
    """Raise ValueError for a room, body or meta that the server would reject.

    `max_body` is the limit in UTF-8 bytes from the server's `welcome`, or None before the first one.
    """
    check_name("room", room)
    if not isinstance(body, str):
        raise ValueError(f"body must be a string, got {type(body).__name__}")
    if "\x00" in body:
        raise ValueError("body must not contain U+0000")
    try:
        size = len(body.encode())
    except UnicodeEncodeError as error:
        raise ValueError("body must not contain lone surrogates") from error
    if max_body is not None and size > max_body:
        raise ValueError(f"body is {size} bytes as UTF-8; the server accepts at most {max_body}")

    if meta is None:
        return
    if not isinstance(meta, dict):
        raise ValueError(f"meta must be a dict, got {type(meta).__name__}")
    try:
        orjson.dumps(meta)
    except TypeError as error:
        raise ValueError(f"meta must be JSON-serialisable: {error}") from error


def check_client_arguments(
    url: str,
    user: str | None,
    token: str | None,
    backoff_base: float,
    backoff_cap: float,
    open_timeout: float,
) -> None:
    """Raise ValueError for Client arguments that can never connect."""
    try:
        parse_uri(url)
    except InvalidURI as error:
        raise ValueError(f"invalid server URL {url!r}: expected ws://host:port/ws or wss://…") from error
    if user is None and token is None:
        raise ValueError("give a user (servers with open authentication) or a token")
    if user is not None:
        check_name("user", user)
    if not 0 < backoff_base <= backoff_cap:
        raise ValueError(f"need 0 < backoff_base <= backoff_cap, got {backoff_base} and {backoff_cap}")
    if open_timeout <= 0:
        raise ValueError(f"open_timeout must be positive, got {open_timeout}")


def check_last(last: int | None) -> None:
    """Raise ValueError unless `last` is None or a non-negative integer."""
    if last is not None and (isinstance(last, bool) or not isinstance(last, int) or last < 0):
        raise ValueError(f"last must be a non-negative integer, got {last!r}")


def parse_retry_after(value: str | None) -> float | None:
    """Return a `Retry-After` header's delay in seconds; HTTP dates are not supported and give None."""
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        return None
