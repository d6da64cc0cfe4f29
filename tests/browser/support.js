// Helpers for the browser tests: start the real herald binary, a TCP proxy that can cut
// a page's connection server-side, and Debian's Chromium through playwright-core.
"use strict";

const { spawn } = require("node:child_process");
const fs = require("node:fs");
const net = require("node:net");
const os = require("node:os");
const path = require("node:path");

const ROOT = path.resolve(__dirname, "..", "..");
const ASSETS = path.join(ROOT, "src", "http", "assets");
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";

function heraldBinary() {
  if (process.env.HERALD_BIN) return process.env.HERALD_BIN;
  for (const profile of ["release", "debug"]) {
    const candidate = path.join(ROOT, "target", profile, "herald");
    if (fs.existsSync(candidate)) return candidate;
  }
  throw new Error("no herald binary: run `cargo build --release` or set HERALD_BIN");
}

// The servers run on the backend HERALD_IO names, else on epoll (the product's default,
// `auto`, is io_uring where it works).
process.env.HERALD_IO = process.env.HERALD_IO || "epoll";

/** The backend `herald serve ARGS` must run: `--io`, else HERALD_IO. */
function requestedBackend(args) {
  let chosen = process.env.HERALD_IO;
  args.forEach((arg, i) => {
    if (arg === "--io" && i + 1 < args.length) chosen = args[i + 1];
    else if (arg.startsWith("--io=")) chosen = arg.slice("--io=".length);
  });
  if (chosen !== "epoll" && chosen !== "uring") {
    throw new Error(`the tests check the backend they run on: name epoll or uring, not ${chosen}`);
  }
  return chosen;
}

/**
 * Starts `herald serve --listen 127.0.0.1:0`; resolves once it prints its address and the
 * backend it runs, which must be the one asked for.
 */
function startHerald(extraArgs = [], { timeoutMs = 20000 } = {}) {
  const bin = heraldBinary();
  const args = ["serve", "--listen", "127.0.0.1:0", "--threads", "2", ...extraArgs];
  const backend = requestedBackend(args);
  const proc = spawn(bin, args, { stdio: ["ignore", "pipe", "pipe"] });
  let stderr = "";
  proc.stderr.on("data", (d) => {
    stderr += d;
    if (stderr.length > 200000) stderr = stderr.slice(-100000);
  });
  return new Promise((resolve, reject) => {
    let out = "";
    const timer = setTimeout(() => {
      proc.kill("SIGKILL");
      reject(new Error(`herald did not print its address within ${timeoutMs} ms\n${stderr}`));
    }, timeoutMs);
    proc.on("exit", (code, signal) => {
      clearTimeout(timer);
      reject(new Error(`herald exited early (code ${code}, signal ${signal})\n${stderr}`));
    });
    proc.stdout.on("data", (d) => {
      out += d;
      const m = /listening on (127\.0\.0\.1:(\d+))\nio backend (\S+)\n/.exec(out);
      if (m && m[3] !== backend) {
        clearTimeout(timer);
        proc.removeAllListeners("exit");
        proc.kill("SIGKILL");
        reject(new Error(`herald runs the ${m[3]} backend, not ${backend}\n${stderr}`));
      } else if (m) {
        clearTimeout(timer);
        proc.removeAllListeners("exit");
        const info = { exited: null };
        proc.on("exit", (code, signal) => {
          info.exited = { code, signal };
        });
        resolve({
          /** { code, signal } once the process has exited, else null. */
          exited: () => info.exited,
          proc,
          addr: m[1],
          port: Number(m[2]),
          url: `http://${m[1]}`,
          stderr: () => stderr,
          stop() {
            return new Promise((done) => {
              if (proc.exitCode !== null || proc.signalCode !== null) return done();
              const kill = setTimeout(() => proc.kill("SIGKILL"), 5000);
              proc.once("exit", () => {
                clearTimeout(kill);
                done();
              });
              proc.kill("SIGTERM");
            });
          },
        });
      }
    });
  });
}

/**
 * A TCP proxy in front of herald. `cut()` destroys every proxied connection (to the page
 * it looks like the server dropped it); `block()` also refuses new ones until `unblock()`.
 * With HERALD_BROWSER_ASSETS=disk it answers GET / and GET /herald.js from
 * src/http/assets instead (for editing the page without a rebuild; never in CI).
 */
class CutProxy {
  constructor(upstreamPort) {
    this.upstreamPort = upstreamPort;
    this.sockets = new Set();
    this.blocked = false;
    this.accepted = 0;
    this.server = net.createServer((client) => this._onClient(client));
  }

  listen() {
    return new Promise((resolve, reject) => {
      this.server.once("error", reject);
      this.server.listen(0, "127.0.0.1", () => {
        this.port = this.server.address().port;
        this.url = `http://127.0.0.1:${this.port}`;
        resolve(this);
      });
    });
  }

  _track(sock) {
    this.sockets.add(sock);
    sock.on("close", () => this.sockets.delete(sock));
    sock.on("error", () => {});
  }

  _onClient(client) {
    this._track(client);
    if (this.blocked) {
      client.destroy();
      return;
    }
    this.accepted += 1;
    if (process.env.HERALD_BROWSER_ASSETS === "disk") {
      client.once("data", (first) => {
        const m = /^GET (\/|\/herald\.js)(\?[^ ]*)? HTTP/.exec(first.toString("latin1", 0, 200));
        if (m) {
          const file = m[1] === "/" ? "index.html" : "herald.js";
          const type = m[1] === "/" ? "text/html; charset=utf-8" : "text/javascript; charset=utf-8";
          const body = fs.readFileSync(path.join(ASSETS, file));
          client.end(
            Buffer.concat([
              Buffer.from(`HTTP/1.1 200 OK\r\nContent-Type: ${type}\r\nContent-Length: ${body.length}\r\nConnection: close\r\n\r\n`),
              body,
            ]),
          );
          return;
        }
        this._pipe(client, first);
      });
      return;
    }
    this._pipe(client, null);
  }

  _pipe(client, first) {
    const upstream = net.connect(this.upstreamPort, "127.0.0.1");
    this._track(upstream);
    if (first) upstream.write(first);
    client.pipe(upstream);
    upstream.pipe(client);
    const end = () => {
      client.destroy();
      upstream.destroy();
    };
    client.on("close", end);
    upstream.on("close", end);
  }

  /** Destroys every proxied connection now (an abrupt server-side drop, no close frame). */
  cut() {
    for (const s of this.sockets) s.destroy();
    this.sockets.clear();
  }

  block() {
    this.blocked = true;
    this.cut();
  }

  unblock() {
    this.blocked = false;
  }

  close() {
    this.cut();
    return new Promise((resolve) => this.server.close(() => resolve()));
  }
}

/** Launches Debian's Chromium headless with a fresh profile directory. */
async function launchChromium() {
  const { chromium } = require("playwright-core");
  if (!fs.existsSync(CHROMIUM)) throw new Error(`${CHROMIUM} is missing: apt-get install chromium`);
  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), "herald-chromium-"));
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: CHROMIUM,
    headless: true,
    timeout: 60000,
    viewport: { width: 1200, height: 760 },
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
  context.setDefaultTimeout(15000);
  return {
    context,
    async close() {
      await context.close().catch(() => {});
      fs.rmSync(userDataDir, { recursive: true, force: true });
    },
  };
}

/** Polls `fn` until it returns a truthy value; throws `what` after `timeoutMs`. */
async function waitFor(what, fn, { timeoutMs = 10000, intervalMs = 50 } = {}) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      last = await fn();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what} (last: ${last instanceof Error ? last.message : JSON.stringify(last)})`);
    }
    await new Promise((r) => setTimeout(r, intervalMs));
  }
}

module.exports = { ROOT, ASSETS, startHerald, CutProxy, launchChromium, waitFor };
