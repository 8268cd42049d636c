"""Child processes of a benchmark run: the server under test, baseline servers and load-generator workers.

Every child is started here and ended by its own PID (SIGTERM, then SIGKILL after a grace period), and
every wait on a child is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import orjson

LISTEN_LINE = re.compile(rb"listening on http://([\d.]+):(\d+)")
STOP_GRACE = 10.0

BASELINES: dict[str, tuple[str, list[str], str]] = {
    "raw": ("srv_raw.py", [], "raw"),
    "raw-uvloop": ("srv_raw.py", ["--uvloop"], "raw"),
    "raw-batch": ("srv_raw.py", ["--batch-ms", "5"], "raw"),
    "raw-batch-uvloop": ("srv_raw.py", ["--batch-ms", "5", "--uvloop"], "raw"),
    "socketio": ("srv_socketio.py", [], "socketio"),
}
"""Baseline name -> (script in the baseline folder, its flags, the client dialect it speaks)."""


class ChildError(RuntimeError):
    """A child process failed to start or to reply; the message carries the tail of its log."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def log_tail(path: Path, size: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-size:]
    except OSError:
        return ""


async def stop_process(process: asyncio.subprocess.Process, grace: float = STOP_GRACE) -> int | None:
    """End a child we started: SIGTERM, then SIGKILL when it is still running after `grace` seconds."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
    return process.returncode


class ServerProcess:
    """A server under test: `parley serve` or a baseline, on 127.0.0.1 and a port of its own."""

    def __init__(self, name: str, kind: str, command: list[str], log_path: Path, port: int = 0) -> None:
        self.name = name
        self.kind = kind
        self.command = command
        self.log_path = log_path
        self.port = port
        self.process: asyncio.subprocess.Process | None = None
        self._log: TextIO | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def _open_log(self) -> TextIO:
        self._log = open(self.log_path, "a")  # noqa: SIM115 - closed in stop()
        return self._log

    async def start(self, time_limit: float = 30.0) -> None:
        log = self._open_log()
        if self.kind == "parley":
            self.process = await asyncio.create_subprocess_exec(
                *self.command, stdout=asyncio.subprocess.PIPE, stderr=log
            )
            self.port = await self._read_listen_port(time_limit)
        else:
            self.process = await asyncio.create_subprocess_exec(*self.command, stdout=log, stderr=log)
            await self._wait_listening(time_limit)

    async def _read_listen_port(self, time_limit: float) -> int:
        assert self.process is not None and self.process.stdout is not None
        deadline = time.monotonic() + time_limit
        while time.monotonic() < deadline:
            try:
                line = await asyncio.wait_for(self.process.stdout.readline(), deadline - time.monotonic())
            except TimeoutError:
                break
            if not line:
                break
            found = LISTEN_LINE.search(line)
            if found:
                return int(found.group(2))
        raise ChildError(f"{self.name} did not start within {time_limit} s; log:\n{log_tail(self.log_path)}")

    async def _wait_listening(self, time_limit: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + time_limit
        while time.monotonic() < deadline:
            if self.process.returncode is not None:
                break
            try:
                _reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            await writer.wait_closed()
            return
        raise ChildError(f"{self.name} did not listen within {time_limit} s; log:\n{log_tail(self.log_path)}")

    async def stop(self) -> int | None:
        code = None
        if self.process is not None:
            code = await stop_process(self.process)
        if self._log is not None:
            self._log.close()
            self._log = None
        return code


def parley_command(port: int, data_dir: Path, extra: list[str]) -> list[str]:
    """Build the `parley serve` command for a benchmark: quiet logs and no per-connection send limit.

    The send limit would throttle the single benchmark publisher; `extra` flags come last and win.
    """
    return [
        sys.executable, "-m", "parley", "serve",
        "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data_dir),
        "--log-level", "WARNING", "--send-rate", "1000000", "--send-burst", "1000000",
        "--frame-rate", "1000000", "--frame-burst", "1000000",
        *extra,
    ]  # fmt: skip


def baseline_command(name: str, folder: Path, python: str, port: int) -> tuple[list[str], str]:
    """Return the command that starts baseline `name` from `folder`, and the dialect its clients speak."""
    script, flags, kind = BASELINES[name]
    path = folder / script
    if not path.is_file():
        raise ChildError(f"baseline {name}: {path} not found; pass the folder holding it with --baseline-dir")
    return [python, str(path), *flags, "--port", str(port)], kind


class WorkerProcess:
    """A `parley.bench.worker` child, driven by one JSON command per line."""

    def __init__(self, index: int, log_path: Path) -> None:
        self.index = index
        self.log_path = log_path
        self.process: asyncio.subprocess.Process | None = None
        self._log: TextIO | None = None

    def _open_log(self) -> TextIO:
        self._log = open(self.log_path, "a")  # noqa: SIM115 - closed in stop()
        return self._log

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def start(self) -> None:
        log = self._open_log()
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "parley.bench.worker",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log,
            limit=1 << 26,
        )  # fmt: skip

    async def request(self, command: dict[str, Any], time_limit: float) -> dict[str, Any]:
        """Send one command and return the reply; raise ChildError on an error reply, an exit or a timeout."""
        assert self.process is not None
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.write(orjson.dumps(command) + b"\n")
        await self.process.stdin.drain()
        try:
            line = await asyncio.wait_for(self.process.stdout.readline(), time_limit)
        except TimeoutError:
            raise ChildError(
                f"load worker {self.index} did not reply to {command['cmd']!r} within {time_limit:.0f} s"
            ) from None
        if not line:
            raise ChildError(f"load worker {self.index} exited; log:\n{log_tail(self.log_path)}")
        reply: dict[str, Any] = orjson.loads(line)
        if reply.get("event") == "error":
            raise ChildError(f"load worker {self.index} failed on {command['cmd']!r}: {reply['error']}")
        return reply

    async def stop(self) -> None:
        if self.process is not None:
            if self.process.returncode is None and self.process.stdin is not None:
                with contextlib.suppress(OSError, ChildError, RuntimeError):
                    await self.request({"cmd": "close", "timeout": 3.0}, time_limit=8.0)
                self.process.stdin.close()
            await stop_process(self.process, grace=5.0)
        if self._log is not None:
            self._log.close()
            self._log = None
