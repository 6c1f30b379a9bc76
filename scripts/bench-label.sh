#!/usr/bin/env bash
# Labeling benchmark: tangle vs. the official Python `openai` client, same mock
# server process, same prompts, same concurrency. Prints every run's JSON and the medians.
#
# usage: scripts/bench-label.sh [RUNS=3] [N=10000] [CONCURRENCY=128] [LATENCY_MS=50]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}; N=${2:-10000}; CONC=${3:-128}; LAT=${4:-50}
nice -n 19 cargo build --release --bin mock_server --bin bench_label >&2
BIN=target/release

coproc MOCK { exec "$BIN/mock_server" --latency-ms "$LAT" --threads 2; }
read -r line <&"${MOCK[0]}"
ADDR=${line#MOCK_ADDR=}
URL="http://$ADDR/v1"
echo "mock at $URL (pid $MOCK_PID), $RUNS runs each, n=$N concurrency=$CONC latency=${LAT}ms" >&2
trap 'kill "$MOCK_PID" 2>/dev/null || true' EXIT

OUT=$(mktemp -d)
for i in $(seq "$RUNS"); do
  "$BIN/bench_label" --base-url "$URL" --n "$N" --concurrency "$CONC" --latency-ms "$LAT" --durability fsync | tee -a "$OUT/tangle_fsync.jsonl"
  "$BIN/bench_label" --base-url "$URL" --n "$N" --concurrency "$CONC" --latency-ms "$LAT" --durability os | tee -a "$OUT/tangle_os.jsonl"
  python3 scripts/bench_openai.py "$URL" "$N" "$CONC" "$LAT" | tee -a "$OUT/python.jsonl"
done

python3 - "$OUT" <<'PY'
import json, statistics, sys, pathlib
out = pathlib.Path(sys.argv[1])
med = {}
for name in ["tangle_fsync", "tangle_os", "python"]:
    rows = [json.loads(l) for l in (out / f"{name}.jsonl").read_text().splitlines() if l.strip()]
    keys = ["req_per_s", "efficiency", "cpu_us_per_call", "wall_s"] + [k for k in ["mean_call_ms", "mock_service_ms"] if k in rows[0]]
    med[name] = {k: statistics.median(r[k] for r in rows) for k in keys}
    m = med[name]
    extra = ""
    if m.get("mean_call_ms"):
        # Ledger latencies are whole ms, truncated: +0.5 ms on average.
        call_ms = m["mean_call_ms"] + 0.5
        extra = f"  mean call {call_ms:.1f} ms -> {m['req_per_s'] / (rows[0]['concurrency'] / call_ms * 1000) * 100:.1f}% of concurrency/measured latency"
        if m.get("mock_service_ms"):
            extra += f"; mock served in {m['mock_service_ms']:.2f} ms (ideal with it: {rows[0]['concurrency'] / m['mock_service_ms'] * 1000:.0f} req/s)"
    print(f"{name:13s} median of {len(rows)}: {m['req_per_s']:8.1f} req/s  efficiency {m['efficiency']*100:5.1f}%  "
          f"wall {m['wall_s']:.2f}s  client CPU {m['cpu_us_per_call']:.0f} us/call{extra}")
for name in ["tangle_fsync", "tangle_os"]:
    print(f"{name} / python: throughput x{med[name]['req_per_s']/med['python']['req_per_s']:.2f}, "
          f"CPU per call x{med['python']['cpu_us_per_call']/med[name]['cpu_us_per_call']:.1f} less")
PY
