#!/usr/bin/env bash
# Serving benchmark: `tangle serve` on a tiny and a ~135M-shaped (SmolLM2-135M dimensions,
# Qwen2 architecture, random weights) model, at concurrency 1, 8 and 32, each RUNS times.
# Prints every run's JSON line and the medians.
#
# usage: scripts/bench-serve.sh [RUNS=3] [MAX_TOKENS=32] [WORKERS=1]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}; MAX_TOKENS=${2:-32}; WORKERS=${3:-1}
cargo build --release --bin tangle --bin bench_serve >&2
BIN=target/release
WORK=$(mktemp -d)
SERVER=
trap '[ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null; rm -rf "$WORK"' EXIT

for shape in tiny 135m; do
  "$BIN/bench_serve" write-model "$WORK/$shape" "$shape"
  "$BIN/tangle" serve "$WORK/$shape" --port 0 --workers "$WORKERS" --queue 64 --device cpu 2>"$WORK/serve.log" &
  SERVER=$!
  for _ in $(seq 300); do grep -q "serving" "$WORK/serve.log" && break; sleep 0.1; done
  URL=$(grep -o 'http://[^ ]*/v1' "$WORK/serve.log")
  echo "$shape: $URL (workers $WORKERS, max_tokens $MAX_TOKENS)" >&2
  for conc in 1 8 32; do
    # Enough requests that every client sends at least two.
    requests=$(( conc * 2 > 16 ? conc * 2 : 16 ))
    for _ in $(seq "$RUNS"); do
      "$BIN/bench_serve" load --base-url "$URL" --concurrency "$conc" --requests "$requests" --max-tokens "$MAX_TOKENS" \
        | sed "s/^{/{\"model\":\"$shape\",/" | tee -a "$WORK/runs.jsonl"
    done
  done
  kill "$SERVER"; wait "$SERVER" 2>/dev/null || true; SERVER=
done

python3 - "$WORK/runs.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
base = {}
print(f"{'model':6} {'conc':>4} {'req/s':>7} {'tok/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'ttft p50':>9} {'ttft p95':>9}  vs conc 1")
for model in dict.fromkeys(r["model"] for r in rows):
    for conc in (1, 8, 32):
        rs = [r for r in rows if r["model"] == model and r["concurrency"] == conc]
        m = {k: statistics.median(r[k] for r in rs) for k in
             ["req_per_s", "tokens_per_s", "latency_p50_ms", "latency_p95_ms", "ttft_p50_ms", "ttft_p95_ms"]}
        base.setdefault(model, m["tokens_per_s"])
        print(f"{model:6} {conc:4} {m['req_per_s']:7.2f} {m['tokens_per_s']:7.1f} {m['latency_p50_ms']:8.1f} "
              f"{m['latency_p95_ms']:8.1f} {m['ttft_p50_ms']:9.1f} {m['ttft_p95_ms']:9.1f}  x{m['tokens_per_s']/base[model]:.2f} tok/s")
PY
