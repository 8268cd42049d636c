"""Server settings: defaults, then an optional TOML file, then `PARLEY_*` variables, then flags."""

from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


@dataclass
class Settings:
    """Every setting of `parley serve`; durations are in seconds."""

    host: str = "127.0.0.1"
    port: int = 8765
    data_dir: Path = field(default_factory=lambda: Path("parley-data"))
    store: str = ""
    secret: str | None = None
    auth: str = "auto"
    ack_timeout: float = 5.0
    max_tries: int = 3
    heartbeat: float = 25.0
    hot_window: float = 3600.0
    hot_max_per_room: int = 20_000
    hot_max_bytes_per_room: int = 8 * 1024 * 1024
    hot_max_bytes: int = 256 * 1024 * 1024
    max_body: int = 16384
    max_meta: int = 2048
    shard_size: int = 1000
    batch_window: float = 0.005
    batch_max: int = 256
    send_rate: float = 50.0
    send_burst: int = 200
    frame_rate: float = 500.0
    frame_burst: int = 1000
    outbound_high_water: int = 256 * 1024
    slow_timeout: float = 30.0
    handshake_timeout: float = 10.0
    http_idle_timeout: float = 30.0
    hello_timeout: float = 10.0
    max_connections: int = 100_000
    handshake_rate: float = 5000.0
    presence_limit: int = 200
    receipt_limit: int = 50
    large_room: int = 1000
    large_room_ack_interval: float = 1.0
    receipt_interval: float = 0.5
    web: bool = True
    log_level: str = "INFO"
    uvloop: bool = True

    @property
    def open_auth(self) -> bool:
        """Tell whether `hello` may name its user without a token."""
        if self.auth == "open":
            return True
        if self.auth == "token":
            return False
        return self.secret is None

    def check(self) -> None:
        """Raise ValueError when the settings cannot run safely or at all."""
        for name in (
            "ack_timeout", "heartbeat", "hot_window", "batch_window", "slow_timeout",
            "handshake_timeout", "http_idle_timeout", "hello_timeout",
        ):  # fmt: skip
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.auth not in ("auto", "open", "token"):
            raise ValueError(f"auth must be auto, open or token, got {self.auth!r}")
        if self.auth == "token" and not self.secret:
            raise ValueError("--auth token needs --secret (or PARLEY_SECRET)")
        if self.max_body < 4096:
            raise ValueError(f"max_body must be at least 4096, got {self.max_body}")
        if self.auth == "auto" and self.secret is None and not is_loopback(self.host):
            raise ValueError(
                f"refusing to listen on {self.host} without a secret: set --secret (or PARLEY_SECRET), "
                "or pass --auth open to accept any user name from anyone who can reach this address"
            )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_settings(flags: dict[str, Any], config_file: Path | None = None) -> Settings:
    """Merge the TOML file, the environment and the flags (which win) into Settings."""
    settings = Settings()
    layers: list[dict[str, Any]] = []
    if config_file is not None:
        with open(config_file, "rb") as file:
            layers.append(tomllib.load(file))
    layers.append(environment_values())
    layers.append({key: value for key, value in flags.items() if value is not None})

    known = {item.name: item for item in fields(Settings)}
    for layer in layers:
        for key, value in layer.items():
            key = key.replace("-", "_")
            if key not in known:
                raise ValueError(f"unknown setting {key!r}")
            setattr(settings, key, convert(getattr(Settings(), key), value, key))
    return settings


def environment_values() -> dict[str, Any]:
    values: dict[str, Any] = {}
    for item in fields(Settings):
        raw = os.environ.get("PARLEY_" + item.name.upper())
        if raw is not None:
            values[item.name] = raw
    return values


def convert(default: Any, value: Any, key: str) -> Any:
    """Convert a value from TOML, the environment or a flag to the type of the setting's default."""
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                return value.strip().lower() in ("1", "true", "yes", "on")
            return bool(value)
        if isinstance(default, Path):
            return Path(value)
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key}: invalid value {value!r}") from None
    return None if value == "" and default is None else value
