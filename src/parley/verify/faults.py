"""The fault scheduler: at random times, injects one enabled fault into the network, server or clients.

Every choice (when, which kind, which link or client, how long) comes from one seeded generator, so a
run with the same seed and settings requests the same faults in the same order. Timing on a loaded
machine still differs between runs, so a replay reproduces the plan, not every interleaving.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

import orjson
from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException

from parley.verify.history import DuplicateSend
from parley.verify.proxy import FaultProxy
from parley.verify.server import ServerProcess
from parley.verify.workload import Application

log = logging.getLogger("parley.verify.faults")

FAULT_WEIGHTS: Final = {
    "cut": 3,
    "delay": 2,
    "stall": 2,
    "black_hole": 2,
    "server_kill": 1,
    "server_term": 1,
    "client_crash": 2,
    "client_pause": 2,
    "dup_send": 2,
}
"""Every fault kind with its relative frequency: network faults are cheap and come most often."""

FAULT_KINDS: Final = tuple(FAULT_WEIGHTS)
SERVER_FAULTS: Final = frozenset({"server_kill", "server_term"})
PROXY_FAULTS: Final = frozenset({"cut", "delay", "stall", "black_hole"})
REPLAY_TIMEOUT: Final = 5.0
INJECT_TIMEOUT: Final = 90.0
"""Maximum seconds one fault may take to inject (a server restart is the slowest) before it is abandoned."""


@dataclass(frozen=True, slots=True)
class FaultTiming:
    """Ranges, in seconds, from which the scheduler draws each fault's parameters."""

    interval: float = 1.0
    """Mean time between two faults (exponentially distributed)."""
    delay: tuple[float, float] = (0.05, 0.5)
    delay_duration: tuple[float, float] = (1.0, 5.0)
    stall_duration: tuple[float, float] = (0.5, 5.0)
    restart_pause: tuple[float, float] = (0.0, 1.0)
    crash_down: tuple[float, float] = (0.0, 2.0)
    pause_reading: tuple[float, float] = (1.0, 6.0)


def parse_fault_kinds(text: str, without: list[str]) -> list[str]:
    """Turn `--faults` (comma-separated, `all` or `none`) and `--without` into the enabled kinds.

    Raises ValueError naming an unknown kind.
    """
    names = [name.strip() for name in text.split(",") if name.strip()]
    if names == ["all"]:
        names = list(FAULT_KINDS)
    elif names == ["none"]:
        names = []
    for name in [*names, *without]:
        if name not in FAULT_WEIGHTS:
            raise ValueError(
                f"unknown fault kind {name!r}; choose from {', '.join(FAULT_KINDS)}, all or none"
            )
    return [name for name in FAULT_KINDS if name in names and name not in without]


class FaultScheduler:
    """Injects faults until stopped, and counts and logs each one in `faults.jsonl`."""

    def __init__(
        self,
        kinds: list[str],
        rng: random.Random,
        timing: FaultTiming,
        proxy: FaultProxy | None,
        server: ServerProcess | None,
        applications: list[Application],
        replay_url: str,
        log_path: Path,
        started: float,
    ) -> None:
        self.kinds = kinds
        self.rng = rng
        self.timing = timing
        self.proxy = proxy
        self.server = server
        self.applications = applications
        self.replay_url = replay_url
        self.started = started
        self.injected: Counter[str] = Counter()
        self.replays_unanswered = 0
        self.abandoned = 0
        """Faults whose injection failed or hung: a bug in the verifier or a stuck component."""
        self._log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 - closed by close()
        self._restarts: set[asyncio.Task[None]] = set()
        self._server_lock = asyncio.Lock()

    async def run(self, deadline: float, stop: Callable[[], bool]) -> None:
        """Inject faults until the monotonic time `deadline`, or until `stop()` is true."""
        if not self.kinds:
            return
        weights = [FAULT_WEIGHTS[kind] for kind in self.kinds]
        # Every enabled kind comes once, in a random order, before the weighted draws begin, so that a
        # short run exercises each of them.
        first_round = self.rng.sample(self.kinds, len(self.kinds))
        while not stop():
            wait = self.rng.expovariate(1 / self.timing.interval)
            if time.monotonic() + wait >= deadline:
                return
            await asyncio.sleep(wait)
            kind = first_round.pop() if first_round else self.rng.choices(self.kinds, weights)[0]
            try:
                if not await asyncio.wait_for(self.inject(kind), INJECT_TIMEOUT) and kind not in first_round:
                    first_round.insert(0, kind)  # nothing to apply it to yet: try again later
            except TimeoutError:
                log.error("injecting fault %s took more than %.0f s; abandoned", kind, INJECT_TIMEOUT)
                self.abandoned += 1
            except Exception:
                log.exception("injecting fault %s failed", kind)
                self.abandoned += 1

    async def inject(self, kind: str) -> bool:
        """Inject one fault of `kind` now; return False when there was nothing to apply it to."""
        if kind in PROXY_FAULTS:
            return self._inject_network(kind)
        if kind == "server_kill":
            return await self._restart_server(signal.SIGKILL, kind)
        if kind == "server_term":
            return await self._restart_server(signal.SIGTERM, kind)
        if kind == "client_crash":
            return await self._crash_client()
        if kind == "client_pause":
            return self._pause_client()
        if kind == "dup_send":
            return await self._replay_send()
        raise ValueError(f"unknown fault kind {kind!r}")

    async def finish(self) -> None:
        """Undo lasting faults before the drain: heal the network, start the server and every client."""
        if self._restarts:
            await asyncio.gather(*self._restarts, return_exceptions=True)
        if self.proxy is not None:
            self.proxy.heal()
        if self.server is not None and not self.server.running:
            async with self._server_lock:
                await self.server.start()
        for application in self.applications:
            application.reading.set()
            if not application.running:
                application.start()

    def close(self) -> None:
        self._log.close()

    def _record(self, kind: str, **details: Any) -> None:
        self.injected[kind] += 1
        entry = {"t": round(time.monotonic() - self.started, 3), "kind": kind, **details}
        self._log.write(orjson.dumps(entry) + b"\n")
        self._log.flush()
        log.info("fault %s %s", kind, details)

    def _inject_network(self, kind: str) -> bool:
        assert self.proxy is not None
        link = self.proxy.pick()
        if link is None:
            return False
        if kind == "cut":
            reset = self.rng.random() < 0.5
            self.proxy.cut(link, reset)
            self._record(kind, link=link.number, reset=reset)
        elif kind == "delay":
            seconds = self.rng.uniform(*self.timing.delay)
            duration = self.rng.uniform(*self.timing.delay_duration)
            self.proxy.delay(link, seconds, duration)
            self._record(kind, link=link.number, seconds=round(seconds, 3), duration=round(duration, 3))
        elif kind == "stall":
            which = self.rng.choice(["up", "down", "both"])
            duration = self.rng.uniform(*self.timing.stall_duration)
            self.proxy.stall(link, which, duration)
            self._record(kind, link=link.number, direction=which, duration=round(duration, 3))
        else:
            self.proxy.black_hole(link)
            self._record(kind, link=link.number)
        return True

    async def _restart_server(self, sig: int, kind: str) -> bool:
        assert self.server is not None
        pause = self.rng.uniform(*self.timing.restart_pause)
        self._record(kind, pause=round(pause, 3))
        async with self._server_lock:
            await self.server.restart(sig, pause)
        return True

    async def _crash_client(self) -> bool:
        running = [application for application in self.applications if application.running]
        if not running:
            return False
        application = self.rng.choice(running)
        down = self.rng.uniform(*self.timing.crash_down)
        self._record("client_crash", client=application.name, down=round(down, 3))
        await application.crash()
        task = asyncio.create_task(self._start_later(application, down))
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)
        return True

    async def _start_later(self, application: Application, delay: float) -> None:
        await asyncio.sleep(delay)
        if not application.running:
            application.start()

    def _pause_client(self) -> bool:
        application = self.rng.choice(self.applications)
        seconds = self.rng.uniform(*self.timing.pause_reading)
        self._record("client_pause", client=application.name, seconds=round(seconds, 3))
        application.pause_reading(seconds)
        return True

    async def _replay_send(self) -> bool:
        """Send a confirmed message again, same id and body, on a second connection of the same user.

        The connection goes straight to the server, not through the proxy, so that network faults
        do not make the replay's reply a matter of chance.
        """
        candidates = [application for application in self.applications if application.recent]
        if not candidates:
            return False
        application = self.rng.choice(candidates)
        message = self.rng.choice(list(application.recent))
        self._record("dup_send", client=application.name, room=message.room, id=message.id)

        seq, dup = await replay_send(
            self.replay_url, application.name, message.room, message.id, message.body
        )
        if seq is None:
            self.replays_unanswered += 1
            return True
        history = application.history
        history.write(DuplicateSend(message.room, message.body, message.id, seq, dup, t=history.now()))
        return True


async def replay_send(url: str, user: str, room: str, id: str, body: str) -> tuple[int | None, bool]:
    """Transmit one `send` on a fresh connection and return the reply's seq and dup flag.

    Returns (None, False) when the server is unreachable or does not reply in time. The connection
    never acknowledges anything, so it cannot move the user's cursor.
    """
    frames = [{"type": "hello", "user": user}, {"type": "send", "room": room, "id": id, "body": body}]
    try:
        async with (
            asyncio.timeout(REPLAY_TIMEOUT),
            connect(url, proxy=None, open_timeout=REPLAY_TIMEOUT) as ws,
        ):
            await ws.send(orjson.dumps(frames).decode())
            async for data in ws:
                for frame in _frames(data):
                    if frame.get("type") == "sent" and frame.get("id") == id and frame.get("room") == room:
                        seq = frame.get("seq")
                        return (seq if isinstance(seq, int) else None), frame.get("dup") is True
    except (TimeoutError, OSError, WebSocketException) as error:
        log.info("replayed send of %s in %s got no reply: %s", id, room, error or type(error).__name__)
    return None, False


def _frames(data: str | bytes) -> list[dict[str, Any]]:
    value = orjson.loads(data)
    items = value if isinstance(value, list) else [value]
    return [item for item in items if isinstance(item, dict)]
