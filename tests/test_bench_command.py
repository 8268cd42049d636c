"""`parley bench`: its latency histogram, its client WebSocket codec, and a small run end to end."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from parley.bench.histogram import Histogram, bucket_of, bucket_value
from parley.bench.report import ratios, summarize
from parley.bench.wire import (
    OP_PING,
    OP_TEXT,
    HandshakeError,
    client_frame,
    handshake_request,
    parse_handshake_response,
    split_frames,
)
from parley.server.websocket import FrameReader, Ping, TextMessage, encode_frame


def test_histogram_buckets_are_monotonic_and_tight() -> None:
    powers = {2**shift + offset for shift in range(12, 40) for offset in (-1, 0, 1)}
    previous = -1
    for value in sorted({*range(0, 5000), *powers}):
        index = bucket_of(value)
        assert index >= previous
        previous = index
        assert abs(bucket_value(index) - value) <= max(1, value // 64)


def test_histogram_percentiles_within_two_percent() -> None:
    generator = random.Random(7)
    values = sorted(generator.randint(0, 5_000_000) for _ in range(20_000))
    histogram = Histogram()
    for value in values:
        histogram.add(value)

    for fraction in (0.5, 0.99, 0.999):
        exact = values[int(fraction * len(values))]
        reported = histogram.percentile(fraction)
        assert reported is not None
        assert abs(reported - exact) <= exact * 0.02


def test_histogram_merges_through_json() -> None:
    first, second = Histogram(), Histogram()
    for value in (10, 200, 3000):
        first.add(value)
    second.add(40_000)

    merged = Histogram.from_sparse(first.to_sparse(), first.maximum)
    merged.merge(Histogram.from_sparse(second.to_sparse(), second.maximum))

    assert merged.count == 4
    assert merged.maximum == 40_000
    assert merged.percentile(0.0) == 10
    assert Histogram().percentile(0.5) is None


def test_client_frames_parse_on_the_server() -> None:
    reader = FrameReader(max_message=1 << 20)
    payloads = [b"", b"x" * 125, b"y" * 126, b"z" * 70_000]

    events = reader.feed(
        b"".join(client_frame(payload) for payload in payloads) + client_frame(b"p", OP_PING)
    )

    assert events == [*(TextMessage(payload) for payload in payloads), Ping(b"p")]


def test_split_frames_keeps_partial_frames() -> None:
    data = bytearray(encode_frame(b"a" * 200) + encode_frame(b"b" * 70_000))

    frames, used = split_frames(data[:1000])
    assert frames == [(OP_TEXT, b"a" * 200)]
    assert used == 204

    frames, used = split_frames(data)
    assert [len(payload) for _opcode, payload in frames] == [200, 70_000]
    assert used == len(data)


def test_handshake_response_checks_status_and_key() -> None:
    _request, accept = handshake_request("127.0.0.1", 8765, "/ws")
    good = b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\nrest"

    assert parse_handshake_response(good[:20], accept) == 0
    assert parse_handshake_response(good, accept) == len(good) - 4
    with pytest.raises(HandshakeError, match="Sec-WebSocket-Accept"):
        parse_handshake_response(good.replace(accept, b"wrong"), accept)
    with pytest.raises(HandshakeError) as refused:
        parse_handshake_response(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 3\r\n\r\n", accept)
    assert refused.value.status == 503
    assert refused.value.retry_after == 3


def test_summary_takes_medians_and_ratios() -> None:
    runs = [
        {"target": "parley", "deliveries_per_s": rate, "connections": 10, "lost": 0}
        for rate in (100.0, 300.0, 200.0)
    ]
    runs.append({"target": "raw", "deliveries_per_s": 100.0, "connections": 10, "lost": 0})
    runs.append({"target": "raw", "error": "ChildError: did not start"})

    summary = summarize(runs)

    assert summary["parley"]["deliveries_per_s"] == {"median": 200.0, "min": 100.0, "max": 300.0, "runs": 3}
    assert summary["raw"]["errors"] == ["ChildError: did not start"]
    assert ratios(summary)["raw"]["deliveries_per_s"] == 2.0


def test_bench_small_run_reports_no_loss(tmp_path: Path) -> None:
    output = tmp_path / "bench.json"
    command = [
        sys.executable, "-m", "parley", "bench", "--connections", "40", "--room-size", "20",
        "--duration", "1", "--warmup", "0.2", "--batch", "--catch-up", "300", "--catch-up-tries", "1",
        "--json", str(output), "--quiet", "--timeout", "120",
    ]  # fmt: skip

    finished = subprocess.run(command, capture_output=True, text=True, timeout=180)

    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert "deliveries/s" in finished.stdout
    document = json.loads(output.read_text())
    [run] = document["runs"]
    assert "error" not in run
    assert run["connections"] == 40
    assert run["published"] > 0
    assert run["delivered"] == run["published"] * 20
    assert run["lost"] == 0
    assert run["duplicates"] == 0
    assert run["out_of_order"] == 0
    assert run["unconfirmed_acks"] == 0
    assert run["catch_up"]["behind"] == 300
    assert run["catch_up"]["tries"][0]["messages"] == 300
    assert document["host"]["versions"]["python"]
