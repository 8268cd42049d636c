"""Shared fixtures: a real `parley serve` process on 127.0.0.1 with its own data folder."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

LISTEN_LINE = re.compile(r"listening on http://([\d.]+):(\d+)")


class ServerProcess:
    """A `parley serve` child process: start, kill with any signal, restart on the same port and data."""

    def __init__(self, data_dir: Path, *extra: str, port: int = 0) -> None:
        self.data_dir = data_dir
        self.extra = list(extra)
        self.port = port
        self.proc: subprocess.Popen[str] | None = None
        self.log_path = data_dir / "server.log"

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> ServerProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            "parley",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
            *self.extra,
        ]
        log = open(self.log_path, "a")  # noqa: SIM115 - the child process keeps it open
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
        log.close()
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            found = LISTEN_LINE.search(line)
            if found:
                self.port = int(found.group(2))
                return self
        self.stop(signal.SIGKILL)
        raise RuntimeError(f"parley serve did not start; log:\n{self.log_path.read_text()[-4000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        """Send `sig` to the server and wait for it to exit; return its exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        code = self.proc.returncode
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None
        return code

    def restart(self, sig: int = signal.SIGTERM) -> ServerProcess:
        self.stop(sig)
        return self.start()

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start servers on demand: `server_factory("--ack-timeout", "0.5")`; all are stopped at the end."""
    started: list[ServerProcess] = []

    def start(*extra: str, data_dir: Path | None = None) -> ServerProcess:
        server = ServerProcess(data_dir or tmp_path / f"data{len(started)}", *extra)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop(signal.SIGKILL if os.environ.get("PARLEY_FAST_TEARDOWN") else signal.SIGTERM)


@pytest.fixture
def server(server_factory: Callable[..., ServerProcess]) -> ServerProcess:
    """One `parley serve` with default settings."""
    return server_factory()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def services_required() -> bool:
    return os.environ.get("PARLEY_REQUIRE_SERVICES") == "1"
