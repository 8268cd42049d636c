"""The client library against a scripted WebSocket server on 127.0.0.1, for cases a correct server rarely
causes: gaps, resets, close codes, rate limits, refused handshakes and malformed frames."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from http import HTTPStatus
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from parley.client import Client, RequestFailed, StateFileError, Unauthorized
from parley.client.positions import ClientState, StateFile

FAST_RECONNECT = {"backoff_base": 0.01, "backoff_cap": 0.05}
EPOCH = "e1"

Script = Callable[["Peer", int], Awaitable[None]]


class Peer:
    """The server side of one scripted connection."""

    def __init__(self, ws: ServerConnection) -> None:
        self.ws = ws
        self.received: list[dict[str, Any]] = []

    async def send(self, *frames: dict[str, Any] | list[dict[str, Any]] | str) -> None:
        for frame in frames:
            await self.ws.send(frame if isinstance(frame, str) else json.dumps(frame))

    async def expect(self, frame_type: str) -> dict[str, Any]:
        """Receive frames until one of `frame_type` arrives; acks and others are recorded and skipped."""
        while True:
            data = await self.ws.recv()
            value = json.loads(data)
            frames: list[dict[str, Any]] = value if isinstance(value, list) else [value]
            for frame in frames:
                self.received.append(frame)
                if frame["type"] == frame_type:
                    return frame

    async def welcome(self, user: str = "alice") -> dict[str, Any]:
        hello = await self.expect("hello")
        await self.send({"type": "welcome", "protocol": 1, "user": user, "session": "s1", "max_body": 4096})
        return hello

    async def idle(self) -> None:
        await self.ws.wait_closed()


class ScriptedServer:
    """Runs `script(peer, index)` for every connection, numbered from 0."""

    def __init__(self, script: Script, reject_first: int = 0) -> None:
        self.script = script
        self.reject_first = reject_first
        self.handshakes = 0
        self.peers: list[Peer] = []
        self.done = asyncio.Event()
        self._server: Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"ws://127.0.0.1:{port}/ws"

    async def start(self) -> ScriptedServer:
        self._server = await serve(self._handle, "127.0.0.1", 0, process_request=self._reject_handshake)
        return self

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    def _reject_handshake(self, connection: ServerConnection, request: Request) -> Response | None:
        self.handshakes += 1
        if self.handshakes > self.reject_first:
            return None
        response = connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "busy\n")
        response.headers["Retry-After"] = "0"
        return response

    async def _handle(self, ws: ServerConnection) -> None:
        peer = Peer(ws)
        self.peers.append(peer)
        with contextlib.suppress(Exception):
            await self.script(peer, len(self.peers) - 1)
            self.done.set()
            await peer.idle()


@contextlib.asynccontextmanager
async def scripted(script: Script, reject_first: int = 0) -> AsyncIterator[ScriptedServer]:
    server = await ScriptedServer(script, reject_first).start()
    try:
        async with asyncio.timeout(20):
            yield server
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def client_for(server: ScriptedServer, **options: Any) -> AsyncIterator[Client]:
    client = Client(server.url, **{"user": "alice", **FAST_RECONNECT, **options})
    try:
        yield client
    finally:
        await client.close()


def joined(since: int, head: int, epoch: str = EPOCH, **extra: Any) -> dict[str, Any]:
    return {"type": "joined", "room": "lobby", "epoch": epoch, "head": head, "since": since, **extra}


def msg(seq: int, body: str | None = None) -> dict[str, Any]:
    return {
        "type": "msg",
        "room": "lobby",
        "seq": seq,
        "id": f"c-o-{seq}",
        "from": "bob",
        "ts": 1_765_000_000_000,
        "body": body if body is not None else f"m{seq}",
    }


async def wait_until(condition: Callable[[], bool]) -> None:
    # Client counters have no event to wait on, so poll; every test runs under a timeout.
    while not condition():  # noqa: ASYNC110
        await asyncio.sleep(0.01)


async def take(client: Client, count: int) -> list[str]:
    stream = client.messages()
    return [(await anext(stream)).body for _ in range(count)]


async def test_gap_makes_client_join_from_position() -> None:
    rejoins: list[dict[str, Any]] = []

    async def script(peer: Peer, index: int) -> None:
        await peer.welcome()
        await peer.expect("join")
        await peer.send(joined(since=0, head=3), msg(1), msg(3))
        rejoins.append(await peer.expect("join"))
        await peer.send(joined(since=1, head=3), msg(2), msg(3))

    async with scripted(script) as server, client_for(server) as client:
        await client.connect()
        await client.join("lobby")
        bodies = await take(client, 3)

    assert bodies == ["m1", "m2", "m3"]
    assert rejoins == [{"type": "join", "room": "lobby", "since": 1, "epoch": EPOCH}]
    assert client.statistics().gaps == 1


@pytest.mark.parametrize("code", [1001, 1006, 1011, 1012, 4008, 4029])
async def test_reconnects_and_resumes_after_close(code: int) -> None:
    hellos: list[dict[str, Any]] = []

    async def script(peer: Peer, index: int) -> None:
        hellos.append(await peer.welcome())
        if index > 0:
            return
        await peer.expect("join")
        await peer.send(joined(since=0, head=2), msg(1), msg(2))
        await peer.expect("ack")
        if code == 1006:
            peer.ws.transport.abort()
        else:
            await peer.ws.close(code)

    async with scripted(script) as server, client_for(server) as client:
        await client.connect()
        await client.join("lobby")
        stream = client.messages()
        await anext(stream)
        await anext(stream)
        await wait_until(lambda: len(hellos) >= 2)

    assert hellos[1]["resume"] == {"lobby": {"since": 2, "epoch": EPOCH}}
    assert "resume" not in hellos[0]


async def test_close_4001_stops_with_unauthorized() -> None:
    async def script(peer: Peer, index: int) -> None:
        await peer.expect("hello")
        await peer.ws.close(4001, "unauthorized")

    async with scripted(script) as server, client_for(server, token="expired") as client:
        with pytest.raises(Unauthorized):
            await client.connect()
        with pytest.raises(Unauthorized):
            client.send_nowait("lobby", "never sent")
        with pytest.raises(Unauthorized):
            await anext(client.messages())

    assert len(server.peers) == 1


async def test_token_sent_as_bearer_header_only() -> None:
    headers: list[str | None] = []
    hellos: list[dict[str, Any]] = []

    async def script(peer: Peer, index: int) -> None:
        assert peer.ws.request is not None
        headers.append(peer.ws.request.headers.get("Authorization"))
        hellos.append(await peer.welcome())

    async with (
        scripted(script) as server,
        client_for(server, user=None, token="t0ken", device="laptop") as client,
    ):
        await client.connect()

    assert headers == ["Bearer t0ken"]
    assert hellos == [{"type": "hello", "device": "laptop"}]


async def test_rate_limited_send_retried_with_same_id() -> None:
    sends: list[dict[str, Any]] = []

    async def script(peer: Peer, index: int) -> None:
        await peer.welcome()
        sends.append(await peer.expect("send"))
        ref = {"type": "send", "room": "lobby", "id": sends[0]["id"]}
        await peer.send(
            {"type": "error", "code": "rate_limited", "retry_after": 50, "message": "slow", "ref": ref}
        )
        sends.append(await peer.expect("send"))
        await peer.send({"type": "sent", "room": "lobby", "id": sends[1]["id"], "seq": 1, "ts": 5})

    async with scripted(script) as server, client_for(server) as client:
        await client.connect()
        sent = await client.send("lobby", "patience", meta={"k": [1, 2]})

    assert sent.seq == 1
    assert sends[0] == sends[1]
    assert sends[0]["body"] == "patience"
    assert sends[0]["meta"] == {"k": [1, 2]}
    assert client.statistics().resends == 1


async def test_final_send_error_fails_future() -> None:
    async def script(peer: Peer, index: int) -> None:
        await peer.welcome()
        send = await peer.expect("send")
        ref = {"type": "send", "room": "lobby", "id": send["id"]}
        await peer.send({"type": "error", "code": "not_joined", "message": "join first", "ref": ref})

    async with scripted(script) as server, client_for(server) as client:
        await client.connect()
        with pytest.raises(RequestFailed) as raised:
            await client.send("lobby", "nobody hears")
        statistics = client.statistics()

    assert raised.value.code == "not_joined"
    assert statistics.sends_failed == 1
    assert statistics.sends_pending == 0


async def test_handshake_503_retried() -> None:
    async def script(peer: Peer, index: int) -> None:
        await peer.welcome()

    async with scripted(script, reject_first=2) as server, client_for(server) as client:
        await client.connect()

    assert server.handshakes == 3
    assert len(server.peers) == 1


async def test_join_forbidden_raises() -> None:
    async def script(peer: Peer, index: int) -> None:
        await peer.welcome()
        join = await peer.expect("join")
        ref = {"type": "join", "room": join["room"]}
        await peer.send({"type": "error", "code": "forbidden", "message": "private room", "ref": ref})

    async with scripted(script) as server, client_for(server) as client:
        await client.connect()
        with pytest.raises(RequestFailed) as raised:
            await client.join("secret")

    assert raised.value.code == "forbidden"
    assert raised.value.room == "secret"


async def test_reset_drops_queued_old_messages() -> None:
    async def script(peer: Peer, index: int) -> None:
        await peer.welcome()
        await peer.expect("join")
        await peer.send(joined(since=0, head=2), msg(1, "old 1"), msg(2, "old 2"))
        await peer.send(joined(since=0, head=1, epoch="e2", reset=True), msg(1, "new 1"))

    async with scripted(script) as server, client_for(server) as client:
        await client.connect()
        await client.join("lobby")
        await wait_until(lambda: client.statistics().resets == 1)
        message = await anext(client.messages())

    assert message.body == "new 1"
    assert message.seq == 1


async def test_batch_arrays_in_both_directions() -> None:
    hellos: list[dict[str, Any]] = []

    async def script(peer: Peer, index: int) -> None:
        hellos.append(await peer.expect("hello"))
        await peer.send([{"type": "welcome", "protocol": 1, "user": "alice", "session": "s"}])
        await peer.expect("join")
        await peer.send([joined(since=0, head=3), msg(1), msg(2), msg(3)])

    async with scripted(script) as server, client_for(server, batch=True) as client:
        await client.connect()
        await client.join("lobby")
        bodies = await take(client, 3)

    assert hellos[0]["batch"] is True
    assert bodies == ["m1", "m2", "m3"]


async def test_malformed_frames_ignored() -> None:
    async def script(peer: Peer, index: int) -> None:
        await peer.welcome()
        await peer.expect("join")
        broken = msg(1)
        del broken["from"]
        await peer.send(joined(since=0, head=1), "not json", "[1, 2]", {"no": "type"}, broken, msg(1))

    async with scripted(script) as server, client_for(server) as client:
        await client.connect()
        await client.join("lobby")
        bodies = await take(client, 1)

    assert bodies == ["m1"]


async def test_missing_welcome_reconnects() -> None:
    async def script(peer: Peer, index: int) -> None:
        if index == 0:
            await peer.expect("hello")
            return
        await peer.welcome()

    async with scripted(script) as server, client_for(server, open_timeout=0.2) as client:
        await client.connect()

    assert len(server.peers) == 2
    assert client.statistics().connections == 1


async def test_unanswered_join_sent_again_after_reconnect() -> None:
    async def script(peer: Peer, index: int) -> None:
        await peer.welcome()
        await peer.expect("join")
        if index == 0:
            await peer.ws.close(1012)
            return
        await peer.send(joined(since=0, head=0))

    async with scripted(script) as server, client_for(server) as client:
        await client.connect()
        result = await client.join("lobby", last=5)

    assert result.room == "lobby"
    assert [peer.received[1] for peer in server.peers] == [{"type": "join", "room": "lobby", "last": 5}] * 2


async def test_welcome_for_other_user_stops_state_file_client(tmp_path: Path) -> None:
    async def script(peer: Peer, index: int) -> None:
        await peer.welcome(user="mallory")

    path = tmp_path / "state.json"
    async with scripted(script) as server:
        StateFile(path).save(ClientState(url=server.url, user="alice"))
        async with client_for(server, user=None, token="t", state_file=path) as client:
            with pytest.raises(StateFileError, match="belongs to 'alice'"):
                await client.connect()


async def test_close_sends_coalesced_ack() -> None:
    acks: list[dict[str, Any]] = []
    first_ack = asyncio.Event()

    async def script(peer: Peer, index: int) -> None:
        await peer.welcome()
        await peer.expect("join")
        await peer.send(joined(since=0, head=2), msg(1), msg(2))
        acks.append(await peer.expect("ack"))
        first_ack.set()
        acks.append(await peer.expect("ack"))

    async with scripted(script) as server, client_for(server, ack_interval=3600) as client:
        await client.connect()
        await client.join("lobby")
        stream = client.messages()
        client.handled(await anext(stream))
        await first_ack.wait()
        # The next ack may go out only an hour after the first, unless close() sends it.
        client.handled(await anext(stream))
        await client.close()
        await server.done.wait()

    assert acks == [{"type": "ack", "room": "lobby", "seq": 1}, {"type": "ack", "room": "lobby", "seq": 2}]
