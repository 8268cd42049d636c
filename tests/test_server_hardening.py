"""Hostile and careless clients: the server stays bounded, replies correctly and keeps serving others."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import ServerProcess
from test_websocket_codec import client_frame
from wsclient import Client, close_all, http_get, members

HANDSHAKE = (
    "GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
)


@contextmanager
def raw_websocket(port: int, extra: str = "") -> Iterator[socket.socket]:
    """Open a WebSocket by hand, so tests can write any bytes; yields the socket after the 101."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(HANDSHAKE.format(port=port, key=key, extra=extra).encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            assert chunk, f"closed during the handshake: {head!r}"
            head += chunk
        assert head.startswith(b"HTTP/1.1 101"), head
        yield sock
    finally:
        sock.close()


def read_close_code(sock: socket.socket, limit: int = 1_000_000) -> int | None:
    """Read server frames until a close frame; return its code, or None if the socket just ended."""
    buffer = b""
    while len(buffer) < limit:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buffer += chunk
        while len(buffer) >= 2:
            length = buffer[1] & 0x7F
            start = 2 + {126: 2, 127: 8}.get(length, 0)
            if length == 126:
                length = int.from_bytes(buffer[2:4], "big")
            elif length == 127:
                length = int.from_bytes(buffer[2:10], "big")
            if len(buffer) < start + length:
                break
            opcode, payload = buffer[0] & 0x0F, buffer[start : start + length]
            buffer = buffer[start + length :]
            if opcode == 0x8:
                return int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
    raise AssertionError("no close frame within the read limit")


def server_rss_kb(server: ServerProcess) -> int:
    assert server.proc is not None
    with open(f"/proc/{server.proc.pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS line")


def hello_frame(user: str) -> bytes:
    return client_frame(json.dumps({"type": "hello", "user": user}).encode())


async def test_head_request_gets_headers_only(server: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while received.count(b"HTTP/1.1 200") < 2 or not received.endswith(b"ok\n"):
            chunk = sock.recv(4096)
            assert chunk, received
            received += chunk

    assert received.count(b"ok\n") == 1
    assert "LocalProtocolError" not in server.log()


async def test_reader_that_never_reads_stays_bounded(server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory("--send-rate", "100000", "--send-burst", "100000")
    writer = await Client.login_as(server.url, "writer")
    await writer.join("big")
    body = "x" * 8000
    for index in range(200):
        await writer.send({"type": "send", "room": "big", "id": f"m{index}", "body": body})
    await writer.wait_messages("big", 200)
    await writer.close()
    before = server_rss_kb(server)

    # Each history reply is 200 messages of 8 kB; 400 of them would be 640 MB if the server buffered them.
    grown_mb = await asyncio.to_thread(flood_history_without_reading, server, before)

    assert grown_mb < 150, f"server RSS grew by {grown_mb:.0f} MB for a client that reads nothing"
    other = await Client.login_as(server.url, "other")
    await other.close()


def flood_history_without_reading(server: ServerProcess, rss_before_kb: int) -> float:
    """Send up to 400 history requests and read no reply; return how much the server's RSS grew, in MB."""
    request = client_frame(json.dumps({"type": "history", "room": "big", "limit": 200}).encode())
    with raw_websocket(server.port) as sock:
        sock.sendall(hello_frame("reader"))
        sock.settimeout(0.5)
        deadline = time.monotonic() + 10
        for _ in range(400):
            if time.monotonic() > deadline:
                break
            try:
                sock.sendall(request)
            except TimeoutError:
                break  # the server stopped reading: the backpressure under test
        time.sleep(1.0)
        return (server_rss_kb(server) - rss_before_kb) / 1024


async def test_empty_fragments_are_limited(server: ServerProcess) -> None:
    with raw_websocket(server.port) as sock:
        sock.sendall(hello_frame("frag"))
        sock.sendall(client_frame(b"[", final=False))
        sock.sendall(client_frame(b"", opcode=0x0, final=False) * 2000)

        assert read_close_code(sock) == 1009


async def test_binary_first_frame_closes_1008(server: ServerProcess) -> None:
    with raw_websocket(server.port) as sock:
        sock.sendall(client_frame(b"\x01\x02", opcode=0x2))

        assert read_close_code(sock) == 1008


@pytest.mark.parametrize("code", [1005, 1006, 999, 5000])
async def test_forbidden_close_code_answered_1002(server: ServerProcess, code: int) -> None:
    with raw_websocket(server.port) as sock:
        sock.sendall(hello_frame("closer"))
        sock.sendall(client_frame(code.to_bytes(2, "big"), opcode=0x8))

        assert read_close_code(sock) == 1002


def handshake_status(port: int, extra: str, key: str | None = None) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        key = key or base64.b64encode(os.urandom(16)).decode()
        sock.sendall(HANDSHAKE.format(port=port, key=key, extra=extra).encode("utf-8"))
        return sock.recv(4096).split(b"\r\n", 1)[0]


async def test_cross_origin_rejected_in_open_mode(server: ServerProcess) -> None:
    foreign = handshake_status(server.port, "Origin: https://evil.example\r\n")
    same = handshake_status(server.port, f"Origin: http://127.0.0.1:{server.port}\r\n")
    none = handshake_status(server.port, "")

    assert foreign.startswith(b"HTTP/1.1 403")
    assert same.startswith(b"HTTP/1.1 101")
    assert none.startswith(b"HTTP/1.1 101")


async def test_non_ascii_key_gets_400(server: ServerProcess) -> None:
    status = handshake_status(server.port, "", key="é" * 24)

    assert status.startswith(b"HTTP/1.1 400")


async def test_unfinished_handshake_times_out(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    config = tmp_path / "parley.toml"
    config.write_text("handshake_timeout = 0.5\n")
    server = server_factory("--config", str(config))
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\n")

        assert sock.recv(4096) == b""


async def test_missing_hello_times_out(server_factory: Callable[..., ServerProcess], tmp_path: Path) -> None:
    config = tmp_path / "parley.toml"
    config.write_text("hello_timeout = 0.5\n")
    server = server_factory("--config", str(config))
    with raw_websocket(server.port) as sock:
        assert read_close_code(sock) == 1008


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/" + "a" * 300, 404),
        ("/api/rooms/lobby/messages?limit=0", 400),
        ("/api/rooms/lobby/messages?after=%C2%B2", 400),
    ],
    ids=["long-path", "limit-zero", "superscript-digit"],
)
async def test_odd_http_requests(server: ServerProcess, path: str, status: int) -> None:
    got, _ = http_get(server.port, path)

    assert got == status
    assert "Traceback" not in server.log()


async def test_send_burst_is_slowed_not_closed(server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory("--send-rate", "5", "--send-burst", "5")
    (alice,) = await members(server.url, "lobby", "alice")
    try:
        await alice.send(
            [{"type": "send", "room": "lobby", "id": f"b{index}", "body": "x"} for index in range(60)]
        )
        await alice.sync()

        limited = [frame for frame in alice.frames if frame.get("code") == "rate_limited"]
        assert len(limited) >= 40
        assert not alice.closed
    finally:
        await close_all(alice)
