"""A raw Parley test client on the `websockets` asyncio client, and a small HTTP helper.

This is a test utility, not the product's client library: it sends exactly the frames a test gives
it, keeps every frame it receives, and never hides a duplicate or a gap. A background task reads the
socket. `msg` frames are collected per room in arrival order (resends included). Other frames wait in
per-type queues until a test takes them with `wait_for`, so a test can match replies in any order.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
from collections import Counter, deque
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlencode

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

Frame = dict[str, Any]

WAIT_TIMEOUT = 30.0
"""Seconds a client waits for an expected frame or close before the test fails (a `Client.wait_timeout`)."""
ACK_DELAY = 0.02
"""Seconds an automatic ack waits so that a burst of messages gets one cumulative ack."""


class FrameTimeout(AssertionError):
    """Failure of a wait: the expected frame or close did not arrive in time. The message lists what did."""


class Client:
    """One WebSocket connection to a Parley server, with everything it received.

    Open it with `Client.open` and usually `login`, or with `Client.login_as` for both. With
    `auto_ack`, the client acknowledges each room up to the highest seq it has received without a gap, as a
    well-behaved application does, after a delay of `ACK_DELAY` seconds to coalesce bursts.
    """

    def __init__(self, ws: ClientConnection, *, auto_ack: bool = False) -> None:
        self.ws = ws
        self.auto_ack = auto_ack
        self.wait_timeout = WAIT_TIMEOUT
        self.frames: list[Frame] = []
        self.messages: dict[str, list[Frame]] = {}
        self.pending: dict[str, deque[Frame]] = {}
        self.acked: dict[str, int] = {}
        self.epochs: dict[str, str] = {}
        self.array_messages = 0
        self.close_code: int | None = None
        self.close_reason = ""
        self._changed = asyncio.Condition()
        self._contiguous: dict[str, int] = {}
        self._ack_due: dict[str, int] = {}
        self._ack_task: asyncio.Task[None] | None = None
        self._reader = asyncio.get_running_loop().create_task(self._read_loop())

    # Opening and closing

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        query: dict[str, str] | None = None,
        auto_ack: bool = False,
    ) -> Client:
        """Open the WebSocket without sending anything."""
        if query:
            url = f"{url}?{urlencode(query)}"
        ws = await connect(
            url,
            additional_headers=headers,
            compression=None,
            proxy=None,
            ping_interval=None,
            max_size=None,
            max_queue=None,
            open_timeout=WAIT_TIMEOUT,
            close_timeout=2,
        )
        return cls(ws, auto_ack=auto_ack)

    @classmethod
    async def login_as(cls, url: str, user: str, *, auto_ack: bool = True, **hello: Any) -> Client:
        """Open a connection, send `hello` for `user` in open authentication, and wait for `welcome`."""
        client = await cls.open(url, auto_ack=auto_ack)
        await client.login(user=user, **hello)
        return client

    async def login(self, **hello: Any) -> Frame:
        """Send `hello` with the given fields and return the `welcome` reply."""
        await self.send({"type": "hello", **hello})
        return await self.wait_for("welcome")

    async def close(self) -> None:
        """Close the connection with 1000 and stop the reader and the ack task."""
        if self._ack_task is not None:
            self._ack_task.cancel()
        await self.ws.close()
        await asyncio.wait_for(self._reader, self.wait_timeout)

    async def abort(self) -> None:
        """Drop the TCP connection without a closing handshake, as a crashed client would."""
        if self._ack_task is not None:
            self._ack_task.cancel()
        self.ws.transport.abort()
        await asyncio.wait_for(self._reader, self.wait_timeout)

    async def wait_closed(self) -> int | None:
        """Wait until the connection closes and return the close code the server sent (1006 for none)."""
        try:
            await asyncio.wait_for(asyncio.shield(self._reader), self.wait_timeout)
        except TimeoutError:
            raise FrameTimeout(
                f"connection still open after {self.wait_timeout} s; received {self.tail()}"
            ) from None
        return self.close_code

    @property
    def closed(self) -> bool:
        """Tell whether the reader saw the connection end (the close code is then known)."""
        return self.close_code is not None

    # Sending

    async def send(self, frame: Frame | list[Any]) -> None:
        """Send one frame, or a list of frames as one JSON array message."""
        await self.ws.send(json.dumps(frame))

    async def send_raw(self, data: str | bytes, *, text: bool | None = None) -> None:
        """Send a message verbatim: a str as text, bytes as binary unless `text` is true."""
        await self.ws.send(data, text=text)

    async def ack(self, room: str, seq: int) -> Frame:
        """Acknowledge `room` up to `seq` and return the server's `acked` reply."""
        await self.send({"type": "ack", "room": room, "seq": seq})
        return await self.wait_reply("acked", {"type": "ack", "room": room})

    async def join(self, room: str, **fields: Any) -> Frame:
        """Send `join` and return the `joined` reply."""
        await self.send({"type": "join", "room": room, **fields})
        return await self.wait_reply("joined", {"type": "join", "room": room})

    async def publish(self, room: str, message_id: str, body: str, **fields: Any) -> Frame:
        """Send one `send` frame and return its `sent` reply."""
        await self.send({"type": "send", "room": room, "id": message_id, "body": body, **fields})
        return await self.wait_reply("sent", {"type": "send", "room": room, "id": message_id})

    async def sync(self) -> None:
        """Round-trip a `ping` frame: every frame the server wrote before its `pong` has then arrived."""
        await self.send({"type": "ping"})
        await self.wait_for("pong")

    # Receiving

    async def wait_for(
        self,
        kind: str,
        where: Callable[[Frame], bool] | None = None,
        **fields: Any,
    ) -> Frame:
        """Take the oldest received frame of type `kind` whose fields equal `fields` and pass `where`."""

        def matches(frame: Frame) -> bool:
            if any(frame.get(key) != value for key, value in fields.items()):
                return False
            return where is None or where(frame)

        return await self.wait_for_any((kind,), matches, f"{kind} frame with {fields}")

    async def wait_reply(self, kind: str, ref: Frame) -> Frame:
        """Wait for the `kind` reply to the frame described by `ref`, and fail at once on an error about it.

        The reply matches on the `ref` fields it carries (`room`, `id`), and an error matches when its
        `ref` equals `ref`.
        """
        fields = {key: value for key, value in ref.items() if key != "type"}

        def is_reply(frame: Frame) -> bool:
            if frame.get("type") == "error":
                return bool(frame.get("ref") == ref)
            return all(frame.get(key) == value for key, value in fields.items())

        reply = await self.wait_for_any((kind, "error"), is_reply, f"{kind} or error for {ref}")
        if reply["type"] == "error":
            raise AssertionError(f"expected {kind} for {ref}, got error {reply}")
        return reply

    async def wait_for_any(
        self, kinds: tuple[str, ...], where: Callable[[Frame], bool], wanted: str
    ) -> Frame:
        """Take the oldest received frame whose type is one of `kinds` and which passes `where`."""

        def find() -> Frame | None:
            for kind in kinds:
                queue = self.pending.get(kind, deque())
                for index, frame in enumerate(queue):
                    if where(frame):
                        del queue[index]
                        return frame
            return None

        async def take() -> Frame:
            async with self._changed:
                while True:
                    found = find()
                    if found is not None:
                        return found
                    if self.closed:
                        raise FrameTimeout(
                            f"closed with {self.close_code} before a {wanted} arrived; received {self.tail()}"
                        )
                    await self._changed.wait()

        try:
            return await asyncio.wait_for(take(), self.wait_timeout)
        except TimeoutError:
            raise FrameTimeout(f"no {wanted} within {self.wait_timeout} s; received {self.tail()}") from None

    async def wait_messages(self, room: str, count: int) -> list[Frame]:
        """Wait until at least `count` `msg` frames of `room` arrived, and return all of them."""

        async def enough() -> None:
            async with self._changed:
                while len(self.messages.get(room, [])) < count:
                    if self.closed:
                        return
                    await self._changed.wait()

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(enough(), self.wait_timeout)
        received = self.messages.get(room, [])
        if len(received) < count:
            raise FrameTimeout(
                f"{len(received)} of {count} msg frames for {room} within {self.wait_timeout} s "
                f"(closed: {self.close_code}); last seqs {self.seqs(room)[-10:]}"
            )
        return received

    def seqs(self, room: str) -> list[int]:
        """List the seq of every `msg` frame received for `room`, in arrival order."""
        return [frame["seq"] for frame in self.messages.get(room, [])]

    def take_all(self, kind: str) -> list[Frame]:
        """Remove and return every waiting frame of type `kind`."""
        queue = self.pending.pop(kind, deque())
        return list(queue)

    def tail(self, count: int = 8) -> str:
        """Describe the last frames received, for failure messages."""
        return json.dumps(self.frames[-count:])[:2000]

    async def _read_loop(self) -> None:
        try:
            async for message in self.ws:
                value = orjson.loads(message)
                if isinstance(value, list):
                    self.array_messages += 1
                frames = value if isinstance(value, list) else [value]
                async with self._changed:
                    for frame in frames:
                        self._on_frame(frame)
                    self._changed.notify_all()
        except ConnectionClosed:
            pass
        finally:
            received = self.ws.protocol.close_rcvd
            self.close_code = received.code if received is not None else 1006
            self.close_reason = received.reason if received is not None else ""
            async with self._changed:
                self._changed.notify_all()

    def _on_frame(self, frame: Frame) -> None:
        self.frames.append(frame)
        kind = frame.get("type")
        if kind == "msg":
            room = frame["room"]
            self.messages.setdefault(room, []).append(frame)
            if frame["seq"] == self._contiguous.get(room, 0) + 1:
                self._contiguous[room] = frame["seq"]
                if self.auto_ack:
                    self._schedule_ack(room, frame["seq"])
            return
        if kind == "joined":
            # A (re)join states what the client holds, so contiguity restarts from `since`.
            self._contiguous[frame["room"]] = frame["since"]
            self.epochs[frame["room"]] = frame["epoch"]
        elif kind == "acked":
            self.acked[frame["room"]] = max(self.acked.get(frame["room"], 0), frame["seq"])
        self.pending.setdefault(str(kind), deque()).append(frame)

    def _schedule_ack(self, room: str, seq: int) -> None:
        self._ack_due[room] = seq
        if self._ack_task is None or self._ack_task.done():
            self._ack_task = asyncio.get_running_loop().create_task(self._flush_acks())

    async def _flush_acks(self) -> None:
        await asyncio.sleep(ACK_DELAY)
        due, self._ack_due = self._ack_due, {}
        try:
            for room, seq in due.items():
                await self.ws.send(json.dumps({"type": "ack", "room": room, "seq": seq}))
        except ConnectionClosed:
            pass


def assert_in_order_once(seqs: Iterable[int], first: int, last: int) -> None:
    """Check that `seqs` is exactly first, first + 1, …, last."""
    received = list(seqs)
    expected = list(range(first, last + 1))
    if received != expected:
        missing = sorted(set(expected) - set(received))
        repeated = sorted(seq for seq, count in Counter(received).items() if count > 1)
        raise AssertionError(
            f"expected seqs {first}..{last} once in order; got {len(received)} frames, "
            f"missing {missing[:20]}, repeated {repeated[:20]}, first {received[:10]}, last {received[-10:]}"
        )


# HTTP


def http_get(port: int, path: str, query: dict[str, Any] | None = None) -> tuple[int, bytes]:
    """GET a path from the server on 127.0.0.1 (blocking) and return the status and body."""
    if query:
        path = f"{path}?{urlencode(query)}"
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT_TIMEOUT)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


async def get_json(port: int, path: str, query: dict[str, Any] | None = None) -> Any:
    """GET a JSON document without blocking the event loop, and fail unless the status is 200."""
    status, body = await asyncio.to_thread(http_get, port, path, query)
    assert status == 200, f"GET {path} {query}: status {status}, body {body[:500]!r}"
    return orjson.loads(body)


async def stored_messages(port: int, room: str) -> list[Frame]:
    """Read a room's whole history over HTTP, page by page with `after`."""
    messages: list[Frame] = []
    after = 0
    for _ in range(10_000):
        page = await get_json(port, f"/api/rooms/{room}/messages", {"after": after, "limit": 200})
        messages.extend(page["messages"])
        if not page["more"]:
            return messages
        assert page["messages"], f"page after {after} is empty but says more"
        after = page["messages"][-1]["seq"]
    raise AssertionError("history paging did not end")


async def members(url: str, room: str, *users: str, auto_ack: bool = True) -> list[Client]:
    """Log each user in on its own connection, join `room`, and return the clients in the order of `users`."""
    clients = []
    for user in users:
        client = await Client.login_as(url, user, auto_ack=auto_ack)
        await client.join(room)
        clients.append(client)
    return clients


async def close_all(*clients: Client) -> None:
    """Close every client that is still open."""
    for client in clients:
        if not client.closed:
            await client.close()
