#!/usr/bin/env bash
# Fan-out latency across shards: 10,000 subscribers on one channel, 5 messages/s of 64 B,
# herald with two shards beside herald with one and the `floor` reference server, in one
# run, rounds alternating the servers. Latency is publish to receipt for every delivery,
# so its tail is the last subscribers reached. Server and client share the machine's cores.
#
#   bash bench-client/shards.sh                       # ROUNDS=3, 10 s per run
#   BASE=/path/to/other/herald bash bench-client/shards.sh   # and another build beside it
#
# Everything runs on 127.0.0.0/8 and stops by itself; subscribers come from 127.0.0.2 and
# up. Each run's JSON is left in target/shards/.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p herald -p herald-bench
H=$PWD/target/release/herald
B=$PWD/target/release/herald-bench
OUT=$PWD/target/shards
ROUNDS=${ROUNDS:-3}
DUR=${DURATION:-10}
mkdir -p "$OUT"
rm -f "$OUT"/*.json
ulimit -n "$(ulimit -Hn)"

# start, stop, and the servers killed on exit.
source bench-client/servers.sh # (the working directory is the repository root)

# run NAME: one fan-out against $ADDR/$PID.
run() {
    local name=$1
    "$B" fanout --url "ws://$ADDR/ws" --server-pid "$PID" --conns 10000 --rate 5 --size 64 \
        --duration "$DUR" --source-ips 127.0.0.2-127.0.0.11 --json -q | tail -n 1 >"$OUT/$name.json"
    python3 - "$name" "$OUT/$name.json" <<'PY'
import json, sys
name, path = sys.argv[1], sys.argv[2]
r = json.load(open(path))
l, d, s = r["latency_us"], r["deliveries"], r.get("server") or {}
ms = lambda us: f"{us / 1000:6.2f}"
print(f"{name:16} p50 {ms(l['p50'])} ms  p99 {ms(l['p99'])} ms  p99.9 {ms(l['p999'])} ms  "
      f"max {ms(l['max'])} ms  deliveries {d['received']}/{d['expected']} lost {d['lost']}  "
      f"server {s.get('cpu_ns_per_delivery', 0):5.0f} ns/delivery")
PY
}

SERVE=(serve --listen 127.0.0.1:0 --max-messages-per-second 1000000)

echo "== 10,000 subscribers, 5 msg/s, 64 B, $DUR s per run, $ROUNDS rounds (load: $(cut -d' ' -f1-3 /proc/loadavg))"
for round in $(seq "$ROUNDS"); do
    start "herald-t2-$round" "$H" "${SERVE[@]}" --threads 2
    run "herald-t2-$round"
    stop
    start "herald-t1-$round" "$H" "${SERVE[@]}" --threads 1
    run "herald-t1-$round"
    stop
    if [ -n "${BASE:-}" ]; then
        start "base-t2-$round" "$BASE" "${SERVE[@]}" --threads 2
        run "base-t2-$round"
        stop
    fi
    start "floor-$round" "$B" floor --listen 127.0.0.1:0
    run "floor-$round"
    stop
done

echo "== medians over the rounds"
python3 - "$OUT" <<'PY'
import json, pathlib, statistics, sys
runs = {}
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    name = path.stem.rsplit("-", 1)[0]
    runs.setdefault(name, []).append(json.loads(path.read_text()))
for name, rs in runs.items():
    med = lambda key: statistics.median(r["latency_us"][key] for r in rs) / 1000
    lost = sum(r["deliveries"]["lost"] for r in rs)
    print(f"{name:10} p50 {med('p50'):6.2f} ms  p99 {med('p99'):6.2f} ms  p99.9 {med('p999'):6.2f} ms"
          f"  max {med('max'):6.2f} ms  lost {lost}  ({len(rs)} runs)")
PY
