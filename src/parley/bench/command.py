"""`parley bench`: measure a Parley server under load, side by side with baseline servers.

The servers it starts listen on 127.0.0.1 (`--url` may name another), and every process it starts
is ended by its PID. Every phase has a time bound, and `--timeout` bounds the whole command.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from parley.bench import processes, report
from parley.bench.proc import describe_host
from parley.bench.runner import Case, CaseOptions, parse_ws_url

BASELINE_DIR_VARIABLE = "PARLEY_BENCH_BASELINES"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of `parley bench` to its subparser."""
    load = parser.add_argument_group("load")
    load.add_argument("--connections", type=int, default=1000, help="subscriber connections (1000)")
    load.add_argument(
        "--room-size", type=int, default=0, help="members per room; rooms are filled in order (0: one room)"
    )
    load.add_argument(
        "--rate", type=float, default=0.0,
        help="messages per second into each room; 0 publishes flat out, at most --window ahead of the "
        "slowest member (0)",
    )  # fmt: skip
    load.add_argument("--duration", type=float, default=5.0, help="seconds of publishing (5)")
    load.add_argument(
        "--warmup", type=float, default=1.0, help="first seconds of publishing left out of figures (1)"
    )
    load.add_argument(
        "--window",
        type=int,
        default=200,
        help="flat out: messages a room may run ahead of its slowest member (200)",
    )
    load.add_argument(
        "--batch", action="store_true", help="subscribers ask for merged frames (`batch` in hello)"
    )
    load.add_argument(
        "--ack-interval", type=float, default=0.1, help="seconds between a connection's cumulative acks (0.1)"
    )
    load.add_argument(
        "--hold", type=float, default=0.0, help="seconds to hold the connections idle before publishing"
    )
    load.add_argument("--body-size", type=int, default=40, help="message body length in bytes (40)")
    load.add_argument(
        "--catch-up", type=int, default=0,
        help="afterwards, time a member this many messages behind reconnecting (Parley only; 0: skip)",
    )  # fmt: skip
    load.add_argument("--catch-up-tries", type=int, default=3, help="catch-up measurements to take (3)")
    load.add_argument(
        "--workers", type=int, default=0, help="load-generator processes (default: one per 5,000 connections)"
    )

    server = parser.add_argument_group("servers")
    server.add_argument("--url", help="benchmark the Parley server at this ws:// URL instead of starting one")
    server.add_argument("--server-pid", type=int, help="with --url, its PID, for CPU and memory figures")
    server.add_argument(
        "--server-arg", action="append", default=[], metavar="FLAG",
        help="extra `parley serve` flag, repeatable: --server-arg=--heartbeat=5",
    )  # fmt: skip
    server.add_argument(
        "--baseline", action="append", default=[], metavar="NAME",
        help=f"also run a baseline server, repeatable or comma-separated: {', '.join(processes.BASELINES)}",
    )  # fmt: skip
    server.add_argument(
        "--baseline-dir", type=Path, default=None,
        help=f"folder holding srv_raw.py and srv_socketio.py (or set {BASELINE_DIR_VARIABLE})",
    )  # fmt: skip
    server.add_argument(
        "--baseline-python", default=sys.executable,
        help="Python that runs the baselines; socketio needs aiohttp and python-socketio in it (this Python)",
    )  # fmt: skip
    server.add_argument("--no-parley", action="store_true", help="run only the baselines")

    run = parser.add_argument_group("run")
    run.add_argument("--repeat", type=int, default=1, help="runs of each server, interleaved (1)")
    run.add_argument("--json", type=Path, metavar="FILE", help="also write every run and the summary as JSON")
    run.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds after which the whole run stops (1800)"
    )
    run.add_argument(
        "--drain-timeout", type=float, default=60.0, help="seconds to wait for the last deliveries (60)"
    )
    run.add_argument("--keep-data", action="store_true", help="keep each run's folder (server data and logs)")
    run.add_argument("--quiet", action="store_true", help="print only the table")


def options_from(args: argparse.Namespace) -> CaseOptions:
    baseline_dir = args.baseline_dir
    if baseline_dir is None and os.environ.get(BASELINE_DIR_VARIABLE):
        baseline_dir = Path(os.environ[BASELINE_DIR_VARIABLE])
    return CaseOptions(
        connections=args.connections,
        room_size=args.room_size,
        rate=args.rate,
        duration=args.duration,
        warmup=args.warmup,
        window=args.window,
        batch=args.batch,
        ack_interval=args.ack_interval,
        hold=args.hold,
        catch_up=args.catch_up,
        catch_up_tries=args.catch_up_tries,
        workers=args.workers,
        body_size=args.body_size,
        drain_timeout=args.drain_timeout,
        server_args=list(args.server_arg),
        url=args.url,
        server_pid=args.server_pid,
        baseline_dir=baseline_dir,
        baseline_python=args.baseline_python,
        keep_data=args.keep_data,
    )


def check_arguments(args: argparse.Namespace, targets: list[str]) -> str | None:
    """Return what is wrong with the arguments, or None."""
    if args.connections < 0 or args.room_size < 0:
        return "--connections and --room-size must not be negative"
    if args.duration <= 0 or args.warmup < 0 or args.ack_interval <= 0:
        return "--duration and --ack-interval must be positive and --warmup not negative"
    if args.window < 1:
        return "--window must be at least 1"
    unknown = [name for name in targets if name != "parley" and name not in processes.BASELINES]
    if unknown:
        return f"unknown baseline {', '.join(unknown)}; choose from {', '.join(processes.BASELINES)}"
    baselines = [name for name in targets if name != "parley"]
    rooms = 1 if not args.room_size else -(-args.connections // args.room_size)
    if baselines and rooms > 1:
        return "the baselines serve one room: drop --room-size or the baselines"
    if not targets:
        return "nothing to run: --no-parley without --baseline"
    if args.url is not None:
        try:
            parse_ws_url(args.url)
        except ValueError as error:
            return str(error)
    return None


async def run_cases(
    targets: list[str], options: CaseOptions, repeat: int, quiet: bool
) -> list[dict[str, Any]]:
    def log(line: str) -> None:
        if not quiet:
            print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)

    runs = []
    for repetition in range(repeat):
        for target in targets:
            run = await Case(target, options, repetition, log).run()
            if "error" in run:
                log(f"{target}: failed: {run['error']}")
            runs.append(run)
    return runs


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by `args`, print the table, write --json; return the exit code.

    The exit code is 1 when a run failed or lost, duplicated or reordered a message.
    """
    targets = [] if args.no_parley else ["parley"]
    for item in args.baseline:
        targets += [name.strip() for name in item.split(",") if name.strip()]
    problem = check_arguments(args, targets)
    if problem is not None:
        print(f"parley bench: {problem}", file=sys.stderr)
        return 2

    options = options_from(args)
    started = time.time()
    try:
        runs = asyncio.run(
            asyncio.wait_for(run_cases(targets, options, args.repeat, args.quiet), args.timeout)
        )
    except TimeoutError:
        print(
            f"parley bench: timed out after {args.timeout:g} s (--timeout); raise it or shorten the run",
            file=sys.stderr,
        )
        return 1

    summary = report.summarize(runs)
    ratio_table = report.ratios(summary)
    print(report.render(summary, ratio_table))
    if args.json is not None:
        document = {
            "command": ["parley", "bench", *sys.argv[2:]] if sys.argv[1:2] == ["bench"] else sys.argv,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "host": describe_host(),
            "options": {
                key: str(value) if isinstance(value, Path) else value for key, value in vars(options).items()
            },
            "runs": runs,
            "summary": summary,
            "ratios": ratio_table,
        }
        args.json.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))

    failed = any("error" in run for run in runs)
    broken = any(run.get("lost") or run.get("duplicates") or run.get("out_of_order") for run in runs)
    return 1 if failed or broken else 0
