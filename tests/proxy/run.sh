#!/usr/bin/env bash
# tuning/nginx.conf really works: nginx (Debian's package, installed if missing) runs the
# guide's configuration with its upstream pointed at a real herald, and a Python
# `websockets` client subscribes through it and receives broadcasts published through it
# (over /ws and over POST /api/publish), plus an SSE stream through the `location /`
# block. Also `systemd-analyze verify` on tuning/herald.service (Debian's systemd package,
# installed if missing; without it the run fails rather than skip the check).
#
#   bash tests/proxy/run.sh      (expects target/release/herald and the .venv of tests/run.sh)
set -euo pipefail
# The server runs on the backend HERALD_IO names, else on epoll (the product's default,
# `auto`, is io_uring where it works; tests/run.sh runs this again with HERALD_IO=uring).
export HERALD_IO=${HERALD_IO:-epoll}
case $HERALD_IO in epoll | uring) ;; *) echo "HERALD_IO: name epoll or uring, not $HERALD_IO" >&2; exit 2 ;; esac
cd "$(dirname "$0")/../.."
ROOT=$PWD
HERALD=${HERALD_BIN:-$ROOT/target/release/herald}
PY=$ROOT/.venv/bin/python
WORK=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

missing=()
command -v nginx >/dev/null || missing+=(nginx)
command -v systemd-analyze >/dev/null || missing+=(systemd)
if [ "${#missing[@]}" != 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "+ apt-get install ${missing[*]}"
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
    else
        echo "missing: ${missing[*]}: install these Debian packages (apt-get install ${missing[*]})" >&2
        exit 1
    fi
fi

"$HERALD" serve --listen 127.0.0.1:0 --threads 2 --api-key proxy-test-key \
    --trusted-proxies 127.0.0.1 >"$WORK/herald.out" 2>"$WORK/herald.err" &
PIDS+=($!)
for _ in $(seq 100); do
    HADDR=$(sed -n 's/^listening on //p' "$WORK/herald.out")
    [ -n "$HADDR" ] && break
    sleep 0.1
done
[ -n "$HADDR" ] || { cat "$WORK/herald.err" >&2; exit 1; }
# The backend asked for is the one that runs.
want="io backend $HERALD_IO"
for _ in $(seq 50); do
    grep -qx "io backend .*" "$WORK/herald.out" && break
    sleep 0.1
done
grep -qx "$want" "$WORK/herald.out" || {
    echo "herald should print '$want'; it printed:" >&2
    cat "$WORK/herald.out" "$WORK/herald.err" >&2
    exit 1
}
NPORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')

# The guide's file, with its example upstream nodes replaced by this herald and the
# listener and pid moved to this test's own port and directory.
sed -e "/server 10\.0\.0\.1[23]:8080/d" \
    -e "s|server 10\.0\.0\.11:8080|server $HADDR|" \
    -e "s|listen 80 |listen 127.0.0.1:$NPORT |" \
    -e "s|pid /tmp/herald-nginx.pid;|pid $WORK/nginx.pid;|" \
    -e "s|worker_processes auto;|worker_processes 1;|" \
    -e "s|worker_rlimit_nofile 2097152;|worker_rlimit_nofile 8192;|" \
    -e "s|worker_connections 1048576;|worker_connections 4096;|" \
    "$ROOT/tuning/nginx.conf" >"$WORK/nginx.conf"
mkdir -p "$WORK/tmp"
nginx -t -p "$WORK" -c "$WORK/nginx.conf" -g "error_log stderr notice;" 2>&1 | tail -n 2
nginx -p "$WORK" -c "$WORK/nginx.conf" -g "daemon off;" 2>"$WORK/nginx.err" &
PIDS+=($!)
for _ in $(seq 50); do
    (exec 3<>"/dev/tcp/127.0.0.1/$NPORT") 2>/dev/null && break
    sleep 0.1
done

"$PY" - "$NPORT" <<'PY'
import asyncio, json, sys, urllib.request
import websockets

port = sys.argv[1]
base = f"127.0.0.1:{port}"

async def recv_json(ws):
    return json.loads(await asyncio.wait_for(ws.recv(), 5))

async def main():
    async with websockets.connect(f"ws://{base}/ws") as sub, websockets.connect(f"ws://{base}/ws") as pub:
        await sub.send(json.dumps({"type": "subscribe", "channel": "via-nginx", "id": 1}))
        reply = await recv_json(sub)
        assert reply["type"] == "subscribed", reply
        await pub.send(json.dumps({"type": "publish", "channel": "via-nginx", "data": {"n": 1}, "id": 2}))
        assert (await recv_json(pub))["type"] == "ack"
        message = await recv_json(sub)
        assert message["seq"] == 1 and message["data"] == {"n": 1}, message
        request = urllib.request.Request(
            f"http://{base}/api/publish",
            data=json.dumps({"channel": "via-nginx", "data": {"n": 2}}).encode(),
            headers={"Authorization": "Bearer proxy-test-key", "Content-Type": "application/json"},
        )
        receipt = json.loads(urllib.request.urlopen(request, timeout=5).read())
        assert receipt["seq"] == 2 and receipt["subscribers"] >= 1, receipt
        message = await recv_json(sub)
        assert message["seq"] == 2 and message["data"] == {"n": 2}, message
    with urllib.request.urlopen(f"http://{base}/sse?channel=via-nginx&since=0", timeout=5) as stream:
        seen = []
        while len(seen) < 2:
            line = stream.readline().decode()
            if line.startswith("id: "):
                seen.append(int(line[4:]))
        assert seen == [1, 2], seen
    print("proxy: subscribe, publish over /ws and HTTP, and SSE through nginx work")

asyncio.run(main())
PY

sed "s|/usr/bin/herald|$HERALD|g" "$ROOT/tuning/herald.service" >"$WORK/herald.service"
systemd-analyze verify "$WORK/herald.service"
echo "systemd-analyze verify: ok"
echo "2 passed, 0 failed"
