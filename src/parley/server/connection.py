"""One TCP connection: HTTP/1.1 through h11 until a WebSocket upgrade, then RFC 6455 frames.

This module is the pump between the socket and the protocol: it parses bytes, hands complete text
messages to the session, writes what the session and the hub give it, and notifies the hub when the
kernel buffer fills (`pause_writing`) or drains (`resume_writing`). It never interprets frames.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import parse_qs, urlsplit

import h11

from parley.protocol.errors import (
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL,
    CLOSE_TOO_SLOW,
    CloseConnection,
)
from parley.protocol.frames import encode
from parley.server import websocket
from parley.server.websocket import FrameReader, encode_close, encode_frame

if TYPE_CHECKING:
    from parley.server.app import App
    from parley.server.hub import Subscription
    from parley.server.session import Session

log = logging.getLogger("parley.connection")

MAX_HTTP_HEAD = 16 * 1024
CLOSE_GRACE = 2.0


class Connection(asyncio.Protocol):
    """The asyncio protocol of one client connection."""

    __slots__ = (
        "_close_handle",
        "alive",
        "app",
        "batch",
        "catch_up_task",
        "closed",
        "closing_since",
        "http",
        "lagging",
        "paused",
        "paused_since",
        "peer_address",
        "reader",
        "session",
        "session_handler",
        "subscriptions",
        "token",
        "transport",
        "user",
    )

    def __init__(self, app: App) -> None:
        self.app = app
        self.transport: asyncio.Transport | None = None
        self.http: h11.Connection | None = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HTTP_HEAD)
        self.reader: FrameReader | None = None
        self.session_handler: Session | None = None
        self.session = ""
        self.user = ""
        self.token: str | None = None
        self.batch = False
        self.paused = False
        self.paused_since = 0.0
        self.alive = True
        self.closed = False
        self.closing_since = 0.0
        self.subscriptions: dict[str, Subscription] = {}
        self.lagging: set[Subscription] = set()
        self.catch_up_task: asyncio.Task[None] | None = None
        self.peer_address = ""
        self._close_handle: asyncio.TimerHandle | None = None

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        transport = self.transport
        transport.set_write_buffer_limits(high=self.app.settings.outbound_high_water)
        peer = transport.get_extra_info("peername")
        self.peer_address = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.app.connections.add(self)

    def data_received(self, data: bytes) -> None:
        self.alive = True
        try:
            if self.reader is not None:
                self._on_websocket_data(data)
            elif self.http is not None:
                self._on_http_data(data)
        except CloseConnection as close:
            log.info(
                "closing connection %s: %s",
                close.code,
                close.reason,
                extra={"session": self.session, "user": self.user},
            )
            self.close(close.code, close.reason)
        except Exception:
            log.exception("connection failed", extra={"session": self.session, "user": self.user})
            self.close(CLOSE_INTERNAL, "internal error")

    def pause_writing(self) -> None:
        self.paused = True
        self.paused_since = time.monotonic()

    def resume_writing(self) -> None:
        self.paused = False
        self.app.hub.resume_peer(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.app.connections.discard(self)
        if self._close_handle is not None:
            self._close_handle.cancel()
        if self.session_handler is not None:
            self.session_handler.on_closed()
            log.info("disconnected", extra={"session": self.session, "user": self.user})

    # Writing

    @property
    def closing(self) -> bool:
        return self.closed or self.closing_since > 0

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closing:
            self.transport.write(data)

    def send_frame(self, frame: dict[str, Any]) -> None:
        self.write(encode_frame(encode(frame)))

    def close(self, code: int, reason: str) -> None:
        """Start the closing handshake; the socket closes when the client answers, or after a grace period."""
        if self.closing or self.transport is None:
            return
        if self.reader is None:
            self.transport.close()
            return
        self.transport.write(encode_close(code, reason))
        # Reading may be paused by a shutdown; the client's close reply must still be read.
        self.transport.resume_reading()
        self.closing_since = time.monotonic()
        self.app.hub.disconnect(self)
        self._close_handle = asyncio.get_running_loop().call_later(CLOSE_GRACE, self.abort)

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()

    # WebSocket

    def _on_websocket_data(self, data: bytes) -> None:
        assert self.reader is not None and self.session_handler is not None
        for event in self.reader.feed(data):
            if self.closing and not isinstance(event, websocket.CloseReceived):
                continue
            if isinstance(event, websocket.TextMessage):
                self.session_handler.on_text(event.payload)
            elif isinstance(event, websocket.BinaryMessage):
                self.session_handler.on_binary(event.size)
            elif isinstance(event, websocket.Ping):
                self.write(encode_frame(event.payload, websocket.OP_PONG))
            elif isinstance(event, websocket.CloseReceived):
                self._on_close_frame(event)
                return

    def _on_close_frame(self, event: websocket.CloseReceived) -> None:
        log.info(
            "client closed with %s %s",
            event.code,
            event.reason[:120],
            extra={"session": self.session, "user": self.user},
        )
        if self.transport is None:
            return
        if not self.closing:
            self.transport.write(encode_close(event.code or 1000) if event.code else encode_frame(b"", 0x8))
            self.closing_since = time.monotonic()
            self.app.hub.disconnect(self)
        self.transport.close()

    def heartbeat(self, now: float) -> None:
        """Ping the client, close it when it stayed silent since the last ping or stayed too slow."""
        if self.closing or self.reader is None:
            if self.closing and now - self.closing_since > CLOSE_GRACE:
                self.abort()
            return
        if not self.alive and self.paused:
            # A client that reads nothing answers no ping either; say why before the grace period ends it.
            log.info(
                "closing slow consumer that stopped reading",
                extra={"session": self.session, "user": self.user},
            )
            self.close(CLOSE_TOO_SLOW, "too slow")
            return
        if not self.alive:
            log.info("no answer to heartbeat", extra={"session": self.session, "user": self.user})
            self.abort()
            return
        if self.paused and now - self.paused_since > self.app.settings.slow_timeout:
            log.info("closing slow consumer", extra={"session": self.session, "user": self.user})
            self.close(CLOSE_TOO_SLOW, "too slow")
            return
        self.alive = False
        self.write(encode_frame(b"", websocket.OP_PING))

    def shutdown(self, code: int = CLOSE_GOING_AWAY) -> None:
        if self.reader is not None:
            self.close(code, "server shutting down")
        elif self.transport is not None:
            self.transport.close()

    # HTTP

    def _on_http_data(self, data: bytes) -> None:
        assert self.http is not None
        self.http.receive_data(data)
        self._next_http_event()

    def _next_http_event(self) -> None:
        http = self.http
        while http is not None and self.transport is not None and not self.closed:
            try:
                event = http.next_event()
            except h11.RemoteProtocolError as error:
                self._http_error(error.error_status_hint, str(error))
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                if http.our_state is h11.DONE and http.their_state is h11.DONE:
                    http.start_next_cycle()
                    continue
                return
            if isinstance(event, h11.Request):
                self._on_request(event)
                return
            if isinstance(event, h11.ConnectionClosed):
                self.transport.close()
                return

    def _on_request(self, request: h11.Request) -> None:
        target = request.target.decode("latin-1")
        url = urlsplit(target)
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in request.headers}
        query = parse_qs(url.query)

        if url.path == "/ws":
            self._upgrade(request, headers, query)
            return
        assert self.transport is not None
        self.transport.pause_reading()
        task = asyncio.get_running_loop().create_task(
            self.app.http.respond(request.method.decode("latin-1"), url.path, query, headers)
        )
        task.add_done_callback(self._on_http_response)

    def _on_http_response(self, task: asyncio.Task[tuple[int, list[tuple[str, str]], bytes]]) -> None:
        if self.closed or self.http is None or self.transport is None:
            return
        try:
            status, headers, body = task.result()
        except Exception:
            log.exception("HTTP handler failed", extra={"peer": self.peer_address})
            status, headers, body = 500, [("content-type", "text/plain")], b"internal error\n"
        self._send_response(status, headers, body)
        if self.http.our_state is h11.MUST_CLOSE or self.http.their_state is h11.MUST_CLOSE:
            self.transport.close()
            return
        self.transport.resume_reading()
        self._next_http_event()

    def _send_response(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        assert self.http is not None and self.transport is not None
        headers = [*headers, ("content-length", str(len(body)))]
        data = self.http.send(h11.Response(status_code=status, headers=headers))
        data += self.http.send(h11.Data(data=body)) or b""
        data += self.http.send(h11.EndOfMessage()) or b""
        self.transport.write(data)

    def _http_error(self, status: int, message: str) -> None:
        assert self.transport is not None
        body = f"{message}\n".encode()
        head = f"HTTP/1.1 {status} Bad Request\r\ncontent-type: text/plain\r\ncontent-length: {len(body)}\r\n"
        self.transport.write(head.encode() + b"connection: close\r\n\r\n" + body)
        self.transport.close()

    def _upgrade(self, request: h11.Request, headers: dict[str, str], query: dict[str, list[str]]) -> None:
        assert self.http is not None and self.transport is not None
        key = headers.get("sec-websocket-key", "")
        if (
            request.method != b"GET"
            or headers.get("upgrade", "").lower() != "websocket"
            or "upgrade" not in headers.get("connection", "").lower()
            or headers.get("sec-websocket-version") != "13"
            or len(key) != 24
        ):
            self._send_response(
                400, [("content-type", "text/plain")], b"a WebSocket upgrade (version 13) is required\n"
            )
            self.transport.close()
            return

        refusal = self.app.admit_handshake()
        if refusal is not None:
            self._send_response(
                503, [("retry-after", str(refusal)), ("content-type", "text/plain")], b"busy\n"
            )
            self.transport.close()
            return

        authorization = headers.get("authorization", "")
        if authorization.lower().startswith("bearer "):
            self.token = authorization[7:].strip()
        elif "token" in query:
            self.token = query["token"][0]

        response_headers = [
            ("upgrade", "websocket"),
            ("connection", "Upgrade"),
            ("sec-websocket-accept", websocket.accept_key(key)),
        ]
        offered = [item.strip() for item in headers.get("sec-websocket-protocol", "").split(",")]
        if "parley.v1" in offered:
            response_headers.append(("sec-websocket-protocol", "parley.v1"))
        self.transport.write(
            self.http.send(h11.InformationalResponse(status_code=101, headers=response_headers))
        )
        trailing, _closed = self.http.trailing_data
        self.http = None

        self.session = secrets.token_hex(6)
        self.reader = FrameReader(self.app.limits.max_frame)
        self.session_handler = self.app.new_session(self)
        log.debug("upgraded", extra={"session": self.session, "peer": self.peer_address})
        if trailing:
            self._on_websocket_data(bytes(trailing))
