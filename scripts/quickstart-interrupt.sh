#!/usr/bin/env bash
# Interrupts the quickstart during labeling (Ctrl-C, then kill -9), runs it again to the end,
# and counts at the teacher server whether any prompt was answered twice. The teacher
# (`tangle serve`, launched by the pipeline) appends one line per answered request to
# $TANGLE_SERVE_REQUEST_LOG; the launcher passes the environment through.
#
# usage: scripts/quickstart-interrupt.sh [ANSWERS_BEFORE_EACH_INTERRUPT=15]
# Needs the models (scripts/fetch-models) and a release build (cargo build --release).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
EVERY=${1:-15}
TANGLE=$REPO/target/release/tangle
WORK=$(mktemp -d)
cd "$WORK"
export TANGLE_SERVE_REQUEST_LOG=$WORK/teacher-requests.jsonl
: >"$TANGLE_SERVE_REQUEST_LOG"
echo "working in $WORK" >&2

answered() { wc -l <"$TANGLE_SERVE_REQUEST_LOG"; }

# Starts the quickstart, waits for EVERY more answers, sends SIGNAL, prints the exit code.
interrupt() {
  local signal=$1 before target code
  before=$(answered); target=$((before + EVERY))
  "$TANGLE" run "$REPO/pipelines/quickstart.yaml" >>run.log 2>&1 &
  local pid=$!
  while [ "$(answered)" -lt "$target" ]; do
    kill -0 "$pid" 2>/dev/null || { echo "the run ended before $target answers" >&2; exit 1; }
    sleep 0.2
  done
  kill "-$signal" "$pid"
  code=0; wait "$pid" || code=$?
  # The launched teacher must not outlive tangle.
  for _ in $(seq 50); do pgrep -f "serve .*qwen2.5-coder-1.5b" >/dev/null || break; sleep 0.1; done
  pgrep -f "serve .*qwen2.5-coder-1.5b" >/dev/null && { echo "the teacher outlived tangle after SIG$signal" >&2; exit 1; }
  echo "SIG$signal after $((target - before)) new answers: exit $code, teacher stopped" >&2
}

interrupt INT
interrupt KILL
started=$(date +%s)
"$TANGLE" run "$REPO/pipelines/quickstart.yaml" >>run.log 2>&1 || { tail -30 run.log; exit 1; }
echo "final run: $(( $(date +%s) - started )) s" >&2

python3 - "$TANGLE_SERVE_REQUEST_LOG" <<'PY'
import collections, json, sys
hashes = [json.loads(l)["messages_sha256"] for l in open(sys.argv[1]) if l.strip()]
counts = collections.Counter(hashes)
twice = sum(c - 1 for c in counts.values() if c > 1)
print(f"teacher answers: {len(hashes)}, distinct prompts: {len(counts)}, answered more than once: {twice}")
sys.exit(1 if twice else 0)
PY
