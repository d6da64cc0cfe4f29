"""wss:// with a real Python client: the `websockets` library over the standard `ssl`
module, which verifies Herald's certificate against a CA this test makes with the
`openssl` command line (Debian's openssl; tests/run.sh checks it is there).

Covers: echo and pub/sub over wss, an expired certificate and a wrong host name refused
by the client, TLS 1.0/1.1 refused by the server, TLS 1.2/1.3 with ECDHE + AEAD only.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
from pathlib import Path

import pytest
import websockets

from conftest import HeraldProcess

CA_CONFIG = """
[ca]
default_ca = test_ca
[test_ca]
database = {dir}/index.txt
new_certs_dir = {dir}
serial = {dir}/serial
default_md = sha256
policy = anything
copy_extensions = copy
[anything]
commonName = supplied
"""


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


class Pki:
    """A test CA in `dir`, and leaves it signs for localhost/127.0.0.1."""

    def __init__(self, dir: Path) -> None:
        self.dir = dir
        (dir / "index.txt").write_text("")
        (dir / "serial").write_text("1000\n")
        (dir / "ca.cnf").write_text(CA_CONFIG.format(dir=dir))
        openssl(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=Herald pytest CA",
            cwd=dir,
        )
        self.ca = dir / "ca.pem"

    def leaf(self, name: str, dates: tuple[str, ...]) -> tuple[Path, Path]:
        key, csr, cert = f"{name}.key", f"{name}.csr", f"{name}.pem"
        openssl(
            "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", key, "-out", csr, "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
            cwd=self.dir,
        )
        openssl(
            "ca", "-batch", "-notext", "-config", "ca.cnf", "-cert", "ca.pem", "-keyfile", "ca.key",
            "-in", csr, "-out", cert, *dates,
            cwd=self.dir,
        )
        return self.dir / cert, self.dir / key


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


def tls_herald(cert: Path, key: Path) -> HeraldProcess:
    # The echo test sends 1 MiB: past /echo's default 64 KiB, raised as a conformance run does.
    return HeraldProcess(
        "--tls-cert", str(cert), "--tls-key", str(key), "--echo-max-message-bytes", str(4 << 20)
    )


def client_context(pki: Pki) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki.ca))


@pytest.fixture
def secure_herald(pki: Pki):
    cert, key = pki.leaf("good", ("-days", "2"))
    server = tls_herald(cert, key)
    yield server
    server.finish()


def wss_url(server: HeraldProcess, path: str) -> str:
    port = server.addr.rsplit(":", 1)[1]
    return f"wss://localhost:{port}{path}"


def test_echo_over_wss_verified_by_python_ssl(secure_herald, pki):
    async def run() -> None:
        async with websockets.connect(
            wss_url(secure_herald, "/echo"), ssl=client_context(pki), max_size=None
        ) as ws:
            await ws.send("héllo")
            assert await ws.recv() == "héllo"
            blob = bytes(range(256)) * 4096
            await ws.send(blob)
            assert await ws.recv() == blob
            # A fragmented message from an iterable.
            await ws.send(["a", "b" * 70000, "c"])
            assert await ws.recv() == "a" + "b" * 70000 + "c"
            await ws.close(code=4000, reason="bye")
            assert ws.close_code == 4000

    asyncio.run(asyncio.wait_for(run(), 30))


def test_pubsub_over_wss(secure_herald, pki):
    async def run() -> None:
        ctx = client_context(pki)
        url = wss_url(secure_herald, "/ws")
        async with websockets.connect(url, ssl=ctx) as sub, websockets.connect(url, ssl=ctx) as pub:
            await sub.send(json.dumps({"type": "subscribe", "channel": "news", "id": 1}))
            assert json.loads(await sub.recv())["type"] == "subscribed"
            for i in range(50):
                await pub.send(json.dumps({"type": "publish", "channel": "news", "data": {"i": i}, "id": i}))
                assert json.loads(await pub.recv())["type"] == "ack"
            for i in range(50):
                msg = json.loads(await sub.recv())
                assert msg["type"] == "message" and msg["data"] == {"i": i}, msg

    asyncio.run(asyncio.wait_for(run(), 30))


def test_expired_certificate_is_refused_by_the_client(pki):
    cert, key = pki.leaf("expired", ("-startdate", "20200101000000Z", "-enddate", "20210101000000Z"))
    server = tls_herald(cert, key)
    try:
        async def run() -> None:
            with pytest.raises(ssl.SSLCertVerificationError, match="expired"):
                async with websockets.connect(wss_url(server, "/echo"), ssl=client_context(pki)):
                    pass

        asyncio.run(asyncio.wait_for(run(), 30))
        assert server.proc.poll() is None, server.stderr()
    finally:
        server.kill()


def test_wrong_host_name_is_refused_by_the_client(secure_herald, pki):
    async def run() -> None:
        with pytest.raises(ssl.SSLCertVerificationError, match="mismatch|doesn't match"):
            async with websockets.connect(
                wss_url(secure_herald, "/echo"),
                ssl=client_context(pki),
                server_hostname="herald.example",
            ):
                pass
        # The right name still works afterwards.
        async with websockets.connect(wss_url(secure_herald, "/echo"), ssl=client_context(pki)) as ws:
            await ws.send("ok")
            assert await ws.recv() == "ok"

    asyncio.run(asyncio.wait_for(run(), 30))


def handshake(server: HeraldProcess, pki: Pki, version: ssl.TLSVersion, ciphers: str | None = None):
    ctx = client_context(pki)
    ctx.minimum_version = ctx.maximum_version = version
    if ciphers:
        ctx.set_ciphers(ciphers)

    async def run():
        host, port = server.addr.rsplit(":", 1)
        _, writer = await asyncio.open_connection(host, int(port), ssl=ctx, server_hostname="localhost")
        obj = writer.get_extra_info("ssl_object")
        result = (obj.version(), obj.cipher()[0])
        writer.close()
        return result

    return asyncio.run(asyncio.wait_for(run(), 10))


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_only_tls12_and_tls13_with_ecdhe_aead_suites(secure_herald, pki):
    assert handshake(secure_herald, pki, ssl.TLSVersion.TLSv1_3)[0] == "TLSv1.3"
    version, cipher = handshake(secure_herald, pki, ssl.TLSVersion.TLSv1_2)
    assert version == "TLSv1.2" and cipher.startswith("ECDHE-") and ("GCM" in cipher or "CHACHA20" in cipher)
    # OpenSSL's own default level would refuse these before sending: SECLEVEL=0 makes the
    # client really offer them, so the refusal is the server's.
    for old in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
        with pytest.raises(ssl.SSLError, match="ALERT|alert"):
            handshake(secure_herald, pki, old, "DEFAULT:@SECLEVEL=0")
    # A TLS 1.2 client offering only CBC suites without forward secrecy finds nothing.
    with pytest.raises(ssl.SSLError, match="ALERT|alert"):
        handshake(secure_herald, pki, ssl.TLSVersion.TLSv1_2, "AES128-SHA:AES256-SHA")
