"""One TCP connection: HTTP/1.1 through h11 until a WebSocket upgrade, then RFC 6455 frames.

This module is the pump between the socket and the protocol. It parses bytes and hands complete text
messages to the session. It writes what the session and the hub give it, and notifies the hub when the
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
    CLOSE_POLICY,
    CLOSE_PROTOCOL_ERROR,
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

# Reasons to stop reading from a client; reading resumes once none is left.
HOLD_WRITE = 1  # its write buffer is full: a client that does not read gets no more replies queued
HOLD_INBOX = 2  # its session has too many frames waiting
HOLD_RATE = 4  # it sent more frames than its budget allows
HOLD_HTTP = 8  # an HTTP response is being prepared
HOLD_SHUTDOWN = 16  # the server is shutting down and takes no new frames


class Connection(asyncio.Protocol):
    """The asyncio protocol of one client connection."""

    __slots__ = (
        "_close_handle",
        "_deadline",
        "_writable",
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
        "read_holds",
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
        self.read_holds = 0
        self._close_handle: asyncio.TimerHandle | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._writable: asyncio.Future[None] | None = None

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        transport = self.transport
        transport.set_write_buffer_limits(high=self.app.settings.outbound_high_water)
        peer = transport.get_extra_info("peername")
        self.peer_address = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.app.connections.add(self)
        self.set_deadline(self.app.settings.handshake_timeout)

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
        self.hold_reading(HOLD_WRITE)

    def resume_writing(self) -> None:
        self.paused = False
        self.release_reading(HOLD_WRITE)
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None
        self.app.hub.resume_peer(self)
        if self.http is not None and not self.read_holds:
            self._next_http_event()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.app.connections.discard(self)
        for handle in (self._close_handle, self._deadline):
            if handle is not None:
                handle.cancel()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        if self.session_handler is not None:
            self.session_handler.on_closed()
            log.info("disconnected", extra={"session": self.session, "user": self.user})

    # Flow control and deadlines

    def hold_reading(self, reason: int) -> None:
        """Stop reading from the client for `reason` (one of the HOLD_ flags)."""
        if not self.read_holds and self.transport is not None and not self.closing:
            self.transport.pause_reading()
        self.read_holds |= reason

    def release_reading(self, reason: int) -> None:
        """Drop one reason to stop reading; reading resumes once no reason is left."""
        if not self.read_holds & reason:
            return
        self.read_holds &= ~reason
        if not self.read_holds and self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def writable(self) -> asyncio.Future[None]:
        """Return a future that is done once the write buffer has drained below its limit."""
        if self._writable is None:
            self._writable = asyncio.get_running_loop().create_future()
            if not self.paused:
                self._writable.set_result(None)
        return self._writable

    def set_deadline(self, seconds: float | None) -> None:
        """Close the connection unless the next step (handshake, hello) happens within `seconds`."""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if seconds is not None and not self.closed:
            self._deadline = asyncio.get_running_loop().call_later(seconds, self._on_deadline)

    def _on_deadline(self) -> None:
        self._deadline = None
        if self.reader is None:
            log.info("closing idle HTTP connection", extra={"peer": self.peer_address})
            if self.transport is not None:
                self.transport.close()
        else:
            log.info(
                "closing connection that sent no hello",
                extra={"session": self.session, "peer": self.peer_address},
            )
            self.close(CLOSE_POLICY, "no hello in time")

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
        """Start the closing handshake; the socket closes when the client replies, or after a grace period."""
        if self.closing or self.transport is None:
            return
        if self.reader is None:
            self.transport.close()
            return
        self.transport.write(encode_close(code, reason))
        # Reading may be paused for flow control or a shutdown; the client's close reply must still be read.
        self.read_holds = 0
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
            "client closed with %s %r",
            event.code,
            event.reason[:120],
            extra={"session": self.session, "user": self.user},
        )
        if self.transport is None:
            return
        if not self.closing:
            if event.code is None:
                reply = encode_frame(b"", websocket.OP_CLOSE)
            elif websocket.is_valid_close_code(event.code):
                reply = encode_close(event.code)
            else:
                reply = encode_close(CLOSE_PROTOCOL_ERROR, "invalid close code")
            self.transport.write(reply)
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
            # A client that reads nothing sends no pong either, so the close frame states the reason.
            log.info(
                "closing slow consumer that stopped reading",
                extra={"session": self.session, "user": self.user},
            )
            self.close(CLOSE_TOO_SLOW, "too slow")
            return
        if not self.alive:
            log.info(
                "no pong or other data since the last heartbeat ping",
                extra={"session": self.session, "user": self.user},
            )
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
        self.set_deadline(None)
        self.hold_reading(HOLD_HTTP)
        method = request.method.decode("latin-1")
        task = asyncio.get_running_loop().create_task(self.app.http.respond(method, url.path, query, headers))
        task.add_done_callback(lambda done: self._on_http_response(done, method == "HEAD"))

    def _on_http_response(
        self, task: asyncio.Task[tuple[int, list[tuple[str, str]], bytes]], head: bool
    ) -> None:
        if self.closed or self.http is None or self.transport is None:
            return
        try:
            status, headers, body = task.result()
        except Exception:
            log.exception("HTTP handler failed", extra={"peer": self.peer_address})
            status, headers, body = 500, [("content-type", "text/plain")], b"internal error\n"
        try:
            self._send_response(status, headers, body, head)
        except h11.LocalProtocolError as error:
            log.error("HTTP response failed: %s", error, extra={"peer": self.peer_address})
            self.transport.abort()
            return
        if self.http.our_state is h11.MUST_CLOSE or self.http.their_state is h11.MUST_CLOSE:
            self.transport.close()
            return
        self.set_deadline(self.app.settings.http_idle_timeout)
        self.release_reading(HOLD_HTTP)
        if not self.paused:
            self._next_http_event()

    def _send_response(
        self, status: int, headers: list[tuple[str, str]], body: bytes, head: bool = False
    ) -> None:
        """Write a whole response; for HEAD, the headers announce the body's length but it is not sent."""
        assert self.http is not None and self.transport is not None
        headers = [*headers, ("content-length", str(len(body)))]
        data = self.http.send(h11.Response(status_code=status, headers=headers))
        if not head:
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
            or not key.isascii()
        ):
            self._send_response(
                400, [("content-type", "text/plain")], b"a WebSocket upgrade (version 13) is required\n"
            )
            self.transport.close()
            return

        if not self.app.origin_allowed(headers.get("origin"), headers.get("host")):
            log.warning("rejecting cross-origin handshake from %r in open mode", headers.get("origin"))
            self._send_response(
                403, [("content-type", "text/plain")], b"cross-origin WebSocket not allowed\n"
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
        self.set_deadline(self.app.settings.hello_timeout)
        log.debug("upgraded", extra={"session": self.session, "peer": self.peer_address})
        if trailing:
            self._on_websocket_data(bytes(trailing))
