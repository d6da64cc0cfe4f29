#!/usr/bin/env bash
# Server memory per connection, herald beside the `floor` reference server in one run:
# idle subscribed WebSocket connections (right after connecting, and after one ping
# interval), and during a 1,000-subscriber fan-out. RSS growth of the server process over
# its footprint before the connections, divided by the connections (user space only: the
# kernel's socket buffers are not in RSS).
#
#   bash bench-client/memory.sh                 # epoll and io_uring, ROUNDS=2
#   CONNS=10000 ROUNDS=3 bash bench-client/memory.sh
#   WARMUP=1 bash bench-client/memory.sh        # after 20 connections came and went
#   IOS=epoll bash bench-client/memory.sh       # one backend only
#   BASE=/path/to/older/herald ...              # also that build on io_uring ("ubase"),
#                                               # to measure a change against its base
#
# WARMUP=1 leaves out what the first connections cost a process once, not per connection:
# its code paged in (~640 kB for herald, measured with /proc/PID/smaps) and the allocator's
# first pages. Without it, that weighs 64 B per connection at 10,000 and ten times as much
# at the fan-out's 1,000.
#
# Rounds alternate the servers. Everything runs on 127.0.0.0/8 and stops by itself; the
# connections come from source addresses 127.0.0.2 and up, so no per-address limit applies.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p herald -p herald-bench
H=$PWD/target/release/herald
B=$PWD/target/release/herald-bench
OUT=$PWD/target/memory
CONNS=${CONNS:-10000}
ROUNDS=${ROUNDS:-2}
IOS=${IOS:-epoll uring}
mkdir -p "$OUT"
ulimit -n "$(ulimit -Hn)"

# start, stop, and the servers killed on exit.
source bench-client/servers.sh # (the working directory is the repository root)

# warm: with WARMUP=1, 20 subscribed connections to $ADDR for a second, then gone.
warm() {
    [ "${WARMUP:-0}" = 1 ] || return 0
    "$B" connect --url "ws://$ADDR/ws" --conns 20 --subscribe --channels 1 --hold 1 -q >/dev/null
}

# idle NAME: $CONNS subscribed connections to $ADDR held past one ping interval (2 s).
idle() {
    local name=$1
    warm
    "$B" connect --url "ws://$ADDR/ws" --conns "$CONNS" --subscribe --channels 100 --hold 5 \
        --procs 2 --source-ips 127.0.0.2-127.0.0.20 --server-pid "$PID" --json -q \
        | tail -n 1 >"$OUT/$name.json"
    python3 - "$name" "$OUT/$name.json" <<'PY'
import json, sys
name, path = sys.argv[1], sys.argv[2]
r = json.load(open(path))
s, c = r["server"], r["connect"]
n = max(c["ok"], 1)
print(f"{name:24} idle   {c['ok']:6} connected ({c['failed']} failed)  "
      f"after connecting {(s['rss_bytes_after_connect'] - s['rss_bytes_before']) / n:6.0f} B/conn  "
      f"after a ping interval {(s['rss_bytes_after_hold'] - s['rss_bytes_before']) / n:6.0f} B/conn")
PY
}

# active NAME: 1,000 subscribers, 20 messages/s of 64 B; memory once they are subscribed.
active() {
    local name=$1
    warm
    "$B" fanout --url "ws://$ADDR/ws" --server-pid "$PID" --conns 1000 --rate 20 --size 64 \
        --duration 8 --json -q | tail -n 1 >"$OUT/$name-fanout.json"
    python3 - "$name" "$OUT/$name-fanout.json" <<'PY'
import json, sys
name, path = sys.argv[1], sys.argv[2]
r = json.load(open(path))
s, d = r.get("server") or {}, r["deliveries"]
print(f"{name:24} fanout 1,000 subscribers, 20 msg/s: {s.get('rss_bytes_per_conn', 0):6.0f} B/conn"
      f"  (lost {d['lost']})")
PY
}

echo "== $CONNS idle subscribed connections (2 shards, ping interval 2 s), then a fan-out"
echo "== load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
for round in $(seq "$ROUNDS"); do
    for io in $IOS${BASE:+ ubase}; do
        bin=$H backend=$io
        if [ "$io" = ubase ]; then bin=$BASE backend=uring; fi
        start "herald-$io-$round" "$bin" serve --listen 127.0.0.1:0 --threads 2 --io "$backend" \
            --ping-interval-ms 2000 --max-connections-per-ip 0
        idle "herald-$io-r$round"
        stop
        start "herald-$io-fan-$round" "$bin" serve --listen 127.0.0.1:0 --threads 2 --io "$backend"
        active "herald-$io-r$round"
        stop
    done
    start "floor-$round" "$B" floor --listen 127.0.0.1:0 --ping-interval-ms 2000
    idle "floor-r$round"
    stop
    start "floor-fan-$round" "$B" floor --listen 127.0.0.1:0
    active "floor-r$round"
    stop
done
