"""The client's state file: atomic saves, validation, and a restarted client resuming on a real server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from conftest import ServerProcess
from parley.client import Client, Message, Position, StateFileError
from parley.client.positions import ClientState, SavedSend, StateFile

FAST_RECONNECT = {"backoff_base": 0.05, "backoff_cap": 0.5}
URL = "ws://127.0.0.1:1/ws"


@contextlib.asynccontextmanager
async def connected(url: str, user: str, **options: object) -> AsyncIterator[Client]:
    client = Client(url, user=user, **{**FAST_RECONNECT, **options})  # type: ignore[arg-type]
    try:
        await client.connect()
        yield client
    finally:
        await client.close()


async def receive(client: Client, count: int) -> list[Message]:
    stream = client.messages()
    return [await anext(stream) for _ in range(count)]


def test_state_round_trip(tmp_path: Path) -> None:
    state_file = StateFile(tmp_path / "nested" / "state.json")
    state = ClientState(
        url=URL,
        user="alice",
        rooms={"lobby": Position(41, "e1"), "kitchen": Position(3)},
        outbox=[SavedSend("lobby", "c-x-1", "hi", None), SavedSend("lobby", "c-x-2", "ünï", {"reply_to": 4})],
    )

    state_file.save(state)
    loaded = state_file.load(URL)

    assert loaded == state
    assert stat.S_IMODE(os.stat(state_file.path).st_mode) == 0o600
    assert [path.name for path in state_file.path.parent.iterdir()] == ["state.json"]


def test_missing_file_is_empty_state(tmp_path: Path) -> None:
    loaded = StateFile(tmp_path / "absent.json").load(URL)

    assert loaded == ClientState(url=URL)


def test_save_replaces_previous_content(tmp_path: Path) -> None:
    state_file = StateFile(tmp_path / "state.json")
    state_file.save(ClientState(url=URL, rooms={"lobby": Position(1, "e1")}))

    state_file.save(ClientState(url=URL, rooms={"lobby": Position(2, "e1")}))

    assert state_file.load(URL).rooms == {"lobby": Position(2, "e1")}


def test_failed_save_keeps_old_file(tmp_path: Path) -> None:
    state_file = StateFile(tmp_path / "state.json")
    state_file.save(ClientState(url=URL, rooms={"lobby": Position(1, "e1")}))
    unserialisable = ClientState(url=URL, outbox=[SavedSend("lobby", "c-x-1", "hi", {"bad": object()})])

    with pytest.raises(TypeError):
        state_file.save(unserialisable)

    assert state_file.load(URL).rooms == {"lobby": Position(1, "e1")}
    assert [path.name for path in tmp_path.iterdir()] == ["state.json"]


def test_other_url_rejected(tmp_path: Path) -> None:
    state_file = StateFile(tmp_path / "state.json")
    state_file.save(ClientState(url=URL))

    with pytest.raises(StateFileError, match="written for"):
        state_file.load("ws://127.0.0.1:2/ws")


@pytest.mark.parametrize(
    "content",
    [
        b"not json",
        b"[]",
        b'{"version": 99, "url": "ws://127.0.0.1:1/ws"}',
        b'{"version": 1}',
        b'{"version": 1, "url": "ws://127.0.0.1:1/ws", "rooms": {"lobby": {"since": "4"}}}',
        b'{"version": 1, "url": "ws://127.0.0.1:1/ws", "outbox": [{"room": "lobby", "id": "a"}]}',
        b'{"version": 1, "url": "ws://127.0.0.1:1/ws", "outbox": [{"room": "l", "id": "a", "body": 1}]}',
    ],
    ids=["not-json", "array", "version", "no-url", "since-string", "no-body", "body-number"],
)
def test_malformed_file_rejected(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(content)

    with pytest.raises(StateFileError, match="malformed"):
        StateFile(path).load(URL)


def test_client_rejects_other_users_file(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    StateFile(path).save(ClientState(url=URL, user="alice"))

    with pytest.raises(StateFileError, match="belongs to 'alice'"):
        Client(URL, user="bob", state_file=path)


async def test_restarted_client_resumes_after_handled(server: ServerProcess, tmp_path: Path) -> None:
    path = tmp_path / "bob.json"
    async with asyncio.timeout(30), connected(server.url, "alice") as alice:
        await alice.join("lobby")
        async with connected(server.url, "bob", state_file=path) as bob:
            await bob.join("lobby")
            for index in range(5):
                await alice.send("lobby", f"s{index}")
            # Taking a message from the stream marks the one before it handled, so after three the
            # first two are handled, and the explicit call adds the third.
            first = await receive(bob, 3)
            bob.handled(first[2])

        saved = json.loads(path.read_text())
        for index in range(5, 7):
            await alice.send("lobby", f"s{index}")

        async with connected(server.url, "bob", state_file=path) as bob_again:
            resumed = await receive(bob_again, 4)

    assert saved["rooms"]["lobby"]["since"] == 3
    assert [message.body for message in resumed] == ["s3", "s4", "s5", "s6"]


async def test_restarted_client_shows_nothing_twice(server: ServerProcess, tmp_path: Path) -> None:
    path = tmp_path / "bob.json"
    async with asyncio.timeout(30), connected(server.url, "alice") as alice:
        await alice.join("lobby")
        for run in range(3):
            async with connected(server.url, "bob", state_file=path) as bob:
                await bob.join("lobby", last=50)
                await alice.send("lobby", f"run {run}")
                stream = bob.messages()
                received = [await anext(stream)]
                bob.handled(received[0])

            assert [message.body for message in received] == [f"run {run}"]


async def test_unconfirmed_sends_survive_client_restart(server: ServerProcess, tmp_path: Path) -> None:
    path = tmp_path / "alice.json"
    async with asyncio.timeout(60), connected(server.url, "bob") as bob:
        await bob.join("lobby")
        async with connected(server.url, "alice", state_file=path) as alice:
            await alice.join("lobby")

        await asyncio.to_thread(server.stop, signal.SIGTERM)
        offline = Client(server.url, user="alice", state_file=path, **FAST_RECONNECT)  # type: ignore[arg-type]
        queued = [offline.send_nowait("lobby", f"queued {index}") for index in range(3)]
        await offline.close()
        for future in queued:
            assert future.exception() is not None
        saved_ids = [entry["id"] for entry in json.loads(path.read_text())["outbox"]]
        await asyncio.to_thread(server.start)

        async with connected(server.url, "alice", state_file=path) as restarted:
            await restarted.wait_sent()
            statistics = restarted.statistics()
        history = await bob.history("lobby", after=0)

    assert len(saved_ids) == 3
    assert [message.body for message in history.messages] == ["queued 0", "queued 1", "queued 2"]
    assert [message.id for message in history.messages] == saved_ids
    assert statistics.sends_confirmed == 3
    assert json.loads(path.read_text())["outbox"] == []


async def test_reused_id_with_other_body_is_final_conflict(server: ServerProcess, tmp_path: Path) -> None:
    path = tmp_path / "alice.json"
    async with asyncio.timeout(30), connected(server.url, "alice") as alice:
        await alice.join("lobby")
        original = await alice.send("lobby", "original")
        StateFile(path).save(
            ClientState(
                url=server.url, user="alice", outbox=[SavedSend("lobby", original.id, "changed", None)]
            )
        )

        async with connected(server.url, "alice", state_file=path) as restarted:
            await restarted.wait_sent()
            statistics = restarted.statistics()
        history = await alice.history("lobby", after=0)

    assert statistics.sends_failed == 1
    assert statistics.sends_confirmed == 0
    assert [message.body for message in history.messages] == ["original"]
