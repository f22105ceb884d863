#!/usr/bin/env bash
# The HTTP load test recorded in BENCHMARKS.md ("Serving over HTTP"): for a full-depth and an
# early-exit server in turn, start `drex-jax serve`, warm it with a short unrecorded run, run the
# recorded load test (results in OUT/full, OUT/ee), then stop the server with SIGTERM.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/drex_load}
for mode in full ee; do
  port=$((8130 + RANDOM % 500)); extra=""
  [ "$mode" = ee ] && extra="--early-exit"
  .venv/bin/drex-jax serve --port "$port" --max-slots 16 --max-seq-len 512 $extra --log-level warning &
  pid=$!
  for _ in $(seq 120); do curl -sf "localhost:$port/health" >/dev/null && break; sleep 1; done
  .venv/bin/drex-jax bench --url "http://127.0.0.1:$port" --requests 48 --concurrency 16 --rate 8 --max-tokens 32 \
    --no-reference --out "$OUT/${mode}_warm" >/dev/null
  .venv/bin/drex-jax bench --url "http://127.0.0.1:$port" --requests 200 --concurrency 16 --rate 4 --max-tokens 32 \
    --out "$OUT/$mode"
  kill -TERM "$pid"; wait "$pid"
done
