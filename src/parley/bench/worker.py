"""A load-generator process: runs many benchmark connections and carries out JSON commands from stdin.

`parley bench` starts several of these (`python -m parley.bench.worker`) so that the clients do not
share a CPU core or a file-descriptor limit with the server or with each other. Each command is one
JSON line on stdin and gets one JSON line on stdout:

    connect  open the connections (subscribers, or one publisher)  -> ready
    window   set the time window whose latencies count              -> ok
    publish  (publisher) send messages at a rate or flat out       -> published
    drain    wait until every connection holds the given heads      -> result
    close    close every connection and exit                        -> closed

A subscriber process writes the lowest position of its connections in each room to a shared file every
`PROGRESS_INTERVAL` seconds; in flat-out mode the publisher reads it and keeps each room at most
`window` messages ahead of its slowest member, so the server runs at full speed without a backlog
growing for the whole run. Every wait is bounded by the timeout the command carries.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import struct
import sys
import time
from typing import Any

import orjson

from parley.bench.clients import SOCKETIO_PATH, BenchConnection, Tally, monotonic_us, open_connection
from parley.bench.histogram import Histogram
from parley.bench.wire import HandshakeError, client_frame

PROGRESS_INTERVAL = 0.02
SERIES_INTERVAL = 0.1
ACK_GROUPS = 10
"""Connections are split into this many groups, acknowledged in turn, so acks do not arrive in bursts."""
NO_MEMBERS = 1 << 62
"""The progress value of a room in which a process has no connection."""
CONNECT_TRIES = 4


class ProgressBoard:
    """The shared file of positions: one int64 per (process, room), read by the publisher."""

    def __init__(self, path: str, processes: int, rooms: int) -> None:
        self.processes = processes
        self.rooms = rooms
        self._file = open(path, "r+b")  # noqa: SIM115 - mapped for the life of the process
        self._map = mmap.mmap(self._file.fileno(), 8 * processes * rooms)

    def write(self, process: int, room: int, value: int) -> None:
        struct.pack_into("<q", self._map, 8 * (process * self.rooms + room), value)

    def lowest(self, room: int) -> int:
        values: list[int] = [
            struct.unpack_from("<q", self._map, 8 * (process * self.rooms + room))[0]
            for process in range(self.processes)
        ]
        return min(values)

    @staticmethod
    def create(path: str, processes: int, rooms: int) -> None:
        with open(path, "wb") as file:
            file.write(struct.pack(f"<{processes * rooms}q", *([NO_MEMBERS] * (processes * rooms))))


class Worker:
    """The connections of one process and the commands that drive them."""

    def __init__(self) -> None:
        self.connections: list[BenchConnection] = []
        self.tally = Tally()
        self.kind = "parley"
        self.series: list[tuple[int, int]] = []
        self.board: ProgressBoard | None = None
        self.slot = 0
        self.room_index: dict[str, int] = {}
        # Messages published into each room over every `publish` command: the raw baseline's seq, and
        # the number in Parley message ids, which must stay unique for the sender.
        self.published: dict[str, int] = {}
        self.publisher_lag = Histogram()
        self.connect_errors: dict[str, int] = {}
        self._tasks: list[asyncio.Task[None]] = []

    async def handle(self, command: dict[str, Any]) -> dict[str, Any]:
        name = command["cmd"]
        if name == "connect":
            return await self.connect(command)
        if name == "window":
            self.tally.measure_from = int(command["from"])
            self.tally.measure_to = int(command["to"])
            return {"event": "ok"}
        if name == "publish":
            return await self.publish(command)
        if name == "drain":
            return await self.drain(command)
        if name == "close":
            await self.close(float(command.get("timeout", 5.0)))
            return {"event": "closed"}
        raise ValueError(f"unknown command {name!r}")

    # Connecting

    async def connect(self, command: dict[str, Any]) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        self.kind = command["kind"]
        host, port = command["host"], int(command["port"])
        path = command.get("path") or default_path(self.kind, command.get("role") == "publisher")
        timeout = float(command.get("timeout", 60.0))
        limit = asyncio.Semaphore(int(command.get("concurrency", 100)))
        deadline = time.monotonic() + timeout
        users: list[str] = command["users"]
        rooms: list[list[str]] = command["rooms"]

        async def open_one(user: str, followed: list[str]) -> BenchConnection | None:
            for attempt in range(CONNECT_TRIES):
                connection = BenchConnection(
                    self.kind,
                    host,
                    port,
                    path,
                    user,
                    followed,
                    self.tally,
                    batch=bool(command.get("batch")),
                    hello=command.get("hello"),
                )
                async with limit:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        self._count_connect_error("timed out")
                        return None
                    try:
                        await open_connection(loop, connection, host, port, remaining)
                        return connection
                    except HandshakeError as error:
                        self._count_connect_error(f"HTTP {error.status}")
                        wait = error.retry_after or 0.5
                    except (OSError, ConnectionError, TimeoutError) as error:
                        self._count_connect_error(type(error).__name__)
                        connection.abort()
                        wait = 0.2 * (attempt + 1)
                if attempt + 1 < CONNECT_TRIES:
                    await asyncio.sleep(min(wait, max(0.0, deadline - time.monotonic())))
            return None

        opened = await asyncio.gather(
            *(open_one(user, followed) for user, followed in zip(users, rooms, strict=True))
        )
        self.connections = [connection for connection in opened if connection is not None]

        board = command.get("progress")
        if board is not None:
            self.board = ProgressBoard(board["path"], int(board["processes"]), len(board["rooms"]))
            self.slot = int(board["slot"])
            self.room_index = {room: index for index, room in enumerate(board["rooms"])}
            if command.get("role") != "publisher":
                self._write_progress()
        if self.kind == "parley":
            self._tasks.append(loop.create_task(self._acknowledge(float(command.get("ack_interval", 0.1)))))
        self._tasks.append(loop.create_task(self._sample_series()))
        if self.board is not None and command.get("role") != "publisher":
            self._tasks.append(loop.create_task(self._report_progress()))
        return {
            "event": "ready",
            "open": len(self.connections),
            "failed": len(users) - len(self.connections),
            "seconds": round(time.monotonic() - started, 3),
            "errors": self.connect_errors,
            "heads": self._heads_seen(),
        }

    def _count_connect_error(self, reason: str) -> None:
        self.connect_errors[reason] = self.connect_errors.get(reason, 0) + 1

    def _heads_seen(self) -> dict[str, int]:
        """Return, per room, the highest position a connection started from (the room's head at join)."""
        heads: dict[str, int] = {}
        for connection in self.connections:
            for room, position in connection.positions.items():
                heads[room] = max(heads.get(room, 0), position.since)
        return heads

    # Background work

    async def _acknowledge(self, interval: float) -> None:
        step = interval / ACK_GROUPS
        group = 0
        last = time.monotonic()
        while True:
            await asyncio.sleep(step)
            # A busy loop wakes late. Then every group that fell due is acknowledged at once, so no
            # connection waits much longer than `interval`, or one loop iteration, between its acks.
            now = time.monotonic()
            due = min(ACK_GROUPS, max(1, int((now - last) / step)))
            last = now
            for _ in range(due):
                for connection in self.connections[group::ACK_GROUPS]:
                    connection.send_acks(now)
                group = (group + 1) % ACK_GROUPS

    async def _sample_series(self) -> None:
        while True:
            self.series.append((monotonic_us(), self.tally.delivered))
            await asyncio.sleep(SERIES_INTERVAL)

    async def _report_progress(self) -> None:
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL)
            self._write_progress()

    def _write_progress(self) -> None:
        if self.board is None:
            return
        lowest: dict[str, int] = {}
        for connection in self.connections:
            for room, position in connection.positions.items():
                held = lowest.get(room)
                if held is None or position.since < held:
                    lowest[room] = position.since
        for room, value in lowest.items():
            index = self.room_index.get(room)
            if index is not None:
                self.board.write(self.slot, index, value)

    # Publishing

    async def publish(self, command: dict[str, Any]) -> dict[str, Any]:
        """Send messages into every followed room from `start` (µs) for `duration` seconds."""
        if len(self.connections) != 1:
            return {"event": "published", "error": "the publisher has no open connection"}
        connection = self.connections[0]
        rooms: list[str] = command.get("rooms") or list(connection.positions)
        # A room's head is the higher of the last seq received and the last seq in a `sent` reply.
        base = {
            room: max(connection.positions[room].since, connection.sent_heads.get(room, 0)) for room in rooms
        }
        confirmed_before = connection.sent_replies
        sent = dict.fromkeys(rooms, 0)
        body = command["body"]
        rate = float(command["rate"])
        start = int(command["start"])
        end = start + int(float(command["duration"]) * 1e6)
        limit = int(command.get("max_messages", 1 << 40))
        encode = message_encoder(self.kind, body)

        self.publisher_lag = Histogram()
        await asyncio.sleep(max(0.0, (start - monotonic_us()) / 1e6))
        if rate > 0:
            await self._publish_paced(connection, rooms, sent, rate, start, end, limit, encode)
        else:
            window = int(command.get("window", 200))
            await self._publish_flat_out(connection, rooms, base, sent, window, end, limit, encode)
        finished = monotonic_us()

        heads = {room: base[room] + sent[room] for room in rooms}
        if self.kind == "parley":
            # The server numbers the messages; its `sent` replies confirm that every one was stored.
            expected = confirmed_before + sum(sent.values())
            confirm_by = time.monotonic() + float(command.get("timeout", 30.0))
            while connection.sent_replies < expected and time.monotonic() < confirm_by:
                if connection.closed.done():
                    break
                await asyncio.sleep(0.01)
            heads = {room: connection.sent_heads.get(room, base[room]) for room in rooms}
        reply: dict[str, Any] = {
            "event": "published",
            "sent": sent,
            "heads": heads,
            "confirmed": connection.sent_replies - confirmed_before,
            "started": start,
            "finished": finished,
            "errors": self.tally.errors,
        }
        if self.publisher_lag.count:
            reply["lag_ms"] = {
                "p50": (self.publisher_lag.percentile(0.5) or 0) / 1000,
                "p99": (self.publisher_lag.percentile(0.99) or 0) / 1000,
                "max": (self.publisher_lag.maximum or self.publisher_lag.percentile(1.0) or 0) / 1000,
            }
        return reply

    async def _publish_paced(
        self,
        connection: BenchConnection,
        rooms: list[str],
        sent: dict[str, int],
        rate: float,
        start: int,
        end: int,
        limit: int,
        encode: Any,
    ) -> None:
        period_us = 1e6 / (rate * len(rooms))
        index = 0
        while index < limit:
            scheduled = start + int(index * period_us)
            if scheduled >= end or connection.closed.done():
                return
            now = monotonic_us()
            if scheduled > now:
                await asyncio.sleep((scheduled - now) / 1e6)
            # Messages carry their scheduled time, so a server that falls behind shows it as latency.
            chunk = []
            while index < limit:
                scheduled = start + int(index * period_us)
                if scheduled > monotonic_us() or scheduled >= end:
                    break
                room = rooms[index % len(rooms)]
                sent[room] += 1
                chunk.append(encode(room, self._next_number(room), scheduled))
                index += 1
            if chunk:
                connection.write(b"".join(chunk))
                # How late the publisher itself sent, which counts in every latency it measures.
                self.publisher_lag.add(monotonic_us() - start - int((index - len(chunk)) * period_us))

    async def _publish_flat_out(
        self,
        connection: BenchConnection,
        rooms: list[str],
        base: dict[str, int],
        sent: dict[str, int],
        window: int,
        end: int,
        limit: int,
        encode: Any,
    ) -> None:
        assert self.board is not None, "flat-out publishing needs the progress board"
        indexes = [self.room_index[room] for room in rooms]
        total = 0
        while monotonic_us() < end and total < limit and not connection.closed.done():
            if connection.paused:
                await asyncio.sleep(0.001)
                continue
            chunk = []
            now = monotonic_us()
            for room, index in zip(rooms, indexes, strict=True):
                allowed = self.board.lowest(index) + window - (base[room] + sent[room])
                for _ in range(min(allowed, 64, limit - total)):
                    sent[room] += 1
                    total += 1
                    chunk.append(encode(room, self._next_number(room), now))
            if chunk:
                connection.write(b"".join(chunk))
                await asyncio.sleep(0)
            else:
                await asyncio.sleep(0.001)

    def _next_number(self, room: str) -> int:
        number = self.published.get(room, 0) + 1
        self.published[room] = number
        return number

    # Finishing

    async def drain(self, command: dict[str, Any]) -> dict[str, Any]:
        """Wait until each connection has received its room's head, confirm the last acks, and report."""
        heads: dict[str, int] = command["heads"]
        deadline = time.monotonic() + float(command.get("timeout", 30.0))
        # Polled: a wake-up per delivered message would cost more than a check every 20 ms.
        while time.monotonic() < deadline and self._behind(heads):  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        finished = monotonic_us()

        unconfirmed = 0
        if self.kind == "parley" and command.get("confirm", True):
            for connection in self.connections:
                connection.send_acks(time.monotonic(), force=True)
            confirm_by = time.monotonic() + min(10.0, float(command.get("timeout", 30.0)))
            while time.monotonic() < confirm_by and self._unconfirmed(heads):  # noqa: ASYNC110
                await asyncio.sleep(0.02)
            unconfirmed = self._unconfirmed(heads)

        lost = self.tally.skipped
        behind = 0
        for connection in self.connections:
            for room, position in connection.positions.items():
                missing = heads.get(room, position.since) - position.since
                if missing > 0:
                    lost += missing
                    behind += 1
        self.series.append((monotonic_us(), self.tally.delivered))
        pings = [connection.pings for connection in self.connections]
        return {
            "rooms": self._room_summaries(),
            "event": "result",
            "tally": self.tally.to_json(),
            "series": self.series,
            "lost": lost,
            "behind": behind,
            "unconfirmed": unconfirmed,
            "open": sum(1 for connection in self.connections if not connection.closed.done()),
            "connections": len(self.connections),
            "pings_min": min(pings) if pings else 0,
            "drained_at": finished,
        }

    def _room_summaries(self) -> dict[str, dict[str, int]]:
        """Summarize each room's connections: how many and how many open, the lowest and highest
        position, the messages received in order, and the fewest pings any one of them answered."""
        rooms: dict[str, dict[str, int]] = {}
        for connection in self.connections:
            for room, position in connection.positions.items():
                summary = rooms.setdefault(
                    room,
                    {"connections": 0, "open": 0, "lowest": position.since, "highest": position.since,
                     "received": 0, "pings_min": connection.pings},
                )  # fmt: skip
                summary["connections"] += 1
                summary["open"] += 0 if connection.closed.done() else 1
                summary["lowest"] = min(summary["lowest"], position.since)
                summary["highest"] = max(summary["highest"], position.since)
                summary["received"] += position.since - position.start
                summary["pings_min"] = min(summary["pings_min"], connection.pings)
        return rooms

    def _behind(self, heads: dict[str, int]) -> bool:
        return any(
            position.since < heads.get(room, 0)
            for connection in self.connections
            if not connection.closed.done()
            for room, position in connection.positions.items()
        )

    def _unconfirmed(self, heads: dict[str, int]) -> int:
        return sum(
            1
            for connection in self.connections
            if not connection.closed.done()
            for room, position in connection.positions.items()
            if position.acked < min(heads.get(room, 0), position.since)
        )

    async def close(self, time_limit: float) -> None:
        for task in self._tasks:
            task.cancel()
        for connection in self.connections:
            connection.close()
        waiting = [connection.closed for connection in self.connections if not connection.closed.done()]
        if waiting:
            await asyncio.wait(waiting, timeout=time_limit)
        for connection in self.connections:
            connection.abort()


def default_path(kind: str, publisher: bool) -> str:
    if kind == "socketio":
        return SOCKETIO_PATH + ("&role=pub" if publisher else "")
    if kind == "raw" and publisher:
        return "/pub"
    return "/ws"


def message_encoder(kind: str, body: str) -> Any:
    """Return a function (room, number, time µs) -> one client frame publishing message `number`."""
    body_json = orjson.dumps(body)

    def parley(room: str, number: int, sent_at: int) -> bytes:
        return client_frame(
            b'{"type":"send","room":"%s","id":"p%d","body":%s,"meta":{"t":%d}}'
            % (room.encode(), number, body_json, sent_at)
        )

    def relayed(room: str, number: int, sent_at: int) -> bytes:
        return client_frame(
            b'{"type":"msg","room":"%s","seq":%d,"from":"bench-pub","body":%s,"meta":{"t":%d}}'
            % (room.encode(), number, body_json, sent_at)
        )

    def socketio(room: str, number: int, sent_at: int) -> bytes:
        return client_frame(
            b'42["msg",{"type":"msg","room":"%s","seq":%d,"from":"bench-pub","body":%s,"meta":{"t":%d}}]'
            % (room.encode(), number, body_json, sent_at)
        )

    return {"parley": parley, "raw": relayed, "socketio": socketio}[kind]


async def serve_commands() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    worker = Worker()
    while True:
        line = await reader.readline()
        if not line:
            await worker.close(2.0)
            return
        command = orjson.loads(line)
        try:
            reply = await worker.handle(command)
        except Exception as error:  # reported to the parent, which stops the run
            reply = {"event": "error", "error": f"{type(error).__name__}: {error}"}
        sys.stdout.buffer.write(orjson.dumps(reply) + b"\n")
        sys.stdout.buffer.flush()
        if command["cmd"] == "close":
            return


def main() -> None:
    # The parent ends a worker by closing its stdin; SIGTERM (default action) stops it otherwise.
    if os.environ.get("PARLEY_BENCH_NO_UVLOOP"):
        asyncio.run(serve_commands())
        return
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve_commands())
        return
    uvloop.run(serve_commands())


if __name__ == "__main__":
    main()
