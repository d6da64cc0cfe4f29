#!/usr/bin/env bash
# Reproduces the README's TLS figures: server CPU per delivery with and without TLS at
# 1,000 subscribers, herald --threads 1 on core 0 and herald-bench on core 1, plain and
# TLS runs alternating in one go (ROUNDS of each; the README gives the medians); then
# memory per idle subscribed connection and CPU per accepted connection, plain and TLS.
# Loopback only; stops by itself.
#
#   bash bench-client/tls-figures.sh
#   ROUNDS=5 DURATION=10 CONNS=1000 bash bench-client/tls-figures.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p herald -p herald-bench
H=$PWD/target/release/herald
B=$PWD/target/release/herald-bench
OUT=$PWD/target/figures/tls
DUR=${DURATION:-8}
ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-1000}
RATE=${RATE:-20}
mkdir -p "$OUT"
cores=$(nproc)
client_core=$((cores > 1 ? 1 : 0))

# A self-signed certificate for the test (herald-bench --insecure accepts it).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -keyout "$OUT/key.pem" -out "$OUT/cert.pem" -subj /CN=localhost \
    -addext subjectAltName=DNS:localhost 2>/dev/null

PID=
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null || true; }
trap cleanup EXIT

# serve NAME [SERVER-ARGS...]: starts herald on core 0; sets PID and PORT.
serve() {
    local name=$1
    shift
    local log="$OUT/$name.server.log"
    ( exec taskset -c 0 "$H" serve --listen 127.0.0.1:0 --threads 1 --max-connections-per-ip 0 \
        --max-messages-per-second 1000000 "$@" ) >"$log" 2>&1 &
    PID=$!
    local addr=
    for _ in $(seq 100); do
        addr=$(sed -n 's/^listening on //p' "$log" | head -n 1)
        [ -n "$addr" ] && break
        sleep 0.1
    done
    [ -n "$addr" ] || { cat "$log" >&2; exit 1; }
    PORT=${addr##*:}
}

# run NAME SCHEME [SERVER-ARGS...]: one server, one fan-out run, one summary line.
run() {
    local name=$1 scheme=$2
    shift 2
    serve "$name" "$@"
    taskset -c "$client_core" "$B" fanout --url "$scheme://localhost:$PORT/ws" --insecure \
        --server-pid "$PID" --conns "$CONNS" --rate "$RATE" --size 64 --duration "$DUR" \
        --json -q | tail -n 1 >"$OUT/$name.json"
    kill "$PID"
    wait "$PID" 2>/dev/null || true
    PID=
    python3 - "$name" "$OUT/$name.json" <<'PY'
import json, sys
name, path = sys.argv[1], sys.argv[2]
r = json.load(open(path))
l, d, s, c = r["latency_us"], r["deliveries"], r["server"], r["client"]
print(f"{name:12} deliveries/s {d['per_second']:7.0f}  p50 {l['p50'] / 1000:6.1f} ms  p99 {l['p99'] / 1000:6.1f} ms"
      f"  lost {d['lost']}  server {s['cpu_ns_per_delivery']:6.0f} ns/delivery"
      f"  {s['rss_bytes_per_conn']:6.0f} B/conn  client {c['cpu_ns_per_delivery']:5.0f} ns/delivery")
PY
}

echo "== $CONNS subscribers, $RATE msg/s x 64 B, ${DUR} s per run, plain and TLS alternating"
for round in $(seq "$ROUNDS"); do
    run "plain-$round" ws
    run "tls-$round" wss --tls-cert "$OUT/cert.pem" --tls-key "$OUT/key.pem"
done
python3 - "$OUT" "$ROUNDS" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def median(kind, key):
    return statistics.median(json.load(open(f"{out}/{kind}-{i}.json"))["server"][key] for i in range(1, rounds + 1))
plain, tls = median("plain", "cpu_ns_per_delivery"), median("tls", "cpu_ns_per_delivery")
print(f"median server CPU per delivery: plain {plain:.0f} ns, TLS {tls:.0f} ns ({tls / plain:.2f}x)")
print(f"median server RSS per connection: plain {median('plain', 'rss_bytes_per_conn'):.0f} B, "
      f"TLS {median('tls', 'rss_bytes_per_conn'):.0f} B")
PY

echo "== 5,000 idle subscribed connections held 3 s: server memory and accept cost"
for scheme in ws wss; do
    tls_args=()
    [ "$scheme" = wss ] && tls_args=(--tls-cert "$OUT/cert.pem" --tls-key "$OUT/key.pem")
    serve "idle-$scheme" "${tls_args[@]}"
    echo "-- $scheme"
    taskset -c "$client_core" "$B" connect --url "$scheme://localhost:$PORT/ws" --insecure \
        --conns 5000 --subscribe --hold 3 --server-pid "$PID" | grep -E "server (rss|cpu)"
    kill "$PID"
    wait "$PID" 2>/dev/null || true
    PID=
done
