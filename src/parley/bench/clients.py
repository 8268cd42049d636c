"""Benchmark connections: one asyncio Protocol per WebSocket, checking every message it receives.

A connection follows one room (the publisher follows several). For each `msg` it checks the room's
seq continuity the way a real client does. `seq == since + 1` is delivered, and `seq <= since` is a
duplicate (a resend), which is dropped. A larger seq is a gap: it counts as out of order, and the seqs
it skips count as lost. Receivers acknowledge cumulatively and at most once per room per ack interval.

Three servers are spoken to:

- `parley`: `hello`, `join`, `msg` (single frames or arrays for `batch`), `ack`, `acked`, `sent`.
- `raw`: the bare baseline server, which relays whatever its publisher writes to every subscriber; the
  publisher here writes msg-shaped JSON with its own seq, so the same checks apply, without acks.
- `socketio`: the python-socketio baseline (Engine.IO 4 over WebSocket), events `42["msg",{…}]`.

Latency is the receive time minus `meta.t`, both microseconds of CLOCK_MONOTONIC, which every process
on one Linux host shares.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import orjson

from parley.bench.histogram import Histogram
from parley.bench.wire import (
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    HandshakeError,
    client_frame,
    close_frame,
    handshake_request,
    parse_handshake_response,
)

SOCKETIO_PATH = "/socket.io/?EIO=4&transport=websocket"
KINDS = ("parley", "raw", "socketio")


def monotonic_us() -> int:
    return time.monotonic_ns() // 1000


@dataclass
class Tally:
    """Counts of what one process's connections received, summed over processes for the report."""

    delivered: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    skipped: int = 0
    pings: int = 0
    acks_sent: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    closes: dict[str, int] = field(default_factory=dict)
    latency: Histogram = field(default_factory=Histogram)
    measure_from: int = 0
    measure_to: int = 1 << 62

    def count_error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1

    def count_close(self, code: int | None) -> None:
        key = "none" if code is None else str(code)
        self.closes[key] = self.closes.get(key, 0) + 1

    def to_json(self) -> dict[str, Any]:
        return {
            "delivered": self.delivered,
            "duplicates": self.duplicates,
            "out_of_order": self.out_of_order,
            "skipped": self.skipped,
            "pings": self.pings,
            "acks_sent": self.acks_sent,
            "errors": self.errors,
            "closes": self.closes,
            "latency": self.latency.to_sparse(),
            "latency_max": self.latency.maximum,
        }


class RoomPosition:
    """A connection's position in one room: what it holds, acknowledged and had confirmed."""

    __slots__ = (
        "ack_interval", "ack_prefix", "ack_sent", "ack_sent_at", "acked", "name", "reached", "since", "start",
        "wake_at",
    )  # fmt: skip

    def __init__(self, name: str) -> None:
        self.name = name
        self.since = 0
        self.start = 0
        self.ack_sent = 0
        self.acked = 0
        self.ack_prefix = b'{"type":"ack","room":"' + name.encode() + b'","seq":'
        self.ack_interval = 0.0
        self.ack_sent_at = 0.0
        self.wake_at = 1 << 62
        self.reached: asyncio.Future[None] | None = None

    def until(self, seq: int) -> asyncio.Future[None]:
        """Return a future that resolves once the connection has received `seq` in this room."""
        self.reached = asyncio.get_running_loop().create_future()
        self.wake_at = seq
        if self.since >= seq:
            self.reached.set_result(None)
        return self.reached

    def _wake(self) -> None:
        self.wake_at = 1 << 62
        if self.reached is not None and not self.reached.done():
            self.reached.set_result(None)


class BenchConnection(asyncio.Protocol):
    """One WebSocket connection of the load generator.

    `ready` resolves once the connection follows its rooms, or fails with the reason why not. Parley
    connections are ready when every `joined` arrived, raw ones after the upgrade, and socket.io ones
    once the namespace is entered.
    """

    __slots__ = (
        "_accept",
        "_buffer",
        "_on_frame",
        "_request",
        "batch",
        "close_code",
        "closed",
        "hello",
        "is_open",
        "kind",
        "paused",
        "pings",
        "positions",
        "ready",
        "resumed",
        "sent_heads",
        "sent_replies",
        "tally",
        "transport",
        "user",
    )

    def __init__(
        self,
        kind: str,
        host: str,
        port: int,
        path: str,
        user: str,
        rooms: list[str],
        tally: Tally,
        *,
        batch: bool = False,
        hello: dict[str, Any] | None = None,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        self.kind = kind
        self.user = user
        self.batch = batch
        self.tally = tally
        self.positions = {room: RoomPosition(room) for room in rooms}
        self.hello = hello
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.is_open = False
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.close_code: int | None = None
        self.paused = False
        self.pings = 0
        self.sent_replies = 0
        self.sent_heads: dict[str, int] = {}
        self.resumed: dict[str, dict[str, Any]] = {}
        self._buffer = bytearray()
        self._request, self._accept = handshake_request(host, port, path)
        self._on_frame: Callable[[dict[str, Any], int], None] = (
            self._parley_frame if kind == "parley" else self._relayed_frame
        )

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        # The hot path of the load generator: frames are cut from `data` directly, and only a partial
        # frame at the end (or the handshake) goes through the buffer.
        if self._buffer or not self.is_open:
            self._buffer += data
            if not self.is_open and not self._finish_handshake():
                return
            data = bytes(self._buffer)
            self._buffer = bytearray()

        now = monotonic_us()
        position = 0
        available = len(data)
        while available - position >= 2:
            opcode = data[position] & 0x0F
            length = data[position + 1] & 0x7F
            start = position + 2
            if length == 126:
                if available < start + 2:
                    break
                length = int.from_bytes(data[start : start + 2], "big")
                start += 2
            elif length == 127:
                if available < start + 8:
                    break
                length = int.from_bytes(data[start : start + 8], "big")
                start += 8
            end = start + length
            if end > available:
                break
            position = end
            if opcode == OP_TEXT:
                self._on_text(data[start:end], now)
            elif opcode == OP_PING:
                self.pings += 1
                self.tally.pings += 1
                self.write(client_frame(data[start:end], OP_PONG))
            elif opcode == OP_CLOSE:
                self._on_close_frame(data[start:end])
                return
        if position < available:
            self._buffer += data[position:]

    def _finish_handshake(self) -> bool:
        """Consume the upgrade response from the buffer; return whether the WebSocket is open."""
        try:
            used = parse_handshake_response(self._buffer, self._accept)
        except HandshakeError as error:
            self._fail(error)
            return False
        if not used:
            return False
        del self._buffer[:used]
        self.is_open = True
        self._on_open()
        return True

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"connection lost before it was ready: {exc}"))
        if not self.closed.done():
            if self.close_code is None:
                self.tally.count_close(1006)
            self.closed.set_result(None)

    # Writing and closing

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def send_json(self, frame: dict[str, Any]) -> None:
        self.write(client_frame(orjson.dumps(frame)))

    def close(self) -> None:
        """Send a close frame (1000) and close the transport once its buffer is written."""
        if self.transport is not None and not self.transport.is_closing():
            self.write(close_frame(1000))
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def send_acks(self, now: float, force: bool = False) -> None:
        """Acknowledge every room that moved since the last ack, with one cumulative ack each.

        A room whose server asked for a longer `ack_interval` is acknowledged at most that often,
        unless `force` is set (the final acks of a run).
        """
        for position in self.positions.values():
            due = force or now >= position.ack_sent_at + position.ack_interval
            if position.since > position.ack_sent and due:
                position.ack_sent = position.since
                position.ack_sent_at = now
                self.write(client_frame(position.ack_prefix + str(position.since).encode() + b"}"))
                self.tally.acks_sent += 1

    def _fail(self, error: Exception) -> None:
        if not self.ready.done():
            self.ready.set_exception(error)
        if self.transport is not None:
            self.transport.close()

    def _on_close_frame(self, payload: bytes) -> None:
        self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
        self.tally.count_close(self.close_code)
        if not self.ready.done():
            reason = payload[2:].decode("utf-8", "replace")
            self.ready.set_exception(ConnectionError(f"closed with {self.close_code} {reason}"))
        if self.transport is not None and not self.transport.is_closing():
            self.write(client_frame(payload[:2], OP_CLOSE))
            self.transport.close()

    # Opening

    def _on_open(self) -> None:
        if self.kind == "raw":
            self.ready.set_result(None)
        elif self.kind == "parley":
            hello: dict[str, Any] = {"type": "hello", "user": self.user, "batch": self.batch}
            if self.hello:
                hello.update(self.hello)
            frames = [hello]
            if "resume" not in hello:
                frames += [{"type": "join", "room": room} for room in self.positions]
            self.write(client_frame(orjson.dumps(frames)))
        # socket.io: the server speaks first (Engine.IO open packet "0{...}").

    # Receiving

    def _on_text(self, payload: bytes, now: int) -> None:
        if self.kind == "socketio":
            self._socketio_packet(payload, now)
            return
        value = orjson.loads(payload)
        if type(value) is dict:
            self._on_frame(value, now)
        else:
            for frame in value:
                self._on_frame(frame, now)

    def _count_msg(self, position: RoomPosition, seq: int, meta: Any, now: int) -> None:
        since = position.since
        tally = self.tally
        if seq == since + 1:
            position.since = seq
            tally.delivered += 1
            if seq >= position.wake_at:
                position._wake()
        elif seq <= since:
            tally.duplicates += 1
            return
        else:
            tally.out_of_order += 1
            tally.skipped += seq - since - 1
            position.since = seq
            tally.delivered += 1
            if seq >= position.wake_at:
                position._wake()
        if meta is not None:
            sent = meta.get("t")
            if sent is not None and tally.measure_from <= sent <= tally.measure_to:
                tally.latency.add(now - sent)

    def _parley_frame(self, frame: dict[str, Any], now: int) -> None:
        kind = frame["type"]
        if kind == "msg":
            position = self.positions.get(frame["room"])
            if position is None:
                return
            seq = frame["seq"]
            if seq == position.since + 1 and seq < position.wake_at:
                # In order, as nearly every message is: count it here without another call.
                position.since = seq
                tally = self.tally
                tally.delivered += 1
                sent = frame["meta"]["t"] if "meta" in frame else None
                if sent is not None and tally.measure_from <= sent <= tally.measure_to:
                    tally.latency.add(now - sent)
            else:
                self._count_msg(position, seq, frame.get("meta"), now)
        elif kind == "acked":
            position = self.positions.get(frame["room"])
            if position is not None:
                if frame["seq"] > position.acked:
                    position.acked = frame["seq"]
                hint = frame.get("ack_interval")
                position.ack_interval = hint / 1000 if isinstance(hint, int) else 0.0
        elif kind == "sent":
            self.sent_replies += 1
            room, seq = frame["room"], frame["seq"]
            if seq > self.sent_heads.get(room, 0):
                self.sent_heads[room] = seq
        elif kind == "joined":
            self._on_joined(frame)
        elif kind == "error":
            self.tally.count_error(str(frame.get("code")))

    def _on_joined(self, frame: dict[str, Any]) -> None:
        position = self.positions.get(frame["room"])
        if position is None:
            return
        # A (re)join states the position the server replays from; anything held beyond it comes again.
        position.since = position.ack_sent = frame["since"]
        if position.name not in self.resumed:
            position.start = frame["since"]
        self.resumed[position.name] = frame
        if not self.ready.done() and len(self.resumed) == len(self.positions):
            self.ready.set_result(None)

    def _relayed_frame(self, frame: dict[str, Any], now: int) -> None:
        position = self.positions.get(frame.get("room", ""))
        if position is not None and frame.get("type") == "msg":
            self._count_msg(position, frame["seq"], frame.get("meta"), now)

    def _socketio_packet(self, payload: bytes, now: int) -> None:
        if payload.startswith(b'42["msg",'):
            self._relayed_frame(orjson.loads(payload[9:-1]), now)
        elif payload.startswith(b"0"):
            self.write(client_frame(b"40"))
        elif payload.startswith(b"40") and not self.ready.done():
            self.ready.set_result(None)
        elif payload == b"2":
            self.write(client_frame(b"3"))


async def open_connection(
    loop: asyncio.AbstractEventLoop, connection: BenchConnection, host: str, port: int, time_limit: float
) -> None:
    """Connect and wait until the connection is ready; raise on failure or after `time_limit` seconds."""
    async with asyncio.timeout(time_limit):
        await loop.create_connection(lambda: connection, host, port)
        await asyncio.shield(connection.ready)
