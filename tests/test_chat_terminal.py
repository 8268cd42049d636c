"""`parley chat` as real processes: lines piped into one appear once, in order, on the other's stdout."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from conftest import ServerProcess
from parley.client.terminal import format_message
from parley.protocol.model import Message

MESSAGE_LINE = re.compile(r"^(\d\d):(\d\d) ([^:]+): (.*)$")
CONFIRMATION_LINE = re.compile(r"^✓ #(\d+) stored$")
WAIT = 30.0


class ChatProcess:
    """A `parley chat` child process whose stdout lines are collected by a thread."""

    def __init__(self, server: ServerProcess, user: str, state_file: Path, home: Path) -> None:
        self.log_path = state_file.with_suffix(".stderr")
        environment = {**os.environ, "XDG_STATE_HOME": str(home), "PYTHONUNBUFFERED": "1"}
        command = [
            sys.executable, "-m", "parley", "chat",
            "--url", server.url, "--user", user, "--room", "lobby", "--state-file", str(state_file),
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=environment
            )
        self.output: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self._lines.put(raw.decode("utf-8").rstrip("\n"))
        self._lines.put(None)

    def write(self, *lines: str) -> None:
        assert self.proc.stdin is not None
        for line in lines:
            self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def end_input(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    def messages(self) -> list[tuple[str, str]]:
        """Return `(sender, text)` of every message line printed so far."""
        found = []
        for line in self.output:
            match = MESSAGE_LINE.match(line)
            if match:
                found.append((match.group(3), match.group(4)))
        return found

    def wait_for_messages(self, count: int) -> list[tuple[str, str]]:
        """Collect output until `count` message lines arrived; fail with the output when it ends first."""
        deadline = time.monotonic() + WAIT
        while len(self.messages()) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"timed out waiting for {count} messages; output: {self.output}\n{self.stderr()}")
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                pytest.fail(f"chat exited before {count} messages; output: {self.output}\n{self.stderr()}")
            self.output.append(line)
        return self.messages()

    def wait_exit(self) -> int:
        code = self.proc.wait(WAIT)
        self._drain()
        return code

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait_exit()

    def close(self) -> None:
        """Kill the process if it still runs and close its pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(WAIT)
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.close()
        self._reader.join(WAIT)
        self.proc.stdout.close()

    def stderr(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _drain(self) -> None:
        while True:
            try:
                line = self._lines.get(timeout=WAIT)
            except queue.Empty:
                return
            if line is None:
                return
            self.output.append(line)


@pytest.fixture
def chats() -> Iterator[list[ChatProcess]]:
    started: list[ChatProcess] = []
    yield started
    for chat in started:
        chat.close()


def start_chat(chats: list[ChatProcess], server: ServerProcess, user: str, tmp_path: Path) -> ChatProcess:
    chat = ChatProcess(server, user, tmp_path / f"{user}.json", tmp_path / "xdg")
    chats.append(chat)
    return chat


def test_piped_lines_reach_other_chat(
    server: ServerProcess, tmp_path: Path, chats: list[ChatProcess]
) -> None:
    bob = start_chat(chats, server, "bob", tmp_path)
    alice = start_chat(chats, server, "alice", tmp_path)
    lines = [f"hello {index}" for index in range(5)] + ["ünïcødé ✓ 😀"]

    alice.write(*lines)
    alice.end_input()
    alice_code = alice.wait_exit()
    received = bob.wait_for_messages(len(lines))
    bob_code = bob.stop()

    assert alice_code == 0, alice.stderr()
    assert bob_code == 0, bob.stderr()
    assert received == [("alice", line) for line in lines]
    assert bob.messages() == received
    confirmations = [line for line in alice.output if CONFIRMATION_LINE.match(line)]
    assert len(confirmations) == len(lines)


def test_chat_survives_server_restart(
    server: ServerProcess, tmp_path: Path, chats: list[ChatProcess]
) -> None:
    bob = start_chat(chats, server, "bob", tmp_path)
    alice = start_chat(chats, server, "alice", tmp_path)

    alice.write("before 0", "before 1")
    bob.wait_for_messages(2)
    server.restart(signal.SIGKILL)
    alice.write("after 0", "after 1", "after 2")
    bob.wait_for_messages(5)
    server.restart(signal.SIGTERM)
    alice.write("last")
    alice.end_input()
    alice_code = alice.wait_exit()
    bob.wait_for_messages(6)
    bob_code = bob.stop()

    expected = ["before 0", "before 1", "after 0", "after 1", "after 2", "last"]
    assert alice_code == 0, alice.stderr()
    assert bob_code == 0, bob.stderr()
    assert bob.messages() == [("alice", line) for line in expected]


def test_restarted_chat_shows_only_new(
    server: ServerProcess, tmp_path: Path, chats: list[ChatProcess]
) -> None:
    bob = start_chat(chats, server, "bob", tmp_path)
    alice = start_chat(chats, server, "alice", tmp_path)
    alice.write("one", "two")
    bob.wait_for_messages(2)
    assert bob.stop() == 0

    alice.write("three")
    alice.wait_for_messages(3)
    bob_again = start_chat(chats, server, "bob", tmp_path)
    alice.write("four")
    bob_again.wait_for_messages(2)
    alice.end_input()
    assert alice.wait_exit() == 0
    assert bob_again.stop() == 0

    assert bob.messages() == [("alice", "one"), ("alice", "two")]
    assert bob_again.messages() == [("alice", "three"), ("alice", "four")]


def test_first_join_shows_recent_history(
    server: ServerProcess, tmp_path: Path, chats: list[ChatProcess]
) -> None:
    alice = start_chat(chats, server, "alice", tmp_path)
    alice.write("early 1", "early 2")
    alice.end_input()
    assert alice.wait_exit() == 0

    carol = start_chat(chats, server, "carol", tmp_path)
    received = carol.wait_for_messages(2)
    assert carol.stop() == 0

    assert received == [("alice", "early 1"), ("alice", "early 2")]


def test_format_message_local_time_and_escapes() -> None:
    ts = 1_765_000_000_123
    message = Message(
        room="lobby", seq=1, id="c-x-1", sender="bob", ts=ts, body="hi\x1b[2J\u202eevil\nsecond"
    )

    line = format_message(message)

    clock = datetime.fromtimestamp(ts / 1000).strftime("%H:%M")
    assert line == f"{clock} bob: hi\\u001b[2J\\u202eevil\n      second"


def test_chat_exits_when_reconnect_rejected(
    server: ServerProcess, tmp_path: Path, chats: list[ChatProcess]
) -> None:
    alice = start_chat(chats, server, "alice", tmp_path)
    alice.write("hello")
    alice.wait_for_messages(1)

    # The server comes back requiring tokens, so the chat's next hello is rejected with 4001.
    server.extra.extend(["--secret", "a-secret-that-is-long-enough-for-hs256-0123456789"])
    server.restart(signal.SIGTERM)
    code = alice.wait_exit()

    assert code == 1
    assert "unauthorized" in alice.stderr()
    assert "Traceback" not in alice.stderr()
