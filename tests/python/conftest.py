"""Starts the real `herald` binary for the Python client tests.

The binary is $HERALD_BIN, else target/release/herald, else target/debug/herald.
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import threading
from pathlib import Path

import pytest

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

    def stderr(self) -> str:
        return b"".join(self._err).decode(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def herald():
    server = HeraldProcess()
    yield server
    alive = server.proc.poll() is None
    server.kill()
    assert alive, f"herald died during the test\n{server.stderr()}"
    assert "panicked at" not in server.stderr(), server.stderr()
