#!/usr/bin/env python3
"""Autobahn conformance of Herald's /echo endpoint, driven by kosoku.

Starts `herald serve --listen 127.0.0.1:0 --threads 2` with /echo's limits raised to what
the cases need (ECHO_LIMITS), runs
`kosoku -m fuzzingclient -o OUTDIR ws://127.0.0.1:PORT/echo` and judges the report
(index.json) itself instead of trusting kosoku's exit code:

* suite "core" (groups 1-10, 301 cases; 12.* and 13.* excluded).
* suite "compression" (groups 12 and 13, 216 cases): the server runs with
  `--compression shared` (permessage-deflate is off by default; /echo then compresses
  its replies with its own context, honouring the negotiated takeover and window
  parameters).
* tests/conformance/expected.json (case -> behaviour, written by --update-expected) is
  mandatory, and every case must get exactly the behaviour it names: a case that got
  worse, got better, is missing or is not in the file fails the run (a better one asks
  for the file to be updated, so the baseline never hides a later regression). Only OK
  and INFORMATIONAL are accepted at all: NON-STRICT, UNIMPLEMENTED and FAILED fail, and
  --update-expected refuses to write them into the file.
* The server must run the backend asked for (`--server-arg=--io --server-arg=X`, else
  HERALD_IO, else epoll): it says which on its second stdout line.

With --tls the server speaks TLS only (a CA and a leaf made here with the openssl
command line) and kosoku, which has no wss:// support (its tungstenite is built without
TLS and it refuses the scheme), reaches it through a relay in this script: plain
WebSocket bytes from kosoku in, a verified TLS connection to Herald out, end of stream
passed on in both directions. Every byte Herald reads and writes then goes through its
TLS layer, and the verdicts must match the plain run's.

The last line printed is `N passed, M failed` (cases).
Only the standard library is used; run it with the venv's python so `kosoku` is found
next to it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

# The servers run on the backend HERALD_IO names, else on epoll (the product's default,
# `auto`, is io_uring where it works; tests/run.sh runs these again with HERALD_IO=uring).
os.environ.setdefault("HERALD_IO", "epoll")

ROOT = Path(__file__).resolve().parents[2]
EXPECTED_FILE = Path(__file__).resolve().parent / "expected.json"

# kosoku 0.1.0 case counts (research/reliability.md §2.1).
SUITES = {
    "core": {"args": ["-x", "12.*", "-x", "13.*"], "count": 301, "parallel": 1, "timeout": 900, "server_args": []},
    "compression": {
        "args": ["-i", "12.*", "-i", "13.*"],
        "count": 216,
        "parallel": 2,
        "timeout": 1200,
        "server_args": ["--compression", "shared"],
    },
}
# /echo has the limits of /ws by default (64 KiB messages, 1024 fragments, 100 messages a
# second); the Autobahn cases need more: 16 MiB messages (9.1.6, 9.2.6), 65,536 fragments
# (9.3.1, 9.4.1) and 1,000 messages back to back (9.7, 9.8, 12, 13).
ECHO_LIMITS = [
    "--echo-max-message-bytes", str(16 * 1024 * 1024),
    "--echo-max-fragments", "65536",
    "--echo-max-messages-per-second", "1000000",
]
# What a case may get at all; the expected file then names the one it must get.
PASSING = {"OK", "INFORMATIONAL"}
# Lower is better; only used to say whether a change is a regression or an improvement.
RANK = {"OK": 0, "INFORMATIONAL": 0, "NON-STRICT": 1, "UNIMPLEMENTED": 2, "FAILED": 3, "MISSING": 4}


def log(msg: str) -> None:
    print(msg, flush=True)


def case_key(case: str) -> tuple[int, ...]:
    return tuple(int(p) for p in case.split(".") if p.isdigit())


class Server:
    """`herald serve` on a free port; stderr goes to a log file."""

    def __init__(self, binary: Path, extra: list[str], logfile: Path) -> None:
        self.logfile = logfile
        self.log_fh = open(logfile, "wb")
        cmd = [str(binary), "serve", "--listen", "127.0.0.1:0", "--threads", "2", *extra]
        log(f"+ {' '.join(cmd)}")
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.log_fh
        )
        lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            assert self.proc.stdout is not None
            for raw in self.proc.stdout:
                lines.put(raw.decode(errors="replace").rstrip("\n"))
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        try:
            line = lines.get(timeout=20)
        except queue.Empty:
            line = None
        m = re.fullmatch(r"listening on (127\.0\.0\.1:(\d+))", line or "")
        if not m:
            self.kill()
            raise SystemExit(
                f"herald did not print `listening on 127.0.0.1:PORT` (got {line!r})\n"
                f"--- stderr ---\n{self.stderr()}"
            )
        self.addr = m.group(1)
        want = requested_backend(extra)
        try:
            line = lines.get(timeout=20)
        except queue.Empty:
            line = None
        if line != f"io backend {want}":
            self.kill()
            raise SystemExit(
                f"herald should run the {want} backend; its second stdout line is {line!r}\n"
                f"--- stderr ---\n{self.stderr()}"
            )
        log(f"herald {self.addr}, io backend {want}")

    def stderr(self) -> str:
        self.log_fh.flush()
        return self.logfile.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int | None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log_fh.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def requested_backend(args: list[str]) -> str:
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


def make_certificate(dir: Path) -> tuple[Path, Path, Path]:
    """A CA and a leaf for localhost it signed: (ca.pem, cert.pem, key.pem)."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=dir, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=Herald conformance CA")
    openssl("req", "-new", *ec, "-keyout", "key.pem", "-out", "leaf.csr", "-subj", "/CN=localhost")
    (dir / "leaf.ext").write_text("subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n")
    openssl("x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", "leaf.ext", "-out", "cert.pem")
    return dir / "ca.pem", dir / "cert.pem", dir / "key.pem"


class TlsRelay:
    """Plain TCP on 127.0.0.1:PORT in, TLS (verified against `ca`) to `upstream` out."""

    def __init__(self, upstream: str, ca: Path) -> None:
        self.upstream_host, port = upstream.rsplit(":", 1)
        self.upstream_port = int(port)
        self.context = ssl.create_default_context(cafile=str(ca))
        self.loop = asyncio.new_event_loop()
        ready: queue.Queue[int] = queue.Queue()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        self.port = ready.get(timeout=10)

    def _run(self, ready: "queue.Queue[int]") -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        ready.put(server.sockets[0].getsockname()[1])
        self.loop.run_forever()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            herald_r, herald_w = await asyncio.open_connection(
                self.upstream_host, self.upstream_port, ssl=self.context, server_hostname="localhost"
            )
        except OSError as e:
            log(f"relay: cannot reach herald over TLS: {e}")
            client_w.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, half_close: bool) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
                # TLS has no half-close here: the end towards Herald closes the session.
                if half_close and dst.can_write_eof():
                    dst.write_eof()
                else:
                    dst.close()
            except (OSError, ssl.SSLError):
                dst.close()

        await asyncio.gather(pipe(client_r, herald_w, False), pipe(herald_r, client_w, True))
        client_w.close()
        herald_w.close()


def find_kosoku(explicit: str | None) -> str:
    if explicit:
        return explicit
    beside = Path(sys.executable).parent / "kosoku"
    if beside.exists():
        return str(beside)
    found = shutil.which("kosoku")
    if not found:
        raise SystemExit("kosoku not found: pip install kosoku (tests/run.sh does this in .venv)")
    return found


def run_suite(
    name: str, binary: Path, kosoku: str, outroot: Path, extra: list[str], tls: bool = False
) -> tuple[dict, list[str]]:
    """Runs one suite; returns ({case: entry}, [problems not tied to a case])."""
    spec = SUITES[name]
    outdir = outroot / name
    shutil.rmtree(outdir, ignore_errors=True)
    outdir.mkdir(parents=True)
    problems: list[str] = []
    if tls:
        # Beside the reports, not in /tmp: each run makes it again over the last one's.
        certdir = outroot / f"tls-{name}"
        certdir.mkdir(parents=True, exist_ok=True)
        ca, cert, key = make_certificate(certdir)
        extra = [*extra, "--tls-cert", str(cert), "--tls-key", str(key)]
    server = Server(binary, [*ECHO_LIMITS, *spec["server_args"], *extra], outroot / f"herald-{name}.log")
    url = f"ws://{server.addr}/echo"
    if tls:
        relay = TlsRelay(server.addr, ca)
        url = f"ws://127.0.0.1:{relay.port}/echo"
        log(f"kosoku -> relay 127.0.0.1:{relay.port} -> TLS -> herald {server.addr}")
    cmd = [kosoku, "-m", "fuzzingclient", "-p", str(spec["parallel"]), *spec["args"], "-o", str(outdir), url]
    log(f"+ {' '.join(cmd)}")
    started = time.monotonic()
    kosoku_log = outroot / f"kosoku-{name}.log"
    try:
        with open(kosoku_log, "wb") as fh:
            res = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=spec["timeout"])
        log(f"kosoku exited {res.returncode} after {time.monotonic() - started:.1f} s (log: {kosoku_log})")
    except subprocess.TimeoutExpired:
        problems.append(f"kosoku did not finish within {spec['timeout']} s")
    if not server.alive():
        problems.append(f"herald died during the {name} suite (exit {server.proc.returncode})")
    err = server.stderr()
    if "panicked at" in err:
        problems.append(f"herald panicked during the {name} suite (see {server.logfile})")
    code = server.stop()
    if code not in (0, None) and not problems:
        problems.append(f"herald exited {code} on SIGTERM after the {name} suite")
    index = outdir / "index.json"
    if not index.exists():
        problems.append(f"no report at {index}")
        tail = kosoku_log.read_text(errors="replace")[-3000:] if kosoku_log.exists() else ""
        log(f"--- kosoku output (tail) ---\n{tail}")
        return {}, problems
    data = json.loads(index.read_text())
    cases: dict = {}
    for agent_cases in data.values():
        cases.update(agent_cases)
    for case, entry in cases.items():
        rf = entry.get("reportfile")
        if entry.get("behavior") != "OK" and rf and (outdir / rf).exists():
            detail = json.loads((outdir / rf).read_text())
            entry["result"] = detail.get("result")
            entry["description"] = detail.get("description")
    return cases, problems


def judge(name: str, cases: dict, expected: dict) -> tuple[int, int, list[str]]:
    """Returns (passed, failed, lines to print). `expected` is empty when updating it."""
    out: list[str] = []
    all_ids = set(cases) | set(expected)
    passed = failed = 0
    bad: list[str] = []
    improved: list[str] = []
    behaviours: Counter = Counter()
    per_group: dict[str, Counter] = defaultdict(Counter)
    for case in sorted(all_ids, key=case_key):
        entry = cases.get(case)
        got = entry["behavior"] if entry else "MISSING"
        behaviours[got] += 1
        per_group[case.split(".")[0]][got] += 1
        want = expected.get(case)
        why = None
        if got not in PASSING:
            why = "not acceptable"
        elif expected and want is None:
            why = "not in the expected-results file"
        elif want is not None and got != want:
            if RANK.get(got, 9) < RANK.get(want, 9):
                improved.append(f"{case}: {want} -> {got}")
                why = f"better than expected {want}: update the expected file"
            else:
                why = f"expected {want}"
        if why:
            failed += 1
            e = entry or {}
            bad.append(
                f"  {case}: {got} ({why}); close={e.get('behaviorClose')} "
                f"remoteCloseCode={e.get('remoteCloseCode')} — {e.get('result') or ''} "
                f"[{(e.get('description') or '')[:100]}]"
            )
        else:
            passed += 1
    if len(cases) != SUITES[name]["count"]:
        failed += 1
        bad.append(f"  {len(cases)} cases reported, expected {SUITES[name]['count']} (some are missing)")
    out.append(f"== {name}: {len(cases)} cases reported ==")
    out.append("  by behaviour: " + ", ".join(f"{b} {n}" for b, n in sorted(behaviours.items())))
    for g in sorted(per_group, key=int):
        out.append(f"  group {g:>2}: " + ", ".join(f"{b} {n}" for b, n in sorted(per_group[g].items())))
    non_ok = [
        f"{c}={cases[c]['behavior']}"
        for c in sorted(cases, key=case_key)
        if cases[c]["behavior"] not in ("OK", "UNIMPLEMENTED")
    ]
    if non_ok:
        out.append("  not OK: " + " ".join(non_ok))
    if improved:
        out.append("  improved (update the expected file with --update-expected): " + ", ".join(improved))
    if bad:
        out.append("  FAILING:")
        out.extend(bad)
    return passed, failed, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", type=Path, default=ROOT / "target" / "release" / "herald")
    ap.add_argument("--suite", choices=["core", "compression", "all"], default="all")
    ap.add_argument("--outdir", type=Path, default=ROOT / "target" / "conformance")
    ap.add_argument("--kosoku", default=None, help="kosoku executable (default: next to this python)")
    ap.add_argument("--expected", type=Path, default=EXPECTED_FILE)
    ap.add_argument("--update-expected", action="store_true", help="write the expected file from an all-green run")
    ap.add_argument("--server-arg", action="append", default=[], help="extra argument for herald serve")
    ap.add_argument("--tls", action="store_true", help="herald serves TLS; kosoku goes through a TLS relay")
    args = ap.parse_args()

    suites = ["core", "compression"] if args.suite == "all" else [args.suite]
    expected_all: dict = {}
    if not args.update_expected:
        # The baseline is what makes a green run mean something: without it, fail.
        if not args.expected.exists():
            log(f"FAILED: the expected-results file {args.expected} is missing; restore it "
                "from git, or write one from an all-green run with --update-expected")
            return 1
        expected_all = json.loads(args.expected.read_text())
        lacking = [name for name in suites if not expected_all.get(name)]
        if lacking:
            log(f"FAILED: {args.expected} has no results for suite(s) {', '.join(lacking)}; "
                "write them from an all-green run with --update-expected")
            return 1

    if not args.bin.exists():
        log(f"{args.bin} missing: cargo build --release")
        subprocess.run(["cargo", "build", "--release", "--bin", "herald"], cwd=ROOT, check=True)
    kosoku = find_kosoku(args.kosoku)
    if args.tls:
        args.outdir = args.outdir / "tls"
    args.outdir.mkdir(parents=True, exist_ok=True)

    total_pass = total_fail = 0
    results: dict[str, dict] = {}
    reports: list[str] = []
    for name in suites:
        cases, problems = run_suite(name, args.bin, kosoku, args.outdir, args.server_arg, args.tls)
        results[name] = {c: e["behavior"] for c, e in cases.items()}
        p, f, lines = judge(name, cases, expected_all.get(name, {}))
        for prob in problems:
            lines.append(f"  PROBLEM: {prob}")
            f += 1
        total_pass += p
        total_fail += f
        reports.extend(lines)
        for line in lines:
            log(line)

    if args.update_expected:
        if total_fail:
            log("not writing the expected file: the run is not all green")
        else:
            merged = json.loads(args.expected.read_text()) if args.expected.exists() else {}
            for name, cases in results.items():
                merged[name] = dict(sorted(cases.items(), key=lambda kv: case_key(kv[0])))
            args.expected.write_text(json.dumps(merged, indent=1) + "\n")
            log(f"wrote {args.expected}")

    log(f"reports: {args.outdir}")
    log(f"{total_pass} passed, {total_fail} failed")
    return 1 if total_fail else 0


if __name__ == "__main__":
    sys.exit(main())
