#!/usr/bin/env bash
# Reproduces the Redis Cluster figures in the README: the same fan-out run on one Redis and
# on a 3-master, 3-replica Redis Cluster, same machine, one after the other. Three herald
# nodes (--threads 1) each time; one publisher paced at RATE messages/s over CHANNELS
# channels on the first node; CONNS subscribers spread over the three nodes. Reported per
# run: what was published and acknowledged, deliveries per second, lost/duplicated, latency,
# herald CPU per delivery, and Redis CPU per acknowledged publish above what the same
# processes spend idle (all redis-server processes of the run, and the masters alone, from
# /proc).
# Then, on the same cluster, the cost of sharded against plain pub/sub alone: PUBSUB_N
# announcements of 64 bytes over CHANNELS channels, each sent to its slot's master with
# SPUBLISH (what the ordering script does) or with PUBLISH (which the cluster bus copies to
# every node), rounds alternating, one subscriber per channel (SSUBSCRIBE on the owner,
# SUBSCRIBE on one node); the CPU of all six redis-servers per announcement, above idle.
# Everything binds 127.0.0.0/8, each redis-server runs under `timeout`, and all stops by
# itself.
#
#   bash bench-client/redis-cluster.sh
#   RATES="1000 4000" CONNS=300 CHANNELS=30 DURATION=10 bash bench-client/redis-cluster.sh
#   RATES= PUBSUB_ROUNDS=3 PUBSUB_N=200000 ...  # only the SPUBLISH/PUBLISH comparison
#   NO_BUILD=1 ...                       # use the binaries already in target/release
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${NO_BUILD:-}" ] || cargo build --release -q -p herald -p herald-bench
H=$PWD/target/release/herald
B=$PWD/target/release/herald-bench
OUT=$PWD/target/figures/redis-cluster
RATES=${RATES-"1000 4000"}
PUBSUB_ROUNDS=${PUBSUB_ROUNDS:-3}
PUBSUB_N=${PUBSUB_N:-200000}
CONNS=${CONNS:-300}
CHANNELS=${CHANNELS:-30}
DUR=${DURATION:-10}
mkdir -p "$OUT"
for tool in redis-server redis-cli curl; do
    command -v "$tool" >/dev/null || { echo "needs $tool (Debian packages redis-server, redis-tools)" >&2; exit 1; }
done
source bench-client/servers.sh

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# redis NAME ARGS...: one redis-server on a free port, at most 30 minutes; sets RPORT.
REDIS_PIDS=()
redis() {
    local name=$1
    shift
    RPORT=$(free_port)
    timeout -s KILL 1800 redis-server --port "$RPORT" --bind 127.0.0.1 --save "" \
        --appendonly no --dir "$OUT" "$@" >"$OUT/$name.redis.log" 2>&1 &
    PIDS+=("$!")
    for _ in $(seq 100); do redis-cli -p "$RPORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
    # The server is the child of `timeout`.
    REDIS_PIDS+=("$(pgrep -P "$!")")
}

redis single
SINGLE_URL=redis://127.0.0.1:$RPORT
SINGLE_PIDS=("${REDIS_PIDS[@]}")

REDIS_PIDS=()
CLUSTER_ADDRS=()
for i in 0 1 2 3 4 5; do
    rm -f "$OUT/nodes-$i.conf"
    redis "cluster$i" --cluster-enabled yes --cluster-port "$(free_port)" \
        --cluster-config-file "$OUT/nodes-$i.conf" --repl-diskless-sync-delay 0
    CLUSTER_ADDRS+=("127.0.0.1:$RPORT")
done
CLUSTER_PIDS=("${REDIS_PIDS[@]}")
redis-cli --cluster create "${CLUSTER_ADDRS[@]}" --cluster-replicas 1 --cluster-yes >"$OUT/create.log"
for _ in $(seq 300); do
    ok=1
    for a in "${CLUSTER_ADDRS[@]}"; do
        redis-cli -h "${a%:*}" -p "${a#*:}" cluster info | grep -q cluster_state:ok || ok=0
    done
    [ "$ok" = 1 ] && break
    sleep 0.1
done
CLUSTER_URL=redis+cluster://${CLUSTER_ADDRS[0]},${CLUSTER_ADDRS[1]}
# The masters alone (their replicas also spend CPU, replaying every write): the cost of
# the script with SPUBLISH against the same script with PUBLISH on one Redis.
MASTER_PIDS=()
for i in "${!CLUSTER_ADDRS[@]}"; do
    a=${CLUSTER_ADDRS[$i]}
    if redis-cli -h "${a%:*}" -p "${a#*:}" role | head -n 1 | grep -q master; then
        MASTER_PIDS+=("${CLUSTER_PIDS[$i]}")
    fi
done

# cpu_ticks PID...: user+system clock ticks of the processes.
cpu_ticks() {
    local total=0 p
    for p in "$@"; do
        total=$((total + $(awk '{print $14 + $15}' "/proc/$p/stat")))
    done
    echo "$total"
}

# idle_ticks_per_s PID...: what the processes spend idle (cron, cluster bus, replication
# pings), per second over 5 s, subtracted from each run's figure.
idle_ticks_per_s() {
    local before
    before=$(cpu_ticks "$@")
    sleep 5
    python3 -c "print(($(cpu_ticks "$@") - $before) / 5)"
}
# shellcheck disable=SC2086
IDLE_SINGLE=$(idle_ticks_per_s ${SINGLE_PIDS[*]})
IDLE_CLUSTER=$(idle_ticks_per_s "${CLUSTER_PIDS[@]}")
# shellcheck disable=SC2086
IDLE_MASTERS=$(idle_ticks_per_s ${MASTER_PIDS[*]})

# run NAME REDIS_URL RATE "MASTER_PID..." REDIS_PID...: three nodes on REDIS_URL, one
# fan-out run; Redis CPU is read for every REDIS_PID and for the masters among them.
run() {
    local name=$1 url=$2 rate=$3 masters=$4 idle=$5 idle_masters=$6
    shift 6
    local nodes=() urls=() pids=() i
    for i in 1 2 3; do
        # Created before the server starts: `start` may read it before the server writes.
        : >"$OUT/$name-node$i.server.log"
        # The publisher, one connection, goes past the default per-connection rate.
        start "$name-node$i" "$H" serve --listen 127.0.0.1:0 --threads 1 --redis "$url" \
            --max-messages-per-second 1000000
        # Ready once its Redis link is up (/healthz 200).
        for _ in $(seq 100); do curl -sf "http://$ADDR/healthz" >/dev/null && break; sleep 0.1; done
        nodes+=("$PID")
        urls+=("ws://$ADDR/ws")
        pids+=(--server-pid "$PID")
    done
    local before after masters_before masters_after
    before=$(cpu_ticks "$@")
    # shellcheck disable=SC2086 # a list of pids
    masters_before=$(cpu_ticks $masters)
    local started
    started=$(date +%s.%N)
    "$B" fanout --url "$(IFS=,; echo "${urls[*]}")" "${pids[@]}" --procs 3 \
        --conns "$CONNS" --channels "$CHANNELS" --rate "$rate" --size 64 \
        --duration "$DUR" --json -q | tail -n 1 >"$OUT/$name.json"
    after=$(cpu_ticks "$@")
    # shellcheck disable=SC2086
    masters_after=$(cpu_ticks $masters)
    local seconds
    seconds=$(python3 -c "print($(date +%s.%N) - $started)")
    for PID in "${nodes[@]}"; do stop; done
    python3 - "$name" "$OUT/$name.json" "$((after - before))" "$(getconf CLK_TCK)" \
        "$((masters_after - masters_before))" "$seconds" "$idle" "$idle_masters" <<'PY'
import json, sys
name, path, ticks, hz = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
seconds, idle, idle_masters = float(sys.argv[6]), float(sys.argv[7]), float(sys.argv[8])
ticks -= idle * seconds
master_ticks = int(sys.argv[5]) - idle_masters * seconds
r = json.load(open(path))
l, d, s = r["latency_us"], r["deliveries"], r.get("server") or {}
ms = lambda us: f"{us / 1000:.1f} ms"
redis_us = ticks * 1e6 / hz / max(r["acked"], 1)
masters_us = master_ticks * 1e6 / hz / max(r["acked"], 1)
print(f"{name}: published {r['published']}, acked {r['acked']}, publisher behind at worst "
      f"{ms(r['publisher_max_behind_us'])}; delivered {d['received']} of {d['expected']} "
      f"({d['per_second']:.0f}/s), lost {d['lost']}, duplicated {d['duplicated']}, "
      f"out of order {d['out_of_order']}; p50 {ms(l['p50'])} p99 {ms(l['p99'])}; "
      f"herald CPU {s.get('cpu_ns_per_delivery', 0):.0f} ns/delivery; "
      f"redis CPU {redis_us:.1f} us/publish (masters {masters_us:.1f})")
PY
}

for rate in $RATES; do
    run "single-$rate" "$SINGLE_URL" "$rate" "${SINGLE_PIDS[*]}" "$IDLE_SINGLE" "$IDLE_SINGLE" \
        "${SINGLE_PIDS[@]}"
    run "cluster-$rate" "$CLUSTER_URL" "$rate" "${MASTER_PIDS[*]}" "$IDLE_CLUSTER" \
        "$IDLE_MASTERS" "${CLUSTER_PIDS[@]}"
done

# announce KIND: PUBSUB_N announcements spread over the channels, each channel's sent to
# its slot's master with KIND (SPUBLISH or PUBLISH) through `redis-cli --pipe`; prints
# the redis-servers' CPU in microseconds per announcement, above idle.
announce() {
    local kind=$1 before after started seconds per=$((PUBSUB_N / CHANNELS)) i
    before=$(cpu_ticks "${CLUSTER_PIDS[@]}")
    started=$(date +%s.%N)
    for i in $(seq 0 $((CHANNELS - 1))); do
        python3 - "$kind" "herald:{c$i}" "$per" <<'PY' | redis-cli -h "${OWNER[$i]%:*}" -p "${OWNER[$i]#*:}" --pipe >/dev/null &
import sys
kind, channel, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
payload = "x" * 64
one = f"*3\r\n${len(kind)}\r\n{kind}\r\n${len(channel)}\r\n{channel}\r\n$64\r\n{payload}\r\n"
sys.stdout.write(one * count)
PY
    done
    wait
    after=$(cpu_ticks "${CLUSTER_PIDS[@]}")
    seconds=$(python3 -c "print($(date +%s.%N) - $started)")
    python3 -c "print(f'{(($after - $before) - $IDLE_CLUSTER * $seconds) * 1e6 / $(getconf CLK_TCK) / ($per * $CHANNELS):.2f}')"
}

if [ "$PUBSUB_ROUNDS" -gt 0 ]; then
    SLOTS=()
    for i in $(seq 0 $((CHANNELS - 1))); do
        SLOTS+=("$(redis-cli -h "${CLUSTER_ADDRS[0]%:*}" -p "${CLUSTER_ADDRS[0]#*:}" cluster keyslot "herald:{c$i}")")
    done
    # Each channel's master, from the slot ranges of `CLUSTER NODES`.
    mapfile -t OWNER < <(redis-cli -h "${CLUSTER_ADDRS[0]%:*}" -p "${CLUSTER_ADDRS[0]#*:}" cluster nodes |
        python3 -c '
import sys
ranges = []
for line in sys.stdin:
    f = line.split()
    if "master" in f[2].split(","):
        for r in f[8:]:
            lo, _, hi = r.partition("-")
            if lo.isdigit():
                ranges.append((int(lo), int(hi or lo), f[1].split("@")[0]))
for slot in map(int, sys.argv[1:]):
    print(next(a for lo, hi, a in ranges if lo <= slot <= hi))
' "${SLOTS[@]}")
    SUBSCRIBERS=()
    for i in $(seq 0 $((CHANNELS - 1))); do
        # The subscribers a herald node would be: the shard channel on its owner, the
        # plain channel on the first node.
        timeout -s KILL 1800 redis-cli -h "${OWNER[$i]%:*}" -p "${OWNER[$i]#*:}" ssubscribe "herald:{c$i}" >/dev/null &
        SUBSCRIBERS+=("$!")
        timeout -s KILL 1800 redis-cli -h "${CLUSTER_ADDRS[0]%:*}" -p "${CLUSTER_ADDRS[0]#*:}" subscribe "herald:{c$i}" >/dev/null &
        SUBSCRIBERS+=("$!")
    done
    PIDS+=("${SUBSCRIBERS[@]}")
    sleep 1
    echo "redis CPU per announcement (us, all six redis-servers, above idle), $PUBSUB_N per round over $CHANNELS channels:"
    for round in $(seq "$PUBSUB_ROUNDS"); do
        echo "round $round: SPUBLISH $(announce SPUBLISH), PUBLISH $(announce PUBLISH)"
    done
fi
