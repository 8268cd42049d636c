"""A short `parley verify` run with every fault kind: a real server, proxy and clients, and the checker."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson

from parley.verify.faults import FAULT_KINDS

RUN_TIMEOUT = 150
"""Seconds before the test gives up on the run; a healthy one takes about 25 s."""


def run_parley(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "parley", *arguments],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )


def test_verify_passes_under_every_fault(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    run = run_parley(
        "verify",
        "--seed", "3",
        "--clients", "8",
        "--rooms", "3",
        "--duration", "15",
        "--rate", "4",
        "--fault-interval", "0.3",
        "--ack-timeout", "0.3",
        "--heartbeat", "1",
        "--black-hole-for", "3",
        "--send-timeout", "1",
        "--backoff-cap", "1",
        "--drain-timeout", "40",
        "--out", str(folder),
    )  # fmt: skip
    report = f"stdout:\n{run.stdout}\nstderr (tail):\n{run.stderr[-3000:]}"

    assert run.returncode == 0, report
    assert "violations: none" in run.stdout, report
    summary = orjson.loads((folder / "summary.json").read_bytes())
    assert summary["ok"] is True
    assert summary["drained"] is True, report
    for kind in FAULT_KINDS:
        assert summary["faults"].get(kind, 0) >= 1, f"fault {kind} was never injected\n{report}"
    assert summary["counts"]["confirmed"] > 50, report
    assert summary["counts"]["delivered"] > summary["counts"]["confirmed"], report
    assert summary["counts"]["incarnations"] > 8, report

    # The same recorded run, with one delivery removed from one history, must fail the check.
    history = sorted((folder / "history").glob("*.jsonl"))[0]
    lines = history.read_bytes().splitlines(keepends=True)
    deliveries = [index for index, line in enumerate(lines) if line.startswith(b'{"e":"deliver"')]
    assert len(deliveries) > 10
    del lines[deliveries[len(deliveries) // 2]]
    history.write_bytes(b"".join(lines))

    recheck = run_parley("verify", "--check", str(folder))

    assert recheck.returncode == 1, recheck.stdout + recheck.stderr
    assert "lost_delivery" in recheck.stdout


def test_verify_rejects_unknown_fault_kind(tmp_path: Path) -> None:
    run = run_parley("verify", "--faults", "cut,meteor", "--out", str(tmp_path / "run"))

    assert run.returncode == 2
    assert "unknown fault kind 'meteor'" in run.stderr
