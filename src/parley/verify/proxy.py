"""A fault-injecting TCP proxy for 127.0.0.1: cuts, delays, stalls and black-holes connections.

Each accepted connection becomes a `Link` to the upstream address, with one pump per direction. A pump
reads chunks into a small bounded queue and a writer task forwards them. When a direction is stalled,
its queue fills and its pump stops reading, so the sender's kernel buffers fill as on a congested
network. The faults, applied by the caller (see `faults.py`) or by a test:

- `cut`: both sockets close at once, with a FIN, or with an RST (SO_LINGER set to 0).
- `delay`: every chunk waits the given seconds before it is forwarded, in order.
- `stall`: one or both directions stop forwarding until `heal` or the stall's end; nothing is lost.
- `black_hole`: both directions stop forwarding for good and neither side is told: no data, no FIN
  and no RST, even when a side closes. The link is reset after `black_hole_for` seconds, the way a
  TCP stack finally gives up after its retransmission timeout (with None it stays until the proxy
  closes).

Random choices (which link, FIN or RST) come from the `rng` passed in, so a seeded run picks the same
faults in the same order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import struct
from collections import Counter
from collections.abc import Callable
from typing import Final

log = logging.getLogger("parley.verify.proxy")

CHUNK_SIZE: Final = 65536
QUEUE_CHUNKS: Final = 16
"""Maximum chunks queued in one direction before its pump stops reading, which bounds memory per link."""

_EOF: Final = b""

UP: Final = "up"
"""Direction from the client to the upstream server."""
DOWN: Final = "down"
"""Direction from the upstream server to the client."""


class _Direction:
    """One direction of a link: its gate (closed while stalled), its delay and its queue of chunks."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.delay = 0.0
        self.gate = asyncio.Event()
        self.gate.set()
        self.queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUE_CHUNKS)
        self.forwarded = 0


class Link:
    """One proxied connection: the client's socket, the upstream socket and a pump per direction."""

    def __init__(
        self,
        number: int,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.number = number
        self.client_reader, self.client_writer = client
        self.upstream_reader, self.upstream_writer = upstream
        self.up = _Direction(UP)
        self.down = _Direction(DOWN)
        self.black_holed = False
        self.closed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._restore: list[asyncio.TimerHandle] = []

    def __repr__(self) -> str:
        return f"<Link {self.number}{' black-holed' if self.black_holed else ''}>"

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._read(self.client_reader, self.up)),
            asyncio.create_task(self._write(self.up, self.upstream_writer)),
            asyncio.create_task(self._read(self.upstream_reader, self.down)),
            asyncio.create_task(self._write(self.down, self.client_writer)),
        ]
        for task in self._tasks:
            task.add_done_callback(self._on_task_done)

    def directions(self, which: str) -> list[_Direction]:
        if which == UP:
            return [self.up]
        if which == DOWN:
            return [self.down]
        if which == "both":
            return [self.up, self.down]
        raise ValueError(f"direction must be {UP!r}, {DOWN!r} or 'both', got {which!r}")

    def set_delay(self, seconds: float, duration: float | None = None) -> None:
        """Delay every chunk in both directions by `seconds`, for `duration` seconds (None: until healed)."""
        for direction in (self.up, self.down):
            direction.delay = seconds
        if duration is not None:
            self._later(duration, lambda: self.set_delay(0.0))

    def stall(self, which: str, duration: float | None = None) -> None:
        """Stop forwarding in `which` direction(s) for `duration` seconds (None: until healed)."""
        for direction in self.directions(which):
            direction.gate.clear()
        if duration is not None:
            self._later(duration, lambda: self.resume(which))

    def resume(self, which: str = "both") -> None:
        """End a stall; a black-holed link stays silent."""
        if self.black_holed:
            return
        for direction in self.directions(which):
            direction.gate.set()

    def black_hole(self, reset_after: float | None) -> None:
        """Forward nothing more and tell neither side; reset both sockets after `reset_after` seconds."""
        self.black_holed = True
        for direction in (self.up, self.down):
            direction.gate.clear()
        if reset_after is not None:
            self._later(reset_after, lambda: self.cut(reset=True))

    def heal(self) -> None:
        """End delays and stalls. A black-holed link is reset, because its bytes can never arrive in order."""
        for handle in self._restore:
            handle.cancel()
        self._restore.clear()
        if self.black_holed:
            self.cut(reset=True)
            return
        for direction in (self.up, self.down):
            direction.delay = 0.0
            direction.gate.set()

    def cut(self, reset: bool) -> None:
        """Close both sockets now: with an RST when `reset`, else with a FIN."""
        for writer in (self.client_writer, self.upstream_writer):
            if reset:
                _set_linger_zero(writer)
            writer.transport.abort()
        self._finish()

    def _later(self, delay: float, action: Callable[[], None]) -> None:
        self._restore.append(asyncio.get_running_loop().call_later(delay, action))

    async def _read(self, reader: asyncio.StreamReader, direction: _Direction) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = await reader.read(CHUNK_SIZE)
            except ConnectionError:
                data = _EOF
            await direction.queue.put((loop.time() + direction.delay, data))
            if not data:
                return

    async def _write(self, direction: _Direction, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, data = await direction.queue.get()
            await direction.gate.wait()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
                await direction.gate.wait()

            if not data:
                if writer.can_write_eof():
                    with contextlib.suppress(OSError):
                        writer.write_eof()
                return
            writer.write(data)
            direction.forwarded += len(data)
            try:
                await writer.drain()
            except ConnectionError:
                self.cut(reset=True)
                return

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        if task.exception() is not None:
            log.error("proxy link %d failed", self.number, exc_info=task.exception())
            self.cut(reset=True)
            return
        # Both writers are done once each direction forwarded its EOF: the link is over.
        writers_done = all(t.done() for t in (self._tasks[1], self._tasks[3]))
        if writers_done:
            for writer in (self.client_writer, self.upstream_writer):
                writer.close()
            self._finish()

    def _finish(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for handle in self._restore:
            handle.cancel()
        for task in self._tasks:
            task.cancel()


def _set_linger_zero(writer: asyncio.StreamWriter) -> None:
    """Make the next close send an RST instead of a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class FaultProxy:
    """Listens on `host:port` (127.0.0.1, a free port by default) and forwards to `upstream`.

    `faults` counts each fault applied by kind. Connections whose upstream refuses (the server is down)
    are closed at once and counted in `refused`.
    """

    def __init__(
        self,
        upstream: tuple[str, int],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        rng: random.Random | None = None,
        black_hole_for: float | None = 30.0,
    ) -> None:
        self.upstream = upstream
        self.host = host
        self.port = port
        self.rng = rng if rng is not None else random.Random()
        self.black_hole_for = black_hole_for
        self.links: dict[int, Link] = {}
        self.faults: Counter[str] = Counter()
        self.accepted = 0
        self.refused = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop listening and reset every link."""
        if self._server is not None:
            self._server.close()
        for link in list(self.links.values()):
            link.cut(reset=True)
        if self._server is not None:
            await self._server.wait_closed()

    def open_links(self) -> list[Link]:
        """Return the links that are neither closed nor black-holed, oldest first."""
        return [link for link in self.links.values() if not link.closed.is_set() and not link.black_holed]

    def pick(self) -> Link | None:
        """Choose an open link at random, or None when there is none."""
        links = self.open_links()
        return self.rng.choice(links) if links else None

    def cut(self, link: Link, reset: bool | None = None) -> None:
        """Cut `link`, with an RST or a FIN as given, or chosen at random when `reset` is None."""
        if reset is None:
            reset = self.rng.random() < 0.5
        self.faults["cut_rst" if reset else "cut_fin"] += 1
        link.cut(reset)

    def delay(self, link: Link, seconds: float, duration: float | None) -> None:
        self.faults["delay"] += 1
        link.set_delay(seconds, duration)

    def stall(self, link: Link, which: str, duration: float | None) -> None:
        self.faults[f"stall_{which}"] += 1
        link.stall(which, duration)

    def black_hole(self, link: Link) -> None:
        self.faults["black_hole"] += 1
        link.black_hole(self.black_hole_for)

    def heal(self) -> None:
        """End every delay and stall, and reset every black-holed link."""
        for link in list(self.links.values()):
            link.heal()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        number = self.accepted
        try:
            upstream = await asyncio.open_connection(*self.upstream)
        except OSError as error:
            log.debug("link %d: connecting to upstream %s:%d failed: %s", number, *self.upstream, error)
            self.refused += 1
            writer.transport.abort()
            return

        link = Link(number, (reader, writer), upstream)
        self.links[number] = link
        link.start()
        await link.closed.wait()
        self.links.pop(number, None)
