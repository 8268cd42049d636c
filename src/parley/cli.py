"""The `parley` command: serve, chat, token."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from pathlib import Path
from typing import Any

from parley import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="parley", description="Reliable real-time chat rooms over WebSocket."
    )
    parser.add_argument("--version", action="version", version=f"parley {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run a Parley server")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="TCP port (default 8765; 0 picks a free one)")
    serve.add_argument(
        "--data-dir", type=Path, help="folder for the database and files (default ./parley-data)"
    )
    serve.add_argument(
        "--store", help="store URL, e.g. sqlite:///path/parley.db (default: parley.db in --data-dir)"
    )
    serve.add_argument(
        "--secret", help="HS256 secret for tokens (or PARLEY_SECRET); without one, auth is open"
    )
    serve.add_argument(
        "--auth", choices=["auto", "open", "token"], help="open: trust `user` in hello (development)"
    )
    serve.add_argument(
        "--ack-timeout", type=float, help="seconds before unacknowledged messages are resent (5)"
    )
    serve.add_argument("--heartbeat", type=float, help="seconds between WebSocket pings (25)")
    serve.add_argument("--hot-window", type=float, help="seconds of each room kept in the hot cache (3600)")
    serve.add_argument("--hot-max-per-room", type=int, help="messages per room kept in the hot cache (20000)")
    serve.add_argument("--max-body", type=int, help="largest message body in UTF-8 bytes (16384)")
    serve.add_argument("--shard-size", type=int, help="subscribers written per fan-out step (1000)")
    serve.add_argument(
        "--batch-window", type=float, help="seconds a merged frame waits for more messages (0.005)"
    )
    serve.add_argument("--presence-limit", type=int, help="largest room that gets presence frames (200)")
    serve.add_argument("--receipt-limit", type=int, help="largest room that gets receipt frames (50)")
    serve.add_argument(
        "--large-room", type=int, help="subscribers from which `joined` asks clients to ack less often (1000)"
    )
    serve.add_argument(
        "--large-room-ack-interval", type=float, help="seconds between acks asked of large rooms' members (1)"
    )
    serve.add_argument("--send-rate", type=float, help="sends per second per connection (50)")
    serve.add_argument("--send-burst", type=int, help="sends a connection may burst above the rate (200)")
    serve.add_argument(
        "--frame-rate", type=float, help="frames per second per connection before reading pauses (500)"
    )
    serve.add_argument("--frame-burst", type=int, help="frames a connection may burst above the rate (1000)")
    serve.add_argument(
        "--config", type=Path, help="TOML file with settings; flags and PARLEY_* variables win"
    )
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR (INFO)")
    serve.add_argument("--no-uvloop", action="store_true", help="run on the standard asyncio event loop")

    token = commands.add_parser("token", help="print a signed token for a user")
    token.add_argument("user")
    token.add_argument("--secret", help="HS256 secret (or PARLEY_SECRET)")
    token.add_argument("--ttl", type=float, default=30 * 86400, help="seconds until it expires (30 days)")

    from parley.bench import command as bench_command

    bench = commands.add_parser("bench", help="measure a server under load, beside baseline servers")
    bench_command.add_arguments(bench)

    from parley.verify import command as verify_command

    verify = commands.add_parser("verify", help="check reliable delivery under injected faults")
    verify_command.add_arguments(verify)

    chat = commands.add_parser("chat", help="chat in a room from the terminal")
    from parley.client import terminal

    terminal.add_arguments(chat)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return run_serve(args)
    if args.command == "token":
        return run_token(args)
    if args.command == "bench":
        from parley.bench import command as bench_command

        return bench_command.run(args)
    if args.command == "verify":
        from parley.verify import command as verify_command

        return verify_command.run(args)
    if args.command == "chat":
        from parley.client import terminal

        return asyncio.run(terminal.run(args))
    return 2


def run_serve(args: argparse.Namespace) -> int:
    from parley import logs
    from parley.server.app import serve
    from parley.server.config import Settings, load_settings

    setting_names = {field.name for field in dataclasses.fields(Settings)}
    flags: dict[str, Any] = {name: value for name, value in vars(args).items() if name in setting_names}
    if args.no_uvloop:
        flags["uvloop"] = False
    try:
        settings = load_settings(flags, args.config)
        settings.check()
    except (ValueError, OSError) as error:
        print(f"parley serve: {error}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level)

    def announce(line: str) -> None:
        print(line, flush=True)

    if settings.uvloop:
        try:
            import uvloop

            return int(uvloop.run(serve(settings, announce)))
        except ImportError:
            pass
    return asyncio.run(serve(settings, announce))


def run_token(args: argparse.Namespace) -> int:
    import os

    from parley.server.auth import mint_token

    secret = args.secret or os.environ.get("PARLEY_SECRET")
    if not secret:
        print("parley token: give --secret or set PARLEY_SECRET", file=sys.stderr)
        return 2
    try:
        print(mint_token(args.user, secret, args.ttl))
    except ValueError as error:
        print(f"parley token: {error}", file=sys.stderr)
        return 2
    return 0
