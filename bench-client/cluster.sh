#!/usr/bin/env bash
# Reproduces the cluster figures in the README: fan-out through Redis to more subscribers
# than one process may hold (each herald process has a 20,000 open-file limit here), and
# the cost of the Redis hop measured side by side on one node. Everything runs on
# 127.0.0.0/8 with its own redis-server on a free port, and stops by itself.
#
#   bash bench-client/cluster.sh                       # 60,000 subscribers over 4 nodes
#   NODES=4 CONNS=60000 RATE=2 DURATION=10 bash bench-client/cluster.sh
#   NO_BUILD=1 ...                                     # use the binaries already in target/release
#
# Prints one summary line per run and leaves each run's JSON in target/figures/.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${NO_BUILD:-}" ] || cargo build --release -q -p herald -p herald-bench
H=$PWD/target/release/herald
B=$PWD/target/release/herald-bench
OUT=$PWD/target/figures
NODES=${NODES:-4}
CONNS=${CONNS:-60000}
RATE=${RATE:-2}
DUR=${DURATION:-10}
mkdir -p "$OUT"
ulimit -n "$(ulimit -Hn)"
command -v redis-server >/dev/null || { echo "needs redis-server (Debian package redis-server)" >&2; exit 1; }

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

REDIS_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no >"$OUT/redis.log" 2>&1 &
PIDS+=("$!")
for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
REDIS=redis://127.0.0.1:$REDIS_PORT

# start NAME ARGS...: one herald node; appends its ws URL to URLS and pid to NODE_PIDS.
URLS=()
NODE_PIDS=()
start() {
    local name=$1
    shift
    local log="$OUT/$name.server.log"
    ( exec "$H" serve --listen 127.0.0.1:0 "$@" ) >"$log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    for _ in $(seq 100); do
        local addr
        addr=$(sed -n 's/^listening on //p' "$log" | head -n 1)
        if [ -n "$addr" ]; then
            URLS+=("ws://$addr/ws")
            NODE_PIDS+=("$pid")
            return 0
        fi
        sleep 0.1
    done
    echo "$name did not start; log:" >&2
    cat "$log" >&2
    exit 1
}

stop_nodes() {
    for p in "${NODE_PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    URLS=()
    NODE_PIDS=()
    redis-cli -p "$REDIS_PORT" flushall >/dev/null
}

# fanout NAME BENCH-ARGS...: one run against every started node, JSON kept, summary shown.
fanout() {
    local name=$1
    shift
    local urls pids=()
    urls=$(IFS=,; echo "${URLS[*]}")
    for p in "${NODE_PIDS[@]}"; do pids+=(--server-pid "$p"); done
    "$B" fanout --url "$urls" "${pids[@]}" --duration "$DUR" --json -q "$@" | tail -n 1 >"$OUT/$name.json"
    python3 - "$name" "$OUT/$name.json" <<'PY'
import json, sys
name, path = sys.argv[1], sys.argv[2]
r = json.load(open(path))
l, d, s = r["latency_us"], r["deliveries"], r.get("server") or {}
ms = lambda us: f"{us / 1000:.1f} ms"
print(f"{name}: subscribed {r['connect']['ok']}, published {r['published']}, acked {r['acked']}, "
      f"delivered {d['received']} of {d['expected']} ({d['per_second']:.0f}/s), lost {d['lost']}, "
      f"duplicated {d['duplicated']}, out of order {d['out_of_order']}; p50 {ms(l['p50'])} "
      f"p99 {ms(l['p99'])} p99.9 {ms(l['p999'])} max {ms(l['max'])}; "
      f"server CPU {s.get('cpu_ns_per_delivery', 0):.0f} ns/delivery")
PY
}

# 1. The Redis hop on one node, side by side: the in-memory hub, then --redis.
start single --threads 1
fanout single-local --conns 10000 --rate 10 --size 64 --source-ips 127.0.0.2-127.0.0.11
stop_nodes
start single --threads 1 --redis "$REDIS"
fanout single-redis --conns 10000 --rate 10 --size 64 --source-ips 127.0.0.2-127.0.0.11
stop_nodes

# 2. More subscribers than one process may hold: NODES nodes on one Redis, the bench's
#    workers spread over them and over source addresses 127.0.0.2-127.0.0.41.
for i in $(seq "$NODES"); do start "node$i" --threads 1 --redis "$REDIS"; done
fanout cluster --conns "$CONNS" --procs "$NODES" --source-ips 127.0.0.2-127.0.0.41 \
    --rate "$RATE" --size 64 --connect-rate 10000
