"""Herald's /ws pub/sub protocol from a real third-party client: Python `websockets`
(asyncio API). Each test runs its own event loop with asyncio.run, so no pytest plugin
is needed.
"""

from __future__ import annotations

import asyncio
import json

from websockets.asyncio.client import connect

from conftest import HeraldProcess

TIMEOUT = 5


async def send(ws, obj) -> None:
    await ws.send(json.dumps(obj))


async def recv(ws) -> dict:
    raw = await asyncio.wait_for(ws.recv(), TIMEOUT)
    assert isinstance(raw, str), f"expected a text frame, got {raw!r}"
    return json.loads(raw)


async def subscribe(ws, channel: str, id_: int) -> dict:
    await send(ws, {"type": "subscribe", "channel": channel, "id": id_})
    reply = await recv(ws)
    assert reply["type"] == "subscribed", reply
    assert reply["channel"] == channel and reply["id"] == id_, reply
    return reply


async def publish(ws, channel: str, data, id_: int) -> int:
    await send(ws, {"type": "publish", "channel": channel, "data": data, "id": id_})
    reply = await recv(ws)
    assert reply["type"] == "ack" and reply["id"] == id_, reply
    return reply["seq"]


def test_publish_on_one_connection_reaches_subscriber_on_another(herald):
    async def main():
        async with connect(herald.url) as sub, connect(herald.url) as pub:
            assert (await subscribe(sub, "py-news", 1))["seq"] == 0
            seq = await publish(pub, "py-news", {"text": "hello", "n": [1, 2]}, 2)
            assert seq == 1
            msg = await recv(sub)
            assert msg == {"type": "message", "channel": "py-news", "seq": 1, "data": {"text": "hello", "n": [1, 2]}}

    asyncio.run(main())


def test_messages_arrive_in_seq_order_without_gaps(herald):
    async def main():
        async with connect(herald.url) as sub1, connect(herald.url) as sub2, connect(herald.url) as pub:
            await subscribe(sub1, "py-order", 1)
            await subscribe(sub2, "py-order", 1)
            acked = [await publish(pub, "py-order", i, 100 + i) for i in range(50)]
            assert acked == list(range(1, 51))
            for sub in (sub1, sub2):
                got = [await recv(sub) for _ in range(50)]
                assert [m["seq"] for m in got] == list(range(1, 51))
                assert [m["data"] for m in got] == list(range(50))
            # A late subscriber learns the latest seq.
            async with connect(herald.url) as late:
                assert (await subscribe(late, "py-order", 9))["seq"] == 50

    asyncio.run(main())


def test_error_replies_keep_the_connection_open(herald):
    async def main():
        async with connect(herald.url) as ws:
            await ws.send('{"type": "subscribe", "channel": ')
            err = await recv(ws)
            assert err["type"] == "error" and err["code"] == "bad_request", err
            assert isinstance(err["message"], str)

            await send(ws, {"type": "no-such-type", "id": 4})
            err = await recv(ws)
            assert err["type"] == "error" and err["code"] == "unknown_type", err
            assert err.get("id") == 4, err

            # Still usable.
            await send(ws, {"type": "ping"})
            assert (await recv(ws))["type"] == "pong"

    asyncio.run(main())


def test_json_ping_and_websocket_ping_are_answered(herald):
    async def main():
        async with connect(herald.url) as ws:
            for _ in range(3):
                await send(ws, {"type": "ping"})
                assert await recv(ws) == {"type": "pong"}
            # WebSocket-level ping: the library waits for the matching pong frame.
            pong_waiter = await ws.ping(b"py")
            latency = await asyncio.wait_for(pong_waiter, TIMEOUT)
            assert latency >= 0

    asyncio.run(main())


def test_a_client_answering_server_pings_stays_connected_past_the_pong_timeout():
    # websockets answers pings from its background reader: over ten intervals and four
    # pong timeouts, the connection stays open and keeps working.
    server = HeraldProcess("--ping-interval-ms", "200", "--pong-timeout-ms", "500")

    async def main():
        async with connect(server.url, ping_interval=None) as ws:
            await subscribe(ws, "heartbeat", 1)
            await asyncio.sleep(2.0)
            assert ws.state.name == "OPEN", ws.close_code
            await send(ws, {"type": "ping"})
            assert await recv(ws) == {"type": "pong"}

    try:
        asyncio.run(main())
    finally:
        server.finish()


def test_binary_message_is_refused_with_close_1003(herald):
    async def main():
        async with connect(herald.url) as ws:
            await ws.send(b"\x00\x01")
            await asyncio.wait_for(ws.wait_closed(), TIMEOUT)
            assert ws.close_code == 1003, (ws.close_code, ws.close_reason)

    asyncio.run(main())


def test_echo_endpoint_round_trips_text_and_bytes(herald):
    async def main():
        async with connect(f"ws://{herald.addr}/echo", max_size=None) as ws:
            await ws.send("grüße")
            assert await asyncio.wait_for(ws.recv(), TIMEOUT) == "grüße"
            blob = bytes(range(256)) * 250  # under /echo's default 64 KiB
            await ws.send(blob)
            assert await asyncio.wait_for(ws.recv(), TIMEOUT) == blob

    asyncio.run(main())
