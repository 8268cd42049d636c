"""Replay a real multilingual dialogue corpus through the server and check every line arrives intact.

The `chatterbot-corpus` package ships conversations in many languages, Simplified and Traditional
Chinese among them. Two speakers per room take turns saying the lines of each conversation while
listeners follow every room; each listener must receive each room's lines byte for byte, in order, once.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import chatterbot_corpus
import yaml

from conftest import ServerProcess
from parley.client import Client, Message

LANGUAGES = ["chinese", "traditionalchinese", "english", "japanese", "russian", "hebrew", "hindi", "korean"]
LINES_PER_LANGUAGE = 120
LISTENERS = 3


def corpus_lines(language: str, limit: int) -> list[tuple[int, str]]:
    """Return up to `limit` (conversation number, line) pairs of one language, in corpus order."""
    folder = Path(chatterbot_corpus.__file__).parent / "data" / language
    lines: list[tuple[int, str]] = []
    conversation = 0
    for path in sorted(folder.glob("*.yml")):
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
        for dialogue in document.get("conversations", []):
            conversation += 1
            lines.extend((conversation, str(line)) for line in dialogue)
            if len(lines) >= limit:
                return lines[:limit]
    return lines


async def speak(url: str, room: str, lines: list[tuple[int, str]]) -> list[int]:
    """Have two speakers alternate the lines of a room; return the seq each line was stored at."""
    async with (
        Client(url, user=f"{room}-a") as first,
        Client(url, user=f"{room}-b") as second,
    ):
        await first.join(room)
        await second.join(room)
        seqs = []
        for index, (conversation, line) in enumerate(lines):
            speaker = first if index % 2 == 0 else second
            sent = await speaker.send(room, line, {"conversation": conversation, "line": index})
            seqs.append(sent.seq)
        return seqs


async def listen(client: Client, expected: dict[str, int]) -> dict[str, list[Message]]:
    """Collect messages until every room has its expected count."""
    received: dict[str, list[Message]] = {room: [] for room in expected}
    async for message in client.messages():
        received[message.room].append(message)
        if all(len(received[room]) >= count for room, count in expected.items()):
            break
    return received


async def test_corpus_replays_intact(server: ServerProcess) -> None:
    corpus = {f"corpus-{language}": corpus_lines(language, LINES_PER_LANGUAGE) for language in LANGUAGES}
    assert all(corpus.values()), "every language of the corpus has conversations"
    assert any("的" in line for _, line in corpus["corpus-chinese"])
    assert any("們" in line or "這" in line for _, line in corpus["corpus-traditionalchinese"])

    listeners = [Client(server.url, user=f"listener-{number}") for number in range(LISTENERS)]
    for listener in listeners:
        await listener.connect()
        for room in corpus:
            await listener.join(room)

    expected = {room: len(lines) for room, lines in corpus.items()}
    listening = [asyncio.create_task(listen(listener, expected)) for listener in listeners]
    stored_seqs = await asyncio.wait_for(
        asyncio.gather(*(speak(server.url, room, lines) for room, lines in corpus.items())), 120
    )
    results = await asyncio.wait_for(asyncio.gather(*listening), 60)
    for listener in listeners:
        await listener.close()

    for room, seqs in zip(corpus, stored_seqs, strict=True):
        assert seqs == list(range(1, len(corpus[room]) + 1)), room

    for received in results:
        for room, lines in corpus.items():
            messages = received[room]
            assert [message.seq for message in messages] == list(range(1, len(lines) + 1)), room
            assert [message.body.encode() for message in messages] == [line.encode() for _, line in lines], (
                room
            )
            metas: list[Any] = [message.meta for message in messages]
            assert [meta["line"] for meta in metas] == list(range(len(lines))), room
