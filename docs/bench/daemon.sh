# Sourced by the bench scripts here: start_daemon CONFIG LOG BASE starts
# `$BIN run --config CONFIG` with its log in LOG, stops it (SIGTERM) when the script exits, and
# returns once BASE (http://HOST:PORT) serves a first result; it exits with the log if the
# daemon died instead. Sets `pid`.
start_daemon() {
    local config=$1 log=$2 base=$3
    "$BIN" run --config "$config" 2>"$log" &
    pid=$!
    trap 'kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
    for _ in $(seq 100); do
        curl -sf "$base/api/v1/results/latest" >/dev/null 2>&1 && break
        sleep 0.2
    done
    kill -0 "$pid" 2>/dev/null || {
        echo "weld-edge did not start; its log:" >&2
        cat "$log" >&2
        exit 1
    }
}
