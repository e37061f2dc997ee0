#!/usr/bin/env bash
# The HTTP API under a loopback load while the pipeline runs (docs/PERFORMANCE.md, "HTTP API").
# Runs `weld-edge run --config docs/bench/http-load.toml`, measures the pipeline's results per
# second over a quiet window, then loads GET /api/v1/status and GET /api/v1/results/latest
# with wrk (Debian package `wrk`) for the same time each and measures the pipeline again
# during each load. Needs a release build: `cargo build --release -p weld-edge`.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-target/release/weld-edge}
SECS=${SECS:-20}
CONNS=${CONNS:-32}
THREADS=${THREADS:-1}
BASE=http://127.0.0.1:18080

rm -rf target/bench-http-load
log=target/bench-http-load.log
"$BIN" run --config docs/bench/http-load.toml 2>"$log" &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT

# Ready when the first result is in.
for _ in $(seq 100); do
    curl -sf "$BASE/api/v1/results/latest" >/dev/null 2>&1 && break
    sleep 0.2
done
kill -0 $pid 2>/dev/null || { echo "weld-edge did not start; its log:" >&2; cat "$log" >&2; exit 1; }
sleep 5 # past the model's warm-up and the scene pool's first fill

processed() { curl -sf "$BASE/api/v1/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["frames"]["processed"])'; }
dropped() { curl -sf "$BASE/api/v1/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["frames"]["dropped"])'; }

window() { # $1: label, rest: command run for the window (or `sleep`)
    local label=$1
    shift
    local p0 d0 t0 p1 d1 t1
    p0=$(processed); d0=$(dropped); t0=$(date +%s.%N)
    "$@"
    p1=$(processed); d1=$(dropped); t1=$(date +%s.%N)
    python3 -c "print(f'pipeline during $label: {($p1-$p0)/($t1-$t0):.1f} results/s, {$d1-$d0} dropped')"
}

window "no load" sleep "$SECS"
for path in /api/v1/status /api/v1/results/latest; do
    echo "== wrk -t$THREADS -c$CONNS -d${SECS}s --latency $BASE$path"
    window "$path load" wrk -t"$THREADS" -c"$CONNS" -d"${SECS}s" --latency "$BASE$path"
done
window "no load, after" sleep "$SECS"
