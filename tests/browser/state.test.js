// State that stays right, in real Chromium against the real herald binary: the demo's
// counter on the `latest` channel state.counter (two pages pressing at once lose no
// press, on one node and across two nodes of a cluster on a real redis-server, and a
// page opened long after the history TTL still reads the value), and herald.js falling
// back from a blocked WebSocket to SSE, from blocked SSE to long-polling, and back up to
// the WebSocket without delivering anything twice.
"use strict";

const { test, before, after, afterEach } = require("node:test");
const assert = require("node:assert/strict");
const net = require("node:net");
const { spawn } = require("node:child_process");

const { startHerald, launchChromium, waitFor } = require("./support");

const API_KEY = "browser-state-key";
// Short, so "after the history window expired" is a short wait.
const TTL_MS = 400;
const PRESSES = 500;

let browser;
const servers = [];
const pageErrors = [];

before(async () => {
  browser = await launchChromium();
});

afterEach((t) => {
  if (!t || t.passed !== false) return;
  for (const s of servers) console.log(`herald ${s.addr}: ${s.exited() ? "EXITED" : "running"}; stderr tail:\n${s.stderr().slice(-2000)}`);
});

after(async () => {
  if (browser) await browser.close();
  for (const s of servers) await s.stop();
});

async function herald(extra = [], ttlMs = TTL_MS) {
  const s = await startHerald(["--history-ttl-ms", String(ttlMs), "--api-key", API_KEY, ...extra]);
  servers.push(s);
  return s;
}

async function openPage(url, label) {
  const page = await browser.context.newPage();
  page.on("pageerror", (err) => pageErrors.push(`${label}: ${err.message}`));
  await page.goto(url + "/", { timeout: 15000 });
  await page.waitForFunction(() => document.getElementById("state").dataset.state === "open", null, { timeout: 15000 });
  // Subscribed: the counter knows the seq of the value it shows.
  await page.waitForFunction(() => document.getElementById("counter-value").dataset.seq !== "", null, { timeout: 15000 });
  return page;
}

async function counter(page) {
  return Number(await page.textContent("#counter-value"));
}

/** Both pages press "+" PRESSES times at once; every page ends at start + 2 * PRESSES. */
async function pressTogether(pages) {
  const start = await counter(pages[0]);
  for (const page of pages) assert.equal(await counter(page), start, "pages start from the same value");
  const t0 = Date.now();
  // Real mouse presses at the button's place: playwright's click() would wait for each
  // page's animation frames, which Chromium throttles in the pages not in front.
  await Promise.all(
    pages.map(async (page) => {
      const box = await page.locator("#counter-inc").boundingBox();
      const [x, y] = [box.x + box.width / 2, box.y + box.height / 2];
      for (let i = 0; i < PRESSES; i++) await page.mouse.click(x, y);
    }),
  );
  const end = start + pages.length * PRESSES;
  for (const [i, page] of pages.entries()) {
    await waitFor(`page ${i} to show ${end}`, async () => (await counter(page)) === end, { timeoutMs: 30000 });
  }
  const conflicts = await Promise.all(pages.map((p) => p.evaluate(() => Number(document.getElementById("counter-value").dataset.conflicts || 0))));
  console.log(`${pages.length} pages x ${PRESSES} presses in ${Date.now() - t0} ms: ${start} -> ${end}, conflicts retried per page: ${conflicts}`);
  return end;
}

test("two pages pressing + 500 times each at once end at exactly + 1000; a later page too, after the TTL", { timeout: 180000 }, async () => {
  const s = await herald();
  const [a, b] = [await openPage(s.url, "A"), await openPage(s.url, "B")];
  const end = await pressTogether([a, b]);
  const c = await openPage(s.url, "C");
  await waitFor("C to read the value", async () => (await counter(c)) === end);
  // Long past the history TTL: the latest value is kept, and a new page reads it.
  await new Promise((r) => setTimeout(r, 3 * TTL_MS));
  const d = await openPage(s.url, "D");
  await waitFor("D to read the value after the TTL", async () => (await counter(d)) === end);
  for (const page of [a, b, c, d]) assert.equal(await counter(page), end);
  for (const page of [a, b, c, d]) await page.close();
});

/** A redis-server of our own on a free port, killed by stop(). */
async function startRedis() {
  const port = await new Promise((resolve) => {
    const srv = net.createServer().listen(0, "127.0.0.1", () => {
      const p = srv.address().port;
      srv.close(() => resolve(p));
    });
  });
  const proc = spawn("redis-server", ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], { stdio: "ignore" });
  await waitFor("redis-server to answer", () => new Promise((resolve) => {
    const sock = net.connect(port, "127.0.0.1", () => sock.write("PING\r\n"));
    sock.on("data", (d) => { sock.destroy(); resolve(d.toString().startsWith("+PONG")); });
    sock.on("error", () => resolve(false));
  }));
  return { url: `redis://127.0.0.1:${port}`, stop: () => proc.kill("SIGKILL") };
}

test("across two nodes of a cluster on a real redis-server: + 1000 on both, and on a page opened after the TTL", { timeout: 180000 }, async () => {
  const redis = await startRedis();
  try {
    const n1 = await herald(["--redis", redis.url]);
    const n2 = await herald(["--redis", redis.url]);
    for (const n of [n1, n2]) {
      await waitFor(`node ${n.addr} linked to redis`, async () => (await fetch(n.url + "/healthz")).status === 200);
    }
    const [a, b] = [await openPage(n1.url, "node 1"), await openPage(n2.url, "node 2")];
    const end = await pressTogether([a, b]);
    await new Promise((r) => setTimeout(r, 3 * TTL_MS));
    const c = await openPage(n2.url, "node 2 later");
    await waitFor("a later page on node 2 to read the value", async () => (await counter(c)) === end);
    for (const page of [a, b, c]) await page.close();
    for (const n of [n1, n2]) assert.equal(n.exited(), null, `node exited:\n${n.stderr().slice(-3000)}`);
    // Before their Redis goes: a SIGTERM drain would wait on the link for seconds.
    for (const n of [n1, n2]) {
      n.proc.kill("SIGKILL");
      servers.splice(servers.indexOf(n), 1);
    }
  } finally {
    redis.stop();
  }
});

// ---- herald.js fallback ------------------------------------------------------------------

/** Makes window.WebSocket fail to open while window.__blockWebSocket is true, as a proxy
 *  that drops the upgrade would: an error and a close 1006, never an open. */
function blockWebSocket() {
  const Real = window.WebSocket;
  window.__blockWebSocket = true;
  window.WebSocket = function (url, protocols) {
    if (!window.__blockWebSocket) return new Real(url, protocols);
    const fake = { readyState: 0, send() { throw new Error("not open"); }, close() {} };
    setTimeout(() => {
      fake.readyState = 3;
      if (fake.onerror) fake.onerror({ type: "error" });
      if (fake.onclose) fake.onclose({ code: 1006, reason: "" });
    }, 10);
    return fake;
  };
}

async function publishHttp(s, channel, data) {
  const r = await fetch(s.url + "/api/publish", {
    method: "POST",
    headers: { authorization: `Bearer ${API_KEY}`, "content-type": "application/json" },
    body: JSON.stringify({ channel, data }),
  });
  const text = await r.text();
  assert.equal(r.status, 200, text);
  return JSON.parse(text).seq;
}

/** A page on the server's origin with herald.js, WebSocket blocked, subscribed to `channel`
 *  from `since`; everything it delivers lands in window.got as [seq, data]. */
async function fallbackPage(s, channel, { blockSse }) {
  const page = await browser.context.newPage();
  page.on("pageerror", (err) => pageErrors.push(`fallback: ${err.message}`));
  await page.addInitScript(blockWebSocket);
  let sseRequests = 0;
  if (blockSse) {
    await page.route("**/sse?**", (route) => {
      sseRequests += 1;
      return route.abort();
    });
  }
  await page.goto(s.url + "/healthz");
  await page.addScriptTag({ url: "/herald.js" });
  await page.evaluate((ch) => {
    window.got = [];
    window.transports = [];
    window.h = new Herald("/ws", { upgradeInterval: 300, minDelay: 100 });
    window.h.on("state", (state, info) => window.transports.push(state + ":" + (info.transport || "")));
    window.h.subscribe(ch, (data, m) => window.got.push([m.seq, data]), { since: 0 });
  }, channel);
  return { page, sseRequests: () => sseRequests };
}

async function receivedUpTo(page, seq) {
  await waitFor(`the page to receive up to seq ${seq}`, async () => {
    const got = await page.evaluate(() => window.got);
    return got.length > 0 && got[got.length - 1][0] >= seq;
  }, { timeoutMs: 15000 });
}

/** Every seq from 1 to `last` exactly once, in order, each with its data. */
async function assertExactlyOnce(page, last) {
  const got = await page.evaluate(() => window.got);
  assert.deepEqual(got.map(([seq]) => seq), Array.from({ length: last }, (_, i) => i + 1), JSON.stringify(got));
  for (const [seq, data] of got) assert.deepEqual(data, { n: seq });
}

async function fallbackChain(blockSse) {
  // History that outlives the test: the page replays it from since 0.
  const s = await herald([], 60000);
  const channel = blockSse ? "fb-poll" : "fb-sse";
  // History from before the page: it is replayed over the fallback from since 0.
  for (let n = 1; n <= 3; n++) await publishHttp(s, channel, { n });
  const { page, sseRequests } = await fallbackPage(s, channel, { blockSse });
  const expected = blockSse ? "poll" : "sse";
  await waitFor(`herald.js on ${expected}`, async () => (await page.evaluate(() => window.h.transport)) === expected);
  await receivedUpTo(page, 3);
  for (let n = 4; n <= 6; n++) await publishHttp(s, channel, { n });
  await receivedUpTo(page, 6);
  assert.equal(await page.evaluate(() => window.h.state), "open");
  // A subscription made on the fallback gets a receiver of its own, live.
  await page.evaluate((ch) => {
    window.later = [];
    window.h.subscribe(ch, (data) => window.later.push(data));
  }, channel + "-later");
  await waitFor("the later subscription to be live", async () => {
    await publishHttp(s, channel + "-later", "hi");
    return (await page.evaluate(() => window.later.length)) > 0;
  }, { timeoutMs: 15000, intervalMs: 300 });
  if (blockSse) assert.ok(sseRequests() >= 1, "SSE was tried first");
  // A publish waits for the WebSocket; it goes out once the upgrade succeeds.
  const acked = page.evaluate((ch) => window.h.publish(ch, { n: 7 }), channel);
  // The proxy lets WebSocket through again: herald.js upgrades, stops the fallback and
  // resumes from the last seq it delivered.
  await page.evaluate(() => { window.__blockWebSocket = false; });
  await waitFor("herald.js back on the WebSocket", async () => (await page.evaluate(() => window.h.transport)) === "websocket");
  assert.equal(await acked, 7);
  for (let n = 8; n <= 10; n++) await publishHttp(s, channel, { n });
  await receivedUpTo(page, 10);
  await new Promise((r) => setTimeout(r, 300)); // anything doubled would have come by now
  await assertExactlyOnce(page, 10);
  const transports = await page.evaluate(() => window.transports);
  assert.ok(transports.includes(`open:${expected}`) && transports.includes("open:websocket"), transports.join(" "));
  await page.close();
}

test("herald.js with WebSocket blocked receives over SSE, then upgrades with nothing twice", { timeout: 60000 }, async () => {
  await fallbackChain(false);
});

test("herald.js with WebSocket and SSE blocked receives by long-polling, then upgrades with nothing twice", { timeout: 60000 }, async () => {
  await fallbackChain(true);
});

test("herald.js publish with expectSeq: stored on the expected seq, else conflict with the current seq", { timeout: 30000 }, async () => {
  const s = await herald();
  const page = await browser.context.newPage();
  await page.goto(s.url + "/healthz");
  await page.addScriptTag({ url: "/herald.js" });
  const result = await page.evaluate(async () => {
    const h = new Herald("/ws");
    const first = await h.publish("state.x", 1, { expectSeq: 0 });
    const conflict = await h.publish("state.x", 2, { expectSeq: 0 }).catch((e) => ({ code: e.code, seq: e.detail.seq }));
    h.close();
    return { first, conflict };
  });
  assert.deepEqual(result, { first: 1, conflict: { code: "conflict", seq: 1 } });
  await page.close();
});

test("no script errors on any page, and every herald stayed up", () => {
  assert.deepEqual(pageErrors, []);
  for (const s of servers) assert.equal(s.exited(), null, `herald exited:\n${s.stderr().slice(-3000)}`);
});
