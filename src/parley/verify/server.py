"""A `parley serve` child process that the verifier starts, kills with a signal and restarts.

The first start listens on a free port. Every restart reuses that port and the data folder, so clients
and the proxy reconnect to the same address and find the same store.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import re
import signal
import sys
from pathlib import Path
from typing import IO

log = logging.getLogger("parley.verify.server")

LISTEN_LINE = re.compile(rb"listening on http://([\d.]+):(\d+)")
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0


PR_SET_PDEATHSIG = 1
# Loaded in the parent: between fork and exec the child must not load libraries, because another
# thread of the parent may have held the loader's lock at the fork.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this child when the verifier dies, so no server outlives a killed run."""
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class ServerStartError(RuntimeError):
    """`parley serve` exited or stayed silent instead of printing the address it listens on."""


class ServerProcess:
    """One `parley serve` on 127.0.0.1 with its own data folder; the log goes to `server.log` there."""

    def __init__(self, data_dir: Path, extra_arguments: list[str], port: int = 0) -> None:
        self.data_dir = data_dir
        self.extra_arguments = extra_arguments
        self.port = port
        self.starts = 0
        self._process: asyncio.subprocess.Process | None = None
        self._log: IO[bytes] | None = None

    def _open_log(self) -> IO[bytes]:
        if self._log is None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self._log = open(self.data_dir / "server.log", "ab")  # noqa: SIM115 - closed by close()
        return self._log

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def database(self) -> Path:
        return self.data_dir / "parley.db"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    async def start(self) -> None:
        """Start the server and wait until it prints its address; raises ServerStartError."""
        server_log = self._open_log()
        command = [
            sys.executable, "-m", "parley", "serve",
            "--host", "127.0.0.1", "--port", str(self.port), "--data-dir", str(self.data_dir),
            *self.extra_arguments,
        ]  # fmt: skip
        process = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=server_log,
            preexec_fn=_die_with_parent if _LIBC is not None else None,
        )
        self._process = process
        assert process.stdout is not None
        try:
            async with asyncio.timeout(START_TIMEOUT):
                while line := await process.stdout.readline():
                    found = LISTEN_LINE.search(line)
                    if found:
                        self.port = int(found.group(2))
                        self.starts += 1
                        return
        except TimeoutError:
            pass
        await self.stop(signal.SIGKILL)
        raise ServerStartError(
            f"parley serve did not print its address within {START_TIMEOUT:.0f} s; "
            f"see {self.data_dir / 'server.log'}"
        )

    async def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Send `sig` and wait for the exit; SIGKILL follows when it takes too long. Returns the exit code."""
        process = self._process
        if process is None:
            return None
        self._process = None
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(sig)
            try:
                await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
            except TimeoutError:
                log.error(
                    "parley serve (pid %d) ignored signal %d for %.0f s; killing it",
                    process.pid,
                    sig,
                    STOP_TIMEOUT,
                )
                process.kill()
                await process.wait()
        return process.returncode

    async def restart(self, sig: int, pause: float = 0.0) -> None:
        await self.stop(sig)
        if pause > 0:
            await asyncio.sleep(pause)
        await self.start()

    async def close(self) -> None:
        await self.stop(signal.SIGTERM)
        if self._log is not None:
            self._log.close()
            self._log = None
