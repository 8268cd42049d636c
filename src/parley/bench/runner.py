"""One benchmark case against one server: connect, hold, publish, drain, and compute the figures.

A case runs these phases, each bounded in time:

1. start the server (or use the one given by URL) and read its idle RSS;
2. open the subscriber connections in worker processes, rooms filled in order, and read the RSS
   again once they are idle (the difference divided by the connections is the RSS per connection);
3. optionally hold them idle for `hold` seconds, so heartbeats run;
4. publish for `duration` seconds, at `rate` messages per second per room or flat out;
5. wait until every connection has received every published message, acknowledge, and collect the counts;
6. optionally time a member `catch_up` messages behind that reconnects (Parley only).

Throughput and server CPU are taken over the publishing period minus the first `warmup` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from parley.bench import processes
from parley.bench.clients import BenchConnection, Tally, monotonic_us, open_connection
from parley.bench.histogram import Histogram
from parley.bench.proc import cpu_seconds, open_files, rss_kb
from parley.bench.processes import ChildError, ServerProcess, WorkerProcess
from parley.bench.worker import ProgressBoard

SAMPLE_INTERVAL = 0.1
PUBLISH_LEAD = 0.3
"""Seconds between telling the publisher to start and its first message, so every process is ready."""
CONNECTIONS_PER_WORKER = 5000
BODY_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 "


@dataclass
class CaseOptions:
    """Options of one case; the command line maps onto these fields."""

    connections: int = 1000
    room_size: int = 0
    rate: float = 0.0
    duration: float = 5.0
    warmup: float = 1.0
    window: int = 200
    batch: bool = False
    ack_interval: float = 0.1
    hold: float = 0.0
    settle: float = 1.5
    catch_up: int = 0
    catch_up_tries: int = 3
    workers: int = 0
    body_size: int = 40
    drain_timeout: float = 60.0
    connect_timeout: float = 120.0
    server_args: list[str] = field(default_factory=list)
    url: str | None = None
    server_pid: int | None = None
    baseline_dir: Path | None = None
    baseline_python: str = "python3"
    keep_data: bool = False

    @property
    def rooms(self) -> list[tuple[str, int]]:
        """Return each room's name and member count: rooms of `room_size`, the last one possibly smaller."""
        size = self.room_size or self.connections
        if self.connections == 0:
            return [("r0", 0)]
        count = math.ceil(self.connections / size)
        return [(f"r{index}", min(size, self.connections - index * size)) for index in range(count)]

    @property
    def body(self) -> str:
        return (BODY_ALPHABET * (self.body_size // len(BODY_ALPHABET) + 1))[: self.body_size]


class Sampler:
    """Reads the server's CPU seconds and RSS, and the load generators' CPU seconds, while running.

    Samples are taken every `SAMPLE_INTERVAL` seconds. The clients' CPU shows whether a run was limited
    by the server or by the load generator.
    """

    def __init__(self, pid: int | None, probe_path: Path | None = None) -> None:
        self.pid = pid
        self.client_pids: list[int] = []
        self.samples: list[tuple[int, float, int]] = []
        self.client_samples: list[tuple[int, float]] = []
        self.probe_path = probe_path
        self.sync_times = Histogram()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.pid is not None:
            self._tasks.append(loop.create_task(self._run()))
        if self.probe_path is not None:
            self._tasks.append(loop.create_task(self._probe_disk(self.probe_path)))

    async def _probe_disk(self, path: Path) -> None:
        """Time a 4 KB write and fsync next to the server's data every `SAMPLE_INTERVAL` seconds.

        The store syncs at every commit, so a slow disk (another process writing heavily) shows up in
        Parley's latency but not in the baselines', which store nothing.
        """
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            while True:
                self.sync_times.add(await asyncio.to_thread(timed_sync, descriptor))
                await asyncio.sleep(SAMPLE_INTERVAL)
        finally:
            os.close(descriptor)

    def sample(self) -> None:
        if self.pid is None:
            return
        now = monotonic_us()
        cpu = cpu_seconds(self.pid)
        rss = rss_kb(self.pid)
        if cpu is not None and rss is not None:
            self.samples.append((now, cpu, rss))
        if self.client_pids:
            readings = [cpu_seconds(pid) for pid in self.client_pids]
            self.client_samples.append((now, sum(reading or 0.0 for reading in readings)))

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(SAMPLE_INTERVAL)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.sample()

    def cpu_between(self, start: int, end: int, clients: bool = False) -> float | None:
        """Return the CPU seconds the server (or all load generators together) used from start to end (µs)."""
        points = self.client_samples if clients else [(time_us, cpu) for time_us, cpu, _rss in self.samples]
        if len(points) < 2:
            return None
        return interpolate(points, end) - interpolate(points, start)

    def peak_rss_kb(self) -> int | None:
        return max((rss for _t, _cpu, rss in self.samples), default=None)


def timed_sync(descriptor: int) -> int:
    """Write 4 KB at the start of the file and fsync it; return the microseconds that took."""
    started = time.perf_counter_ns()
    os.pwrite(descriptor, b"\0" * 4096, 0)
    os.fsync(descriptor)
    return (time.perf_counter_ns() - started) // 1000


def interpolate(points: list[tuple[int, float]], at: int) -> float:
    """Linear interpolation in a time-ordered series of (µs, value), clamped at both ends."""
    if not points:
        return 0.0
    if at <= points[0][0]:
        return points[0][1]
    if at >= points[-1][0]:
        return points[-1][1]
    low, high = 0, len(points) - 1
    while high - low > 1:
        middle = (low + high) // 2
        if points[middle][0] <= at:
            low = middle
        else:
            high = middle
    (t0, v0), (t1, v1) = points[low], points[high]
    return v0 + (v1 - v0) * (at - t0) / (t1 - t0) if t1 > t0 else v0


class Case:
    """One run of the load against one server; `run` returns its figures as a JSON-ready dict."""

    def __init__(self, target: str, options: CaseOptions, repetition: int, log: Any = None) -> None:
        self.target = target
        self.options = options
        self.repetition = repetition
        self.log = log or (lambda line: None)
        self.folder = Path(tempfile.mkdtemp(prefix=f"parley-bench-{target}-"))
        self.server: ServerProcess | None = None
        self.workers: list[WorkerProcess] = []
        self.publisher: WorkerProcess | None = None
        self.host = "127.0.0.1"
        self.port = 0
        self.pid: int | None = None
        self.kind = "parley"
        self.run_id = f"{int(time.time()) % 100000:05d}{repetition}"

    async def run(self) -> dict[str, Any]:
        result: dict[str, Any] = {
            "target": self.target,
            "repetition": self.repetition,
            "load_average_start": os.getloadavg()[0],
        }
        sampler: Sampler | None = None
        try:
            await self._start_server()
            result["server_pid"] = self.pid
            sampler = Sampler(self.pid, self.folder / "sync-probe" if self.target == "parley" else None)
            await asyncio.sleep(self.options.settle)
            result["rss_idle_kb"] = rss_kb(self.pid) if self.pid else None
            sampler.start()
            await self._run_phases(result, sampler)
        except (ChildError, OSError, ConnectionError, TimeoutError, ValueError) as error:
            result["error"] = f"{type(error).__name__}: {error}"
        finally:
            if sampler is not None:
                await sampler.stop()
                result["rss_peak_kb"] = sampler.peak_rss_kb()
                if sampler.sync_times.count:
                    result["disk_sync_ms"] = {
                        "p50": (sampler.sync_times.percentile(0.5) or 0) / 1000,
                        "max": sampler.sync_times.maximum / 1000
                        or (sampler.sync_times.percentile(1.0) or 0) / 1000,
                    }
            await self._stop_all()
            result["load_average_end"] = os.getloadavg()[0]
            if not self.options.keep_data:
                shutil.rmtree(self.folder, ignore_errors=True)
            else:
                result["data"] = str(self.folder)
        return result

    # Phases

    async def _run_phases(self, result: dict[str, Any], sampler: Sampler) -> None:
        options = self.options
        rooms = options.rooms
        board_path = self.folder / "progress.bin"
        worker_count = options.workers or max(1, math.ceil(options.connections / CONNECTIONS_PER_WORKER))
        if options.connections == 0:
            worker_count = 0
        ProgressBoard.create(str(board_path), worker_count + 1, len(rooms))
        board = {"path": str(board_path), "processes": worker_count + 1, "rooms": [name for name, _ in rooms]}

        self.log(f"{self.target}: connecting {options.connections} subscribers in {len(rooms)} room(s)")
        started = time.monotonic()
        ready = await self._connect_subscribers(worker_count, rooms, board)
        await self._connect_publisher(rooms, board)
        sampler.client_pids = [worker.pid for worker in [*self.workers, self.publisher] if worker is not None]
        result["connect_seconds"] = round(time.monotonic() - started, 2)
        result["connections"] = sum(reply["open"] for reply in ready)
        result["failed"] = sum(reply["failed"] for reply in ready)
        result["connect_errors"] = merge_counts(reply["errors"] for reply in ready)
        result["rooms"] = len(rooms)
        result["room_sizes"] = sorted({size for _name, size in rooms})

        await asyncio.sleep(options.settle)
        self._read_memory(result, "rss_connected_kb")
        if options.hold > 0:
            self.log(f"{self.target}: holding {result['connections']} connections idle for {options.hold} s")
            await asyncio.sleep(options.hold)
            self._read_memory(result, "rss_after_hold_kb")
        if self.pid is not None:
            result["server_open_files"] = open_files(self.pid)

        published = await self._publish(result)
        drained = await self._drain(published["heads"])
        self._add_figures(result, sampler, published, drained)
        if options.catch_up > 0 and self.kind == "parley":
            result["catch_up"] = await self._measure_catch_up(rooms[0][0])

    async def _start_server(self) -> None:
        options = self.options
        if self.target == "parley" and options.url is not None:
            self.host, self.port = parse_ws_url(options.url)
            self.pid = options.server_pid
            return
        if self.target == "parley":
            command = processes.parley_command(0, self.folder / "data", options.server_args)
            self.server = ServerProcess("parley", "parley", command, self.folder / "server.log")
        else:
            if options.baseline_dir is None:
                raise ChildError(f"baseline {self.target} needs --baseline-dir")
            port = processes.free_port()
            command, kind = processes.baseline_command(
                self.target, options.baseline_dir, options.baseline_python, port
            )
            self.server = ServerProcess(self.target, kind, command, self.folder / "server.log", port)
            self.kind = kind
        await self.server.start()
        self.port = self.server.port
        self.pid = self.server.pid

    async def _connect_subscribers(
        self, worker_count: int, rooms: list[tuple[str, int]], board: dict[str, Any]
    ) -> list[dict[str, Any]]:
        options = self.options
        members: list[tuple[str, str]] = []
        for name, size in rooms:
            members += [(f"b{self.run_id}-{len(members) + index}", name) for index in range(size)]
        self.workers = [
            WorkerProcess(index, self.folder / f"worker{index}.log") for index in range(worker_count)
        ]
        await asyncio.gather(*(worker.start() for worker in self.workers))

        async def connect(worker: WorkerProcess) -> dict[str, Any]:
            share = members[worker.index :: worker_count]
            return await worker.request(
                {
                    "cmd": "connect",
                    "kind": self.kind,
                    "host": self.host,
                    "port": self.port,
                    "users": [user for user, _room in share],
                    "rooms": [[room] for _user, room in share],
                    "batch": options.batch,
                    "ack_interval": options.ack_interval,
                    "timeout": options.connect_timeout,
                    "progress": {**board, "slot": worker.index},
                },
                options.connect_timeout + 30,
            )

        return list(await asyncio.gather(*(connect(worker) for worker in self.workers)))

    async def _connect_publisher(self, rooms: list[tuple[str, int]], board: dict[str, Any]) -> None:
        self.publisher = WorkerProcess(len(self.workers), self.folder / "publisher.log")
        await self.publisher.start()
        reply = await self.publisher.request(
            {
                "cmd": "connect",
                "role": "publisher",
                "kind": self.kind,
                "host": self.host,
                "port": self.port,
                "users": [f"b{self.run_id}-publisher"],
                "rooms": [[name for name, _size in rooms]],
                "batch": True,
                "ack_interval": self.options.ack_interval,
                "timeout": 30.0,
                "progress": {**board, "slot": len(self.workers)},
            },
            60.0,
        )
        if reply["open"] != 1:
            raise ChildError(f"the publisher could not connect: {reply['errors']}")

    def _read_memory(self, result: dict[str, Any], key: str) -> None:
        if self.pid is not None:
            result[key] = rss_kb(self.pid)

    async def _publish(self, result: dict[str, Any]) -> dict[str, Any]:
        options = self.options
        assert self.publisher is not None
        start = monotonic_us() + int(PUBLISH_LEAD * 1e6)
        window = {
            "cmd": "window",
            "from": start + int(options.warmup * 1e6),
            "to": start + int(options.duration * 1e6),
        }
        for worker in self.workers:
            await worker.request(window, 10.0)

        mode = f"{options.rate:g} msg/s per room" if options.rate > 0 else "flat out"
        self.log(f"{self.target}: publishing {mode} for {options.duration} s")
        reply = await self.publisher.request(
            {
                "cmd": "publish",
                "rate": options.rate,
                "start": start,
                "duration": options.duration,
                "window": options.window,
                "body": options.body,
                "timeout": options.drain_timeout,
            },
            PUBLISH_LEAD + options.duration + options.drain_timeout + 30,
        )
        if "error" in reply:
            raise ChildError(f"publishing failed: {reply['error']}")

        result["published"] = sum(reply["sent"].values())
        result["heads"] = reply["heads"]
        result["publisher_lag_ms"] = reply.get("lag_ms")
        result["publisher_errors"] = reply["errors"]
        result["confirmed"] = reply.get("confirmed")
        return reply

    async def _drain(self, heads: dict[str, int]) -> list[dict[str, Any]]:
        timeout = self.options.drain_timeout
        command = {"cmd": "drain", "heads": heads, "timeout": timeout}
        return list(await asyncio.gather(*(worker.request(command, timeout + 40) for worker in self.workers)))

    # Figures

    def _add_figures(
        self,
        result: dict[str, Any],
        sampler: Sampler,
        published: dict[str, Any],
        drained: list[dict[str, Any]],
    ) -> None:
        options = self.options
        start = int(published["started"]) + int(options.warmup * 1e6)
        end = int(published["finished"])
        if end - start < 500_000:
            start = int(published["started"])
        seconds = (end - start) / 1e6
        series = [[(int(t), float(count)) for t, count in reply["series"]] for reply in drained]
        deliveries = sum(interpolate(points, end) - interpolate(points, start) for points in series)
        cpu = sampler.cpu_between(start, end)
        client_cpu = sampler.cpu_between(start, end, clients=True)

        latency = Histogram()
        totals = {"delivered": 0, "duplicates": 0, "out_of_order": 0, "pings": 0, "acks_sent": 0}
        errors: list[dict[str, int]] = []
        closes: list[dict[str, int]] = []
        for reply in drained:
            tally = reply["tally"]
            latency.merge(Histogram.from_sparse(tally["latency"], tally["latency_max"]))
            for key in totals:
                totals[key] += tally[key]
            errors.append(tally["errors"])
            closes.append(tally["closes"])

        result.update(
            {
                "window_seconds": round(seconds, 3),
                "deliveries_in_window": int(deliveries),
                "deliveries_per_s": deliveries / seconds if seconds > 0 else None,
                "server_cpu_percent": 100 * cpu / seconds if cpu is not None and seconds > 0 else None,
                "client_cpu_percent": 100 * client_cpu / seconds
                if client_cpu is not None and seconds
                else None,
                "server_cpu_s_per_million": cpu / deliveries * 1e6
                if cpu is not None and deliveries
                else None,
                "latency_ms": {
                    name: (value / 1000 if value is not None else None)
                    for name, value in (
                        ("p50", latency.percentile(0.50)),
                        ("p99", latency.percentile(0.99)),
                        ("p999", latency.percentile(0.999)),
                        ("max", latency.maximum or latency.percentile(1.0)),
                    )
                },
                "latency_samples": latency.count,
                "delivered": totals["delivered"],
                "lost": sum(reply["lost"] for reply in drained),
                "duplicates": totals["duplicates"],
                "out_of_order": totals["out_of_order"],
                "behind_at_end": sum(reply["behind"] for reply in drained),
                "unconfirmed_acks": sum(reply["unconfirmed"] for reply in drained),
                "open_at_end": sum(reply["open"] for reply in drained),
                "acks_sent": totals["acks_sent"],
                "pings_min": min(
                    (reply["pings_min"] for reply in drained if reply["connections"]), default=0
                ),
                "errors": merge_counts(errors),
                "closes": merge_counts(closes),
                "per_room": merge_rooms(reply["rooms"] for reply in drained),
            }
        )
        if options.rate > 0:
            # Every room gets `rate` messages per second, each delivered to all of its members.
            offered = options.rate * seconds * result.get("connections", 0)
            result["delivered_fraction"] = deliveries / offered if offered else None
        connected, idle = result.get("rss_connected_kb"), result.get("rss_idle_kb")
        if connected is not None and idle is not None and result.get("connections"):
            result["kb_per_connection"] = (connected - idle) / result["connections"]

    # Catch-up

    async def _measure_catch_up(self, room: str) -> dict[str, Any]:
        """Time how long a member `catch_up` messages behind takes, from connecting to holding the head."""
        assert self.publisher is not None
        options = self.options
        loop = asyncio.get_running_loop()
        user = f"b{self.run_id}-late"
        tally = Tally()
        first = BenchConnection("parley", self.host, self.port, "/ws", user, [room], tally)
        await open_connection(loop, first, self.host, self.port, 30.0)
        since = first.positions[room].since
        first.close()
        await asyncio.wait_for(first.closed, 10.0)

        self.log(f"{self.target}: publishing {options.catch_up} messages while a member is away")
        reply = await self.publisher.request(
            {
                "cmd": "publish",
                "rate": 0,
                "start": monotonic_us(),
                "duration": 300.0,
                "window": options.catch_up,
                "max_messages": options.catch_up,
                "rooms": [room],
                "body": options.body,
                "timeout": options.drain_timeout,
            },
            300.0 + options.drain_timeout + 30,
        )
        head = int(reply["heads"][room])
        if self.workers:
            await self._drain(reply["heads"])

        before = await fetch_stats(self.host, self.port)
        timings: list[dict[str, float]] = []
        for _ in range(options.catch_up_tries):
            timings.append(await self._time_one_catch_up(loop, user, room, since, head, tally))
        after = await fetch_stats(self.host, self.port)
        return {
            "behind": head - since,
            "tries": timings,
            "seconds_median": sorted(timing["total_s"] for timing in timings)[len(timings) // 2],
            "duplicates": tally.duplicates,
            "out_of_order": tally.out_of_order,
            "cache_misses": cache_delta(before, after, "misses"),
            "cache_hits": cache_delta(before, after, "hits"),
        }

    async def _time_one_catch_up(
        self, loop: asyncio.AbstractEventLoop, user: str, room: str, since: int, head: int, tally: Tally
    ) -> dict[str, float]:
        started = time.monotonic()
        connection = BenchConnection(
            "parley",
            self.host,
            self.port,
            "/ws",
            user,
            [room],
            tally,
            hello={"resume": {room: {"since": since}}},
        )
        await open_connection(loop, connection, self.host, self.port, 30.0)
        joined = time.monotonic()
        position = connection.positions[room]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(position.until(head)), 30.0)
        done = time.monotonic()
        held = position.since
        connection.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(connection.closed, 10.0)
        return {
            "total_s": round(done - started, 4),
            "after_joined_s": round(done - joined, 4),
            "messages": held - since,
        }

    async def _stop_all(self) -> None:
        stops = [worker.stop() for worker in self.workers]
        if self.publisher is not None:
            stops.append(self.publisher.stop())
        await asyncio.gather(*stops, return_exceptions=True)
        if self.server is not None:
            await self.server.stop()


def merge_counts(parts: Any) -> dict[str, int]:
    merged: dict[str, int] = {}
    for part in parts:
        for key, value in part.items():
            merged[key] = merged.get(key, 0) + int(value)
    return merged


def merge_rooms(parts: Any) -> dict[str, dict[str, int]]:
    """Combine the per-room summaries of several workers: sums, minimums and maximums as each field needs."""
    merged: dict[str, dict[str, int]] = {}
    for part in parts:
        for room, summary in part.items():
            held = merged.get(room)
            if held is None:
                merged[room] = dict(summary)
                continue
            for key in ("connections", "open", "received"):
                held[key] += summary[key]
            for key in ("lowest", "pings_min"):
                held[key] = min(held[key], summary[key])
            held["highest"] = max(held["highest"], summary["highest"])
    return merged


def parse_ws_url(url: str) -> tuple[str, int]:
    """Split `ws://HOST:PORT/ws` into host and port; only plain ws:// is supported by the load generator."""
    if not url.startswith("ws://"):
        raise ValueError(f"--url must start with ws:// (got {url!r}); the load generator does not speak TLS")
    address = url[5:].split("/", 1)[0]
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--url must name a host and a port, as in ws://127.0.0.1:8765/ws (got {url!r})")
    return host, int(port)


async def fetch_stats(host: str, port: int) -> dict[str, Any] | None:
    """GET /api/stats from a Parley server; None when it cannot be read."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5.0)
    except (OSError, TimeoutError):
        return None
    try:
        writer.write(f"GET /api/stats HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        response = await asyncio.wait_for(reader.read(), 5.0)
    except (OSError, TimeoutError):
        return None
    finally:
        writer.close()
    _head, _, body = response.partition(b"\r\n\r\n")
    try:
        value: dict[str, Any] = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return value


def cache_delta(before: dict[str, Any] | None, after: dict[str, Any] | None, key: str) -> int | None:
    if before is None or after is None or "cache" not in before or "cache" not in after:
        return None
    return int(after["cache"][key]) - int(before["cache"][key])
