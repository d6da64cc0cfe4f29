#!/usr/bin/env python3
"""What hostile clients make a herald process hold: starts the given binary, runs one
attack of the hardening issue against it, and prints the server's RSS growth.

    python3 bench-client/hostile.py target/release/herald pipeline
    python3 bench-client/hostile.py target/release/herald parked-poll
    python3 bench-client/hostile.py target/release/herald sse-replay

Each attack is bounded in connections, bytes and time, and targets 127.0.0.1 only.
Compare two builds side by side by running the same attack against each binary.
"""

import json
import socket
import subprocess
import sys
import time
import urllib.request

KEY = "hostile-probe-key"


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def start(binary, extra):
    proc = subprocess.Popen(
        [binary, "serve", "--listen", "127.0.0.1:0", "--threads", "2", "--api-key", KEY, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r}")
    host, port = line.rsplit(" ", 1)[1].strip().rsplit(":", 1)
    return proc, (host, int(port))


def write_until_stalled(sock, data, stall=0.5):
    sock.settimeout(stall)
    sent = 0
    try:
        while sent < len(data):
            sent += sock.send(data[sent : sent + 65536])
    except (socket.timeout, BlockingIOError):
        pass
    return sent


def settle(pid, seconds=2.0):
    peak = 0
    end = time.time() + seconds
    while time.time() < end:
        peak = max(peak, rss_kib(pid))
        time.sleep(0.1)
    return peak


def pipeline(addr, pid):
    """20 connections each pipeline 2,000 requests for the browser client, reading nothing."""
    request = b"GET /herald.js HTTP/1.1\r\nHost: x\r\n\r\n" * 2000
    socks = []
    for _ in range(20):
        s = socket.create_connection(addr)
        write_until_stalled(s, request)
        socks.append(s)
    return socks, "20 connections x 2,000 pipelined GET /herald.js, nothing read"


def parked_poll(addr, pid):
    """8 parked long-polls, each followed by up to 64 MB of bytes."""
    junk = b"x" * (64 << 20)
    socks, sent = [], 0
    for _ in range(8):
        s = socket.create_connection(addr)
        s.sendall(b"GET /poll?channel=parked&timeout=60 HTTP/1.1\r\nHost: x\r\n\r\n")
        sent += write_until_stalled(s, junk)
        socks.append(s)
    return socks, f"8 parked polls followed by junk ({sent >> 20} MB taken)"


def sse_replay(addr, pid):
    """30 event streams resuming from 0 on a channel with 100 messages of 32 KiB."""
    data = json.dumps("x" * (32 * 1024))
    for _ in range(4):
        body = json.dumps({"messages": [{"channel": "big", "data": json.loads(data)}] * 25}).encode()
        req = urllib.request.Request(
            f"http://{addr[0]}:{addr[1]}/api/publish",
            data=body,
            headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        )
        urllib.request.urlopen(req, timeout=10).read()
    socks = []
    for _ in range(30):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(addr)
        s.sendall(b"GET /sse?channel=big HTTP/1.1\r\nHost: x\r\nLast-Event-ID: 0\r\n\r\n")
        socks.append(s)
    return socks, "30 event streams replaying 3.2 MB each, reading nothing"


ATTACKS = {"pipeline": pipeline, "parked-poll": parked_poll, "sse-replay": sse_replay}


def main():
    if len(sys.argv) != 3 or sys.argv[2] not in ATTACKS:
        sys.exit(f"usage: {sys.argv[0]} HERALD_BINARY {{{'|'.join(ATTACKS)}}}")
    binary, attack = sys.argv[1], sys.argv[2]
    proc, addr = start(binary, [])
    try:
        time.sleep(0.3)
        before = rss_kib(proc.pid)
        socks, what = ATTACKS[attack](addr, proc.pid)
        peak = settle(proc.pid)
        print(f"{attack}: {what}: server RSS {before} KiB -> peak {peak} KiB (+{(peak - before) / 1024:.1f} MiB)")
        for s in socks:
            s.close()
    finally:
        proc.kill()
        proc.wait()


if __name__ == "__main__":
    main()
