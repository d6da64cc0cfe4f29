#!/usr/bin/env bash
# Reproduces the figures in the README: herald and the `floor` reference server measured
# side by side in one run, with herald-bench. Needs a quiet 2-core (or larger) Linux box;
# everything runs on 127.0.0.0/8 and stops by itself.
#
#   bash bench-client/figures.sh            # all runs, 10 s each
#   DURATION=20 bash bench-client/figures.sh
#
# Prints one summary line per run and leaves each run's JSON in target/figures/.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p herald -p herald-bench
H=$PWD/target/release/herald
B=$PWD/target/release/herald-bench
OUT=$PWD/target/figures
DUR=${DURATION:-10}
mkdir -p "$OUT"
ulimit -n "$(ulimit -Hn)"
cores=$(nproc)
server_core=0
client_core=$((cores > 1 ? 1 : 0))

# start, stop, and the servers killed on exit.
source bench-client/servers.sh # (the working directory is the repository root)

# fanout NAME BENCH-ARGS...: one fan-out run against $ADDR/$PID, JSON kept, summary shown.
fanout() {
    local name=$1
    shift
    taskset -c "$client_core" "$B" fanout --url "ws://$ADDR/ws" --server-pid "$PID" \
        --duration "$DUR" --json -q "$@" | tail -n 1 >"$OUT/$name.json"
    python3 - "$name" "$OUT/$name.json" <<'PY'
import json, sys
name, path = sys.argv[1], sys.argv[2]
r = json.load(open(path))
l, d, s, c = r["latency_us"], r["deliveries"], r.get("server") or {}, r.get("client") or {}
ms = lambda us: f"{us / 1000:.1f}"
print(f"{name:28} deliveries/s {d['per_second']:9.0f}  p50 {ms(l['p50']):>7} ms  p99 {ms(l['p99']):>7} ms"
      f"  p99.9 {ms(l['p999']):>7} ms  lost {d['lost']} dup {d['duplicated']} ooo {d['out_of_order']}"
      f"  server {s.get('cpu_ns_per_delivery', 0):6.0f} ns/delivery  {s.get('rss_bytes_per_conn', 0):6.0f} B/conn"
      f"  client {c.get('cpu_ns_per_delivery', 0):5.0f} ns/delivery")
PY
}

echo "== fan-out, 64 B, one channel; server on core $server_core, client on core $client_core"
for conns in 1000 10000; do
    procs=1
    start "herald-t1-$conns" taskset -c "$server_core" "$H" serve --listen 127.0.0.1:0 --threads 1 --max-connections-per-ip 0 \
        --max-messages-per-second 1000000
    fanout "herald-t1-$conns-r20" --conns "$conns" --rate 20 --size 64 --procs $procs
    stop
    start "floor-$conns" taskset -c "$server_core" "$B" floor --listen 127.0.0.1:0
    fanout "floor-$conns-r20" --conns "$conns" --rate 20 --size 64 --procs $procs
    stop
done

echo "== 10,000 subscribers at 5 msg/s, --threads 2 (server and client share the cores)"
start herald-t2-10000 "$H" serve --listen 127.0.0.1:0 --threads 2 --max-messages-per-second 1000000 \
    --max-connections-per-ip 0
fanout "herald-t2-10000-r5" --conns 10000 --rate 5 --size 64
stop

echo "== 18,000 subscribers at 20 msg/s over 2 client processes and 19 source addresses"
for threads in 1 2; do
    start "herald-t$threads-18000" "$H" serve --listen 127.0.0.1:0 --threads "$threads" --max-connections-per-ip 0 \
        --max-messages-per-second 1000000
    fanout "herald-t$threads-18000-r20" --conns 18000 --rate 20 --size 64 --procs 2 \
        --source-ips 127.0.0.2-127.0.0.20 --drain-timeout 20
    stop
done

echo "== idle subscribed connections: server memory per connection (after one ping interval)"
start herald-idle "$H" serve --listen 127.0.0.1:0 --threads 2 --ping-interval-ms 2000 --max-connections-per-ip 0
taskset -c "$client_core" "$B" connect --url "ws://$ADDR/ws" --conns 18000 --subscribe --channels 100 \
    --hold 5 --procs 2 --source-ips 127.0.0.2-127.0.0.20 --server-pid "$PID" | tail -n 4
stop

echo "== 60,000 connections over 4 herald processes sharing one port (--shared-port)"
port=$((20000 + RANDOM % 20000))
servers=()
for i in 1 2 3 4; do
    start "herald-shared-$i" "$H" serve --listen "127.0.0.1:$port" --threads 1 --shared-port --max-connections-per-ip 0 \
        --accept-rate 100000
    servers+=(--server-pid "$PID")
done
"$B" connect --url "ws://127.0.0.1:$port/ws" --conns 60000 --hold 5 --procs 4 \
    --source-ips 127.0.0.2-127.0.0.60 --connect-rate 8000 "${servers[@]}" | tail -n 4

echo "== permessage-deflate: 1 KiB JSON to 1,000 subscribers, plain vs shared vs per-connection"
bash bench-client/compression-figures.sh
