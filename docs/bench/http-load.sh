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
source docs/bench/daemon.sh
start_daemon docs/bench/http-load.toml target/bench-http-load.log "$BASE"
sleep 5 # past the model's warm-up and the scene pool's first fill

# "PROCESSED DROPPED" from one read of the stats.
counts() { curl -sf "$BASE/api/v1/stats" | python3 -c 'import json,sys; f=json.load(sys.stdin)["frames"]; print(f["processed"], f["dropped"])'; }

window() { # $1: label, rest: command run for the window (or `sleep`)
    local label=$1
    shift
    local p0 d0 t0 p1 d1 t1
    read -r p0 d0 < <(counts); t0=$(date +%s.%N)
    "$@"
    read -r p1 d1 < <(counts); t1=$(date +%s.%N)
    python3 -c "print(f'pipeline during $label: {($p1-$p0)/($t1-$t0):.1f} results/s, {$d1-$d0} dropped')"
}

window "no load" sleep "$SECS"
for path in /api/v1/status /api/v1/results/latest; do
    echo "== wrk -t$THREADS -c$CONNS -d${SECS}s --latency $BASE$path"
    window "$path load" wrk -t"$THREADS" -c"$CONNS" -d"${SECS}s" --latency "$BASE$path"
done
window "no load, after" sleep "$SECS"
