"""Summaries of benchmark runs: medians and ranges per server, ratios against baselines, the text table."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

FIGURES: dict[str, Callable[[dict[str, Any]], float | None]] = {
    "deliveries_per_s": lambda run: run.get("deliveries_per_s"),
    "server_cpu_s_per_million": lambda run: run.get("server_cpu_s_per_million"),
    "server_cpu_percent": lambda run: run.get("server_cpu_percent"),
    "client_cpu_percent": lambda run: run.get("client_cpu_percent"),
    "p50_ms": lambda run: (run.get("latency_ms") or {}).get("p50"),
    "p99_ms": lambda run: (run.get("latency_ms") or {}).get("p99"),
    "p999_ms": lambda run: (run.get("latency_ms") or {}).get("p999"),
    "kb_per_connection": lambda run: run.get("kb_per_connection"),
    "delivered_fraction": lambda run: run.get("delivered_fraction"),
    "catch_up_s": lambda run: (run.get("catch_up") or {}).get("seconds_median"),
}
COUNTS = ("connections", "failed", "lost", "duplicates", "out_of_order", "unconfirmed_acks", "behind_at_end")
RATIOS = ("deliveries_per_s", "server_cpu_s_per_million", "p99_ms")


def spread(values: list[float]) -> dict[str, float] | None:
    """Return the median, minimum and maximum of the values, or None when there are none."""
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Group runs by target; give each figure's median and range, and each count's worst value."""
    summary: dict[str, Any] = {}
    for target in dict.fromkeys(run["target"] for run in runs):
        mine = [run for run in runs if run["target"] == target and "error" not in run]
        entry: dict[str, Any] = {
            "runs": len(mine),
            "errors": [run["error"] for run in runs if run["target"] == target and "error" in run],
        }
        for name, read in FIGURES.items():
            values = [value for value in (read(run) for run in mine) if value is not None]
            figure = spread(values)
            if figure is not None:
                entry[name] = figure
        for name in COUNTS:
            values = [int(run.get(name) or 0) for run in mine]
            entry[name] = max(values, default=0) if name != "connections" else min(values, default=0)
        summary[target] = entry
    return summary


def ratios(summary: dict[str, Any], subject: str = "parley") -> dict[str, dict[str, float]]:
    """Divide the subject's medians by each other target's: deliveries/s, CPU per delivery and p99."""
    result: dict[str, dict[str, float]] = {}
    mine = summary.get(subject)
    if mine is None:
        return result
    for target, theirs in summary.items():
        if target == subject:
            continue
        entry = {}
        for name in RATIOS:
            if name in mine and name in theirs and theirs[name]["median"]:
                entry[name] = mine[name]["median"] / theirs[name]["median"]
        result[target] = entry
    return result


def format_number(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def median_of(entry: dict[str, Any], name: str, digits: int = 0) -> str:
    figure = entry.get(name)
    return "-" if figure is None else format_number(figure["median"], digits)


def range_of(entry: dict[str, Any], name: str, digits: int = 0) -> str:
    figure = entry.get(name)
    if figure is None:
        return "-"
    return f"{format_number(figure['min'], digits)}-{format_number(figure['max'], digits)}"


def render(summary: dict[str, Any], ratio_table: dict[str, dict[str, float]]) -> str:
    """Render the summary as a plain-text table of medians, one line per server, then ranges and ratios.

    `CPU %` is the server's share of one core, `load %` the load generators' together.
    """
    lines = [
        f"{'server':18} {'conns':>6} {'deliveries/s':>12} {'CPU s/M':>8} {'CPU %':>6} {'load %':>6} "
        f"{'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} {'KB/conn':>8} {'lost':>5} {'dup':>5} {'ooo':>5}"
    ]
    for target, entry in summary.items():
        if not entry["runs"]:
            lines.append(f"{target:18} failed: {'; '.join(entry['errors'])[:300]}")
            continue
        lines.append(
            f"{target:18} {entry['connections']:>6} {median_of(entry, 'deliveries_per_s'):>12} "
            f"{median_of(entry, 'server_cpu_s_per_million', 2):>8} "
            f"{median_of(entry, 'server_cpu_percent'):>6} {median_of(entry, 'client_cpu_percent'):>6} "
            f"{median_of(entry, 'p50_ms', 1):>8} "
            f"{median_of(entry, 'p99_ms', 1):>8} {median_of(entry, 'p999_ms', 1):>9} "
            f"{median_of(entry, 'kb_per_connection', 2):>8} "
            f"{entry['lost']:>5} {entry['duplicates']:>5} {entry['out_of_order']:>5}"
        )
        extra = []
        if entry["runs"] > 1:
            extra.append(
                f"{entry['runs']} runs, ranges: deliveries/s {range_of(entry, 'deliveries_per_s')}, "
                f"CPU s/M {range_of(entry, 'server_cpu_s_per_million', 2)}, "
                f"p99 ms {range_of(entry, 'p99_ms', 1)}"
            )
        if "delivered_fraction" in entry:
            extra.append(f"delivered {100 * entry['delivered_fraction']['median']:.1f}% of offered")
        if "catch_up_s" in entry:
            extra.append(
                f"catch-up {median_of(entry, 'catch_up_s', 3)} s [{range_of(entry, 'catch_up_s', 3)}]"
            )
        for name in ("failed", "unconfirmed_acks", "behind_at_end"):
            if entry[name]:
                extra.append(f"{name.replace('_', ' ')} {entry[name]}")
        if entry["errors"]:
            extra.append(f"{len(entry['errors'])} run(s) failed: {entry['errors'][0][:200]}")
        lines += [f"{'':18} {line}" for line in extra]
    for target, entry in ratio_table.items():
        parts = [f"{name} x{value:.2f}" for name, value in entry.items()]
        if parts:
            lines.append(f"parley / {target}: " + ", ".join(parts))
    return "\n".join(lines)
