"""Readings of another process from Linux's /proc: CPU seconds, resident memory, open files; and the host."""

from __future__ import annotations

import os
import platform
import resource
import sys
from importlib import metadata
from typing import Any

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """Return the user plus system CPU seconds of every thread of `pid`, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            fields = file.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # After the command name: state is field 3 of stat(5), utime field 14 and stime field 15.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_kb(pid: int) -> int | None:
    """Return the resident set size (VmRSS) of `pid` in KiB, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as file:
            for line in file:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def open_files(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def describe_host() -> dict[str, Any]:
    """Collect what a benchmark record needs about the machine and the software versions."""
    model = ""
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory_mb = None
    try:
        with open("/proc/meminfo") as file:
            memory_mb = int(file.readline().split()[1]) // 1024
    except (OSError, IndexError, ValueError):
        pass
    versions = {"python": sys.version.split()[0]}
    for package in ("parley", "uvloop", "orjson", "websockets"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return {
        "system": f"{platform.system()} {platform.release()}",
        "cpu": model,
        "cpus": os.cpu_count(),
        "memory_mb": memory_mb,
        "open_files_limit": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
        "versions": versions,
    }
