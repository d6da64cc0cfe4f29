#!/usr/bin/env python3
"""What the cluster-wide --max-connections-per-user check adds to an upgrade.

Two herald nodes on one redis-server of our own (127.0.0.1, free ports), the same
flags but for the limit: `limited` has --max-connections-per-user (so every upgrade
with a user waits for one Redis script), `plain` has none. One client upgrades /ws
with a signed token, one connection at a time, and times request to 101; rounds
alternate the two nodes so both see the same machine load. Each connection is closed
before the next (the limit is never reached: this measures the check, not refusals).

    python3 bench-client/user-limit.py                 # after cargo build --release
    ROUNDS=6 UPGRADES=500 python3 bench-client/user-limit.py

Prints p50/p90/p99 per node per round and the median of the p50s side by side, and
stops everything it started.
"""

import base64
import hashlib
import hmac
import json
import os
import socket
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERALD = os.environ.get("HERALD", os.path.join(ROOT, "target/release/herald"))
ROUNDS = int(os.environ.get("ROUNDS", "6"))
UPGRADES = int(os.environ.get("UPGRADES", "500"))
USERS = 50
SECRET = b"user-limit-bench-secret-0123456789abcdef"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def b64(raw):
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


def token(user):
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = {"sub": user, "exp": int(time.time()) + 3600, "channels": ["*"]}
    body = b64(json.dumps(claims).encode())
    signed = head + b"." + body
    return (signed + b"." + b64(hmac.new(SECRET, signed, hashlib.sha256).digest())).decode()


def wait_port(port, limit=10.0):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"nothing listens on {port}")


def start_node(redis_port, limited):
    port = free_port()
    args = [HERALD, "serve", "--listen", f"127.0.0.1:{port}", "--threads", "1",
            "--redis", f"redis://127.0.0.1:{redis_port}", "--jwt-secret", SECRET.decode()]
    if limited:
        args += ["--max-connections-per-user", "1000"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    time.sleep(0.5)  # the Redis link comes up after the listener
    return proc, port


def upgrade(port, request):
    start = time.perf_counter()
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(request)
    got = b""
    while b"\r\n\r\n" not in got:
        chunk = s.recv(4096)
        if not chunk:
            break
        got += chunk
    took = time.perf_counter() - start
    s.close()
    if not got.startswith(b"HTTP/1.1 101"):
        sys.exit(f"not upgraded: {got[:200]!r}")
    return took


def main():
    if not os.path.exists(HERALD):
        sys.exit(f"{HERALD} missing: cargo build --release first")
    redis_port = free_port()
    redis = subprocess.Popen(
        ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs = [redis]
    try:
        wait_port(redis_port)
        limited, limited_port = start_node(redis_port, True)
        plain, plain_port = start_node(redis_port, False)
        procs += [limited, plain]
        requests = [
            (f"GET /ws?token={token(f'u{i}')} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
             "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
             "Sec-WebSocket-Version: 13\r\n\r\n").encode()
            for i in range(USERS)
        ]
        for port in (limited_port, plain_port):  # warm up
            for request in requests:
                upgrade(port, request)
        p50 = {"limited": [], "plain": []}
        for rnd in range(ROUNDS):
            order = [("limited", limited_port), ("plain", plain_port)]
            if rnd % 2:
                order.reverse()
            for name, port in order:
                times = sorted(upgrade(port, requests[i % USERS]) for i in range(UPGRADES))
                pick = lambda q: times[min(len(times) - 1, int(q * len(times)))] * 1e6
                p50[name].append(pick(0.5))
                print(f"round {rnd + 1} {name:8} p50 {pick(0.5):7.0f} us  "
                      f"p90 {pick(0.9):7.0f} us  p99 {pick(0.99):7.0f} us", flush=True)
        a, b = statistics.median(p50["limited"]), statistics.median(p50["plain"])
        print(f"median p50: limited {a:.0f} us, plain {b:.0f} us, "
              f"added {a - b:.0f} us ({a / b:.2f}x)")
        print("load average:", open("/proc/loadavg").read().split()[:3])
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=10)


if __name__ == "__main__":
    main()
