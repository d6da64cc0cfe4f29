"""Herald's HTTP side from real third-party clients: `curl` (run as a subprocess) for
`POST /api/publish`, `/poll`, `/sse`, `/metrics` and `/healthz`, together with the Python
`websockets` client on `/ws`. Every subprocess and every receive has a timeout.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time

import pytest
from conftest import HeraldProcess
from websockets.asyncio.client import connect

TIMEOUT = 5
KEY = "py-key"


@pytest.fixture
def herald_api():
    """Herald with HTTP publishing on (`--api-key`) and a short SSE heartbeat."""
    server = HeraldProcess("--api-key", KEY, "--ping-interval-ms", "300")
    yield server
    server.finish()


def curl(*args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """Runs curl; `-sS` quiet but with errors; never longer than `timeout`."""
    return subprocess.run(
        ["curl", "-sS", "--max-time", str(timeout), *args],
        capture_output=True,
        text=True,
        timeout=timeout + 5,
    )


def curl_json(*args: str, timeout: float = TIMEOUT) -> tuple[int, dict]:
    """Runs curl and returns (HTTP status, JSON body)."""
    done = curl("-w", "\n%{http_code}", *args, timeout=timeout)
    assert done.returncode == 0, done.stderr
    body, _, status = done.stdout.rpartition("\n")
    return int(status), json.loads(body)


def publish(server: HeraldProcess, body: dict | str, key: str | None = KEY) -> tuple[int, dict]:
    data = body if isinstance(body, str) else json.dumps(body)
    auth = ["-H", f"Authorization: Bearer {key}"] if key else []
    return curl_json(
        "-X", "POST", *auth, "-H", "Content-Type: application/json",
        "--data-binary", data, f"http://{server.addr}/api/publish",
    )


async def recv(ws) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))


async def subscribe(ws, channel: str, id_: int = 1) -> dict:
    await ws.send(json.dumps({"type": "subscribe", "channel": channel, "id": id_}))
    reply = await recv(ws)
    assert reply["type"] == "subscribed" and reply["channel"] == channel, reply
    return reply


def test_curl_publish_reaches_a_websockets_subscriber(herald_api):
    async def main():
        async with connect(herald_api.url) as sub1, connect(herald_api.url) as sub2:
            await subscribe(sub1, "py-http")
            await subscribe(sub2, "py-http")
            status, receipt = await asyncio.to_thread(
                publish, herald_api, {"channel": "py-http", "data": {"text": "from curl", "n": [1, 2]}}
            )
            assert status == 200, receipt
            assert receipt == {"seq": 1, "subscribers": 2}
            for ws in (sub1, sub2):
                assert await recv(ws) == {
                    "type": "message", "channel": "py-http", "seq": 1,
                    "data": {"text": "from curl", "n": [1, 2]},
                }
            # A batch, in order.
            status, receipt = await asyncio.to_thread(
                publish, herald_api,
                {"messages": [{"channel": "py-http", "data": 2}, {"channel": "py-other", "data": 3}]},
            )
            assert status == 200, receipt
            assert receipt == {"results": [{"seq": 2, "subscribers": 2}, {"seq": 1, "subscribers": 0}]}
            assert (await recv(sub1))["data"] == 2

    asyncio.run(main())


def test_curl_publish_errors_are_json_with_the_right_status(herald_api):
    base = f"http://{herald_api.addr}/api/publish"
    # No key: 401 with WWW-Authenticate.
    done = curl("-i", "-X", "POST", "--data-binary", '{"channel":"a","data":1}', base)
    head, _, body = done.stdout.partition("\n\n")  # text mode: CRLF read as LF
    assert head.startswith("HTTP/1.1 401"), done.stdout
    assert "www-authenticate: bearer" in head.lower(), head
    assert json.loads(body)["code"] == "unauthorized"
    assert publish(herald_api, {"channel": "a", "data": 1}, key="wrong")[0] == 401
    # Malformed and bad channel: 400.
    status, err = publish(herald_api, "{not json")
    assert (status, err["code"]) == (400, "bad_request"), err
    status, err = publish(herald_api, {"channel": "has space", "data": 1})
    assert (status, err["code"]) == (400, "bad_channel"), err
    assert isinstance(err["message"], str) and err["message"]
    # Over the 1 MiB default body limit: 413.
    big = json.dumps({"channel": "a", "data": "x" * (1024 * 1024)})
    status, err = _post_stdin(base, big)
    assert (status, err["code"]) == (413, "too_large"), err


def _post_stdin(url: str, body: str) -> tuple[int, dict]:
    done = subprocess.run(
        ["curl", "-sS", "--max-time", str(TIMEOUT), "-w", "\n%{http_code}", "-X", "POST",
         "-H", f"Authorization: Bearer {KEY}", "--data-binary", "@-", url],
        input=body, capture_output=True, text=True, timeout=TIMEOUT + 5,
    )
    text, _, status = done.stdout.rpartition("\n")
    return int(status), json.loads(text)


def test_curl_reuses_one_keep_alive_connection(herald_api):
    base = f"http://{herald_api.addr}"
    done = curl(
        "-v", "-H", f"Authorization: Bearer {KEY}", "--data-binary", '{"channel":"ka","data":1}',
        f"{base}/api/publish", "--next", f"{base}/healthz", f"{base}/poll?channel=ka&since=0&timeout=2",
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("Connected to") == 1, done.stderr
    assert "Re-using existing connection" in done.stderr or "Reusing existing" in done.stderr, done.stderr
    bodies = done.stdout
    assert '{"seq":1,"subscribers":0}' in bodies
    assert '{"status":"ok"}' in bodies
    assert '"messages":[{"type":"message","channel":"ka","seq":1,"data":1}]' in bodies


def test_curl_long_poll_from_history_on_message_and_on_timeout(herald_api):
    async def main():
        async with connect(herald_api.url) as ws:
            epoch = (await subscribe(ws, "py-poll"))["epoch"]
            for i in range(3):
                await ws.send(json.dumps({"type": "publish", "channel": "py-poll", "data": {"i": i}, "id": i}))
                assert (await recv(ws))["type"] in ("ack", "message")
            base = f"http://{herald_api.addr}/poll?channel=py-poll"
            # From history: at once, i.e. well before the poll's 20 s (a busy machine may
            # take seconds; how fast is for the benchmarks).
            started = time.monotonic()
            status, body = await asyncio.to_thread(curl_json, f"{base}&since=1&timeout=20&epoch={epoch}")
            assert time.monotonic() - started < 10
            assert status == 200
            assert body["epoch"] == epoch and body["seq"] == 3
            assert [m["seq"] for m in body["messages"]] == [2, 3]
            assert body["messages"][0] == {"type": "message", "channel": "py-poll", "seq": 2, "data": {"i": 1}}
            # Parked, then answered by a publish from the WebSocket client.
            waiting = asyncio.create_task(asyncio.to_thread(curl_json, f"{base}&since=3&timeout=20", timeout=15))
            await asyncio.sleep(0.5)
            assert not waiting.done(), "a caught-up poll must wait"
            await ws.send(json.dumps({"type": "publish", "channel": "py-poll", "data": "wake", "id": 9}))
            status, body = await asyncio.wait_for(waiting, TIMEOUT)
            assert status == 200
            assert body["messages"] == [{"type": "message", "channel": "py-poll", "seq": 4, "data": "wake"}]
            # Nothing new: empty after the timeout.
            started = time.monotonic()
            status, body = await asyncio.to_thread(curl_json, f"{base}&since=4&timeout=1")
            took = time.monotonic() - started
            assert 0.9 <= took < 10, took
            assert (status, body["messages"], body["seq"]) == (200, [], 4)
            # Another epoch: an explicit gap, never a silent empty answer.
            status, body = await asyncio.to_thread(curl_json, f"{base}&since=1&timeout=1&epoch=elsewhere")
            assert status == 200 and "history_gap" in body, body

    asyncio.run(main())


def read_sse_events(proc: subprocess.Popen, count: int, limit: float = TIMEOUT) -> list[dict]:
    """Reads `count` events (comments skipped) from a `curl -N` process's stdout."""
    events: list[dict] = []
    current: dict = {}
    deadline = time.monotonic() + limit
    assert proc.stdout is not None
    while len(events) < count:
        assert time.monotonic() < deadline, f"only {events} within {limit}s"
        line = proc.stdout.readline()
        assert line, f"stream ended after {events}"
        line = line.rstrip("\n")
        if line == "":
            if current:
                events.append(current)
            current = {}
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            current[field] = current[field] + "\n" + value if field in current else value
    return events


def test_curl_sse_resumes_with_last_event_id_and_streams_live(herald_api):
    for i in range(1, 4):
        assert publish(herald_api, {"channel": "py-sse", "data": {"i": i}})[0] == 200
    proc = subprocess.Popen(
        ["curl", "-sS", "-N", "--max-time", "15", "-H", "Last-Event-ID: 1",
         f"http://{herald_api.addr}/sse?channel=py-sse"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        # curl's readline blocks; a reader thread with a deadline keeps it bounded.
        async def main():
            events = await asyncio.wait_for(asyncio.to_thread(read_sse_events, proc, 3), TIMEOUT)
            assert events[0]["event"] == "subscribed"
            assert json.loads(events[0]["data"])["seq"] == 3
            assert [e["id"] for e in events[1:]] == ["2", "3"]
            assert json.loads(events[1]["data"]) == {"type": "message", "channel": "py-sse", "seq": 2, "data": {"i": 2}}
            # Live, published by a websockets client.
            async with connect(herald_api.url) as ws:
                await ws.send(json.dumps({"type": "publish", "channel": "py-sse", "data": "live", "id": 1}))
                assert (await recv(ws))["seq"] == 4
            events = await asyncio.wait_for(asyncio.to_thread(read_sse_events, proc, 1), TIMEOUT)
            assert events[0]["id"] == "4" and events[0]["event"] == "message"
            assert json.loads(events[0]["data"])["data"] == "live"

        asyncio.run(main())
    finally:
        proc.kill()
        proc.wait(timeout=5)


def test_curl_sse_heartbeat_and_metrics_and_health(herald_api):
    # Heartbeat comments arrive on an idle stream (ping interval 300 ms).
    done = curl("-N", f"http://{herald_api.addr}/sse?channel=py-idle", timeout=1.5)
    assert done.returncode == 28, done  # curl: stopped by --max-time, as intended
    assert done.stdout.startswith("event: subscribed\n"), done.stdout
    assert done.stdout.count(": ping\n\n") >= 2, done.stdout
    # HEAD /healthz: 200, no body.
    done = curl("-I", f"http://{herald_api.addr}/healthz")
    assert done.stdout.startswith("HTTP/1.1 200"), done.stdout
    # /metrics: Prometheus text with the publish counter moving.
    def published() -> float:
        text = curl(f"http://{herald_api.addr}/metrics").stdout
        line = next(l for l in text.splitlines() if l.startswith("herald_publishes_total "))
        return float(line.split()[1])

    before = published()
    assert publish(herald_api, {"channel": "py-metrics", "data": 1})[0] == 200
    deadline = time.monotonic() + TIMEOUT
    while published() < before + 1:
        assert time.monotonic() < deadline, "herald_publishes_total did not move"
        time.sleep(0.05)
