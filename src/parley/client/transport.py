"""The client's WebSocket transport: connect, reconnect with backoff and full jitter, read and write frames.

The transport keeps no protocol state. It opens a connection, writes the `hello` that its
listener builds, hands every text message to the listener, writes queued frames in order, and when the
connection ends, waits and connects again. Close code 4001 and HTTP 401 stop it for good.

Reconnect delay: a random wait in [0, min(cap, base × 2^(n-1))] for the n-th consecutive failed attempt
("full jitter"). A connection that was welcomed and then lasted STABLE_CONNECTION seconds, or was closed
by a planned shutdown or restart (1000, 1001, 1012), resets n to 1. An HTTP `Retry-After` header
lengthens the wait to at least its value, at most MAX_RETRY_AFTER seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from parley import __version__
from parley.client.validation import parse_retry_after
from parley.protocol.errors import CLOSE_GOING_AWAY, CLOSE_NORMAL, CLOSE_RESTART, CLOSE_UNAUTHORIZED

log = logging.getLogger("parley.client")

MAX_MESSAGE_SIZE = 2**25
"""Largest WebSocket message accepted from the server, in bytes: a 200-message history page of
maximum-size bodies, escaped, stays below it."""

STABLE_CONNECTION = 10.0
PLANNED_CLOSE_CODES = frozenset({CLOSE_NORMAL, CLOSE_GOING_AWAY, CLOSE_RESTART})
MAX_RETRY_AFTER = 300.0
MAX_FRAMES_PER_ARRAY = 100


class TransportListener(Protocol):
    """Callbacks from the transport into the protocol layer of the client."""

    def hello_frame(self) -> dict[str, Any]:
        """Build the `hello` to write first on a new connection."""

    def welcomed(self) -> bool:
        """Return whether the current connection has received `welcome`."""

    def on_text(self, data: str) -> None:
        """Handle one text message from the server."""

    def on_connection_lost(self) -> None:
        """Forget per-connection state; frames queued for the lost connection are gone."""

    def on_unauthorized(self, reason: str) -> None:
        """Stop for good: the server rejected the credentials."""


@dataclass(frozen=True, slots=True)
class _ConnectionEnd:
    """How one connection attempt ended, which decides the wait before the next one."""

    reason: str
    close_code: int | None = None
    http_status: int | None = None
    retry_after: float | None = None
    welcomed: bool = False
    duration: float = 0.0


class Transport:
    """One WebSocket connection at a time to `url`, reopened after every disconnect until closed.

    `token` goes into the `Authorization: Bearer` header. `open_timeout` bounds both the handshake and the
    wait for `welcome` after `hello`. The send queue has no size limit.
    """

    def __init__(
        self,
        url: str,
        listener: TransportListener,
        *,
        token: str | None,
        batch: bool,
        open_timeout: float,
        backoff_base: float,
        backoff_cap: float,
        rng: random.Random,
    ) -> None:
        self.url = url
        self._listener = listener
        self._token = token
        self._batch = batch
        self._open_timeout = open_timeout
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._rng = rng

        self._ws: ClientConnection | None = None
        self._queue: asyncio.Queue[dict[str, Any]] | None = None
        self._run_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._background: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        """Start connecting in a background task; does nothing when already started."""
        if self._run_task is None:
            self._run_task = asyncio.create_task(self._run(), name=f"parley-client {self.url}")

    def send(self, frame: dict[str, Any]) -> bool:
        """Queue `frame` on the open connection; return False, dropping it, when none is open."""
        if self._queue is None:
            return False
        self._queue.put_nowait(frame)
        return True

    async def drain(self) -> None:
        """Wait until every frame queued on the open connection has been written.

        Never returns when the connection drops first; callers bound the wait with `asyncio.timeout`.
        """
        if self._queue is not None:
            await self._queue.join()

    def stop(self) -> None:
        """Stop reconnecting and close the open connection with code 1000, in the background."""
        self._stopping = True
        if self._ws is not None:
            self._spawn(self._ws.close(CLOSE_NORMAL))

    async def close(self) -> None:
        """Stop reconnecting, close the open connection with code 1000 and end the background task."""
        self._stopping = True
        if self._ws is not None:
            await self._ws.close(CLOSE_NORMAL)
        for task in (self._run_task, *self._background):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _run(self) -> None:
        failures = 0
        while not self._stopping:
            try:
                end = await self._connect_once()
            except Exception:
                log.exception("connection to %s failed unexpectedly; reconnecting", self.url)
                end = _ConnectionEnd("internal error in the client")
            if self._stopping:
                return

            if end.close_code == CLOSE_UNAUTHORIZED or end.http_status == 401:
                self._listener.on_unauthorized(end.reason)
                return

            healthy = end.welcomed and (
                end.close_code in PLANNED_CLOSE_CODES or end.duration >= STABLE_CONNECTION
            )
            failures = 1 if healthy else failures + 1
            delay = self._reconnect_delay(failures, end.retry_after)
            log.info(
                "connection to %s ended (%s); reconnecting in %.2f s, attempt %d",
                self.url,
                end.reason,
                delay,
                failures,
            )
            await asyncio.sleep(delay)

    async def _connect_once(self) -> _ConnectionEnd:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            ws = await connect(
                self.url,
                additional_headers=self._handshake_headers(),
                user_agent_header=f"parley-client/{__version__}",
                proxy=None,
                open_timeout=self._open_timeout,
                max_size=MAX_MESSAGE_SIZE,
            )
        except InvalidStatus as error:
            status = error.response.status_code
            retry_after = parse_retry_after(error.response.headers.get("Retry-After"))
            return _ConnectionEnd(f"HTTP {status} on connect", http_status=status, retry_after=retry_after)
        except (OSError, TimeoutError, InvalidHandshake) as error:
            return _ConnectionEnd(f"connect failed: {error or type(error).__name__}")

        self._ws = ws
        self._queue = asyncio.Queue()
        self._queue.put_nowait(self._listener.hello_frame())
        overdue = loop.call_later(self._open_timeout, self._close_unless_welcomed, ws)
        try:
            await self._pump(ws, self._queue)
        finally:
            overdue.cancel()
            welcomed = self._listener.welcomed()
            self._ws = None
            self._queue = None
            self._listener.on_connection_lost()
            await ws.close()

        code = ws.close_code
        reason = f"closed with code {code}" + (f" ({ws.close_reason})" if ws.close_reason else "")
        return _ConnectionEnd(reason, close_code=code, welcomed=welcomed, duration=loop.time() - started)

    async def _pump(self, ws: ClientConnection, queue: asyncio.Queue[dict[str, Any]]) -> None:
        """Run the reader and the writer of one connection until either ends."""
        reader = asyncio.create_task(self._read_loop(ws))
        writer = asyncio.create_task(self._write_loop(ws, queue))
        try:
            await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (reader, writer):
                task.cancel()
            results = await asyncio.gather(reader, writer, return_exceptions=True)

        for result in results:
            if isinstance(result, Exception) and not isinstance(result, ConnectionClosed):
                log.error("client connection task failed", exc_info=result)

    async def _read_loop(self, ws: ClientConnection) -> None:
        async for data in ws:
            if isinstance(data, bytes):
                log.warning("binary message from server ignored")
                continue
            self._listener.on_text(data)

    async def _write_loop(self, ws: ClientConnection, queue: asyncio.Queue[dict[str, Any]]) -> None:
        while True:
            frames = [await queue.get()]
            # Frames queued meanwhile go out as one array; servers always accept arrays from clients.
            while self._batch and not queue.empty() and len(frames) < MAX_FRAMES_PER_ARRAY:
                frames.append(queue.get_nowait())

            payload = orjson.dumps(frames if len(frames) > 1 else frames[0])
            await ws.send(payload.decode())
            for _ in frames:
                queue.task_done()

    def _close_unless_welcomed(self, ws: ClientConnection) -> None:
        if self._ws is ws and not self._listener.welcomed():
            log.warning("no welcome from %s within %.1f s; closing", self.url, self._open_timeout)
            self._spawn(ws.close())

    def _reconnect_delay(self, failures: int, retry_after: float | None) -> float:
        ceiling = min(self._backoff_cap, self._backoff_base * 2 ** min(failures - 1, 32))
        delay = self._rng.uniform(0.0, ceiling)
        if retry_after is not None:
            delay = max(delay, min(retry_after, MAX_RETRY_AFTER))
        return delay

    def _handshake_headers(self) -> dict[str, str] | None:
        if self._token is None:
            return None
        return {"Authorization": f"Bearer {self._token}"}

    def _spawn(self, work: Awaitable[None]) -> None:
        async def run() -> None:
            await work

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
