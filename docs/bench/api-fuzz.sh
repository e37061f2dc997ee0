#!/usr/bin/env bash
# Fuzzes the HTTP API from its OpenAPI document (docs/PERFORMANCE.md, "HTTP API"): schemathesis
# (`pip install schemathesis`) generates requests for every operation, first with the API
# token and then without one, and runs all its checks: no 5xx, responses that match the
# document, no undocumented status codes, schema-valid requests accepted, invalid ones refused.
# The SSE stream is left out (it never ends). Afterwards the daemon must still be running.
# Needs `cargo build --release -p weld-edge`; EXAMPLES (default 200) per operation and phase.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-target/release/weld-edge}
EXAMPLES=${EXAMPLES:-200}
SEED=${SEED:-1}
BASE=http://127.0.0.1:18081

rm -rf target/api-fuzz
mkdir -p target/api-fuzz
head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >target/api-fuzz/token
log=target/api-fuzz/daemon.log
source docs/bench/daemon.sh
start_daemon docs/bench/api-fuzz.toml "$log" "$BASE"

rc=0
st() {
    schemathesis --config-file docs/bench/schemathesis.toml run "$BASE/api/v1/openapi.json" --max-examples "$EXAMPLES" \
        --seed "$SEED" --exclude-path /api/v1/results/stream --request-timeout 10 --no-color "$@" ||
        rc=1
}
echo "== with the token"
st -H "Authorization: Bearer $(cat target/api-fuzz/token)"
echo "== without a token"
st
kill -0 $pid || { echo "the daemon died" >&2; exit 1; }
grep -qi panick "$log" && { echo "the daemon logged a panic" >&2; rc=1; }
exit $rc
