#!/usr/bin/env bash
# Reproduces the README's permessage-deflate figures: 1,000 subscribers of one channel,
# 1 KiB JSON messages at 20 msg/s, plain vs `--compression shared` vs `--compression
# per-connection`, alternating in rounds so that all three see the same machine. Server on
# core 0, client on core 1; loopback only; stops by itself.
#
#   bash bench-client/compression-figures.sh            # 3 rounds of 8 s runs
#   ROUNDS=5 DURATION=10 bash bench-client/compression-figures.sh
#
# Prints one line per run and the medians; each run's JSON is left in target/figures/.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p herald -p herald-bench
H=$PWD/target/release/herald
B=$PWD/target/release/herald-bench
OUT=$PWD/target/figures
DUR=${DURATION:-8}
ROUNDS=${ROUNDS:-3}
mkdir -p "$OUT"
cores=$(nproc)
client_core=$((cores > 1 ? 1 : 0))

PID=
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null || true; }
trap cleanup EXIT

# run NAME POLICY [BENCH-ARGS...]: a fresh server with --compression POLICY, one fan-out.
run() {
    local name=$1 policy=$2
    shift 2
    local log="$OUT/$name.server.log"
    taskset -c 0 "$H" serve --listen 127.0.0.1:0 --threads 1 --compression "$policy" \
        --max-messages-per-second 1000000 >"$log" 2>&1 &
    PID=$!
    local addr=
    for _ in $(seq 100); do
        addr=$(sed -n 's/^listening on //p' "$log" | head -n 1)
        [ -n "$addr" ] && break
        sleep 0.1
    done
    [ -n "$addr" ] || { cat "$log" >&2; exit 1; }
    taskset -c "$client_core" "$B" fanout --url "ws://$addr/ws" --server-pid "$PID" \
        --conns 1000 --rate 20 --size 1024 --duration "$DUR" --json -q "$@" |
        tail -n 1 >"$OUT/$name.json"
    kill "$PID"
    wait "$PID" 2>/dev/null || true
    PID=
}

for round in $(seq "$ROUNDS"); do
    run "deflate-plain-$round" shared
    run "deflate-shared-$round" shared --deflate
    run "deflate-per-connection-$round" per-connection --deflate
done

python3 - "$OUT" "$ROUNDS" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
rows = {}
for kind in ("plain", "shared", "per-connection"):
    for r in range(1, rounds + 1):
        j = json.load(open(f"{out}/deflate-{kind}-{r}.json"))
        d, s, c = j["deliveries"], j["server"], j["client"]
        row = (s["cpu_ns_per_delivery"], c["wire_bytes_per_delivery"], c["cpu_ns_per_delivery"],
               j["latency_us"]["p99"] / 1000, d["lost"], s["rss_bytes_per_conn"])
        rows.setdefault(kind, []).append(row)
        print(f"{kind:15} round {r}: server {row[0]:6.0f} ns/delivery  wire {row[1]:7.1f} B/delivery"
              f"  client {row[2]:6.0f} ns/delivery  p99 {row[3]:6.1f} ms  lost {row[4]}")
plain = [statistics.median(x[i] for x in rows["plain"]) for i in range(2)]
print("median over rounds (ratio to plain):")
for kind, values in rows.items():
    cpu = statistics.median(v[0] for v in values)
    wire = statistics.median(v[1] for v in values)
    print(f"{kind:15} server {cpu:6.0f} ns/delivery ({cpu / plain[0]:.2f}x)"
          f"  wire {wire:7.1f} B/delivery ({wire / plain[1]:.2f}x)")
PY
