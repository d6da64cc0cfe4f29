"""permessage-deflate with a real third-party client: Python `websockets`, which offers
`permessage-deflate; client_max_window_bits` by default and inflates with the standard
library's zlib, so Herald's compressed frames are checked by an independent decoder.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request

import pytest
from websockets.asyncio.client import connect
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory

from conftest import HeraldProcess

TIMEOUT = 5


@pytest.fixture(params=["shared", "per-connection"])
def compressing(request):
    server = HeraldProcess("--compression", request.param)
    yield server
    server.finish()


def metric(server: HeraldProcess, name: str) -> int:
    with urllib.request.urlopen(f"http://{server.addr}/metrics", timeout=TIMEOUT) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return int(line.split()[1])
    raise AssertionError(f"{name} missing from /metrics")


def quote(i: int) -> dict:
    return {"tick": i, "quotes": [{"symbol": f"SYM{j:02}", "bid": 100 + j + i / 100, "ask": 101 + j} for j in range(20)]}


async def recv_json(ws) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))


def test_broadcasts_reach_a_compressing_and_a_plain_subscriber_alike(compressing):
    async def main():
        async with connect(compressing.url) as deflating, connect(compressing.url, compression=None) as plain:
            assert deflating.response.headers["Sec-WebSocket-Extensions"] == "permessage-deflate"
            assert "Sec-WebSocket-Extensions" not in plain.response.headers
            for ws in (deflating, plain):
                await ws.send(json.dumps({"type": "subscribe", "channel": "ticks", "id": 1}))
                assert (await recv_json(ws))["type"] == "subscribed"
            for i in range(20):
                await deflating.send(json.dumps({"type": "publish", "channel": "ticks", "data": quote(i), "id": 2}))
            got = {id(ws): [] for ws in (deflating, plain)}
            for ws in (deflating, plain):
                while len(got[id(ws)]) < 20:
                    message = await recv_json(ws)
                    if message["type"] == "message":
                        got[id(ws)].append(message)
            assert got[id(deflating)] == got[id(plain)]
            assert [m["data"] for m in got[id(deflating)]] == [quote(i) for i in range(20)]

    asyncio.run(main())
    assert metric(compressing, "herald_compressed_frames_total") == 20
    assert metric(compressing, "herald_compression_saved_bytes_total") > 20 * 300
    assert metric(compressing, "herald_inflate_nanoseconds_total") > 0


@pytest.mark.parametrize(
    "factory, accepted",
    [
        (ClientPerMessageDeflateFactory(server_no_context_takeover=True, client_no_context_takeover=True), True),
        (ClientPerMessageDeflateFactory(server_max_window_bits=9, client_max_window_bits=9), True),
        (ClientPerMessageDeflateFactory(server_max_window_bits=8), False),
    ],
)
def test_echo_with_negotiated_parameters(compressing, factory, accepted):
    async def main():
        async with connect(f"ws://{compressing.addr}/echo", extensions=[factory], compression=None) as ws:
            header = ws.response.headers.get("Sec-WebSocket-Extensions")
            assert (header is not None) == accepted, header
            for i in range(30):
                text = json.dumps(quote(i)) * (1 + i % 5)
                await ws.send(text)
                assert await asyncio.wait_for(ws.recv(), TIMEOUT) == text
            await ws.send(bytes(range(256)) * 250)  # under /echo's default 64 KiB
            assert await asyncio.wait_for(ws.recv(), TIMEOUT) == bytes(range(256)) * 250

    asyncio.run(main())
