/*
 * herald.js: the browser client for Herald's /ws pub/sub protocol. No dependencies.
 *
 *   <script src="/herald.js"></script>            classic script: window.Herald
 *   <script type="module">import "/herald.js"; const { Herald } = globalThis;</script>
 *
 *   const h = new Herald("/ws", { token: "..." });
 *   h.on("state", (s) => console.log(s));            // "connecting" | "open" | "closed"
 *   const sub = h.subscribe("chat", (data, m) => show(data, m.seq), {
 *     since: 0,                                       // replay the history first
 *     onGap: (gap) => ({ since: gap.oldest - 1 }),    // history did not reach back
 *   });
 *   const seq = await h.publish("chat", { text: "hi" });
 *   await h.publish("state.n", 5, { expectSeq: 41 });  // only if the channel is still at 41
 *   const page = await h.presence("chat");            // { members: [{user, conn, info}], cursor }
 *   const stats = await h.presenceStats("chat");      // { connections, users }
 *   const past = await h.history("chat", { limit: 20, newestFirst: true });
 *   h.subscribe("room", onMessage, { onJoin: (j) => ..., onLeave: (l) => ... });
 *
 * Delivery: every subscription remembers the last sequence number it handed to the app
 * and the server's epoch. After a reconnect it subscribes again with `since` and `epoch`,
 * so the server replays what was missed; a message whose seq is not above the last one
 * delivered is dropped, so the app never sees a seq twice or out of order. When the
 * server's history no longer reaches back (`history_gap`), the app is told (`onGap`
 * and the "gap" event) and the subscription continues live, or from the `since` that
 * `onGap` returns.
 *
 * Fallback: when a WebSocket cannot be opened (a proxy that blocks it), the client
 * receives over Server-Sent Events (/sse), or where those are blocked too over
 * long-polling (/poll), with the same `since` recovery; state info and `h.transport` say
 * which. Publishes and questions wait for the WebSocket, which is tried again every
 * `upgradeInterval` ms; once it opens the fallback stops before the subscriptions resume
 * over it from the last delivered seq, so nothing is delivered twice.
 *
 * The file is a plain script (no import/export statements) so that the same bytes load
 * both ways; it also sets module.exports where CommonJS is present (Node tests).
 */
(function (root) {
  "use strict";

  var STATES = { CONNECTING: "connecting", OPEN: "open", CLOSED: "closed" };
  // Close codes after which reconnecting cannot help (4003 forbidden).
  var FATAL_CLOSE_CODES = { 4003: true };

  function HeraldError(code, message, detail) {
    var err = new Error(message || code);
    err.name = "HeraldError";
    err.code = code;
    if (detail) err.detail = detail;
    return err;
  }

  function toWebSocketUrl(url) {
    var loc = root.location;
    if (!url) {
      if (!loc) throw new TypeError("Herald: a URL is needed outside a browser");
      url = "/ws";
    }
    var u = loc ? new URL(url, loc.href) : new URL(url);
    if (u.protocol === "http:") u.protocol = "ws:";
    else if (u.protocol === "https:") u.protocol = "wss:";
    return u;
  }

  /**
   * new Herald(url, options)
   *   url: "ws://host/ws", "/ws" (relative to the page) or omitted (the page's /ws).
   *   options.token:        string, or a function returning one (called on every
   *                         connect, so a refreshed token is used after close 4001).
   *   options.minDelay:     first reconnect delay in ms (default 500).
   *   options.maxDelay:     cap of the reconnect delay in ms (default 15000).
   *   options.pingInterval: ms between JSON pings (default 20000); a connection that
   *                         has received nothing for two intervals is treated as dead.
   *   options.ackTimeout:   ms a publish waits for its ack (default 10000).
   *   options.WebSocket:    a WebSocket constructor (default: the global one).
   *   options.transports:   the order to try, of "websocket", "sse", "poll" (default:
   *                         all three where EventSource exists, else "websocket").
   *   options.upgradeInterval: ms between WebSocket attempts on a fallback (default 10000).
   */
  function Herald(url, options) {
    if (!(this instanceof Herald)) return new Herald(url, options);
    options = options || {};
    this.url = toWebSocketUrl(url);
    this.options = {
      token: options.token,
      minDelay: options.minDelay != null ? options.minDelay : 500,
      maxDelay: options.maxDelay != null ? options.maxDelay : 15000,
      pingInterval: options.pingInterval != null ? options.pingInterval : 20000,
      ackTimeout: options.ackTimeout != null ? options.ackTimeout : 10000,
      upgradeInterval: options.upgradeInterval != null ? options.upgradeInterval : 10000,
      transports: options.transports || (root.EventSource && root.fetch ? ["websocket", "sse", "poll"] : ["websocket"]),
    };
    this.transport = "websocket";
    this.fallback = null; // { receivers, timer } while receiving over sse or poll
    this.WebSocket = options.WebSocket || root.WebSocket;
    if (!this.WebSocket) throw new TypeError("Herald: no WebSocket implementation");
    this.state = STATES.CLOSED;
    this.ws = null;
    this.attempt = 0; // failed connects in a row, for the backoff
    this.openedAt = 0;
    this.lastReceived = 0;
    this.lastPingSent = 0;
    this.nextId = 1;
    this.pending = {}; // request id -> { kind, ... }
    this.channels = {}; // channel name -> Subscription (one server subscription each)
    this.outbox = []; // publishes waiting for an open connection
    this.listeners = {};
    this.stopped = false;
    this.reconnectTimer = null;
    this.pingTimer = null;
    var self = this;
    this._onOnline = function () {
      if (self.reconnectTimer) self._connectNow();
    };
    if (root.addEventListener) root.addEventListener("online", this._onOnline);
    // Connect once the caller has had a chance to add listeners and subscriptions.
    this.state = STATES.CONNECTING;
    Promise.resolve().then(function () {
      self.state = STATES.CLOSED;
      self._connect();
    });
  }

  /** h.on(event, fn) -> function that removes the listener.
   *  Events: "state" (state, info), "gap" (gap), "error" (HeraldError), "open", "close". */
  Herald.prototype.on = function (event, fn) {
    var list = this.listeners[event] || (this.listeners[event] = []);
    list.push(fn);
    var self = this;
    return function off() {
      var l = self.listeners[event];
      if (l) {
        var i = l.indexOf(fn);
        if (i >= 0) l.splice(i, 1);
      }
    };
  };

  Herald.prototype._emit = function (event) {
    var list = this.listeners[event];
    if (!list) return;
    var args = Array.prototype.slice.call(arguments, 1);
    list.slice().forEach(function (fn) {
      try {
        fn.apply(null, args);
      } catch (e) {
        setTimeout(function () {
          throw e;
        });
      }
    });
  };

  Herald.prototype._setState = function (state, info) {
    // "open" again is news: the transport changed (a fallback upgraded to the WebSocket).
    if (this.state === state && state !== STATES.OPEN) return;
    this.state = state;
    this._emit("state", state, info || {});
  };

  Herald.prototype._connect = function () {
    if (this.stopped) return;
    this.reconnectTimer = null;
    this._setState(STATES.CONNECTING, { attempt: this.attempt });
    var ws;
    try {
      ws = this._newSocket();
    } catch (e) {
      this._emit("error", HeraldError("connect_failed", String(e && e.message ? e.message : e)));
      this._scheduleReconnect({ code: 0 });
      return;
    }
    this._attach(ws);
  };

  Herald.prototype._newSocket = function () {
    var url = new URL(this.url.href);
    var token = this._token();
    if (token) url.searchParams.set("token", token);
    return new this.WebSocket(url.href);
  };

  /** Makes `ws` the client's connection (opening, or opened already by a probe). */
  Herald.prototype._attach = function (ws) {
    this.ws = ws;
    var self = this;
    ws.onopen = function () {
      if (self.ws !== ws) return;
      ws.opened = true;
      self._onOpen();
    };
    ws.onmessage = function (event) {
      if (self.ws === ws) self._onFrame(event.data);
    };
    ws.onclose = function (event) {
      if (self.ws !== ws) return;
      // Never opened (blocked by a proxy?): receive over the next transport meanwhile.
      if (!ws.opened && self.transports().length > 1 && !self.stopped) {
        self.ws = null;
        self._fallBack(1);
        return;
      }
      self._onClose(event.code, event.reason);
    };
    ws.onerror = function () {
      // A close event always follows; that is where reconnecting starts.
    };
  };

  Herald.prototype.transports = function () {
    return this.options.transports;
  };

  Herald.prototype._token = function () {
    return typeof this.options.token === "function" ? this.options.token() : this.options.token;
  };

  Herald.prototype._connectNow = function () {
    if (this.reconnectTimer) clearTimeout(this.reconnectTimer);
    this._connect();
  };

  Herald.prototype._onOpen = function () {
    this._stopFallback();
    this.transport = "websocket";
    this.openedAt = Date.now();
    this.lastReceived = this.openedAt;
    this._setState(STATES.OPEN, { transport: "websocket" });
    this._emit("open");
    var self = this;
    this.pingTimer = setInterval(function () {
      self._keepAlive();
    }, this.options.pingInterval);
    for (var name in this.channels) {
      if (Object.prototype.hasOwnProperty.call(this.channels, name)) {
        this._sendSubscribe(this.channels[name]);
      }
    }
    var queued = this.outbox;
    this.outbox = [];
    queued.forEach(function (p) {
      self._sendPublish(p);
    });
  };

  Herald.prototype._keepAlive = function () {
    var now = Date.now();
    // Nothing at all since the previous ping (not even its pong): the connection is dead
    // even if the browser has not noticed yet.
    if (this.lastPingSent && this.lastReceived < this.lastPingSent) {
      this._drop(4000, "no reply to ping");
      return;
    }
    this.lastPingSent = now;
    this._send({ type: "ping" });
  };

  /** Forgets the current socket at once and goes through the reconnect path. */
  Herald.prototype._drop = function (code, reason) {
    var ws = this.ws;
    if (!ws) return;
    this.ws = null;
    try {
      ws.close();
    } catch (e) {
      /* already closing */
    }
    this._onClose(code, reason, ws);
  };

  Herald.prototype._onClose = function (code, reason) {
    this.ws = null;
    if (this.pingTimer) clearInterval(this.pingTimer);
    this.pingTimer = null;
    this.lastPingSent = 0;
    var wasOpen = this.openedAt !== 0;
    // A connection that stayed up a while resets the backoff; one the server drops right
    // after opening (overloaded, policy) keeps backing off.
    if (wasOpen && Date.now() - this.openedAt > 5000) this.attempt = 0;
    this.openedAt = 0;
    // Requests in flight are answered by nobody now.
    var pending = this.pending;
    this.pending = {};
    for (var id in pending) {
      if (!Object.prototype.hasOwnProperty.call(pending, id)) continue;
      var req = pending[id];
      if (req.kind === "publish") {
        clearTimeout(req.timer);
        req.reject(HeraldError("disconnected", "connection closed before the ack; the publish may or may not have been stored"));
      }
      // Subscriptions are sent again on the next open.
    }
    for (var name in this.channels) {
      if (Object.prototype.hasOwnProperty.call(this.channels, name)) this.channels[name].live = false;
    }
    this._emit("close", { code: code, reason: reason || "" });
    var fatal = FATAL_CLOSE_CODES[code];
    if (this.stopped || fatal) {
      this._setState(STATES.CLOSED, { code: code, reason: reason || "", final: true });
      if (fatal) {
        this.stopped = true;
        this._emit("error", HeraldError("forbidden", "server closed with " + code + (reason ? ": " + reason : "")));
        this._failQueued(HeraldError("closed", "client stopped"));
      }
      return;
    }
    this._scheduleReconnect({ code: code, reason: reason || "" });
  };

  Herald.prototype._scheduleReconnect = function (info) {
    var base = Math.min(this.options.maxDelay, this.options.minDelay * Math.pow(2, this.attempt));
    // Equal jitter: half fixed, half random, so a crowd of clients spreads out.
    var delay = Math.round(base / 2 + Math.random() * (base / 2));
    this.attempt += 1;
    info.retryIn = delay;
    info.attempt = this.attempt;
    this._setState(STATES.CLOSED, info);
    var self = this;
    this.reconnectTimer = setTimeout(function () {
      self._connect();
    }, delay);
  };

  Herald.prototype._send = function (obj) {
    if (!this.ws || this.state !== STATES.OPEN) return false;
    try {
      this.ws.send(JSON.stringify(obj));
      return true;
    } catch (e) {
      return false;
    }
  };

  Herald.prototype._onFrame = function (raw) {
    this.lastReceived = Date.now();
    if (typeof raw !== "string") return; // the JSON protocol is text only
    var msg;
    try {
      msg = JSON.parse(raw);
    } catch (e) {
      this._emit("error", HeraldError("bad_frame", "server sent invalid JSON"));
      return;
    }
    var req = msg.id != null ? this.pending[msg.id] : undefined;
    switch (msg.type) {
      case "message": {
        var sub = this.channels[msg.channel];
        if (sub) sub._deliver(msg);
        return;
      }
      case "subscribed": {
        if (req) delete this.pending[msg.id];
        var s = (req && req.sub) || this.channels[msg.channel];
        if (s && this.channels[s.channel] === s) s._subscribed(msg);
        return;
      }
      case "ack": {
        if (req && req.kind === "publish") {
          delete this.pending[msg.id];
          clearTimeout(req.timer);
          req.resolve(msg.seq);
        }
        return;
      }
      case "error": {
        if (req) delete this.pending[msg.id];
        var err = HeraldError(msg.code || "error", msg.message || msg.code, msg);
        if (req && (req.kind === "publish" || req.kind === "query")) {
          clearTimeout(req.timer);
          req.reject(err);
          return;
        }
        var target = (req && req.sub) || (msg.channel != null ? this.channels[msg.channel] : undefined);
        if (target && this.channels[target.channel] === target) {
          if (msg.code === "history_gap") target._gap(msg, req ? req.since : undefined);
          else if (req && req.kind === "subscribe") target._failed(err);
          else this._emit("error", err);
          return;
        }
        if (msg.code === "history_gap") return; // for a subscription since dropped
        this._emit("error", err);
        return;
      }
      case "join":
      case "leave": {
        var member = this.channels[msg.channel];
        if (member) member._presenceEvent(msg);
        this._emit(msg.type, msg);
        return;
      }
      case "presence":
      case "presence_stats":
      case "history": {
        if (req && req.kind === "query") {
          delete this.pending[msg.id];
          clearTimeout(req.timer);
          req.resolve(msg);
        }
        return;
      }
      case "pong":
      case "unsubscribed":
        if (req) delete this.pending[msg.id];
        return;
      default:
        return; // unknown frame types are ignored (newer servers)
    }
  };

  Herald.prototype._sendSubscribe = function (sub) {
    // On a fallback (reached or still trying) every subscription gets its receiver.
    if (this.fallback) return this._receive(sub);
    if (this.state !== STATES.OPEN) return;
    var id = this.nextId++;
    var cmd = { type: "subscribe", channel: sub.channel, id: id };
    var since = sub._resumeFrom();
    if (since != null) {
      cmd.since = since;
      if (sub.epoch) cmd.epoch = sub.epoch;
    }
    this.pending[id] = { kind: "subscribe", sub: sub, since: since };
    this._send(cmd);
  };

  Herald.prototype._sendPublish = function (p) {
    var id = this.nextId++;
    var self = this;
    p.timer = setTimeout(function () {
      if (self.pending[id] === p) {
        delete self.pending[id];
        p.reject(HeraldError("timeout", "no ack within " + self.options.ackTimeout + " ms"));
      }
    }, this.options.ackTimeout);
    this.pending[id] = p;
    var cmd = { type: "publish", channel: p.channel, data: p.data, id: id };
    if (p.expectSeq != null) cmd.expect_seq = p.expectSeq;
    if (!this._send(cmd)) {
      delete this.pending[id];
      clearTimeout(p.timer);
      this.outbox.push(p);
    }
  };

  Herald.prototype._failQueued = function (err) {
    var queued = this.outbox;
    this.outbox = [];
    queued.forEach(function (p) {
      p.reject(err);
    });
  };

  /**
   * h.subscribe(channel, onMessage, options) -> Subscription
   *   onMessage(data, { channel, seq, replay, publisher }) for each message, in seq order,
   *                   once (`publisher`: the sender's user, where the namespace exposes it).
   *   options.since:  replay the messages after this seq first (0: the whole history).
   *   options.epoch:  the epoch `since` belongs to (optional).
   *   options.onGap(gap): history did not reach back. gap = { channel, since, oldest,
   *                   seq, lastDelivered, missed (count, or null if the server restarted) }.
   *                   Return { since: N } to resume from N (e.g. gap.oldest - 1), or
   *                   nothing to continue live.
   *   options.onSubscribed({ channel, seq, epoch }): each time the server confirms.
   *   options.onError(err): the server refused the subscription (it is dropped).
   *   options.onJoin(e), options.onLeave(e): a connection joined or left the channel, in
   *                   its place among the messages (where the namespace has join/leave);
   *                   e = { channel, user, conn, info }. Also the "join"/"leave" events.
   * One server subscription per channel: subscribing again to the same channel returns
   * the existing subscription with the extra handler added (live messages only).
   */
  Herald.prototype.subscribe = function (channel, onMessage, options) {
    if (typeof channel !== "string" || !channel) throw new TypeError("Herald.subscribe: channel must be a non-empty string");
    var existing = this.channels[channel];
    if (existing) {
      if (onMessage) existing.handlers.push(onMessage);
      return existing;
    }
    var sub = new Subscription(this, channel, onMessage, options || {});
    this.channels[channel] = sub;
    this._sendSubscribe(sub);
    return sub;
  };

  /** h.publish(channel, data, { expectSeq }) -> Promise<seq>: resolves with the ack's seq;
   *  rejects with a HeraldError (err.code from the server, or "disconnected" / "timeout" /
   *  "closed"). With expectSeq, stored only if the channel's last seq is still that; else
   *  err.code "conflict" and err.detail.seq the channel's current seq (read, retry). */
  Herald.prototype.publish = function (channel, data, options) {
    var self = this;
    return new Promise(function (resolve, reject) {
      if (self.stopped) {
        reject(HeraldError("closed", "client closed"));
        return;
      }
      var p = { kind: "publish", channel: channel, data: data === undefined ? null : data, resolve: resolve, reject: reject };
      if (options && options.expectSeq != null) p.expectSeq = Number(options.expectSeq);
      if (self.state === STATES.OPEN) self._sendPublish(p);
      else self.outbox.push(p);
    });
  };

  /** Sends a question (`cmd`) and resolves with the server's answer frame; rejects with a
   *  HeraldError (the server's code, "disconnected" or "timeout"). */
  Herald.prototype._ask = function (cmd) {
    var self = this;
    return new Promise(function (resolve, reject) {
      if (self.state !== STATES.OPEN) {
        reject(HeraldError("disconnected", "not connected"));
        return;
      }
      var id = self.nextId++;
      var q = { kind: "query", resolve: resolve, reject: reject };
      q.timer = setTimeout(function () {
        if (self.pending[id] === q) {
          delete self.pending[id];
          reject(HeraldError("timeout", "no answer within " + self.options.ackTimeout + " ms"));
        }
      }, self.options.ackTimeout);
      self.pending[id] = q;
      cmd.id = id;
      if (!self._send(cmd)) {
        delete self.pending[id];
        clearTimeout(q.timer);
        reject(HeraldError("disconnected", "not connected"));
      }
    });
  };

  /** h.presence(channel, { cursor, limit }) -> Promise<{ members, cursor }>: one page of
   *  who is subscribed ({ user, conn, info }); pass the returned cursor for the next page
   *  (null on the last). Needs presence on for the channel's namespace. */
  Herald.prototype.presence = function (channel, options) {
    var cmd = { type: "presence", channel: channel };
    if (options && options.cursor != null) cmd.cursor = options.cursor;
    if (options && options.limit != null) cmd.limit = options.limit;
    return this._ask(cmd).then(function (msg) {
      return { members: msg.members, cursor: msg.cursor };
    });
  };

  /** h.presenceStats(channel) -> Promise<{ connections, users }>. */
  Herald.prototype.presenceStats = function (channel) {
    return this._ask({ type: "presence_stats", channel: channel }).then(function (msg) {
      return { connections: msg.connections, users: msg.users };
    });
  };

  /** h.history(channel, { since, limit, newestFirst }) -> Promise<{ messages, seq, epoch }>:
   *  stored messages (each { channel, seq, data }) without subscribing; at most `limit`
   *  (100, up to 1000) after `since`, or the newest first. */
  Herald.prototype.history = function (channel, options) {
    var cmd = { type: "history", channel: channel };
    if (options && options.since != null) cmd.since = options.since;
    if (options && options.limit != null) cmd.limit = options.limit;
    if (options && options.newestFirst) cmd.newest_first = true;
    return this._ask(cmd).then(function (msg) {
      return { messages: msg.messages, seq: msg.seq, epoch: msg.epoch };
    });
  };

  /** h.close(): closes the connection for good (no reconnect). */
  Herald.prototype.close = function () {
    this.stopped = true;
    if (this.reconnectTimer) clearTimeout(this.reconnectTimer);
    this.reconnectTimer = null;
    if (root.removeEventListener) root.removeEventListener("online", this._onOnline);
    this._failQueued(HeraldError("closed", "client closed"));
    this._stopFallback();
    if (this.ws) {
      var ws = this.ws;
      try {
        ws.close(1000);
      } catch (e) {
        /* ignore */
      }
      this._drop(1000, "client closed");
    } else {
      this._setState(STATES.CLOSED, { final: true });
    }
  };

  /** One channel's subscription: sub.lastSeq, sub.epoch, sub.ready, sub.unsubscribe(). */
  function Subscription(client, channel, onMessage, options) {
    this.client = client;
    this.channel = channel;
    this.handlers = onMessage ? [onMessage] : [];
    this.onGap = options.onGap;
    this.onSubscribed = options.onSubscribed;
    this.onError = options.onError;
    this.onJoin = options.onJoin;
    this.onLeave = options.onLeave;
    // lastSeq: the last seq handed to the app, or null while no position is known (a live
    // subscription before its first confirmation).
    this.lastSeq = options.since != null ? Number(options.since) : null;
    this.epoch = options.epoch || null;
    this.live = false;
    this.closed = false;
    var self = this;
    this.ready = new Promise(function (resolve, reject) {
      self._resolveReady = resolve;
      self._rejectReady = reject;
    });
    // Nobody has to await `ready`; do not report its rejection as unhandled.
    this.ready.catch(function () {});
  }

  Subscription.prototype._resumeFrom = function () {
    return this.lastSeq;
  };

  Subscription.prototype._deliver = function (msg) {
    var seq = msg.seq;
    if (typeof seq !== "number") return;
    if (this.lastSeq != null && seq <= this.lastSeq) return; // seen already, or stale
    this.lastSeq = seq;
    var meta = { channel: this.channel, seq: seq, replay: !this.live };
    if (msg.publisher != null) meta.publisher = msg.publisher; // where the namespace exposes it
    var handlers = this.handlers.slice();
    for (var i = 0; i < handlers.length; i++) {
      try {
        handlers[i](msg.data, meta);
      } catch (e) {
        setTimeout(function () {
          throw e;
        });
      }
    }
  };

  Subscription.prototype._presenceEvent = function (msg) {
    var handler = msg.type === "join" ? this.onJoin : this.onLeave;
    if (!handler) return;
    try {
      handler({ channel: msg.channel, user: msg.user, conn: msg.conn, info: msg.info });
    } catch (e) {
      setTimeout(function () {
        throw e;
      });
    }
  };

  /** `replayFollows`: an event stream announces before it replays (the WebSocket after). */
  Subscription.prototype._subscribed = function (msg, replayFollows) {
    this.live = true;
    if (msg.epoch) this.epoch = msg.epoch;
    // Live messages follow from msg.seq + 1. Everything up to msg.seq was either replayed
    // (since given) or is before this subscription (live start).
    if (!replayFollows && (this.lastSeq == null || this.lastSeq < msg.seq)) this.lastSeq = msg.seq;
    var info = { channel: this.channel, seq: msg.seq, epoch: msg.epoch };
    if (this.onSubscribed) this.onSubscribed(info);
    this._resolveReady(info);
  };

  Subscription.prototype._gap = function (msg, since) {
    var oldest = typeof msg.oldest === "number" ? msg.oldest : null;
    var latest = typeof msg.seq === "number" ? msg.seq : null;
    var last = this.lastSeq;
    // With `since` inside oldest-1..latest the only reason for a gap is another epoch: the
    // server restarted and numbers began again, so nothing can be said about what was lost.
    var newEpoch =
      since != null && oldest != null && latest != null && (since > latest || since + 1 >= oldest);
    var missed = null;
    if (!newEpoch && oldest != null && since != null) missed = Math.max(0, oldest - 1 - since);
    var gap = {
      channel: this.channel,
      since: since,
      oldest: oldest,
      seq: latest,
      lastDelivered: last,
      epochChanged: newEpoch,
      missed: missed,
      message: msg.message,
    };
    var choice;
    if (this.onGap) {
      try {
        choice = this.onGap(gap);
      } catch (e) {
        setTimeout(function () {
          throw e;
        });
      }
    }
    this.client._emit("gap", gap);
    if (this.closed) return;
    // The old position means nothing now: resume where the app asked, or live. Only
    // seqs above it are delivered, and those are all newer than what the app has seen.
    var resume = choice && choice.since != null ? Number(choice.since) : null;
    // Within one epoch, never go back behind what the app already has.
    if (!newEpoch && resume != null && last != null && resume < last) resume = last;
    this.epoch = null;
    this.lastSeq = resume;
    this.client._sendSubscribe(this);
  };

  Subscription.prototype._failed = function (err) {
    this.closed = true;
    if (this.client.channels[this.channel] === this) delete this.client.channels[this.channel];
    if (this.onError) this.onError(err);
    this.client._emit("error", err);
    this._rejectReady(err);
  };

  /** Stops this subscription (all its handlers). */
  Subscription.prototype.unsubscribe = function () {
    if (this.closed) return;
    this.closed = true;
    var client = this.client;
    if (client.channels[this.channel] === this) delete client.channels[this.channel];
    if (this.receiver) this.receiver.stop();
    if (client.state === STATES.OPEN) {
      client._send({ type: "unsubscribe", channel: this.channel, id: client.nextId++ });
    }
  };

  // ---- fallback: receiving over SSE or long-polling while the WebSocket is blocked ----

  /** Receives over transports()[index] (and on, as each turns out blocked too). */
  Herald.prototype._fallBack = function (index) {
    var name = this.transports()[index];
    if (!name) {
      // Nothing got through: start over from the WebSocket, backing off.
      this._stopFallback();
      this.transport = "websocket";
      this._onClose(1006, "no transport could connect");
      return;
    }
    this._stopFallback();
    this.transport = name;
    var self = this;
    this.fallback = { index: index, reached: false, timer: setInterval(function () { self._probe(); }, this.options.upgradeInterval) };
    this.openedAt = 0;
    // "open" once something came through: a server that is down fails every transport,
    // and then the client backs off as it would without fallbacks.
    var any = false;
    for (var ch in this.channels) {
      if (!Object.prototype.hasOwnProperty.call(this.channels, ch)) continue;
      any = true;
      this._receive(this.channels[ch]);
    }
    if (!any) {
      var fallback = this.fallback;
      root.fetch(this._httpUrl("/healthz", {}), { cache: "no-store" }).then(function (r) {
        if (self.fallback === fallback && r.ok) self._reached();
        else if (self.fallback === fallback) self._blocked(name);
      }, function () {
        if (self.fallback === fallback) self._blocked(name);
      });
    }
  };

  /** The fallback transport delivered: the client is open on it. */
  Herald.prototype._reached = function () {
    if (!this.fallback || this.fallback.reached) return;
    this.fallback.reached = true;
    // A change of transport is news even when the state stays "open".
    this.state = STATES.OPEN;
    this._emit("state", STATES.OPEN, { transport: this.transport });
  };

  Herald.prototype._stopFallback = function () {
    var fallback = this.fallback;
    if (!fallback) return;
    this.fallback = null;
    clearInterval(fallback.timer);
    if (this.probe) this.probe.onopen = this.probe.onclose = null;
    if (this.probe) this.probe.close();
    this.probe = null;
    for (var ch in this.channels) {
      if (!Object.prototype.hasOwnProperty.call(this.channels, ch)) continue;
      var sub = this.channels[ch];
      if (sub.receiver) sub.receiver.stop();
      sub.receiver = null;
      sub.live = false;
    }
  };

  /** Tries the WebSocket again; once it opens, the fallback stops and it takes over. */
  Herald.prototype._probe = function () {
    if (this.probe || this.stopped) return;
    var ws;
    try { ws = this._newSocket(); } catch (e) { return; }
    this.probe = ws;
    var self = this;
    ws.onopen = function () {
      if (self.probe !== ws) return;
      self.probe = null;
      self._stopFallback();
      self._attach(ws);
      ws.onopen();
    };
    ws.onclose = function () {
      if (self.probe === ws) self.probe = null;
    };
  };

  /** The HTTP URL of `path` on the server, with the token. */
  Herald.prototype._httpUrl = function (path, params) {
    var url = new URL(path, this.url.href);
    url.protocol = this.url.protocol === "wss:" ? "https:" : "http:";
    var token = this._token();
    if (token) params.token = token;
    for (var k in params) if (params[k] != null) url.searchParams.set(k, String(params[k]));
    return url.href;
  };

  /** The transport failed before it ever delivered: try the next one. */
  Herald.prototype._blocked = function (name) {
    if (this.fallback && this.transport === name) this._fallBack(this.fallback.index + 1);
  };

  /** Starts receiving `sub` over the fallback transport, from its last delivered seq. */
  Herald.prototype._receive = function (sub) {
    if (sub.receiver) sub.receiver.stop();
    sub.receiver = this.transport === "sse" ? this._sse(sub) : this._poll(sub);
  };

  Herald.prototype._sse = function (sub) {
    var self = this;
    var since = sub._resumeFrom();
    var es = new root.EventSource(this._httpUrl("/sse", { channel: sub.channel, since: since }));
    var opened = false;
    var frame = function (event) {
      opened = true;
      self._reached();
      var data;
      try { data = JSON.parse(event.data); } catch (e) { return; }
      if (event.type === "message") sub._deliver(data);
      else if (event.type === "subscribed") sub._subscribed(data, true);
      else if (event.type === "gap") {
        // The server continues live by itself: report it, and take what comes.
        sub.lastSeq = null;
        self._emit("gap", { channel: sub.channel, since: since, oldest: data.oldest, seq: data.seq, missed: null });
      }
    };
    ["message", "subscribed", "gap"].forEach(function (t) { es.addEventListener(t, frame); });
    es.onopen = function () { opened = true; self._reached(); };
    es.onerror = function () {
      if (!opened) {
        es.close();
        self._blocked("sse");
      } else if (es.readyState === 2) {
        self._receive(sub); // closed for good: open again from lastSeq
      }
    };
    return { stop: function () { es.close(); } };
  };

  Herald.prototype._poll = function (sub) {
    var self = this;
    var state = { stopped: false, controller: root.AbortController ? new AbortController() : null, delivered: false };
    var next = function () {
      if (state.stopped) return;
      var url = self._httpUrl("/poll", { channel: sub.channel, since: sub._resumeFrom(), epoch: sub.epoch, timeout: 25 });
      root.fetch(url, { signal: state.controller && state.controller.signal, cache: "no-store" })
        .then(function (r) {
          if (r.ok) return r.json();
          throw new Error("HTTP " + r.status);
        })
        .then(function (body) {
          if (state.stopped) return;
          state.delivered = true;
          self._reached();
          if (body.history_gap) {
            self._emit("gap", { channel: sub.channel, since: sub.lastSeq, oldest: body.history_gap.oldest, seq: body.seq, missed: null });
            sub.lastSeq = null;
            sub.epoch = null;
          } else {
            (body.messages || []).forEach(function (m) { sub._deliver(m); });
            if (!sub.live) sub._subscribed({ seq: body.seq, epoch: body.epoch }, false);
            else if (sub.lastSeq == null || sub.lastSeq < body.seq) sub.lastSeq = body.seq;
            if (body.epoch) sub.epoch = body.epoch;
          }
          next();
        })
        .catch(function () {
          if (state.stopped) return;
          if (!state.delivered) self._blocked("poll");
          else setTimeout(next, self.options.minDelay);
        });
    };
    next();
    return {
      stop: function () {
        state.stopped = true;
        if (state.controller) state.controller.abort();
      },
    };
  };

  Herald.Subscription = Subscription;
  Herald.HeraldError = HeraldError;
  Herald.STATES = STATES;
  Herald.version = "1";

  root.Herald = Herald;
  if (typeof module === "object" && module && module.exports) module.exports = Herald;
})(typeof globalThis !== "undefined" ? globalThis : typeof window !== "undefined" ? window : this);
