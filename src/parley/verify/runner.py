"""One verify run: start the server and the proxy, run the workload under faults, drain, check, report.

A run's folder contains everything needed to check it again or to understand a failure:

    data/            the server's data folder (parley.db, server.log)
    history/*.jsonl  one history per client (see history.py)
    state/*.json     the clients' state files
    cursors.jsonl    stored delivery cursors sampled during the run
    faults.jsonl     every fault injected, with its time and target
    summary.json     the counts and violations printed at the end
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from parley.verify.checker import CheckResult, StoreSnapshot, check
from parley.verify.faults import SERVER_FAULTS, FaultScheduler, FaultTiming
from parley.verify.history import CursorSample, encode_sample, read_cursor_samples, read_histories
from parley.verify.proxy import FaultProxy
from parley.verify.server import ServerProcess
from parley.verify.store import (
    read_http_snapshot,
    read_sqlite_cursors,
    read_sqlite_heads,
    read_sqlite_snapshot,
)
from parley.verify.workload import Application, ClientSettings, SendBudget, assign_rooms

log = logging.getLogger("parley.verify")

SHOWN_VIOLATIONS = 10
COUNT_FIELDS = (
    "sends", "confirmed", "confirmed_as_duplicate", "failed", "unconfirmed", "stored", "delivered",
    "redelivered_after_restart", "duplicate_sends", "acked", "incarnations",
)  # fmt: skip


@dataclass(slots=True)
class VerifyOptions:
    """Everything that defines a run; the same options and seed ask for the same workload and faults."""

    folder: Path
    seed: int
    clients: int = 20
    rooms: int = 4
    rooms_per_client: int = 2
    duration: float = 30.0
    messages: int | None = None
    faults: list[str] = field(default_factory=list)
    timing: FaultTiming = field(default_factory=FaultTiming)
    client: ClientSettings = field(default_factory=ClientSettings)
    ack_timeout: float = 1.0
    heartbeat: float = 2.0
    server_arguments: list[str] = field(default_factory=list)
    connect: str | None = None
    drain_timeout: float = 60.0
    black_hole_for: float = 10.0
    sample_interval: float = 1.0


@dataclass(slots=True)
class VerifyReport:
    """The outcome of a run: the checker's result plus what the run itself counted."""

    result: CheckResult
    faults: dict[str, int]
    network_faults: dict[str, int]
    client_counts: dict[str, int]
    drained: bool
    not_caught_up: list[str]
    elapsed: float
    replays_unanswered: int
    server_starts: int

    @property
    def ok(self) -> bool:
        return self.result.ok


async def run_verify(options: VerifyOptions) -> VerifyReport:
    """Run the workload under faults, then check every history against the store."""
    folder = options.folder
    for sub in ("history", "state", "data"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    rng = random.Random(options.seed)

    server: ServerProcess | None = None
    if options.connect is None:
        server_arguments = ["--ack-timeout", str(options.ack_timeout), "--heartbeat", str(options.heartbeat)]
        server = ServerProcess(folder / "data", [*server_arguments, *options.server_arguments])
        await server.start()
        upstream = ("127.0.0.1", server.port)
    else:
        upstream = _address_of(options.connect)

    proxy = FaultProxy(
        upstream, rng=random.Random(f"{options.seed}:proxy"), black_hole_for=options.black_hole_for
    )
    await proxy.start()
    url = f"ws://127.0.0.1:{proxy.port}/ws"

    assignment = assign_rooms(options.clients, options.rooms, options.rooms_per_client, rng)
    applications = [
        Application(f"v{index:04d}", rooms, url, folder, started, options.client, str(options.seed))
        for index, rooms in enumerate(assignment)
    ]
    budget = SendBudget(options.messages) if options.messages is not None else None
    for application in applications:
        application.send_budget = budget

    kinds = [kind for kind in options.faults if server is not None or kind not in SERVER_FAULTS]
    scheduler = FaultScheduler(
        kinds, random.Random(f"{options.seed}:faults"), options.timing, proxy, server, applications,
        f"ws://{upstream[0]}:{upstream[1]}/ws", folder / "faults.jsonl", started,
    )  # fmt: skip
    sampler = CursorSampler(server, folder / "cursors.jsonl", options.sample_interval, started)
    sampling = asyncio.create_task(sampler.run()) if server is not None else None
    flushing = asyncio.create_task(_flush_histories(applications))

    try:
        for application in applications:
            application.start()
        deadline = started + options.duration
        await scheduler.run(deadline, stop=lambda: budget is not None and budget.left <= 0)
        await _wait_until(deadline, lambda: budget is not None and budget.left <= 0)

        for application in applications:
            application.sending = False
        await scheduler.finish()
        drained, not_caught_up = await _drain(applications, server, options)
        for application in applications:
            await application.close(final=True)
    finally:
        for task in (sampling, flushing):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        for application in applications:
            if application.running:
                await application.crash()
            application.history.close()
        sampler.close()
        scheduler.close()
        await proxy.close()
        if server is not None:
            await server.close()

    rooms = sorted({room for rooms in assignment for room in rooms})
    snapshot = await _read_store(server, options.connect, rooms)
    histories = read_histories(folder / "history")
    result = check(histories, snapshot, read_cursor_samples(folder / "cursors.jsonl"))

    client_counts: dict[str, int] = {}
    for application in applications:
        for key, value in application.statistics().items():
            client_counts[key] = client_counts.get(key, 0) + value
    return VerifyReport(
        result=result,
        faults=dict(scheduler.injected),
        network_faults=dict(proxy.faults),
        client_counts=client_counts,
        drained=drained,
        not_caught_up=not_caught_up,
        elapsed=time.monotonic() - started,
        replays_unanswered=scheduler.replays_unanswered,
        server_starts=server.starts if server is not None else 0,
    )


async def _wait_until(deadline: float, stop: Callable[[], bool]) -> None:
    """Sleep until `deadline`, or until `stop()` is true (checked every 0.1 s)."""
    while not stop():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        await asyncio.sleep(min(remaining, 0.1))


async def _drain(
    applications: list[Application], server: ServerProcess | None, options: VerifyOptions
) -> tuple[bool, list[str]]:
    """Wait until every unconfirmed send is stored and every application has each room up to its head.

    Returns whether that happened within the drain timeout, and the clients that did not catch up.
    """
    deadline = time.monotonic() + options.drain_timeout
    try:
        async with asyncio.timeout(options.drain_timeout):
            await asyncio.gather(*(application.wait_sent() for application in applications))
    except TimeoutError:
        log.warning("drain: unconfirmed sends remain after %.0f s", options.drain_timeout)

    heads = await _read_heads(server, options.connect, applications)
    while True:
        behind = [application for application in applications if not application.caught_up(heads)]
        if not behind:
            return True, []
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False, [application.name for application in behind]
        for application in behind:
            application.progress.clear()
        waits = [asyncio.create_task(application.progress.wait()) for application in behind]
        await asyncio.wait(waits, timeout=min(remaining, 1.0), return_when=asyncio.FIRST_COMPLETED)
        for wait in waits:
            wait.cancel()


async def _read_heads(
    server: ServerProcess | None, connect: str | None, applications: list[Application]
) -> dict[str, int]:
    if server is not None:
        return await asyncio.to_thread(read_sqlite_heads, server.database)
    assert connect is not None
    rooms = sorted({room for application in applications for room in application.rooms})
    snapshot = await asyncio.to_thread(read_http_snapshot, _http_base(connect), rooms)
    return snapshot.heads


async def _read_store(server: ServerProcess | None, connect: str | None, rooms: list[str]) -> StoreSnapshot:
    if server is not None:
        return await asyncio.to_thread(read_sqlite_snapshot, server.database)
    assert connect is not None
    return await asyncio.to_thread(read_http_snapshot, _http_base(connect), rooms)


def _address_of(url: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(url)
    if parts.hostname is None or parts.port is None:
        raise ValueError(f"invalid server URL {url!r}: expected ws://HOST:PORT/ws")
    return parts.hostname, parts.port


def _http_base(url: str) -> str:
    host, port = _address_of(url)
    return f"http://{host}:{port}"


async def _flush_histories(applications: list[Application]) -> None:
    while True:
        await asyncio.sleep(0.5)
        for application in applications:
            application.history.flush()


class CursorSampler:
    """Reads every stored delivery cursor from the database at an interval and appends them to a file."""

    def __init__(self, server: ServerProcess | None, path: Path, interval: float, started: float) -> None:
        self.server = server
        self.interval = interval
        self.started = started
        self._file: IO[bytes] = open(path, "ab")  # noqa: SIM115 - closed by close()

    async def run(self) -> None:
        assert self.server is not None
        while True:
            await asyncio.sleep(self.interval)
            try:
                rows = await asyncio.to_thread(read_sqlite_cursors, self.server.database)
            except Exception as error:  # the database may be between a kill and a restart
                log.info("cursor sample skipped: %s", error)
                continue
            t = time.monotonic() - self.started
            lines = [encode_sample(CursorSample(user, room, cursor, t)) for user, room, cursor in rows]
            self._file.write(b"".join(line + b"\n" for line in lines))
            self._file.flush()

    def close(self) -> None:
        self._file.close()


def format_report(report: VerifyReport, options: VerifyOptions) -> str:
    """Return the summary printed at the end of a run."""
    result = report.result
    lines = [
        f"parley verify: seed {options.seed}, {options.clients} clients in {options.rooms} rooms, "
        f"{report.elapsed:.1f} s, run folder {options.folder}",
        f"messages: {result.sends} sent by the applications, {result.confirmed} confirmed "
        f"({result.confirmed_as_duplicate} as duplicates), {result.failed} rejected, "
        f"{result.unconfirmed} never confirmed; {result.stored} stored",
        f"deliveries: {result.delivered} to applications, {result.redelivered_after_restart} of them again "
        f"after a client restart; {result.acked} acked frames; {result.incarnations} client incarnations",
        "faults: " + (_counts(report.faults) or "none"),
    ]
    if report.network_faults:
        lines.append("  network detail: " + _counts(report.network_faults))
    if report.server_starts:
        lines.append(f"  server started {report.server_starts} times")
    if report.faults.get("dup_send"):
        lines.append(
            f"  replayed sends: {result.duplicate_sends} answered, {report.replays_unanswered} unanswered"
        )
    lines.append("client library: " + _counts(report.client_counts))
    if not report.drained:
        shown = ", ".join(report.not_caught_up[:10])
        lines.append(
            f"drain: {len(report.not_caught_up)} clients did not reach the heads within "
            f"{options.drain_timeout:.0f} s ({shown})"
        )

    lines.append(format_violations(result))
    return "\n".join(lines)


def format_violations(result: CheckResult) -> str:
    """Return the violation counts by kind and the first few violations explained."""
    counts = result.counts_by_kind()
    if not counts:
        return "violations: none"
    lines = [f"violations: {len(result.violations)} ({_counts(counts)})"]
    for violation in result.violations[:SHOWN_VIOLATIONS]:
        lines.append("  " + violation.explain())
    if len(result.violations) > SHOWN_VIOLATIONS:
        lines.append(f"  … and {len(result.violations) - SHOWN_VIOLATIONS} more in summary.json")
    return "\n".join(lines)


def write_summary(report: VerifyReport, options: VerifyOptions, command: list[str]) -> Path:
    """Write summary.json into the run folder and return its path."""
    result = report.result
    summary: dict[str, Any] = {
        "command": command,
        "seed": options.seed,
        "ok": report.ok,
        "elapsed": round(report.elapsed, 3),
        "counts": {key: getattr(result, key) for key in COUNT_FIELDS},
        "faults": report.faults,
        "network_faults": report.network_faults,
        "client": report.client_counts,
        "drained": report.drained,
        "not_caught_up": report.not_caught_up,
        "violations_by_kind": result.counts_by_kind(),
        "violations": [asdict(violation) for violation in result.violations],
    }
    path = options.folder / "summary.json"
    path.write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    return path


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{key} {value}" for key, value in sorted(counts.items()))
