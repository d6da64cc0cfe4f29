#!/usr/bin/env bash
# Reproduces the presence figures in the README: what presence and join/leave cost per
# subscribe (`herald-bench connect --subscribe`: connections opened and subscribed as
# fast as the server takes them, CPU per connection) and per message (`herald-bench
# fanout`: CPU per delivery, latency), against the same run without them, on one node
# with the in-memory hub and with --redis (then the CPU counted is herald's plus
# redis-server's). Rounds alternate the contenders. Everything runs on 127.0.0.0/8 with
# its own redis-server on a free port, and stops by itself.
#
#   bash bench-client/presence.sh
#   ROUNDS=2 CONNS=4000 CHANNELS=40 SUBSCRIBERS=1000 RATE=100 NO_BUILD=1 bash bench-client/presence.sh
#
# Prints one line per run and leaves each run's JSON in target/figures/presence/.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${NO_BUILD:-}" ] || cargo build --release -q -p herald -p herald-bench
H=$PWD/target/release/herald
B=$PWD/target/release/herald-bench
OUT=$PWD/target/figures/presence
ROUNDS=${ROUNDS:-2}
CONNS=${CONNS:-4000}
CHANNELS=${CHANNELS:-40}
SUBSCRIBERS=${SUBSCRIBERS:-1000}
RATE=${RATE:-100}
mkdir -p "$OUT"
ulimit -n "$(ulimit -Hn)"
command -v redis-server >/dev/null || { echo "needs redis-server (Debian package redis-server)" >&2; exit 1; }

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

REDIS_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no >"$OUT/redis.log" 2>&1 &
REDIS_PID=$!
PIDS+=("$REDIS_PID")
for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done

# run NAME HUB MODE: one node (one shard on core 0), the connect run, then the fanout run.
run() {
    local name=$1 hub=$2 mode=$3
    local args=(--threads 1 --max-connections-per-ip 0)
    local pids=()
    case $hub in redis) args+=(--redis "redis://127.0.0.1:$REDIS_PORT") ;; esac
    case $mode in
        presence) args+=(--presence) ;;
        join-leave) args+=(--presence --join-leave) ;;
    esac
    local log="$OUT/$name.server.log"
    ( exec taskset -c 0 "$H" serve --listen 127.0.0.1:0 "${args[@]}" ) >"$log" 2>&1 &
    local pid=$!
    local addr=""
    for _ in $(seq 100); do
        addr=$(sed -n 's/^listening on //p' "$log" | head -n 1)
        [ -n "$addr" ] && break
        sleep 0.1
    done
    [ -n "$addr" ] || { echo "$name did not start" >&2; cat "$log" >&2; exit 1; }
    pids+=(--server-pid "$pid")
    case $hub in redis) pids+=(--server-pid "$REDIS_PID"); sleep 0.5 ;; esac
    taskset -c 1 "$B" connect --url "ws://$addr/ws" "${pids[@]}" --conns "$CONNS" --subscribe \
        --channels "$CHANNELS" --connect-rate 0 --hold 1 --json -q | tail -n 1 >"$OUT/$name.connect.json"
    taskset -c 1 "$B" fanout --url "ws://$addr/ws" "${pids[@]}" --conns "$SUBSCRIBERS" \
        --rate "$RATE" --size 64 --duration 5 --json -q | tail -n 1 >"$OUT/$name.fanout.json"
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    redis-cli -p "$REDIS_PORT" flushall >/dev/null
    python3 - "$name" "$OUT/$name.connect.json" "$OUT/$name.fanout.json" <<'PY'
import json, sys
name, connect, fanout = sys.argv[1], json.load(open(sys.argv[2])), json.load(open(sys.argv[3]))
c, cs = connect["connect"], connect.get("server") or {}
d, l, fs = fanout["deliveries"], fanout["latency_us"], fanout.get("server") or {}
print(f"{name}: subscribe {c['ok']}/{c['attempted']} at {c['per_second']:.0f}/s, "
      f"server CPU {cs.get('cpu_ns_per_conn', 0) / 1000:.1f} us/subscribe | fanout "
      f"delivered {d['received']} of {d['expected']}, lost {d['lost']}, CPU "
      f"{fs.get('cpu_ns_per_delivery', 0):.0f} ns/delivery, p50 {l['p50'] / 1000:.2f} ms "
      f"p99 {l['p99'] / 1000:.2f} ms")
PY
}

echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
for round in $(seq "$ROUNDS"); do
    for hub in local redis; do
        for mode in off presence join-leave; do
            run "r$round-$hub-$mode" "$hub" "$mode"
        done
    done
done
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
