#!/usr/bin/env bash
# Server CPU while it holds idle subscribed WebSocket connections with heartbeats on:
# what an idle push server costs, on each IO backend, rounds alternating. The connections
# are held for a ping interval and more after the last one subscribed, and the server's
# user + system time over the next MEASURE seconds (from /proc) is reported as a share
# of one core. The client answers pings as any WebSocket client does.
#
#   bash bench-client/idle-cpu.sh                       # 19,000 connections, 2 rounds
#   CONNS=10000 ROUNDS=3 IOS="epoll" bash bench-client/idle-cpu.sh
#
# Everything runs on 127.0.0.0/8 and stops by itself; the connections come from source
# addresses 127.0.0.2 and up, so no per-address limit applies.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p herald -p herald-bench
H=$PWD/target/release/herald
B=$PWD/target/release/herald-bench
OUT=$PWD/target/idle-cpu
CONNS=${CONNS:-19000}
ROUNDS=${ROUNDS:-2}
IOS=${IOS:-epoll uring floor}
# Long enough for every connection to have been pinged on its phase at least once.
SETTLE=${SETTLE:-30}
MEASURE=${MEASURE:-50}
mkdir -p "$OUT"
ulimit -n "$(ulimit -Hn)"
TICK=$(getconf CLK_TCK)

source bench-client/servers.sh # (the working directory is the repository root)

# user and system ticks
cpu_ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }

echo "== $CONNS idle subscribed connections, --threads 2, ping interval 25 s (the default)"
echo "== load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
for round in $(seq "$ROUNDS"); do
    for io in $IOS; do
        if [ "$io" = floor ]; then
            start "floor-r$round" "$B" floor --listen 127.0.0.1:0
        else
            start "herald-$io-r$round" "$H" serve --listen 127.0.0.1:0 --threads 2 --io "$io"
        fi
        "$B" connect --url "ws://$ADDR/ws" --conns "$CONNS" --subscribe --source-ips 127.0.0.2-127.0.0.40 \
            --hold $((SETTLE + MEASURE + 5)) -q >"$OUT/client-$io-r$round.log" 2>&1 &
        client=$!
        sleep "$SETTLE"
        before=$(cpu_ticks "$PID")
        sleep "$MEASURE"
        after=$(cpu_ticks "$PID")
        read -r user_before sys_before <<<"$before"
        read -r user_after sys_after <<<"$after"
        awk -v io="$io" -v r="$round" -v u="$((user_after - user_before))" -v k="$((sys_after - sys_before))" \
            -v hz="$TICK" -v s="$MEASURE" \
            'BEGIN { printf "%-6s r%d  server CPU %.2f%% of a core over %d s (kernel %.2f%%, user %.2f%%)\n",
                     io, r, 100 * (u + k) / hz / s, s, 100 * k / hz / s, 100 * u / hz / s }'
        wait "$client" || { echo "client failed:"; tail -5 "$OUT/client-$io-r$round.log"; }
        stop
    done
done
