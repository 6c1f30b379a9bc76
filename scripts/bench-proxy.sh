#!/usr/bin/env bash
# Proxy benchmark: added latency of `tangle proxy` (and of LiteLLM's proxy, when it
# installs) over calling a mock directly, then N requests through a route of three mocks
# failing 30% of calls, one of them killed half-way: req/s, answers, proxy CPU and RSS.
# Prints the figures for BENCHMARKS.md; the JSON goes to target/bench-proxy.json.
#
# usage: scripts/bench-proxy.sh [N=100000] [CONCURRENCY=64]
#   LITELLM=/path/to/litellm  use this LiteLLM executable (else target/litellm-venv, else PATH,
#                             else a 10-minute attempt to pip-install 'litellm[proxy]' there)
#   BENCH_NO_LITELLM=1        skip the comparison
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-100000}; CONC=${2:-64}

LITELLM_EXE=${LITELLM:-}
if [ -z "$LITELLM_EXE" ] && [ -z "${BENCH_NO_LITELLM:-}" ]; then
  for candidate in target/litellm-venv/bin/litellm "$(command -v litellm || true)"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ]; then LITELLM_EXE=$candidate; break; fi
  done
  if [ -z "$LITELLM_EXE" ]; then
    echo "installing litellm[proxy] into target/litellm-venv (at most 10 minutes)…" >&2
    if python3 -m venv target/litellm-venv \
       && timeout 600 target/litellm-venv/bin/pip install --quiet 'litellm[proxy]' >&2; then
      LITELLM_EXE=target/litellm-venv/bin/litellm
    else
      echo "litellm did not install; the comparison is skipped" >&2
    fi
  fi
fi
if [ -n "$LITELLM_EXE" ]; then
  LITELLM_EXE=$(cd "$(dirname "$LITELLM_EXE")" && pwd)/$(basename "$LITELLM_EXE")
  echo "LiteLLM: $LITELLM_EXE ($("$(dirname "$LITELLM_EXE")/python" -c 'import importlib.metadata as m; print(m.version("litellm"))' 2>/dev/null || echo '?'))" >&2
fi

nice -n 10 cargo test --release --test it --no-run >&2
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); load average $(cut -d' ' -f1-3 /proc/loadavg)" >&2
BENCH_N=$N BENCH_CONCURRENCY=$CONC LITELLM=$LITELLM_EXE BENCH_OUT=target/bench-proxy.json \
  cargo test --release --test it -- --ignored --nocapture --test-threads 1 proxy_load::
