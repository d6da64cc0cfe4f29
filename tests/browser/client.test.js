// herald.js itself, in Node: first against a scripted fake WebSocket (exact control over
// what the "server" says: duplicates, gaps, epochs, dead connections), then against the
// real herald binary with the `ws` package as the WebSocket and a proxy that cuts it.
"use strict";

const { test, describe, before, after } = require("node:test");
const assert = require("node:assert/strict");
const path = require("node:path");

const { ASSETS, startHerald, CutProxy, waitFor } = require("./support");

const Herald = require(path.join(ASSETS, "herald.js"));

// ---- a scripted fake -----------------------------------------------------------------

/** Every FakeSocket created, newest last; the test plays the server. */
function fakeFactory() {
  const sockets = [];
  class FakeSocket {
    constructor(url) {
      this.url = url;
      this.sent = [];
      this.readyState = 0;
      sockets.push(this);
    }
    send(text) {
      if (this.readyState !== 1) throw new Error("not open");
      this.sent.push(JSON.parse(text));
    }
    close() {
      if (this.readyState === 3) return;
      this.readyState = 3;
      setTimeout(() => this.onclose && this.onclose({ code: 1005, reason: "" }), 0);
    }
    // server side
    open() {
      this.readyState = 1;
      this.onopen && this.onopen({});
    }
    push(obj) {
      this.onmessage && this.onmessage({ data: JSON.stringify(obj) });
    }
    drop(code = 1006) {
      this.readyState = 3;
      this.onclose && this.onclose({ code, reason: "" });
    }
    last(type) {
      return [...this.sent].reverse().find((m) => m.type === type);
    }
  }
  return { FakeSocket, sockets };
}

async function fakeClient(opts = {}) {
  const { FakeSocket, sockets } = fakeFactory();
  const h = new Herald("ws://fake.invalid/ws", { WebSocket: FakeSocket, minDelay: 5, maxDelay: 40, ...opts });
  const states = [];
  h.on("state", (s, info) => states.push({ s, info }));
  await Promise.resolve(); // herald.js connects on the next microtask
  return { h, sockets, states, current: () => sockets[sockets.length - 1] };
}

const tick = (ms = 0) => new Promise((r) => setTimeout(r, ms));

describe("herald.js against a scripted server", () => {
  test("token goes in the query; states connecting -> open", async () => {
    const { h, current, states } = await fakeClient({ token: "t0k en" });
    assert.equal(new URL(current().url).searchParams.get("token"), "t0k en");
    assert.equal(h.state, "connecting");
    current().open();
    assert.equal(h.state, "open");
    assert.deepEqual(states.map((x) => x.s), ["connecting", "open"]);
    h.close();
    assert.equal(h.state, "closed");
  });

  test("delivers each seq once and in order; drops duplicates and stale ones", async () => {
    const { h, current } = await fakeClient();
    const got = [];
    const sub = h.subscribe("news", (data, meta) => got.push([meta.seq, data]));
    current().open();
    const cmd = current().last("subscribe");
    assert.equal(cmd.channel, "news");
    assert.equal(cmd.since, undefined, "a live subscription sends no since");
    current().push({ type: "subscribed", channel: "news", seq: 10, epoch: "e1", id: cmd.id });
    for (const seq of [11, 12, 12, 11, 9, 13]) current().push({ type: "message", channel: "news", seq, data: { n: seq } });
    current().push({ type: "message", channel: "other", seq: 14, data: 0 });
    assert.deepEqual(got, [[11, { n: 11 }], [12, { n: 12 }], [13, { n: 13 }]]);
    assert.equal(sub.lastSeq, 13);
    assert.equal(sub.epoch, "e1");
    h.close();
  });

  test("reconnects with jittered exponential backoff and resubscribes with since + epoch", async () => {
    const { h, sockets, current, states } = await fakeClient({ minDelay: 20, maxDelay: 80 });
    const got = [];
    h.subscribe("news", (d, m) => got.push(m.seq), { since: 0 });
    current().open();
    let cmd = current().last("subscribe");
    assert.equal(cmd.since, 0);
    current().push({ type: "message", channel: "news", seq: 1, data: 1 });
    current().push({ type: "message", channel: "news", seq: 2, data: 2 });
    current().push({ type: "subscribed", channel: "news", seq: 2, epoch: "E", id: cmd.id });
    // Dropped, and the next three connects fail: the delays grow, with jitter.
    current().drop();
    for (let i = 0; i < 3; i++) {
      await waitFor("a reconnect attempt", () => sockets.length === 2 + i, { timeoutMs: 2000, intervalMs: 2 });
      current().drop();
    }
    const delays = states.filter((x) => x.s === "closed").map((x) => x.info.retryIn);
    assert.equal(delays.length, 4);
    [20, 40, 80, 80].forEach((base, i) => {
      assert.ok(delays[i] >= base / 2 && delays[i] <= base, `delay ${i} = ${delays[i]}, base ${base}`);
    });
    await waitFor("a fifth connect", () => sockets.length === 5, { timeoutMs: 2000, intervalMs: 2 });
    current().open();
    cmd = current().last("subscribe");
    assert.deepEqual({ since: cmd.since, epoch: cmd.epoch }, { since: 2, epoch: "E" });
    // Replay overlaps what was delivered: only 3 and 4 are new.
    for (const seq of [2, 3, 4]) current().push({ type: "message", channel: "news", seq, data: seq });
    current().push({ type: "subscribed", channel: "news", seq: 4, epoch: "E", id: cmd.id });
    current().push({ type: "message", channel: "news", seq: 5, data: 5 });
    assert.deepEqual(got, [1, 2, 3, 4, 5]);
    h.close();
  });

  test("history_gap: the app is told how much was missed and resumes live by default", async () => {
    const { h, current } = await fakeClient();
    const got = [];
    const gaps = [];
    h.on("gap", (g) => gaps.push(g));
    h.subscribe("news", (d, m) => got.push(m.seq), { since: 3, epoch: "E" });
    current().open();
    let cmd = current().last("subscribe");
    assert.deepEqual({ since: cmd.since, epoch: cmd.epoch }, { since: 3, epoch: "E" });
    current().push({ type: "error", code: "history_gap", channel: "news", oldest: 10, seq: 20, message: "gone", id: cmd.id });
    assert.equal(gaps.length, 1);
    assert.deepEqual(
      { since: gaps[0].since, oldest: gaps[0].oldest, seq: gaps[0].seq, missed: gaps[0].missed, epochChanged: gaps[0].epochChanged },
      { since: 3, oldest: 10, seq: 20, missed: 6, epochChanged: false },
    );
    cmd = current().last("subscribe");
    assert.equal(cmd.since, undefined, "resubscribed live");
    assert.equal(cmd.epoch, undefined);
    current().push({ type: "subscribed", channel: "news", seq: 20, epoch: "E", id: cmd.id });
    current().push({ type: "message", channel: "news", seq: 21, data: 0 });
    assert.deepEqual(got, [21]);
    h.close();
  });

  test("history_gap: onGap may resume from oldest - 1 (the error matched by id, no channel)", async () => {
    const { h, current } = await fakeClient();
    const got = [];
    h.subscribe("c", (d, m) => got.push(m.seq), { since: 0, onGap: (g) => ({ since: g.oldest - 1 }) });
    current().open();
    let cmd = current().last("subscribe");
    current().push({ type: "error", code: "history_gap", oldest: 101, seq: 200, message: "gone", id: cmd.id });
    cmd = current().last("subscribe");
    assert.equal(cmd.since, 100);
    for (const seq of [101, 102]) current().push({ type: "message", channel: "c", seq, data: 0 });
    current().push({ type: "subscribed", channel: "c", seq: 102, epoch: "E", id: cmd.id });
    assert.deepEqual(got, [101, 102]);
    h.close();
  });

  test("history_gap after a server restart (new epoch): numbering starts again", async () => {
    const { h, current } = await fakeClient();
    const got = [];
    let gap;
    h.subscribe("c", (d, m) => got.push(m.seq), {
      since: 0,
      onGap: (g) => {
        gap = g;
        return { since: 0 };
      },
    });
    current().open();
    let cmd = current().last("subscribe");
    for (const seq of [1, 2, 3, 4, 5]) current().push({ type: "message", channel: "c", seq, data: 0 });
    current().push({ type: "subscribed", channel: "c", seq: 5, epoch: "old", id: cmd.id });
    current().drop(1001);
    await waitFor("reconnect", () => current().readyState === 0, { timeoutMs: 2000, intervalMs: 2 });
    current().open();
    cmd = current().last("subscribe");
    assert.deepEqual({ since: cmd.since, epoch: cmd.epoch }, { since: 5, epoch: "old" });
    // The restarted server has seen two messages on the channel.
    current().push({ type: "error", code: "history_gap", channel: "c", oldest: 1, seq: 2, message: "other epoch", id: cmd.id });
    assert.equal(gap.epochChanged, true);
    assert.equal(gap.missed, null);
    cmd = current().last("subscribe");
    assert.equal(cmd.since, 0);
    assert.equal(cmd.epoch, undefined);
    for (const seq of [1, 2]) current().push({ type: "message", channel: "c", seq, data: 0 });
    current().push({ type: "subscribed", channel: "c", seq: 2, epoch: "new", id: cmd.id });
    assert.deepEqual(got, [1, 2, 3, 4, 5, 1, 2]);
    h.close();
  });

  test("a same-epoch gap never redelivers, even if onGap asks for too little", async () => {
    const { h, current } = await fakeClient();
    const got = [];
    h.subscribe("c", (d, m) => got.push(m.seq), { since: 0, onGap: () => ({ since: 0 }) });
    current().open();
    let cmd = current().last("subscribe");
    for (const seq of [1, 2, 3]) current().push({ type: "message", channel: "c", seq, data: 0 });
    current().push({ type: "subscribed", channel: "c", seq: 3, epoch: "E", id: cmd.id });
    current().drop();
    await waitFor("reconnect", () => current().readyState === 0, { timeoutMs: 2000, intervalMs: 2 });
    current().open();
    cmd = current().last("subscribe");
    current().push({ type: "error", code: "history_gap", channel: "c", oldest: 8, seq: 9, id: cmd.id });
    cmd = current().last("subscribe");
    assert.ok(cmd.since >= 3, `resumed from ${cmd.since}`);
    for (const seq of [1, 2, 8, 9]) current().push({ type: "message", channel: "c", seq, data: 0 });
    assert.deepEqual(got, [1, 2, 3, 8, 9]);
    h.close();
  });

  test("publish: resolves with the ack's seq, rejects on an error reply, queues while closed", async () => {
    const { h, current } = await fakeClient();
    const queued = h.publish("news", { a: 1 });
    current().open();
    let cmd = current().last("publish");
    assert.deepEqual({ channel: cmd.channel, data: cmd.data }, { channel: "news", data: { a: 1 } });
    current().push({ type: "ack", id: cmd.id, seq: 7 });
    assert.equal(await queued, 7);

    const refused = h.publish("news", "x".repeat(10));
    cmd = current().last("publish");
    current().push({ type: "error", code: "too_big", message: "message too big", id: cmd.id });
    await assert.rejects(refused, (e) => e.code === "too_big" && e.message === "message too big");

    const lost = h.publish("news", 1);
    current().drop();
    await assert.rejects(lost, (e) => e.code === "disconnected");
    h.close();
    await assert.rejects(h.publish("news", 1), (e) => e.code === "closed");
  });

  test("presence, presenceStats, history and join/leave callbacks", async () => {
    const { h, current } = await fakeClient();
    const seen = [];
    h.on("join", (e) => seen.push("event:join:" + e.user));
    h.subscribe("room", (data) => seen.push("m" + data), {
      onJoin: (e) => seen.push("join:" + e.user + ":" + e.info.name),
      onLeave: (e) => seen.push("leave:" + e.conn),
    });
    current().open();
    const sub = current().last("subscribe");
    current().push({ type: "subscribed", channel: "room", seq: 0, epoch: "e", id: sub.id });
    current().push({ type: "message", channel: "room", seq: 1, data: 1 });
    current().push({ type: "join", channel: "room", user: "bob", conn: "0.1.1", info: { name: "Bob" } });
    current().push({ type: "message", channel: "room", seq: 2, data: 2 });
    current().push({ type: "leave", channel: "room", user: "bob", conn: "0.1.1" });
    assert.deepEqual(seen, ["m1", "join:bob:Bob", "event:join:bob", "m2", "leave:0.1.1"]);

    const page = h.presence("room", { limit: 1 });
    let cmd = current().last("presence");
    assert.deepEqual({ channel: cmd.channel, limit: cmd.limit }, { channel: "room", limit: 1 });
    const members = [{ user: "ann", conn: "0.2.1" }];
    current().push({ type: "presence", channel: "room", members, cursor: "0.2.1", id: cmd.id });
    assert.deepEqual(await page, { members, cursor: "0.2.1" });

    const stats = h.presenceStats("room");
    cmd = current().last("presence_stats");
    current().push({ type: "presence_stats", channel: "room", connections: 2, users: 1, id: cmd.id });
    assert.deepEqual(await stats, { connections: 2, users: 1 });

    const past = h.history("room", { limit: 2, newestFirst: true });
    cmd = current().last("history");
    assert.deepEqual({ limit: cmd.limit, newest_first: cmd.newest_first }, { limit: 2, newest_first: true });
    const messages = [{ type: "message", channel: "room", seq: 2, data: 2 }];
    current().push({ type: "history", channel: "room", epoch: "e", seq: 2, oldest: 1, messages, id: cmd.id });
    assert.deepEqual(await past, { messages, seq: 2, epoch: "e" });

    const off = h.presence("news");
    cmd = current().last("presence");
    current().push({ type: "error", code: "presence_disabled", message: "off", id: cmd.id });
    await assert.rejects(off, (e) => e.code === "presence_disabled");
    h.close();
    await assert.rejects(h.presenceStats("room"), (e) => e.code === "disconnected");
  });

  test("a refused subscription is reported and dropped", async () => {
    const { h, current } = await fakeClient();
    const errors = [];
    const sub = h.subscribe("bad channel", () => {}, { onError: (e) => errors.push(e.code) });
    current().open();
    const cmd = current().last("subscribe");
    current().push({ type: "error", code: "bad_channel", message: "no spaces", id: cmd.id });
    await assert.rejects(sub.ready, (e) => e.code === "bad_channel");
    assert.deepEqual(errors, ["bad_channel"]);
    assert.equal(h.channels["bad channel"], undefined);
    h.close();
  });

  test("sends a JSON ping every interval, ignores pongs, and drops a silent connection", async () => {
    const { h, sockets, current } = await fakeClient({ pingInterval: 30 });
    current().open();
    const first = current();
    await waitFor("a ping", () => first.sent.some((m) => m.type === "ping"), { timeoutMs: 2000, intervalMs: 5 });
    first.push({ type: "pong" });
    await waitFor("a second ping", () => first.sent.filter((m) => m.type === "ping").length >= 2, { timeoutMs: 2000, intervalMs: 5 });
    // No pong this time: the next tick gives up on the connection and reconnects.
    await waitFor("a new connection", () => sockets.length === 2, { timeoutMs: 2000, intervalMs: 5 });
    assert.equal(first.readyState, 3);
    assert.ok(first.sent.every((m) => m.type === "ping"), "nothing but pings was sent");
    h.close();
  });

  test("close 4003 (forbidden) stops reconnecting", async () => {
    const { h, sockets, current } = await fakeClient();
    const errors = [];
    h.on("error", (e) => errors.push(e.code));
    current().open();
    current().drop(4003);
    await tick(60);
    assert.equal(sockets.length, 1);
    assert.equal(h.state, "closed");
    assert.deepEqual(errors, ["forbidden"]);
  });
});

// ---- the real server -----------------------------------------------------------------

describe("herald.js in Node against the real herald", () => {
  const WebSocket = require("ws");
  let herald;
  let proxy;
  const clients = [];

  before(async () => {
    herald = await startHerald(["--history-size", "5"]);
    proxy = await new CutProxy(herald.port).listen();
  });

  after(async () => {
    for (const c of clients) c.close();
    if (proxy) await proxy.close();
    if (herald) await herald.stop();
  });

  function client(url) {
    const h = new Herald(url, { WebSocket, minDelay: 50, maxDelay: 400 });
    clients.push(h);
    return h;
  }

  const opened = (h) => waitFor("open", () => h.state === "open", { timeoutMs: 5000 });

  test("recovers what was published while the connection was cut", { timeout: 30000 }, async () => {
    const pub = client(`ws://${herald.addr}/ws`);
    const sub = client(`ws://127.0.0.1:${proxy.port}/ws`);
    const got = [];
    const s = sub.subscribe("recover", (data, m) => got.push([m.seq, data.n]));
    await s.ready;
    await opened(pub);
    for (let n = 1; n <= 2; n++) await pub.publish("recover", { n });
    await waitFor("live messages", () => got.length === 2, { timeoutMs: 5000 });

    proxy.block();
    await waitFor("the cut to be seen", () => sub.state !== "open", { timeoutMs: 5000 });
    for (let n = 3; n <= 5; n++) await pub.publish("recover", { n });
    proxy.unblock();
    await waitFor("the missed messages", () => got.length === 5, { timeoutMs: 10000 });
    await pub.publish("recover", { n: 6 });
    await waitFor("live again", () => got.length === 6, { timeoutMs: 5000 });
    assert.deepEqual(got.map((x) => x[1]), [1, 2, 3, 4, 5, 6]);
    const seqs = got.map((x) => x[0]);
    seqs.forEach((seq, i) => i && assert.equal(seq, seqs[i - 1] + 1));
  });

  test("history_gap from the real server: told, then resumed from oldest - 1", { timeout: 30000 }, async () => {
    const pub = client(`ws://${herald.addr}/ws`);
    await opened(pub);
    let last;
    for (let n = 1; n <= 12; n++) last = await pub.publish("gappy", { n });
    const sub = client(`ws://${herald.addr}/ws`);
    const got = [];
    const gaps = [];
    const s = sub.subscribe("gappy", (data) => got.push(data.n), {
      since: 0,
      onGap: (g) => {
        gaps.push(g);
        return { since: g.oldest - 1 };
      },
    });
    await s.ready;
    assert.equal(gaps.length, 1, "one gap");
    assert.equal(gaps[0].seq, last);
    assert.equal(gaps[0].oldest, last - 4, "history of 5");
    assert.equal(gaps[0].missed, last - 5);
    assert.deepEqual(got, [8, 9, 10, 11, 12]);
  });
});
