"""The composition root: builds the store, cache, hub and listener, runs the timers, shuts down cleanly."""

from __future__ import annotations

import asyncio
import gc
import logging
import resource
import signal
import time
from typing import Any
from urllib.parse import urlsplit

import orjson

from parley.cache.memory import MemoryCache
from parley.protocol.delivery import DeliveryTracker
from parley.protocol.errors import CLOSE_GOING_AWAY
from parley.protocol.frames import FrameParser, Limits
from parley.server.auth import Authenticator
from parley.server.config import Settings
from parley.server.connection import HOLD_SHUTDOWN, Connection
from parley.server.cursors import CursorWriter
from parley.server.http import HttpRoutes
from parley.server.hub import Hub
from parley.server.ratelimit import TokenBucket
from parley.server.session import Session
from parley.storage import open_store

log = logging.getLogger("parley.server")

SHUTDOWN_DRAIN = 5.0
RESERVED_FILES = 64  # descriptors kept for the database, its readers, logs and the listening socket
MIN_SECRET_BYTES = 32
GC_YOUNG_THRESHOLD = 50_000


class App:
    """One Parley node: everything `parley serve` runs, wired together."""

    def __init__(self, settings: Settings) -> None:
        settings.check()
        self.settings = settings
        self.limits = Limits(settings.max_body, settings.max_meta)
        self.parser = FrameParser(self.limits)
        self.auth = Authenticator(settings.secret, settings.open_auth)
        self.store = open_store(settings.store, settings.data_dir)
        self.cache = MemoryCache(
            settings.hot_window,
            settings.hot_max_per_room,
            max_bytes_per_room=settings.hot_max_bytes_per_room,
            max_bytes=settings.hot_max_bytes,
        )
        self.tracker = DeliveryTracker(settings.ack_timeout, settings.max_tries)
        self.hub = Hub(
            self.store,
            self.cache,
            self.tracker,
            shard_size=settings.shard_size,
            batch_max=settings.batch_max,
            batch_window=settings.batch_window,
            presence_limit=settings.presence_limit,
            receipt_limit=settings.receipt_limit,
            receipt_interval=settings.receipt_interval,
        )
        self.cursors = CursorWriter(self.store, on_stored=self._on_cursor_stored)
        self.http = HttpRoutes(self)
        self.connections: set[Connection] = set()
        self.users: dict[str, set[Connection]] = {}
        self.handshakes = TokenBucket(settings.handshake_rate, settings.handshake_rate)
        self.max_connections = connection_limit(settings.max_connections)
        self.server: asyncio.Server | None = None
        self.stopping = asyncio.Event()
        self.restart = False
        self.started = time.monotonic()
        self._timers: list[asyncio.Task[None]] = []

    # Lifecycle

    async def start(self) -> None:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        await self.store.open()
        self.store.set_commit_listener(self.hub.on_commit)
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: Connection(self), self.settings.host, self.settings.port, backlog=4096, reuse_address=True
        )
        self._timers = [
            loop.create_task(self._run_resend_wheel()),
            loop.create_task(self._run_heartbeats()),
        ]
        log.info("accepting up to %d connections", self.max_connections)
        if self.settings.secret is not None and len(self.settings.secret.encode()) < MIN_SECRET_BYTES:
            log.warning(
                "the token secret is shorter than %d bytes and can be guessed; use a longer one",
                MIN_SECRET_BYTES,
            )
        if self.settings.open_auth:
            log.warning(
                "open authentication: any client may name its user in hello (listening on %s)",
                self.settings.host,
            )

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        loop.add_signal_handler(signal.SIGINT, self.stopping.set)

    async def shutdown(self) -> None:
        """Stop accepting, store everything already accepted, then close every connection with 1001."""
        log.info("shutting down: %d connections", len(self.connections))
        if self.server is not None:
            self.server.close()

        for connection in list(self.connections):
            connection.hold_reading(HOLD_SHUTDOWN)
        workers = [
            c.session_handler.worker
            for c in self.connections
            if c.session_handler and c.session_handler.worker
        ]
        if workers:
            await asyncio.wait(workers, timeout=SHUTDOWN_DRAIN)

        await self.store.close()
        await asyncio.sleep(0)

        for connection in list(self.connections):
            connection.shutdown(CLOSE_GOING_AWAY)
        for _ in range(40):  # up to two seconds for clients to reply to the close frames
            if not self.connections:
                break
            await asyncio.sleep(0.05)
        for connection in list(self.connections):
            connection.abort()
        for timer in self._timers:
            timer.cancel()
        log.info("stopped")

    async def _run_resend_wheel(self) -> None:
        interval = min(max(self.settings.ack_timeout / 4, 0.01), 0.25)
        while True:
            await asyncio.sleep(interval)
            try:
                self.hub.tick(time.monotonic())
            except Exception:
                log.exception("resend wheel failed")

    async def _run_heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat)
            now = time.monotonic()
            for connection in list(self.connections):
                try:
                    connection.heartbeat(now)
                except Exception:
                    log.exception("heartbeat failed", extra={"session": connection.session})

    def _on_cursor_stored(self, user: str, room: str, cursor: int) -> None:
        self.hub.on_marks(room, user, cursor, None)

    # Connections and users

    def new_session(self, connection: Connection) -> Session:
        return Session(self, connection)

    def origin_allowed(self, origin: str | None, host: str | None) -> bool:
        """Tell whether a browser page from `origin` may open a WebSocket here.

        In open mode anyone who reaches the server may name any user, so a page from another site must
        not connect on behalf of the person browsing it. With tokens a page needs a token anyway.
        Clients outside a browser send no Origin.
        """
        if origin is None or not self.settings.open_auth:
            return True
        origin_host = urlsplit(origin).netloc.lower()
        return bool(host) and origin_host == (host or "").lower()

    def admit_handshake(self) -> int | None:
        """Return None to accept a WebSocket handshake, or the seconds the client should wait."""
        if len(self.connections) > self.max_connections:
            log.warning("refusing handshake: %d connections open", len(self.connections))
            return 5
        wait = self.handshakes.take(time.monotonic())
        if wait > 0:
            log.warning("refusing handshake: reconnect storm")
            return max(1, int(wait) + 1)
        return None

    def remember_user_connection(self, connection: Connection) -> None:
        self.users.setdefault(connection.user, set()).add(connection)

    def forget_user_connection(self, connection: Connection) -> None:
        connections = self.users.get(connection.user)
        if connections is not None:
            connections.discard(connection)
            if not connections:
                del self.users[connection.user]

    def user_connections(self, user: str) -> list[Connection]:
        return list(self.users.get(user, ()))

    # Rooms

    def is_private(self, room: str) -> bool:
        return room.startswith("dm:")

    def may_join(self, user: str, room: str) -> bool:
        """Tell whether `user` may join or read `room`: `dm:alice:bob` admits only alice and bob."""
        if not self.is_private(room):
            return True
        return user in room.split(":")[1:]

    async def read_history(
        self, room_name: str, before: int | None, after: int | None, limit: int
    ) -> tuple[list[orjson.Fragment], bool]:
        """Read one page of a room's history; return the messages as JSON fragments and `more`."""
        room = self.hub.rooms.get(room_name)
        if room is None or room.epoch is None:
            # Rooms this node has loaded keep their head current through the commit listener.
            info = await self.store.room_info(room_name)
            if info is None:
                return [], False
            room = self.hub.room(info.room, info.head, info.epoch)

        if after is not None:
            entries = await self.hub.read_after(room, after, limit) if after < room.head else []
            more = bool(entries) and entries[-1].message.seq < room.head
        else:
            upper = room.head + 1 if before is None else min(before, room.head + 1)
            entries = await self.hub.read_before(room, upper, limit) if upper > 1 else []
            more = bool(entries) and entries[0].message.seq > 1
        return [orjson.Fragment(entry.frame) for entry in entries], more

    def statistics(self) -> dict[str, Any]:
        cache = self.cache.stats()
        return {
            "connections": len(self.connections),
            "users": len(self.users),
            "rooms": len(self.hub.rooms),
            "deliveries": self.hub.deliveries,
            "resends": self.hub.resends,
            "cursor_writes": self.cursors.writes,
            "catch_ups": self.hub.catch_ups,
            "awaiting_ack": self.tracker.armed(),
            "cache": {
                "hits": cache.hits,
                "misses": cache.misses,
                "rooms": cache.rooms,
                "entries": cache.entries,
                "size_bytes": cache.size_bytes,
            },
            "uptime": round(time.monotonic() - self.started, 3),
        }


def tune_garbage_collector() -> None:
    """Collect the young generation less often and leave start-up objects out of full collections.

    Deliveries and acks allocate many short-lived objects, so with the default threshold of 700 the collector
    runs often, and its passes over every connection's objects showed up as tail latency in the bench.
    """
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 50)


def connection_limit(configured: int) -> int:
    """Cap connections below the open-file limit, so handshakes get 503 before accept() starts failing."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(1, min(configured, soft - RESERVED_FILES))


async def serve(settings: Settings, announce: Any = print) -> int:
    """Run a node until SIGTERM or SIGINT; return the exit code."""
    app = App(settings)
    await app.start()
    app.install_signal_handlers()
    tune_garbage_collector()
    announce(
        f"Parley listening on http://{settings.host}:{app.port} (WebSocket at ws://{settings.host}:{app.port}/ws)"
    )
    log.info("started on %s:%d, data in %s", settings.host, app.port, settings.data_dir)
    await app.stopping.wait()
    await app.shutdown()
    return 0
