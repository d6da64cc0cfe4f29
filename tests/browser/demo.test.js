// The demo page (GET /) and herald.js in real Chromium against the real herald binary.
"use strict";

const { test, before, after, afterEach } = require("node:test");
const assert = require("node:assert/strict");
const fs = require("node:fs");
const path = require("node:path");

const { ROOT, startHerald, CutProxy, launchChromium, waitFor } = require("./support");

const ARTIFACTS = path.join(ROOT, "target", "browser");

let herald;
let browser;
const proxies = [];
const pageErrors = [];

before(async () => {
  herald = await startHerald();
  browser = await launchChromium();
});

afterEach((t) => {
  // A failure says whether herald was still up, with its last log lines.
  if (!herald || !t || t.passed !== false) return;
  const gone = herald.exited();
  console.log(`herald: ${gone ? `EXITED ${JSON.stringify(gone)}` : "still running"}; stderr tail:\n${herald.stderr().slice(-3000)}`);
});

after(async () => {
  if (browser) await browser.close();
  for (const p of proxies) await p.close();
  if (herald) await herald.stop();
});

/** Opens the demo page through its own cuttable proxy and waits until it is live. */
async function openDemo(label) {
  const proxy = await new CutProxy(herald.port).listen();
  proxies.push(proxy);
  const page = await browser.context.newPage();
  page.on("pageerror", (err) => pageErrors.push(`${label}: ${err.message}`));
  page.on("console", (msg) => {
    if (msg.type() === "error" && !/Failed to load resource|WebSocket connection/.test(msg.text())) {
      pageErrors.push(`${label} console: ${msg.text()}`);
    }
  });
  await page.goto(proxy.url + "/", { timeout: 15000 });
  await waitForState(page, "open");
  return { page, proxy, label };
}

function waitForState(page, state, timeout = 15000) {
  return page.waitForFunction((s) => document.getElementById("state").dataset.state === s, state, { timeout });
}

async function chatTexts(page) {
  return page.$$eval("#chat-log li.msg .text", (els) => els.map((e) => e.textContent));
}

async function chatSeqs(page) {
  return page.$$eval("#chat-log li.msg", (els) => els.map((e) => Number(e.dataset.seq)));
}

async function counter(page) {
  return Number(await page.textContent("#counter-value"));
}

async function say(page, name, text) {
  await page.fill("#chat-name", name);
  await page.fill("#chat-input", text);
  await page.click("#chat-send");
}

function assertStrictlyIncreasing(seqs, what) {
  for (let i = 1; i < seqs.length; i++) {
    assert.ok(seqs[i] > seqs[i - 1], `${what}: seq ${seqs[i]} after ${seqs[i - 1]} (all: ${seqs.join(",")})`);
  }
}

let A;
let B;

test("GET / and GET /herald.js are served by herald", { timeout: 20000 }, async () => {
  const page = await fetch(herald.url + "/");
  assert.equal(page.status, 200);
  assert.match(page.headers.get("content-type") || "", /text\/html/);
  const html = await page.text();
  assert.match(html, /<script src="\/herald\.js"><\/script>/);
  const js = await fetch(herald.url + "/herald.js");
  assert.equal(js.status, 200);
  assert.match(js.headers.get("content-type") || "", /javascript/);
  const body = await js.text();
  assert.match(body, /function Herald\(url, options\)/);
});

test("two pages see each other's chat messages", { timeout: 60000 }, async () => {
  A = await openDemo("A");
  B = await openDemo("B");
  await say(A.page, "alice", "hello from A");
  await say(B.page, "bob", "hi A, this is B");
  for (const { page, label } of [A, B]) {
    await waitFor(`${label} to show both chat messages`, async () => {
      const texts = await chatTexts(page);
      return texts.includes("hello from A") && texts.includes("hi A, this is B");
    });
    const names = await page.$$eval("#chat-log li.msg .who", (els) => els.map((e) => e.textContent));
    assert.ok(names.includes("alice") && names.includes("bob"), `${label} names: ${names}`);
    assertStrictlyIncreasing(await chatSeqs(page), `${label} chat`);
  }
  // Each page marks its own messages.
  assert.equal(await A.page.textContent("#chat-log li.mine .text"), "hello from A");
});

test("the shared counter changes on every page at once", { timeout: 60000 }, async () => {
  const start = await counter(A.page);
  assert.equal(await counter(B.page), start, "both pages start from the same value");
  await A.page.click("#counter-inc");
  await A.page.click("#counter-inc");
  await A.page.click("#counter-inc");
  await B.page.click("#counter-dec");
  for (const { page, label } of [A, B]) {
    await waitFor(`${label} counter to reach ${start + 2}`, async () => (await counter(page)) === start + 2);
  }
});

test("a page whose connection is cut reconnects and shows what was published meanwhile", { timeout: 90000 }, async () => {
  const before = await counter(A.page);
  const seqsBefore = await chatSeqs(A.page);
  // The server side of A's connection goes away, and A cannot come back for now.
  A.proxy.block();
  await waitFor("A to notice the cut", async () => (await A.page.getAttribute("#state", "data-state")) !== "open");

  const missed = ["while A was away 1", "while A was away 2", "while A was away 3"];
  for (const text of missed) await say(B.page, "bob", text);
  await B.page.click("#counter-inc");
  await B.page.click("#counter-inc");
  await waitFor("B to show its own messages", async () => (await chatTexts(B.page)).includes(missed[2]));
  await waitFor("B's counter", async () => (await counter(B.page)) === before + 2);
  // Still away: A has none of it.
  assert.ok(!(await chatTexts(A.page)).some((t) => missed.includes(t)), "A got messages while cut off");
  assert.equal(await counter(A.page), before);

  A.proxy.unblock();
  // The backoff may have grown to a few seconds while blocked.
  await waitForState(A.page, "open", 30000);
  await waitFor("A to show the missed chat messages", async () => {
    const texts = await chatTexts(A.page);
    return missed.every((t) => texts.includes(t));
  }, { timeoutMs: 10000 });
  await waitFor("A's counter to catch up", async () => (await counter(A.page)) === before + 2, { timeoutMs: 10000 });

  const texts = await chatTexts(A.page);
  const order = missed.map((t) => texts.indexOf(t));
  assert.deepEqual([...order].sort((x, y) => x - y), order, "missed messages in publish order");
  for (const t of missed) assert.equal(texts.filter((x) => x === t).length, 1, `"${t}" shown once`);
  const seqs = await chatSeqs(A.page);
  assertStrictlyIncreasing(seqs, "A chat after reconnect");
  assert.deepEqual(seqs.slice(0, seqsBefore.length), seqsBefore);
  assert.ok(A.proxy.accepted >= 2, "A connected again through the proxy");

  // And it is live again in both directions.
  await say(A.page, "alice", "back again");
  await waitFor("B to see A's message after the reconnect", async () => (await chatTexts(B.page)).includes("back again"));
});

test("a new page rebuilds chat and counter from the channel history", { timeout: 60000 }, async () => {
  const expected = await counter(B.page);
  const C = await openDemo("C");
  await waitFor("C's counter to equal B's", async () => (await counter(C.page)) === expected);
  await waitFor("C to show earlier chat", async () => {
    const texts = await chatTexts(C.page);
    return texts.includes("hello from A") && texts.includes("back again");
  });
  assert.deepEqual(await chatTexts(C.page), await chatTexts(B.page));
  await C.page.close();
});

test("stats panel shows live numbers; screenshot saved", { timeout: 60000 }, async () => {
  // Some traffic so the chart has something to draw.
  for (let i = 0; i < 6; i++) {
    await B.page.click(i % 3 === 2 ? "#counter-dec" : "#counter-inc");
    await new Promise((r) => setTimeout(r, 350));
  }
  await say(B.page, "bob", "the chart should show this traffic");
  await waitFor("stats: connections", async () => {
    const t = await A.page.textContent("#stat-connections");
    return /^\d+$/.test(t.replace(/,/g, "")) && Number(t) >= 2;
  }, { timeoutMs: 10000 });
  await waitFor("chart points", async () => {
    const pts = await A.page.getAttribute("#chart-in", "points");
    return pts && pts.trim().split(" ").length >= 3;
  }, { timeoutMs: 10000 });
  await waitFor("counter settled", async () => (await counter(A.page)) === (await counter(B.page)));
  fs.mkdirSync(ARTIFACTS, { recursive: true });
  const file = path.join(ARTIFACTS, "demo.png");
  await A.page.screenshot({ path: file, fullPage: true });
  assert.ok(fs.statSync(file).size > 10000, "screenshot written");
  assert.equal(await A.page.textContent("#stats-note"), "");
});

test("the page also loads herald.js as a module (globalThis.Herald)", { timeout: 30000 }, async () => {
  const page = await browser.context.newPage();
  page.on("pageerror", (err) => pageErrors.push(`module page: ${err.message}`));
  await page.goto(herald.url + "/", { timeout: 15000 });
  const kind = await page.evaluate(async () => {
    delete globalThis.Herald;
    await import("/herald.js");
    return typeof globalThis.Herald;
  });
  assert.equal(kind, "function");
  await page.close();
});

test("no script errors on any page, and herald stayed up", () => {
  assert.deepEqual(pageErrors, []);
  assert.equal(herald.exited(), null, `herald exited:\n${herald.stderr().slice(-3000)}`);
});
