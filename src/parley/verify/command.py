"""`parley verify`: run clients under faults and check every delivery against the store."""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import tempfile
from pathlib import Path

from parley.verify.checker import check
from parley.verify.faults import FAULT_KINDS, FaultTiming, parse_fault_kinds
from parley.verify.history import read_cursor_samples, read_histories
from parley.verify.runner import VerifyOptions, format_report, format_violations, run_verify, write_summary
from parley.verify.server import ServerStartError
from parley.verify.store import read_sqlite_snapshot
from parley.verify.workload import ClientSettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of `parley verify` to `parser`."""
    workload = parser.add_argument_group("workload")
    workload.add_argument(
        "--clients", type=int, default=20, help="simulated applications, one user each (20)"
    )
    workload.add_argument("--rooms", type=int, default=4, help="rooms shared by the clients (4)")
    workload.add_argument("--rooms-per-client", type=int, default=2, help="rooms each client joins (2)")
    workload.add_argument("--duration", type=float, default=30.0, help="seconds of sending under faults (30)")
    workload.add_argument(
        "--messages", type=int, help="stop sending after this many messages in total, or at --duration"
    )
    workload.add_argument("--rate", type=float, default=2.0, help="messages per second per client (2)")
    workload.add_argument("--seed", type=int, help="seed of every random choice (default: random, printed)")
    workload.add_argument(
        "--out",
        type=Path,
        help="run folder for histories, state files and the server's data (default: new temp folder)",
    )

    faults = parser.add_argument_group("faults")
    faults.add_argument(
        "--faults",
        default="all",
        help=f"comma-separated fault kinds to inject, or all or none: {', '.join(FAULT_KINDS)} (all)",
    )
    faults.add_argument(
        "--without", action="append", default=[], metavar="KIND", help="leave out one fault kind (repeatable)"
    )
    faults.add_argument(
        "--fault-interval", type=float, default=1.0, help="mean seconds between two faults (1.0)"
    )
    faults.add_argument(
        "--black-hole-for",
        type=float,
        default=10.0,
        help="seconds a black-holed connection stays silent before the proxy resets it (10)",
    )

    server = parser.add_argument_group("server and clients")
    server.add_argument(
        "--connect",
        metavar="URL",
        help="verify a running server at ws://HOST:PORT/ws instead of starting one; "
        "server faults and cursor checks are then skipped",
    )
    server.add_argument(
        "--ack-timeout", type=float, default=1.0, help="the server's --ack-timeout in seconds (1.0)"
    )
    server.add_argument(
        "--heartbeat", type=float, default=2.0, help="the server's --heartbeat in seconds (2.0)"
    )
    server.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for `parley serve`, e.g. --server-arg=--send-rate=100 (repeatable)",
    )
    server.add_argument(
        "--send-timeout",
        type=float,
        default=2.0,
        help="seconds a client waits for `sent` before resending (2.0)",
    )
    server.add_argument(
        "--backoff-cap",
        type=float,
        default=2.0,
        help="maximum wait in seconds before a client reconnects (2.0)",
    )
    server.add_argument(
        "--drain-timeout",
        type=float,
        default=60.0,
        help="seconds allowed after the faults end for every client to catch up (60)",
    )
    server.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING or ERROR (WARNING)")
    parser.add_argument(
        "--check",
        type=Path,
        metavar="FOLDER",
        help="only check the run recorded in FOLDER again (its histories against its data/parley.db)",
    )


def options_from(args: argparse.Namespace) -> VerifyOptions:
    """Build the run's options from the parsed arguments; raises ValueError for an invalid value."""
    for name in ("clients", "rooms", "rooms_per_client"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("duration", "rate", "fault_interval", "black_hole_for", "send_timeout", "backoff_cap"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.messages is not None and args.messages < 1:
        raise ValueError(f"--messages must be at least 1, got {args.messages}")

    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    folder = args.out if args.out is not None else Path(tempfile.mkdtemp(prefix=f"parley-verify-{seed}-"))
    return VerifyOptions(
        folder=folder,
        seed=seed,
        clients=args.clients,
        rooms=args.rooms,
        rooms_per_client=args.rooms_per_client,
        duration=args.duration,
        messages=args.messages,
        faults=parse_fault_kinds(args.faults, args.without),
        timing=FaultTiming(interval=args.fault_interval),
        client=ClientSettings(rate=args.rate, send_timeout=args.send_timeout, backoff_cap=args.backoff_cap),
        ack_timeout=args.ack_timeout,
        heartbeat=args.heartbeat,
        server_arguments=list(args.server_arg),
        connect=args.connect,
        drain_timeout=args.drain_timeout,
        black_hole_for=args.black_hole_for,
    )


def run(args: argparse.Namespace) -> int:
    """Run `parley verify`; return 0 when no violation was found, 1 when one was, 2 for a usage error."""
    from parley import logs

    logs.configure(args.log_level)
    if args.check is not None:
        return check_folder(args.check)
    try:
        options = options_from(args)
    except ValueError as error:
        print(f"parley verify: {error}", file=sys.stderr)
        return 2
    if options.folder.exists() and any((options.folder / "history").glob("*.jsonl")):
        print(f"parley verify: {options.folder} already holds a run; choose another --out", file=sys.stderr)
        return 2

    print(f"parley verify: seed {options.seed}, faults: {', '.join(options.faults) or 'none'}", flush=True)
    try:
        report = asyncio.run(run_verify(options))
    except ServerStartError as error:
        print(f"parley verify: {error}", file=sys.stderr)
        return 2

    print(format_report(report, options))
    write_summary(report, options, sys.argv)
    return 0 if report.ok else 1


def check_folder(folder: Path) -> int:
    """Check a recorded run again and print its violations; return 0 when there are none."""
    database = folder / "data" / "parley.db"
    if not (folder / "history").is_dir() or not database.exists():
        print(f"parley verify: {folder} holds no recorded run (history/ and data/parley.db)", file=sys.stderr)
        return 2
    result = check(
        read_histories(folder / "history"),
        read_sqlite_snapshot(database),
        read_cursor_samples(folder / "cursors.jsonl"),
    )
    counts = f"{result.sends} sends, {result.stored} stored, {result.delivered} deliveries"
    print(f"parley verify: {folder}: {counts}")
    print(format_violations(result))
    return 0 if result.ok else 1
