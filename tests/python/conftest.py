"""Starts the real `herald` binary for the Python client tests.

The binary is $HERALD_BIN, else target/release/herald, else target/debug/herald. Each
server must run the backend asked for (`--io`, else HERALD_IO, else epoll) and, when the
test lets go of it (`finish`), still be whole: alive, no panic logged, answering.
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

# The servers run on the backend HERALD_IO names, else on epoll (the product's default,
# `auto`, is io_uring where it works; tests/run.sh runs these again with HERALD_IO=uring).
os.environ.setdefault("HERALD_IO", "epoll")

ROOT = Path(__file__).resolve().parents[2]


def herald_binary() -> Path:
    if os.environ.get("HERALD_BIN"):
        return Path(os.environ["HERALD_BIN"])
    for profile in ("release", "debug"):
        candidate = ROOT / "target" / profile / "herald"
        if candidate.exists():
            return candidate
    pytest.fail("no herald binary: run `cargo build --release` or set HERALD_BIN")


class HeraldProcess:
    def __init__(self, *extra: str) -> None:
        cmd = [str(herald_binary()), "serve", "--listen", "127.0.0.1:0", "--threads", "2", *extra]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self._err: list[bytes] = []
        lines: queue.Queue[str | None] = queue.Queue()

        def pump_out() -> None:
            assert self.proc.stdout is not None
            for raw in self.proc.stdout:
                lines.put(raw.decode(errors="replace").rstrip("\n"))
            lines.put(None)

        def pump_err() -> None:
            assert self.proc.stderr is not None
            for raw in self.proc.stderr:
                self._err.append(raw)

        threading.Thread(target=pump_out, daemon=True).start()
        threading.Thread(target=pump_err, daemon=True).start()
        try:
            line = lines.get(timeout=20)
        except queue.Empty:
            line = None
        m = re.fullmatch(r"listening on (127\.0\.0\.1:\d+)", line or "")
        if not m:
            self.kill()
            pytest.fail(f"herald printed {line!r}, not `listening on 127.0.0.1:PORT`\n{self.stderr()}")
        self.addr = m.group(1)
        self.url = f"ws://{self.addr}/ws"
        self.tls = "--tls-cert" in extra
        self.backend = requested_backend(extra)
        try:
            line = lines.get(timeout=20)
        except queue.Empty:
            line = None
        if line != f"io backend {self.backend}":
            self.kill()
            pytest.fail(f"herald should run the {self.backend} backend; it printed {line!r}\n{self.stderr()}")

    def stderr(self) -> str:
        return b"".join(self._err).decode(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def finish(self) -> None:
        """The end-of-test check, then SIGKILL: still running (a panic aborts the whole
        process), no panic logged, and, without TLS, `/healthz` answered on fresh
        connections (any shard may take each) and `/metrics` naming the backend."""
        try:
            assert self.proc.poll() is None, f"herald died during the test\n{self.stderr()}"
            assert "panicked at" not in self.stderr(), self.stderr()
            if not self.tls:
                for _ in range(8):
                    status, _ = http_get(f"http://{self.addr}/healthz")
                    assert status in (200, 503), f"/healthz answered {status}\n{self.stderr()}"
                status, body = http_get(f"http://{self.addr}/metrics")
                want = f'herald_io_backend{{backend="{self.backend}"}} 1'
                assert status == 200 and want in body.splitlines(), f"/metrics lacks {want!r}:\n{body}"
        finally:
            self.kill()


def requested_backend(args: tuple[str, ...]) -> str:
    """The backend `herald serve ARGS` must run: `--io`, else HERALD_IO (epoll unless set)."""
    chosen = os.environ["HERALD_IO"]
    for i, arg in enumerate(args):
        if arg == "--io" and i + 1 < len(args):
            chosen = args[i + 1]
        elif arg.startswith("--io="):
            chosen = arg.split("=", 1)[1]
    if chosen not in ("epoll", "uring"):
        raise ValueError(f"the tests check the backend they run on: name epoll or uring, not {chosen!r}")
    return chosen


def http_get(url: str) -> tuple[int, str]:
    """Status and body of a plain GET (5 s limit); error statuses are answers too."""
    # No proxy from the environment: the server is on 127.0.0.1.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=5) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


@pytest.fixture
def herald():
    server = HeraldProcess()
    yield server
    server.finish()
