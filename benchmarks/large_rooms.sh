#!/usr/bin/env bash
# Run the large-room measurements recorded in benchmarks/RESULTS.md, each beside its baselines:
# fan-out to 10,000 subscribers, latency at 200 msg/s into 1,000 with merged frames, 19,900 idle
# connections with heartbeats, and a member 10,000 messages behind catching up.
#
# Usage: benchmarks/large_rooms.sh BASELINE_DIR [OUTPUT_DIR]
#   BASELINE_DIR  folder holding the baseline servers srv_raw.py and srv_socketio.py
#   OUTPUT_DIR    where the JSON of every run goes (default: benchmarks/results)
# The baselines run on a separate virtualenv with aiohttp, python-socketio and uvloop, created under
# $PARLEY_BENCH_DIR (default: $TMPDIR/parley-bench) on first use. Everything runs on 127.0.0.1, every
# run stops by itself, and the whole script takes about 10 minutes on a 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/.."

baselines=${1:?give the folder holding srv_raw.py and srv_socketio.py}
out=${2:-benchmarks/results}
work=${PARLEY_BENCH_DIR:-${TMPDIR:-/tmp}/parley-bench}
if [ ! -x "$work/venv/bin/python" ]; then
  python3 -m venv "$work/venv"
  "$work/venv/bin/pip" install --quiet uvloop aiohttp python-socketio
fi
mkdir -p "$out"

bench() {
  .venv/bin/python -m parley bench --baseline-dir "$baselines" --baseline-python "$work/venv/bin/python" "$@"
}

# 1. One room of 10,000, published flat out (at most 50 messages ahead of the slowest member).
#    python-socketio cannot drain 50 x 10,000 deliveries in 30 s: its rows count only the window.
bench --connections 10000 --duration 5 --window 50 --drain-timeout 30 \
  --baseline raw-uvloop,raw,socketio --repeat 3 --json "$out/fanout-10k.json" || true

# 2. 1,000 subscribers asking for merged frames, 200 msg/s into their room.
bench --connections 1000 --rate 200 --duration 6 --warmup 2 --batch \
  --baseline raw-batch-uvloop --repeat 5 --json "$out/latency-1k-200.json" || true

# 3. 19,900 connections in rooms of 1,000, held idle 12 s with a heartbeat every 5 s, then one
#    message per room per second for 2 s to show every connection is still served.
bench --connections 19900 --room-size 1000 --hold 12 --rate 1 --duration 2 --warmup 0 \
  --server-arg=--heartbeat=5 --json "$out/connections-19900.json" || true

# 4. A member 10,000 messages behind reconnects (5 tries), with 1,000 members in the room.
bench --connections 1000 --duration 2 --catch-up 10000 --catch-up-tries 5 --json "$out/catch-up-10k.json" || true
