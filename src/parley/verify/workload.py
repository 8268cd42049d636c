"""The workload: simulated applications, each a `parley.client.Client` that sends and receives in its rooms.

Every application records its requests and what the client library reports in its history file (see
`history.py`). It keeps a state file, so that after a crash a new incarnation resumes from the saved
positions and resends the saved unconfirmed messages, as a real program would after a restart.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parley.client import Client, ClientError, Message, SendFailed
from parley.client import Sent as SentResult
from parley.client.positions import StateFile
from parley.verify.history import (
    Acked,
    Deliver,
    HistoryWriter,
    Joined,
    Send,
    Sent,
    Start,
    Stop,
)
from parley.verify.history import (
    SendFailed as SendFailedEvent,
)

log = logging.getLogger("parley.verify.workload")

RECENT_CONFIRMED = 64
"""Confirmed messages each application remembers for the duplicate-send fault."""
CANCEL_TRIES = 50
CANCEL_WAIT = 0.1
CLOSE_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """Send rate and client library settings of each simulated application; durations in seconds."""

    rate: float = 2.0
    """Messages each application sends per second, on average (Poisson arrivals)."""
    max_in_flight: int = 20
    """Unconfirmed messages an application allows itself before it waits."""
    send_timeout: float = 2.0
    ack_interval: float = 0.1
    backoff_cap: float = 2.0


@dataclass(frozen=True, slots=True)
class ConfirmedMessage:
    room: str
    body: str
    id: str
    seq: int


class RecordingClient(Client):
    """A Client that also records every `joined` and `acked` frame the server sends it.

    NOTE: this overrides two private handlers of Client, because the library has no public hook for
    these frames; rename them here if Client's handlers change.
    """

    def __init__(self, url: str, *, history: HistoryWriter, **options: Any) -> None:
        super().__init__(url, **options)
        self._history = history

    def _on_joined(self, frame: dict[str, Any]) -> None:
        super()._on_joined(frame)
        self._history.write(
            Joined(
                room=str(frame.get("room")),
                since=int(frame.get("since", 0)),
                head=int(frame.get("head", 0)),
                epoch=str(frame.get("epoch")),
                reset=frame.get("reset") is True,
                t=self._history.now(),
            )
        )

    def _on_acked(self, frame: dict[str, Any]) -> None:
        super()._on_acked(frame)
        room, seq = frame.get("room"), frame.get("seq")
        if isinstance(room, str) and isinstance(seq, int):
            self._history.write(Acked(room, seq, t=self._history.now()))


async def abort_client(client: Client) -> int:
    """Stop `client` the way a killed process stops: no close frame, no final ack, no state file save.

    Uses `Client.abort()` when the library has one. NOTE: otherwise this reaches into the library's
    private transport and timer, and raises TypeError when their layout changed, so that a crash is
    never silently replaced by a clean close. Returns how many of the client's tasks ignored a
    cancellation (see `cancel_until_done`).
    """
    abort = getattr(client, "abort", None)
    if callable(abort):
        result = abort()
        if asyncio.iscoroutine(result):
            await result
        return 0

    transport = getattr(client, "_transport", None)
    if transport is None or not hasattr(transport, "_ws") or not hasattr(client, "_timer_task"):
        raise TypeError("cannot crash this Client: it has no abort() and an unknown internal layout")
    transport._stopping = True
    ws = transport._ws
    if ws is not None:
        ws.transport.abort()
    tasks = [client._timer_task, transport._run_task, *transport._background]
    return await cancel_until_done([task for task in tasks if task is not None])


async def cancel_until_done(tasks: list[asyncio.Task[Any]]) -> int:
    """Cancel `tasks` and wait for them to end, cancelling again those that ignored the cancellation.

    Returns how many tasks ignored a cancellation at least once. On Python 3.11, a task that loops
    around `asyncio.wait_for` loses a cancellation that arrives just as the awaited event fires
    (CPython gh-86296), and a plain cancel-and-await of such a task never returns.
    """
    ignored: set[asyncio.Task[Any]] = set()
    pending = {task for task in tasks if not task.done()}
    for _ in range(CANCEL_TRIES):
        if not pending:
            break
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=CANCEL_WAIT)
        ignored |= pending
    for task in pending:
        log.error("task %s still runs after %d cancellations; left behind", task.get_name(), CANCEL_TRIES)
    return len(ignored)


class Application:
    """One simulated user: a client, its rooms, its state file, its history, and its faults."""

    def __init__(
        self,
        name: str,
        rooms: list[str],
        url: str,
        folder: Path,
        started: float,
        settings: ClientSettings,
        seed: str,
    ) -> None:
        self.name = name
        self.rooms = rooms
        self.url = url
        self.settings = settings
        self.state_path = folder / "state" / f"{name}.json"
        self.history = HistoryWriter(folder / "history" / f"{name}.jsonl", started)
        self.rng = random.Random(f"{seed}:{name}")
        self.incarnation = -1
        self.client: RecordingClient | None = None
        self.sending = True
        self.reading = asyncio.Event()
        self.reading.set()
        self.progress = asyncio.Event()
        self.handled: dict[str, int] = {}
        self.recent: deque[ConfirmedMessage] = deque(maxlen=RECENT_CONFIRMED)
        self.send_budget: SendBudget | None = None
        self.resends = 0
        self.reconnects = 0
        self.duplicates_dropped = 0
        self.gaps = 0
        self.ignored_cancellations = 0
        self.close_timeouts = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._in_flight = asyncio.Semaphore(settings.max_in_flight)
        self._joined = asyncio.Event()

    @property
    def running(self) -> bool:
        return self.client is not None

    def start(self) -> None:
        """Start a new incarnation from the state file."""
        assert self.client is None, "start() while an incarnation runs"
        self.incarnation += 1
        saved = StateFile(self.state_path).load(self.url)
        positions = {room: position.since for room, position in saved.rooms.items()}
        self.handled = dict(positions)
        self.history.write(Start(self.incarnation, positions, t=self.history.now()))

        self.client = RecordingClient(
            self.url,
            history=self.history,
            user=self.name,
            state_file=self.state_path,
            ack_interval=self.settings.ack_interval,
            send_timeout=self.settings.send_timeout,
            backoff_cap=self.settings.backoff_cap,
            rng=random.Random(f"{self.rng.random()}"),
        )
        self._in_flight = asyncio.Semaphore(self.settings.max_in_flight)
        self._joined = asyncio.Event()
        client = self.client
        self._tasks = [
            asyncio.create_task(self._receive(client), name=f"verify {self.name} receive"),
            asyncio.create_task(self._send(client), name=f"verify {self.name} send"),
        ]

    async def crash(self) -> None:
        """End the incarnation the way a killed process ends: no close frame, no final ack, no state save."""
        client = self.client
        if client is None:
            return
        self.client = None
        await self._cancel(self._tasks)
        self.ignored_cancellations += await abort_client(client)
        self._count(client)
        self.history.write(Stop("crash", stats=self._stats(client), t=self.history.now()))
        self.history.flush()

    async def close(self, final: bool) -> None:
        """End the incarnation cleanly: the client acknowledges what was handled and saves its state."""
        client = self.client
        if client is None:
            return
        self.client = None
        await self._cancel(self._tasks)
        try:
            await asyncio.wait_for(client.close(), CLOSE_TIMEOUT)
        except (ClientError, OSError) as error:
            log.warning("application %s: close failed: %s", self.name, error)
        except TimeoutError:
            log.error("application %s: Client.close() did not return within %.0f s", self.name, CLOSE_TIMEOUT)
            self.close_timeouts += 1
            timer = getattr(client, "_timer_task", None)
            if timer is not None:
                self.ignored_cancellations += await cancel_until_done([timer])
        self._count(client)
        self.history.write(Stop("close", final=final, stats=self._stats(client), t=self.history.now()))
        self.history.flush()

    def pause_reading(self, seconds: float) -> None:
        """Stop handling messages for `seconds`, as an application that hangs or is too busy would."""
        self.reading.clear()
        asyncio.get_running_loop().call_later(seconds, self.reading.set)

    def caught_up(self, heads: dict[str, int]) -> bool:
        """Tell whether the application handled each of its rooms up to `heads`."""
        return all(self.handled.get(room, 0) >= heads.get(room, 0) for room in self.rooms)

    async def wait_sent(self) -> None:
        client = self.client
        if client is not None:
            await client.wait_sent()

    def statistics(self) -> dict[str, int]:
        counts = {
            "resends": self.resends,
            "reconnects": self.reconnects,
            "duplicates_dropped": self.duplicates_dropped,
            "gaps": self.gaps,
            "ignored_cancellations": self.ignored_cancellations,
            "close_timeouts": self.close_timeouts,
        }
        if self.client is not None:
            for key, value in self._stats(self.client).items():
                counts[key] += value
        return counts

    async def _receive(self, client: RecordingClient) -> None:
        await client.connect()
        for room in self.rooms:
            await client.join(room)
        self._joined.set()
        async for message in client.messages():
            await self.reading.wait()
            self._deliver(client, message)

    def _deliver(self, client: RecordingClient, message: Message) -> None:
        # Recorded before `handled`, so that no position saved in the state file passes the history.
        self.history.write(
            Deliver(message.room, message.seq, message.id, message.sender, t=self.history.now())
        )
        client.handled(message)
        self.handled[message.room] = max(self.handled.get(message.room, 0), message.seq)
        self.progress.set()

    async def _send(self, client: RecordingClient) -> None:
        # Sending before the first join is stored would be rejected with not_joined.
        await self._joined.wait()
        number = 0
        while True:
            await asyncio.sleep(self.rng.expovariate(self.settings.rate))
            if not self.sending:
                continue
            if self.send_budget is not None and not self.send_budget.take():
                self.sending = False
                continue
            await self._in_flight.acquire()
            number += 1
            room = self.rng.choice(self.rooms)
            body = f"{self.name}/{self.incarnation}/{number}"
            self.history.write(Send(room, body, t=self.history.now()))
            future = client.send_nowait(room, body)
            future.add_done_callback(self._on_send_done(room, body, self._in_flight))

    def _on_send_done(self, room: str, body: str, in_flight: asyncio.Semaphore) -> Any:
        incarnation = self.incarnation

        def record(future: asyncio.Future[SentResult]) -> None:
            in_flight.release()
            if future.cancelled() or incarnation != self.incarnation:
                return
            error = future.exception()
            if isinstance(error, SendFailed):
                self.history.write(SendFailedEvent(room, body, error.code, t=self.history.now()))
                return
            if error is not None:
                return  # the client closed: the message stays unconfirmed
            sent = future.result()
            self.history.write(Sent(room, body, sent.id, sent.seq, sent.dup, t=self.history.now()))
            self.recent.append(ConfirmedMessage(room, body, sent.id, sent.seq))

        return record

    async def _cancel(self, tasks: list[asyncio.Task[None]]) -> None:
        self.ignored_cancellations += await cancel_until_done(tasks)
        for task in tasks:
            if task.done() and not task.cancelled():
                error = task.exception()
                if error is not None and not isinstance(error, ClientError):
                    log.error("application %s: task failed", self.name, exc_info=error)

    def _count(self, client: Client) -> None:
        for key, value in self._stats(client).items():
            setattr(self, key, getattr(self, key) + value)

    @staticmethod
    def _stats(client: Client) -> dict[str, int]:
        stats = client.statistics()
        return {
            "resends": stats.resends,
            "reconnects": stats.reconnects,
            "duplicates_dropped": stats.duplicates,
            "gaps": stats.gaps,
        }


class SendBudget:
    """A total number of messages that all applications may send together (for `--messages`)."""

    def __init__(self, total: int) -> None:
        self.left = total

    def take(self) -> bool:
        if self.left <= 0:
            return False
        self.left -= 1
        return True


def assign_rooms(clients: int, rooms: int, rooms_per_client: int, rng: random.Random) -> list[list[str]]:
    """Give each client `rooms_per_client` distinct rooms, every room getting members in turn."""
    names = [f"room-{index}" for index in range(rooms)]
    per_client = min(rooms_per_client, rooms)
    assignment: list[list[str]] = []
    for index in range(clients):
        first = names[index % rooms]
        others = rng.sample([name for name in names if name != first], per_client - 1)
        assignment.append([first, *others])
    return assignment
