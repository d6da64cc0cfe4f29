#!/usr/bin/env bash
# Where a server's CPU goes, by layer (README "IO backends"): `perf record -g` of the
# server at `--threads 1` (pinned to core 0, the client to core 1) during a fan-out or an
# echo run, every sample put in the first of these its stack passes through: the
# loopback receive softirq (on loopback the sender's CPU delivers each segment into the
# client's socket), the TCP send path, the TCP receive path, io_uring, `epoll_wait`, the
# rest of the kernel (system call entry and exit, fd lookup); else user space. Then the
# leaf functions outside TCP. Loopback only; stops by itself.
#
#   bash bench-client/profile.sh                       # floor, uring, epoll: fan-out to 1,000 and 10,000; echo
#   WHO="floor uring" FANOUT_CONNS=10000 NO_ECHO=1 bash bench-client/profile.sh
#   NO_BUILD=1 ...                                     # the binaries already in target/release
#
# `floor` is `herald-bench floor` (one write per subscriber), fan-out only.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${NO_BUILD:-}" ] || cargo build --release -q -p herald -p herald-bench
H=$PWD/target/release/herald
B=$PWD/target/release/herald-bench
OUT=$PWD/target/profile
WHO=${WHO:-floor uring epoll}
FANOUT_CONNS=${FANOUT_CONNS:-"1000 10000"}
SECONDS_RECORDED=${SECONDS_RECORDED:-8}
mkdir -p "$OUT"
ulimit -n "$(ulimit -Hn)"
command -v perf >/dev/null || { echo "needs perf (linux-perf)" >&2; exit 1; }

source bench-client/servers.sh # (the working directory is the repository root)

# record NAME CLIENT_ARGS...: runs the client against $ADDR, records the server meanwhile.
record() {
    local name=$1
    shift
    local client_secs=$((SECONDS_RECORDED + 8))
    taskset -c 1 "$B" "$@" --server-pid "$PID" --duration "$client_secs" --json -q \
        >"$OUT/$name.json" 2>/dev/null &
    local client=$!
    sleep 6 # connected and steady
    perf record -q -F 2000 -g -o "$OUT/$name.data" -p "$PID" -- sleep "$SECONDS_RECORDED" \
        >/dev/null 2>&1
    wait "$client"
    stop
    python3 - "$name" "$OUT" <<'PY'
import collections, json, subprocess, sys
name, out = sys.argv[1], sys.argv[2]
report = json.loads(open(f"{out}/{name}.json").read().splitlines()[-1])
server = report.get("server") or {}
cost = server.get("cpu_ns_per_delivery") or server.get("cpu_ns_per_message") or 0
script = subprocess.run(["perf", "script", "-i", f"{out}/{name}.data", "-F", "ip,sym"],
                        capture_output=True, text=True, check=True).stdout
samples, stack = [], []
for line in script.splitlines() + [""]:
    line = line.strip()
    if not line:
        if stack:
            samples.append(stack)
        stack = []
        continue
    parts = line.split(None, 1)
    stack.append(parts[1] if len(parts) > 1 else "?")
layers = [
    ("loopback receive softirq", ["net_rx_action", "__netif_receive_skb", "process_backlog"]),
    ("TCP send path", ["tcp_sendmsg", "tcp_write_xmit", "__tcp_push"]),
    ("TCP receive path", ["tcp_recvmsg", "sock_recvmsg"]),
    ("io_uring", ["io_uring_enter", "__do_sys_io_uring_enter", "__x64_sys_io_uring_enter",
                  "io_submit_sqes", "io_issue_sqe", "io_run_task_work", "io_cqring_wait"]),
    ("epoll_wait", ["epoll_wait", "do_epoll_wait", "ep_poll"]),
    ("other kernel (entry/exit, fd lookup)", ["entry_SYSCALL", "do_syscall_64", "__x64_sys",
                                              "asm_", "ret_from"]),
]
def layer(stack):
    for label, prefixes in layers:
        if any(f.startswith(p) for f in stack for p in prefixes):
            return label
    return "user space"
n = max(len(samples), 1)
count = collections.Counter(layer(s) for s in samples)
print(f"{name:24} {cost:6.0f} ns per delivery or message, {len(samples)} samples: " + ", ".join(
    f"{label} {count[label] / n * 100:.1f}%" for label, _ in layers + [("user space", [])]
    if count[label]))
tcp = {"loopback receive softirq", "TCP send path", "TCP receive path"}
leaves = collections.Counter(s[0] for s in samples if layer(s) not in tcp)
print("    outside TCP: " + ", ".join(f"{sym} {v / n * 100:.1f}%" for sym, v in leaves.most_common(8)))
PY
}

# server NAME WHO: starts the server WHO pinned to core 0.
server() {
    local name=$1 who=$2
    if [ "$who" = floor ]; then
        start "$name" taskset -c 0 "$B" floor --listen 127.0.0.1:0
    else
        start "$name" taskset -c 0 "$H" serve --io "$who" --listen 127.0.0.1:0 --threads 1 \
            --max-connections-per-ip 0 --max-messages-per-second 1000000
    fi
}

echo "== load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
for conns in $FANOUT_CONNS; do
    for who in $WHO; do
        server "$who-fanout-$conns" "$who"
        record "$who-fanout-$conns" fanout --url "ws://$ADDR/ws" --conns "$conns" --rate 20 \
            --size 64 --procs $((conns > 10000 ? 2 : 1)) --source-ips 127.0.0.2-127.0.0.20
    done
done
[ -z "${NO_ECHO:-}" ] || exit 0
for who in $WHO; do
    [ "$who" = floor ] && continue
    server "$who-echo-10000" "$who"
    record "$who-echo-10000" echo --url "ws://$ADDR/echo" --conns 10000 --rate 20000 --size 64
done
