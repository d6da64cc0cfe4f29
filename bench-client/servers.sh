# Shared by the figure scripts: servers started and stopped around a run (sourced).
# `start` and `stop` expect $OUT (the directory for server logs).

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

# start NAME CMD...: runs a server, waits for its "listening on" line; sets ADDR and PID.
start() {
    local name=$1
    shift
    local log="$OUT/$name.server.log"
    ( exec "$@" ) >"$log" 2>&1 &
    PID=$!
    PIDS+=("$PID")
    for _ in $(seq 100); do
        ADDR=$(sed -n 's/^listening on //p' "$log" | head -n 1)
        [ -n "$ADDR" ] && return 0
        sleep 0.1
    done
    echo "$name did not start; log:" >&2
    cat "$log" >&2
    exit 1
}

stop() {
    kill "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
}
