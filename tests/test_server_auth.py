"""A real `parley serve --secret`: tokens from `parley token` in each place a client may put them."""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from conftest import ServerProcess
from wsclient import Client, close_all, get_json, http_get

SECRET = "integration-test-secret-of-at-least-32-bytes"


def mint_token(user: str, *extra: str, secret: str = SECRET) -> str:
    """Run `parley token` and return the token it prints."""
    result = subprocess.run(
        [sys.executable, "-m", "parley", "token", user, "--secret", secret, *extra],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return result.stdout.strip()


@pytest.fixture(scope="module")
def tokens() -> dict[str, str]:
    """Tokens for alice: valid, signed with another secret, expired, and one that is not a token at all."""
    return {
        "valid": mint_token("alice"),
        "other-secret": mint_token("alice", secret="another-secret-of-at-least-32-bytes"),
        "expired": mint_token("alice", "--ttl", "-60"),
        "garbage": "not.a.token",
    }


ROOMS = itertools.count()


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Start one server with a secret for the module; each test chats in a room of its own."""
    server = ServerProcess(tmp_path_factory.mktemp("auth"), "--secret", SECRET).start()
    yield server
    server.stop()


async def check_alice_can_chat(client: Client) -> str:
    """Check that the client chats as alice in a new room; return the room."""
    room = f"lobby{next(ROOMS)}"
    await client.join(room)
    sent = await client.publish(room, "m1", "signed in")
    assert sent["seq"] == 1
    await client.wait_messages(room, 1)
    assert client.messages[room][0]["from"] == "alice"
    return room


async def test_token_in_authorization_header(secured: ServerProcess, tokens: dict[str, str]) -> None:
    client = await Client.open(secured.url, headers={"Authorization": f"Bearer {tokens['valid']}"})
    welcome = await client.login()
    assert welcome["user"] == "alice"
    await check_alice_can_chat(client)
    await close_all(client)


async def test_token_in_query(secured: ServerProcess, tokens: dict[str, str]) -> None:
    client = await Client.open(secured.url, query={"token": tokens["valid"]})
    welcome = await client.login()
    assert welcome["user"] == "alice"
    await check_alice_can_chat(client)
    await close_all(client)


async def test_token_in_hello(secured: ServerProcess, tokens: dict[str, str]) -> None:
    client = await Client.open(secured.url)
    welcome = await client.login(token=tokens["valid"])
    assert welcome["user"] == "alice"
    await check_alice_can_chat(client)
    await close_all(client)


async def test_token_outweighs_user_in_hello(secured: ServerProcess, tokens: dict[str, str]) -> None:
    client = await Client.open(secured.url)
    welcome = await client.login(token=tokens["valid"], user="mallory")
    assert welcome["user"] == "alice"
    await close_all(client)


@pytest.mark.parametrize("kind", ["other-secret", "expired", "garbage"])
@pytest.mark.parametrize("place", ["header", "query", "hello"])
async def test_bad_token_rejected(
    secured: ServerProcess, tokens: dict[str, str], kind: str, place: str
) -> None:
    token = tokens[kind]
    if place == "header":
        client = await Client.open(secured.url, headers={"Authorization": f"Bearer {token}"})
        await client.send({"type": "hello"})
    elif place == "query":
        client = await Client.open(secured.url, query={"token": token})
        await client.send({"type": "hello"})
    else:
        client = await Client.open(secured.url)
        await client.send({"type": "hello", "token": token})

    error = await client.wait_for("error")
    assert error["code"] == "unauthorized"
    assert await client.wait_closed() == 4001
    assert not any(frame["type"] == "welcome" for frame in client.frames)


async def test_user_only_hello_rejected(secured: ServerProcess) -> None:
    client = await Client.open(secured.url)
    await client.send({"type": "hello", "user": "alice"})
    error = await client.wait_for("error")
    assert error["code"] == "unauthorized"
    assert await client.wait_closed() == 4001


async def test_http_history_needs_token(secured: ServerProcess, tokens: dict[str, str]) -> None:
    client = await Client.open(secured.url)
    await client.login(token=tokens["valid"])
    room = await check_alice_can_chat(client)
    path = f"/api/rooms/{room}/messages"

    status, body = await asyncio.to_thread(http_get, secured.port, path, {"after": 0})
    assert status == 401
    assert orjson.loads(body)["error"] == "unauthorized"
    status, _body = await asyncio.to_thread(http_get, secured.port, path, {"after": 0, "user": "alice"})
    assert status == 401, "a user name without a token must not pass"
    expired = {"after": 0, "token": tokens["expired"]}
    status, _body = await asyncio.to_thread(http_get, secured.port, path, expired)
    assert status == 401

    page = await get_json(secured.port, path, {"after": 0, "token": tokens["valid"]})
    assert [message["id"] for message in page["messages"]] == ["m1"]
    await close_all(client)


def test_public_host_without_secret_refused(tmp_path: Path) -> None:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("PARLEY_")}
    command = [
        sys.executable, "-m", "parley", "serve",
        "--host", "0.0.0.0", "--port", "0", "--data-dir", str(tmp_path / "data"),
    ]  # fmt: skip
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment
    )
    try:
        stdout, stderr = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise AssertionError("parley serve --host 0.0.0.0 without a secret kept running") from None

    assert process.returncode != 0
    assert "listening" not in stdout.lower()
    assert "secret" in stderr.lower(), stderr
    assert "0.0.0.0" in stderr, stderr
