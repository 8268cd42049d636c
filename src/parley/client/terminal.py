"""`parley chat`: a line-based terminal client for one room.

Every line read from stdin is sent to the room. Standard output gets one line per event, so that the
program works the same on a terminal and in a pipe:

    14:02 bob: hello           a message of the room, in local time (own messages included)
    ✓ #58 stored               the server stored a line typed here, as seq 58
    ✗ not stored: …            the server rejected a line typed here

Connection notices and errors go to stderr. At the end of input the program waits until every line is
stored, then exits. Positions and unconfirmed lines are kept in a state file, so a restarted program
shows only what it has not shown before and sends what was never confirmed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import sys
import threading
import time
import unicodedata
from collections.abc import Awaitable
from pathlib import Path
from typing import TextIO, TypeVar

import jwt

from parley.client.connection import Client
from parley.client.errors import ClientError, RequestFailed, StateFileError
from parley.client.results import Sent
from parley.protocol.frames import NAME_PATTERN
from parley.protocol.model import Message

log = logging.getLogger("parley.chat")

DEFAULT_URL = "ws://127.0.0.1:8765/ws"
BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
T = TypeVar("T")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of `parley chat` to `parser`."""
    parser.add_argument("--url", default=DEFAULT_URL, help="server WebSocket URL (default %(default)s)")
    parser.add_argument("--room", required=True, help="room to join and send to")
    parser.add_argument("--user", help="user name, for a server with open authentication")
    parser.add_argument(
        "--token", help="access token, sent as Authorization: Bearer (default: the PARLEY_TOKEN variable)"
    )
    parser.add_argument("--device", help="device name shown to the server, e.g. laptop")
    parser.add_argument(
        "--state-file",
        type=Path,
        help="JSON file that keeps room positions and unconfirmed lines between runs "
        "(default: a file per URL and user under $XDG_STATE_HOME/parley or ~/.local/state/parley)",
    )
    parser.add_argument("--no-state-file", action="store_true", help="keep no state between runs")
    parser.add_argument(
        "--last",
        type=int,
        default=50,
        help="messages of history shown on the first join (default %(default)s)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="level of connection notices on stderr (default %(default)s)",
    )


async def run(args: argparse.Namespace) -> int:
    """Run `parley chat` until the end of input, SIGINT or SIGTERM; return the exit status."""
    _configure_output(args.log_level)
    token = args.token or os.environ.get("PARLEY_TOKEN") or None
    if args.user is None and token is None:
        print("parley chat: give --user (open authentication) or --token", file=sys.stderr)
        return 2
    if args.last < 0:
        print(f"parley chat: --last must not be negative, got {args.last}", file=sys.stderr)
        return 2

    state_file = (
        None if args.no_state_file else args.state_file or default_state_path(args.url, args.user, token)
    )
    try:
        client = Client(args.url, user=args.user, token=token, device=args.device, state_file=state_file)
    except (ValueError, StateFileError) as error:
        print(f"parley chat: {error}", file=sys.stderr)
        return 2

    lines: asyncio.Queue[str | None] = asyncio.Queue()
    start_stdin_reader(lines)
    chat = TerminalChat(client, args.room, lines, out=sys.stdout, last=args.last)
    return await chat.run()


def default_state_path(url: str, user: str | None, token: str | None) -> Path:
    """Return the default state file for a URL and user, under the XDG state folder.

    With only a token, the user comes from the token's unverified `sub` claim. The claim only names the
    file: the client checks the user in `welcome` against the one saved in the file.
    """
    # NOTE: two chat programs for the same URL and user share this file, and the last one to save wins.
    name = user or _token_subject(token) or "token"
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    digest = hashlib.sha256(f"{url}\n{name}".encode()).hexdigest()[:16]
    return Path(base) / "parley" / f"chat-{name}-{digest}.json"


def format_message(message: Message) -> str:
    """Format a message as `HH:MM sender: text` in local time, with control characters escaped."""
    clock = time.strftime("%H:%M", time.localtime(message.ts / 1000))
    text = "\n      ".join(_printable(line) for line in message.body.split("\n"))
    return f"{clock} {_printable(message.sender)}: {text}"


def start_stdin_reader(lines: asyncio.Queue[str | None]) -> threading.Thread:
    """Read stdin lines in a daemon thread into `lines`, then None at the end of input.

    A thread works for a terminal, a pipe and a regular file alike. It reads the file descriptor with
    `os.read` rather than through `sys.stdin`, because a daemon thread blocked inside the buffered reader
    holds its lock and makes the interpreter abort at exit.
    """
    loop = asyncio.get_running_loop()
    descriptor = sys.stdin.fileno()

    def put(line: str | None) -> bool:
        try:
            loop.call_soon_threadsafe(lines.put_nowait, line)
        except RuntimeError:
            return False
        return True

    def read() -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(descriptor, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                break
            *complete, pending = (pending + chunk).split(b"\n")
            for raw in complete:
                if not put(raw.decode("utf-8", "replace").rstrip("\r")):
                    return
        if pending:
            put(pending.decode("utf-8", "replace").rstrip("\r"))
        put(None)

    thread = threading.Thread(target=read, name="parley-chat stdin", daemon=True)
    thread.start()
    return thread


class _Stopped(Exception):
    """SIGINT or SIGTERM arrived: the chat ends, saving its state."""


class TerminalChat:
    """One chat session: joins the room, prints its messages and sends the lines from `lines`."""

    def __init__(
        self, client: Client, room: str, lines: asyncio.Queue[str | None], *, out: TextIO, last: int = 50
    ) -> None:
        self.client = client
        self.room = room
        self.lines = lines
        self.out = out
        self.last = last
        self._stop = asyncio.Event()

    async def run(self) -> int:
        """Chat until the end of input or a stop signal; return the exit status."""
        self._install_signal_handlers()
        tasks: list[asyncio.Task[None]] = []
        try:
            await self._until_stopped(self.client.connect())
            await self._until_stopped(self.client.join(self.room, last=self.last))

            # The message stream ends with the client's error when the server rejects a reconnect, so
            # the chat stops then too, instead of waiting for the next line of input.
            printer = asyncio.create_task(self._print_messages())
            sender = asyncio.create_task(self._send_lines())
            tasks = [printer, sender]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
            return 0
        except _Stopped:
            return 0
        except (ClientError, ValueError) as error:
            print(f"parley chat: {error}", file=sys.stderr)
            return 1
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.client.close()
            self._remove_signal_handlers()

    async def _send_lines(self) -> None:
        while True:
            line = await self._until_stopped(self.lines.get())
            if line is None:
                break
            if not line.strip():
                continue
            try:
                future = self.client.send_nowait(self.room, line)
            except ValueError as error:
                print(f"parley chat: line not sent: {error}", file=sys.stderr)
                continue
            future.add_done_callback(self._print_confirmation)

        await self._until_stopped(self.client.wait_sent())

    async def _print_messages(self) -> None:
        async for message in self.client.messages():
            self._write(format_message(message))
            self.client.handled(message)

    def _print_confirmation(self, future: asyncio.Future[Sent]) -> None:
        if future.cancelled():
            return
        error = future.exception()
        if error is None:
            self._write(f"✓ #{future.result().seq} stored")
        elif isinstance(error, RequestFailed):
            self._write(f"✗ not stored: {error.code}: {error.message}")

    def _write(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()

    async def _until_stopped(self, awaitable: Awaitable[T]) -> T:
        """Await `awaitable` unless a stop signal comes first, which raises _Stopped."""
        work = asyncio.ensure_future(awaitable)
        stopped = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({work, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if work.done():
            return work.result()
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await work
        raise _Stopped

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for number in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(number, self._stop.set)

    def _remove_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for number in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(number)


def _printable(text: str) -> str:
    """Escape control characters and bidirectional overrides, which could rewrite the terminal."""
    if text.isprintable() and not BIDI_CONTROLS.intersection(text):
        return text
    out = []
    for char in text:
        if char == "\t" or (unicodedata.category(char) != "Cc" and char not in BIDI_CONTROLS):
            out.append(char)
        else:
            out.append(f"\\u{ord(char):04x}")
    return "".join(out)


def _token_subject(token: str | None) -> str | None:
    if token is None:
        return None
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    subject = claims.get("sub")
    if isinstance(subject, str) and NAME_PATTERN.fullmatch(subject):
        return subject
    return None


def _configure_output(level: str) -> None:
    """Log the client's notices to stderr as plain lines; replace characters the terminal cannot encode."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("-- %(message)s"))
    root = logging.getLogger("parley")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
