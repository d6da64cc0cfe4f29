#!/usr/bin/env bash
# epoll vs io_uring, side by side in one run (README "IO backends"): each workload runs
# on `--io epoll` then `--io uring`, alternating, so both see the same machine state; at
# `--threads 1` the fan-out also runs on `herald-bench floor` (one write per subscriber,
# the cost a fan-out has in the kernel), so each backend is also read against it.
# With --threads 1 the server is pinned to core 0 and the client to core 1; with
# --threads 2 they share the cores (as in figures.sh). Loopback only; stops by itself.
#
#   bash bench-client/backends.sh              # 5 s per run
#   DURATION=10 ROUNDS=2 bash bench-client/backends.sh
#   FANOUT_CONNS="1000 10000 18000" SIZES=64 NO_ECHO=1 ...   # a subset
#   NO_BUILD=1 ...                          # the binaries already in target/release
#   BASE=/path/to/older/herald ...          # also that build on io_uring ("ubase"), to
#                                           # measure a change against what it replaces
#
# Per run: one summary line; JSON in target/backends/. System calls are counted with
# `perf stat` over the publishing window only (started once the client says it has
# connected), so connection setup is not in them.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${NO_BUILD:-}" ] || cargo build --release -q -p herald -p herald-bench
H=$PWD/target/release/herald
B=$PWD/target/release/herald-bench
OUT=$PWD/target/backends
DUR=${DURATION:-5}
ROUNDS=${ROUNDS:-1}
mkdir -p "$OUT"
ulimit -n "$(ulimit -Hn)"
command -v perf >/dev/null || { echo "needs perf (linux-perf) for the system call counts" >&2; exit 1; }

# start, stop, and the servers killed on exit.
source bench-client/servers.sh # (the working directory is the repository root)

# measure NAME MARKER CLIENT...: runs the client, counts the server's system calls with
# perf from the client's MARKER line (stderr) for DUR-1 s; leaves NAME.json and NAME.perf.
measure() {
    local name=$1 marker=$2
    shift 2
    "$@" >"$OUT/$name.out" 2>"$OUT/$name.err" &
    local client=$!
    for _ in $(seq 600); do
        grep -qs "$marker" "$OUT/$name.err" && break
        sleep 0.1
    done
    # The client starts measuring 0.2 s after its marker.
    sleep 0.5
    perf stat -x, -e raw_syscalls:sys_enter -e syscalls:sys_enter_io_uring_enter -p "$PID" \
        -- sleep "$((DUR - 1))" 2>"$OUT/$name.perf" >/dev/null || true
    if ! wait "$client"; then
        echo "$name: client failed: $(grep -m 1 '^Error' "$OUT/$name.err")"
        return 1
    fi
    tail -n 1 "$OUT/$name.out" >"$OUT/$name.json"
}

# fanout NAME THREADS CONNS SIZE BURST IO
fanout() {
    local name=$1 threads=$2 conns=$3 size=$4 burst=$5 io=$6
    local pin_server=() pin_client=() load=(--procs 1)
    if [ "$threads" = 1 ]; then pin_server=(taskset -c 0); pin_client=(taskset -c 1); fi
    if [ "$conns" -gt 10000 ]; then load=(--procs 2 --source-ips 127.0.0.2-127.0.0.20 --drain-timeout 20); fi
    if [ "$io" = floor ]; then
        start "$name" "${pin_server[@]}" "$B" floor --listen 127.0.0.1:0
    elif [ "$io" = ubase ]; then
        start "$name" "${pin_server[@]}" "$BASE" serve --io uring --listen 127.0.0.1:0 \
            --threads "$threads" --max-connections-per-ip 0 --max-messages-per-second 1000000
    else
        start "$name" "${pin_server[@]}" "$H" serve --io "$io" --listen 127.0.0.1:0 \
            --threads "$threads" --max-connections-per-ip 0 --max-messages-per-second 1000000
    fi
    measure "$name" "publishing" "${pin_client[@]}" "$B" fanout --url "ws://$ADDR/ws" --server-pid "$PID" \
        --duration "$DUR" --json --conns "$conns" --rate 20 --size "$size" --burst "$burst" "${load[@]}" ||
        { stop; return 0; }
    stop
    python3 - "$name" "$OUT" 20 <<'PY'
import json, sys
name, out, rate = sys.argv[1], sys.argv[2], float(sys.argv[3])
r = json.load(open(f"{out}/{name}.json"))
perf = {l.split(",")[2]: float(l.split(",")[0]) for l in open(f"{out}/{name}.perf") if l.count(",") > 2 and l[0].isdigit()}
l, d, s = r["latency_us"], r["deliveries"], r.get("server") or {}
dur = r["config"]["duration"] - 1
calls = perf.get("raw_syscalls:sys_enter", 0) / (rate * dur)
enters = perf.get("syscalls:sys_enter_io_uring_enter", 0) / (rate * dur)
print(f"{name:30} deliv/s {d['per_second']:8.0f}  server {s.get('cpu_ns_per_delivery', 0):6.0f} ns/delivery"
      f"  p99 {l['p99'] / 1000:6.2f} ms  p99.9 {l['p999'] / 1000:6.2f} ms  syscalls/broadcast {calls:7.1f}"
      f" (io_uring_enter {enters:5.1f})  lost {d['lost']} ooo {d['out_of_order']}")
PY
}

# echo NAME THREADS IO
echo_run() {
    local name=$1 threads=$2 io=$3
    local pin_server=() pin_client=() bin=$H
    if [ "$threads" = 1 ]; then pin_server=(taskset -c 0); pin_client=(taskset -c 1); fi
    if [ "$io" = ubase ]; then bin=$BASE io=uring; fi
    start "$name" "${pin_server[@]}" "$bin" serve --io "$io" --listen 127.0.0.1:0 \
        --threads "$threads" --max-connections-per-ip 0 --max-messages-per-second 1000000
    measure "$name" "measuring" "${pin_client[@]}" "$B" echo --url "ws://$ADDR/echo" --server-pid "$PID" \
        --duration "$DUR" --json --conns 10000 --rate "$ECHO_RATE" --size 64 || { stop; return 0; }
    stop
    python3 - "$name" "$OUT" <<'PY'
import json, sys
name, out = sys.argv[1], sys.argv[2]
r = json.load(open(f"{out}/{name}.json"))
perf = {l.split(",")[2]: float(l.split(",")[0]) for l in open(f"{out}/{name}.perf") if l.count(",") > 2 and l[0].isdigit()}
dur = r["config"]["duration"] - 1
msgs = r["per_second"] * dur
s, l = r.get("server") or {}, r["latency_us"]
print(f"{name:30} msg/s {r['per_second']:8.0f}  server {s.get('cpu_ns_per_message', 0):6.0f} ns/message"
      f"  = {1e9 / max(s.get('cpu_ns_per_message', 1), 1):8.0f} msg per server CPU-s"
      f"  p99 {l['p99'] / 1000:6.2f} ms  syscalls/message {perf.get('raw_syscalls:sys_enter', 0) / max(msgs, 1):5.2f}"
      f"  missing {r['missing']}")
PY
}

ECHO_RATE=${ECHO_RATE:-40000}
FANOUT_CONNS=${FANOUT_CONNS:-"1000 18000"}
SIZES=${SIZES:-"64 1024"}
for round in $(seq "$ROUNDS"); do
    for threads in 1 2; do
        echo "== round $round, --threads $threads: fan-out at 20 broadcasts/s"
        contenders="epoll uring${BASE:+ ubase}"
        # The floor serves on one thread: it is the reference for --threads 1.
        [ "$threads" = 1 ] && contenders="$contenders floor"
        for conns in $FANOUT_CONNS; do
            for size in $SIZES; do
                for io in $contenders; do
                    fanout "r$round-t$threads-$io-fanout-$conns-${size}B" "$threads" "$conns" "$size" 1 "$io"
                done
            done
        done
        echo "== round $round, --threads $threads: four messages back to back, 5 bursts/s"
        for io in epoll uring${BASE:+ ubase}; do
            fanout "r$round-t$threads-$io-burst4-1000-64B" "$threads" 1000 64 4 "$io"
        done
        [ -z "${NO_ECHO:-}" ] || continue
        echo "== round $round, --threads $threads: echo, 10,000 connections, $ECHO_RATE msg/s in total"
        for io in epoll uring${BASE:+ ubase}; do
            echo_run "r$round-t$threads-$io-echo-10000" "$threads" "$io"
        done
    done
done
