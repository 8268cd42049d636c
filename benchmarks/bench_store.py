"""Measure SQLite store appends per second: N concurrent appenders (group commit) against one at a time.

Usage: python benchmarks/bench_store.py [--appenders 64] [--messages 100] [--sequential 300] [--rounds 3]

Each round uses a fresh database in a temporary folder (under --dir when given) and runs both phases
side by side, so the ratio is meaningful on a noisy machine. Every phase stops at its message count or
after --max-seconds, whichever comes first. The figures depend on how fast the disk syncs, because the
store syncs the WAL at every commit.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from parley.storage import SqliteStore

BODY = "x" * 100


@dataclass(frozen=True)
class PhaseResult:
    appends: int
    seconds: float
    commits: int
    largest_batch: int

    @property
    def rate(self) -> float:
        return self.appends / self.seconds


async def run_concurrent(path: Path, appenders: int, messages: int, max_seconds: float) -> PhaseResult:
    store = SqliteStore(path)
    await store.open()
    deadline = time.perf_counter() + max_seconds

    async def appender(number: int) -> int:
        sent = 0
        while sent < messages and time.perf_counter() < deadline:
            await store.append(f"room{number % 8}", f"user{number}", f"m{sent}", BODY, None, 0)
            sent += 1
        return sent

    start = time.perf_counter()
    counts = await asyncio.gather(*(appender(number) for number in range(appenders)))
    elapsed = time.perf_counter() - start
    stats = store.statistics()
    await store.close()
    return PhaseResult(sum(counts), elapsed, stats.commits, stats.largest_batch)


async def run_sequential(path: Path, count: int, max_seconds: float) -> PhaseResult:
    store = SqliteStore(path)
    await store.open()
    deadline = time.perf_counter() + max_seconds

    start = time.perf_counter()
    sent = 0
    while sent < count and time.perf_counter() < deadline:
        await store.append("room0", "solo", f"m{sent}", BODY, None, 0)
        sent += 1
    elapsed = time.perf_counter() - start
    stats = store.statistics()
    await store.close()
    return PhaseResult(sent, elapsed, stats.commits, stats.largest_batch)


def describe(name: str, results: list[PhaseResult]) -> str:
    rates = [result.rate for result in results]
    appends = sum(result.appends for result in results)
    commits = sum(result.commits for result in results)
    largest = max(result.largest_batch for result in results)
    return (
        f"{name:<28} median {statistics.median(rates):>9.0f} appends/s"
        f"  (range {min(rates):.0f} to {max(rates):.0f}; {appends} appends in {commits} commits,"
        f" mean batch {appends / commits:.1f}, largest {largest})"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--appenders", type=int, default=64, help="number of concurrent appenders (default 64)"
    )
    parser.add_argument(
        "--messages", type=int, default=100, help="appends per concurrent appender (default 100)"
    )
    parser.add_argument(
        "--sequential", type=int, default=300, help="appends made one at a time (default 300)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of both phases (default 3)")
    parser.add_argument(
        "--max-seconds", type=float, default=20.0, help="time limit per phase, in seconds (default 20)"
    )
    parser.add_argument("--dir", type=Path, default=None, help="folder for the temporary databases")
    args = parser.parse_args()

    concurrent: list[PhaseResult] = []
    sequential: list[PhaseResult] = []
    with tempfile.TemporaryDirectory(prefix="parley-bench-", dir=args.dir) as folder:
        print(f"databases in {folder}")
        for round_number in range(args.rounds):
            concurrent.append(
                await run_concurrent(
                    Path(folder) / f"concurrent{round_number}.db",
                    args.appenders,
                    args.messages,
                    args.max_seconds,
                )
            )
            sequential.append(
                await run_sequential(
                    Path(folder) / f"sequential{round_number}.db", args.sequential, args.max_seconds
                )
            )

    print(describe(f"{args.appenders} concurrent appenders", concurrent))
    print(describe("one at a time", sequential))
    ratio = statistics.median(r.rate for r in concurrent) / statistics.median(r.rate for r in sequential)
    print(f"group commit speed-up (ratio of medians): {ratio:.1f}x")


if __name__ == "__main__":
    asyncio.run(main())
