//! One pinned thread's state: its connections, their outboxes and deadlines, its share of
//! the channels, and its mailbox traffic. No system calls: a backend (`crate::backend`)
//! owns the sockets and drives a [`Shard`] through the calls below.
//!
//! # Calling contract
//! `crate::backend::turn` is this contract, written once for every backend. Per loop turn:
//! 1. calls [`Shard::accept`] for each new socket (it gets the connection's key, and
//!    stores the socket under that key);
//! 2. for each readable socket, appends what it reads to [`Shard::read_buffer`] and calls
//!    [`Shard::handle_read`] (or [`Shard::handle_eof`] on end of stream or error),
//!    reading again only while [`Shard::wants_read`];
//! 3. calls [`Shard::handle_inbox`] and [`Shard::handle_timeout`];
//! 4. hands [`Shard::take_outgoing`] to the [`Post`], so other shards start on this
//!    turn's broadcasts while this one writes; then writes each key from
//!    [`Shard::poll_dirty`] out of [`Shard::outbox`], reports it with
//!    [`Shard::handle_written`], shuts down the socket's write side when
//!    [`Shard::poll_flushed`] says so, and reads again when [`Shard::resume_read`] does;
//!    during a long flush it calls [`Shard::handle_inbox`] again when mail waits;
//! 5. drops the socket of each key from [`Shard::poll_dead`], then calls
//!    [`Shard::remove`];
//! 6. calls [`Shard::end_turn`], hands [`Shard::take_outgoing`] to the [`Post`], and
//!    sleeps until [`Shard::poll_timeout`], a socket event or a wake-up.
//!
//! # Connections
//! A connection starts by reading an HTTP request. It then becomes a WebSocket (`/ws`,
//! `/echo`), an event stream (`/sse`), a parked long-poll (`/poll`), a publish waiting for
//! its acks (`POST /api/publish`), or gets a response and either reads its next request
//! (keep-alive) or finishes. All of them subscribe the same way, so history, ordering and
//! fan-out are one mechanism whatever the transport. What differs, each transport says
//! in its own file by answering the core's events with an action (`transport`).
//!
//! # Where things live
//! This file is the core: the connection table, the dirty and dead lists and the calling
//! contract above. Each concern has its file:
//!
//! | file | what |
//! |---|---|
//! | `conn` | a connection's state: its phase (transport), buffers, subscriptions |
//! | `transport` | the events a phase answers and the actions it returns to the core |
//! | `request` | the HTTP request stage: reading, admission, routing, responses |
//! | `websocket` | `/ws` and `/echo`: upgrade, frames, rate limit, commands, close |
//! | `event_stream`, `longpoll`, `publish` | `/sse`, `/poll`, `POST /api/publish` and acks |
//! | `subscriber` | subscriptions from pending to active, paced `since` replays, gaps |
//! | `home` | the channels homed here: ordering, history, members, join/leave |
//! | `query`, `api` | questions to a channel's home (presence); the server API's orders |
//! | `fanout` | a broadcast queued on every local subscriber; shedding slow ones |
//! | `timer`, `deadlines` | request, poll, token, close and heartbeat deadlines; acting on them |
//! | `outbox`, `mailbox` | a connection's write queue; the envelopes between shards, dispatched |
//! | `context` | what every shard of the node shares (configuration, limits, metrics) |
//! | `harness` | shards driven in memory, for the unit tests and the benches |

#![deny(clippy::disallowed_methods)] // no clock reads here: see clippy.toml

mod admission;
mod api;
mod conn;
mod context;
mod deadlines;
mod event_stream;
mod fanout;
pub mod harness;
mod home;
mod longpoll;
mod mailbox;
mod outbox;
mod publish;
mod query;
mod request;
mod subscriber;
mod timer;
mod transport;
mod websocket;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use slab::Slab;
use smallvec::SmallVec;

pub use conn::ConnRef;
pub use context::Context;
pub use mailbox::{Answer, Envelope, Inbox, Order, Part, Post, Query, Wake};
pub use outbox::Outbox;

use crate::hub::{Channels, Subscriptions};
use crate::limits::{Refusal, TokenBucket};
use crate::metrics::{Counters, Transport};
use crate::proto::deflate::{Compressor, CompressorSettings};
use crate::proto::handshake::HandshakeLimits;
use crate::proto::pubsub::CommandParser;

use conn::{Conn, Life, Phase};
use request::RequestStage;
use timer::{Deadlines, Spread, Timed, Wheel};
use websocket::{Endpoint, EndpointLimits};

/// The most connections a shard reserves its tables for up front (15 MiB of address
/// space for the connection table); past it they grow by doubling.
const MAX_RESERVED_CONNECTIONS: usize = 65_536;

/// One shard: see the module documentation for the calling contract.
pub struct Shard {
    id: usize,
    shards: usize,
    ctx: Arc<Context>,
    conns: Slab<Conn>,
    next_generation: u32,
    subscriptions: Subscriptions,
    channels: Channels,
    parser: CommandParser,
    handshake_limits: HandshakeLimits,
    request_deadlines: Deadlines,
    close_deadlines: Deadlines,
    /// Heartbeat, long-poll and token-expiry deadlines: they vary per connection.
    wheel: Wheel<(ConnRef, Timed)>,
    /// Past this many entries the wheel's stale ones are swept out.
    wheel_sweep_at: usize,
    heartbeat_phases: Spread,
    /// The pong timeout on the heartbeats' phases ([`timer::pong_wait_on_phases`]), where
    /// they are far enough apart.
    pong_wait_on_phases: Option<Duration>,
    dirty: Vec<usize>,
    dead: Vec<usize>,
    /// Envelopes for other shards, per destination, sent once per turn.
    outgoing: Vec<Vec<Envelope>>,
    /// The spare batch this shard's own envelopes are swapped into while processed.
    local_batch: Vec<Envelope>,
    /// When the broadcasts delivered this turn were published (publish→flush latency).
    delivered_this_turn: Vec<Instant>,
    draining: bool,
    /// The time of the current loop turn, as the backend passed it in.
    now: Instant,
    counters: Counters,
    /// New connections this shard admits per second (reconnect storms).
    accept_bucket: TokenBucket,
    /// Seeds the jitter of `Retry-After`.
    jitter: u64,
    /// Numbers subscription requests.
    next_ticket: u32,
    /// Keep-alive connections that went back to reading with bytes already buffered (a
    /// request pipelined behind one answered later): processed at the end of the step.
    reread: Vec<usize>,
    /// What the connections of `/ws` and of `/echo` share.
    pubsub_limits: EndpointLimits,
    echo_limits: EndpointLimits,
    /// Compresses the broadcasts of `shared` channels homed here, once per publish, each
    /// from an empty window so any compressing subscriber can take the frame.
    shared_compressor: Compressor,
}

impl Shard {
    /// Shard `id` of `shards`, its clock starting at `now`.
    pub fn new(id: usize, shards: usize, ctx: Arc<Context>, now: Instant) -> Self {
        let config = &ctx.config;
        Self {
            id,
            shards,
            accept_bucket: TokenBucket::new(config.accept_rate, config.accept_rate, now),
            jitter: ctx.jitter_seed(id),
            next_ticket: 0,
            reread: Vec::new(),
            handshake_limits: HandshakeLimits {
                max_head_bytes: config.max_head_bytes,
                max_headers: config.max_headers,
            },
            request_deadlines: Deadlines::new(config.handshake_timeout),
            close_deadlines: Deadlines::new(config.close_timeout),
            wheel: Wheel::new(now),
            wheel_sweep_at: 64,
            heartbeat_phases: Spread::new(now),
            pong_wait_on_phases: timer::pong_wait_on_phases(
                config.pong_timeout,
                config.ping_interval,
            ),
            channels: Channels::new(shards, config.history)
                .with_prefixes(config.namespaces.history_by_prefix()),
            // Address space for this shard's share of the connection limit, touched only as
            // connections arrive: a table grown by doubling would copy itself each time and
            // leave the old copies resident until the allocator purges them (as much again
            // as the table, right after a connect storm). Capped, so a host that counts
            // address space (`vm.overcommit_memory = 2`) is not charged for a million.
            conns: Slab::with_capacity(
                config
                    .max_connections
                    .div_ceil(shards)
                    .min(MAX_RESERVED_CONNECTIONS),
            ),
            next_generation: 0,
            subscriptions: Subscriptions::default(),
            parser: CommandParser::default(),
            dirty: Vec::new(),
            dead: Vec::new(),
            outgoing: (0..shards).map(|_| Vec::new()).collect(),
            local_batch: Vec::new(),
            delivered_this_turn: Vec::new(),
            draining: false,
            now,
            counters: Counters::default(),
            shared_compressor: Compressor::new(CompressorSettings::SHARED, true),
            pubsub_limits: EndpointLimits::new(config, Endpoint::PubSub),
            echo_limits: EndpointLimits::new(config, Endpoint::Echo),
            ctx,
        }
    }

    pub fn id(&self) -> usize {
        self.id
    }

    /// This shard's counters as of now.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Registers a new socket from `peer`; `None` when draining or far over the
    /// connection limit (the backend closes the socket at once). Above the shard's accept
    /// rate the connection gets a 503 with a spread `Retry-After` and ends.
    pub fn accept(&mut self, now: Instant, peer: IpAddr) -> Option<usize> {
        self.now = now;
        if self.draining || !self.ctx.limits.accept() {
            return None;
        }
        self.next_generation = self.next_generation.wrapping_add(1);
        let key = self.conns.insert(Conn {
            generation: self.next_generation,
            phase: Phase::Request(RequestStage::new_boxed(
                now + self.ctx.config.handshake_timeout,
            )),
            read_buf: None,
            outbox: Outbox::default(),
            subs: SmallVec::new(),
            last_activity: self.wheel.stamp(now),
            dirty: false,
            life: Life::Open,
            read_paused: false,
            peer,
            counted: None,
            identity: None,
            user_count: conn::UserCount::Uncounted,
        });
        self.arm_request_deadline(key);
        self.counters.accepted_total += 1;
        self.counters.connections[Transport::Http as usize] += 1;
        if !self.accept_bucket.try_take(now) {
            self.refuse_busy(key, Refusal::AcceptRate);
        } else if !self.is_trusted_proxy(peer) {
            // Every socket counts from accept on, plain HTTP keep-alive ones too: one
            // address cannot hold more than its share, whatever it sends.
            match self.ctx.limits.count(peer) {
                Ok(()) => self.conns[key].counted = Some(peer),
                Err(refusal) => self.refuse_busy(key, refusal),
            }
        }
        Some(key)
    }

    fn conn_ref(&self, key: usize) -> ConnRef {
        ConnRef {
            key: key as u32,
            generation: self.conns[key].generation,
        }
    }

    /// The key behind `conn` if it is still the same live connection.
    fn resolve(&self, conn: ConnRef) -> Option<usize> {
        let key = conn.key as usize;
        match self.conns.get(key) {
            Some(c) if c.generation == conn.generation && !c.is_dead() => Some(key),
            _ => None,
        }
    }

    fn set_phase(&mut self, key: usize, phase: Phase) {
        let conn = &mut self.conns[key];
        self.counters.connections[conn.phase.counted_as() as usize] -= 1;
        self.counters.connections[phase.counted_as() as usize] += 1;
        conn.phase = phase;
    }

    /// Where the backend appends bytes read from `key`'s socket.
    pub fn read_buffer(&mut self, key: usize) -> &mut BytesMut {
        self.conns[key].read_buf_mut()
    }

    /// The backend reads nothing more from `key` for now: an empty read buffer goes.
    pub fn release_read_buffer(&mut self, key: usize) {
        self.conns[key].release_read_buf();
    }

    /// Whether reading more from `key` is useful now: not when it is gone, not while its
    /// outbox is over budget (a client that sends without reading waits for us), not while
    /// its read buffer holds what its phase may buffer, and not while its transport says
    /// no (too many publishes awaiting their acks). When this says no, reading is paused
    /// until [`Shard::resume_read`] says yes: the bytes wait in the kernel, where TCP flow
    /// control stops the client.
    pub fn wants_read(&mut self, key: usize) -> bool {
        let config = &self.ctx.config;
        let conn = &mut self.conns[key];
        if conn.is_dead() {
            return false;
        }
        let transport = conn.phase.transport_ref();
        let wants = conn.outbox.len_bytes() < config.outbound_queue_bytes
            && transport.may_read()
            && conn.unread().len() < transport.read_budget(config);
        if !wants {
            conn.read_paused = true;
        }
        wants
    }

    /// Whether `key` reads a stream of input (WebSocket frames, an event stream's
    /// ignored bytes) rather than one request at a time: a backend may then keep a
    /// receive armed across reads.
    pub fn reads_in_bulk(&self, key: usize) -> bool {
        self.conns[key].phase.transport_ref().reads_in_bulk()
    }

    /// Processes what the backend appended to `key`'s read buffer.
    pub fn handle_read(&mut self, key: usize, now: Instant) {
        self.now = now;
        let conn = &mut self.conns[key];
        if conn.is_dead() {
            return;
        }
        conn.last_activity = self.wheel.stamp(now);
        if conn.is_finishing() {
            // Only the peer's end of stream matters now.
            conn.read_buf = None;
            return;
        }
        loop {
            match self.conns[key].phase {
                Phase::Request(_) => {
                    // Pipelined requests wait while the answers to earlier ones are
                    // unread: the outbox stays within its budget.
                    if self.conns[key].outbox.len_bytes() >= self.ctx.config.outbound_queue_bytes {
                        self.conns[key].read_paused = true;
                        break;
                    }
                    if !self.read_request(key) {
                        break;
                    }
                }
                Phase::WebSocket(_) => {
                    self.read_frames(key);
                    break;
                }
                // Waiting for an answer: a pipelined request stays buffered until then.
                Phase::Publishing(_) | Phase::Polling(_) | Phase::Api(_) | Phase::Admitting(_) => {
                    break;
                }
                Phase::EventStream(_) => {
                    self.conns[key].read_buf = None;
                    break;
                }
            }
        }
        // Idle connections keep no read buffer.
        self.conns[key].release_read_buf();
    }

    fn reply(&mut self, key: usize, frame: Bytes) {
        let conn = &mut self.conns[key];
        if conn.is_closing() {
            return;
        }
        // Replies (acks, errors) go plain even on compressing connections: they are short,
        // and compressing them would allocate a compressor for every connection that ever
        // subscribed, where only those that receive broadcasts need one.
        conn.outbox.push(frame);
        self.counters.messages_out_total += 1;
        self.mark_dirty(key);
    }

    fn send(&mut self, shard: usize, envelope: Envelope) {
        self.outgoing[shard].push(envelope);
    }

    fn mark_dirty(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        let queued = conn.outbox.len_bytes() as u64;
        if queued > self.counters.outbound_queue_peak_bytes {
            self.counters.outbound_queue_peak_bytes = queued;
        }
        if !conn.dirty && !conn.is_dead() {
            conn.dirty = true;
            self.dirty.push(key);
        }
    }

    /// After the queued bytes are written: shut down writing, then wait for the peer.
    fn finish(&mut self, key: usize) {
        let conn_ref = self.conn_ref(key);
        let conn = &mut self.conns[key];
        if !conn.is_finishing() {
            conn.life = Life::Finishing;
            conn.read_buf = None;
            self.close_deadlines.arm(self.now, conn_ref);
            self.leave_all(key);
        }
        self.mark_dirty(key);
    }

    fn leave_all(&mut self, key: usize) {
        while !self.conns[key].subs.is_empty() {
            self.release(key, self.conns[key].subs.len() - 1);
        }
    }

    /// The peer closed its end, or the socket failed.
    pub fn handle_eof(&mut self, key: usize) {
        self.kill(key);
    }

    /// The backend will drop `key`'s socket: release everything it held.
    fn kill(&mut self, key: usize) {
        if self.conns[key].is_dead() {
            return;
        }
        self.leave_all(key);
        self.drop_identity(key);
        let conn = &mut self.conns[key];
        conn.life = Life::Dead;
        // A send under way (io_uring) may still read a started frame: it goes with the
        // connection, in `remove`.
        conn.outbox.discard_all_but_started();
        conn.read_buf = None;
        self.counters.connections[conn.phase.counted_as() as usize] -= 1;
        if let Some(ip) = conn.counted.take() {
            self.ctx.limits.release(ip);
        }
        self.ctx.limits.close();
        self.dead.push(key);
    }

    /// Connections whose sockets the backend must drop (then call [`Shard::remove`]).
    pub fn poll_dead(&mut self) -> Option<usize> {
        self.dead.pop()
    }

    /// Forgets a dead connection once its socket is gone.
    pub fn remove(&mut self, key: usize) {
        debug_assert!(self.conns[key].is_dead());
        self.conns.remove(key);
    }

    /// Connections with bytes to write or a state change to act on.
    pub fn poll_dirty(&mut self) -> Option<usize> {
        while let Some(key) = self.dirty.pop() {
            if let Some(conn) = self.conns.get_mut(key) {
                conn.dirty = false;
                if !conn.is_dead() {
                    return Some(key);
                }
            }
        }
        None
    }

    /// The socket of `key` can take more bytes again.
    pub fn handle_writable(&mut self, key: usize) {
        if !self.conns[key].outbox.is_empty() {
            self.mark_dirty(key);
        }
    }

    pub fn outbox(&mut self, key: usize) -> &mut Outbox {
        &mut self.conns[key].outbox
    }

    /// The backend wrote `written` bytes of `key`'s outbox.
    pub fn handle_written(&mut self, key: usize, written: usize) {
        self.conns[key].outbox.advance(written);
        self.counters.bytes_out_total += written as u64;
        self.continue_replay(key);
    }

    /// Moves up to `max` chunks of `key`'s outbox into `out`, in write order, as written:
    /// for a backend whose sends complete later and keeps the bytes alive until then.
    pub fn take_outbox(&mut self, key: usize, out: &mut Vec<Bytes>, max: usize) {
        let taken = self.conns[key].outbox.take_chunks(out, max);
        self.counters.bytes_out_total += taken as u64;
        self.continue_replay(key);
    }

    /// Whether the backend should process `key`'s read buffer and socket again: reading
    /// had paused on a full outbox that has since drained below budget.
    pub fn resume_read(&mut self, key: usize) -> bool {
        if self.conns[key].read_paused && self.wants_read(key) {
            self.conns[key].read_paused = false;
            return true;
        }
        false
    }

    /// After a write attempt: whether the backend should now shut down `key`'s write side
    /// (everything queued went out and the connection is finishing). The shard then waits
    /// for the peer's end of stream, bounded by the close timeout.
    pub fn poll_flushed(&mut self, key: usize) -> bool {
        let conn = &mut self.conns[key];
        if conn.life == Life::Finishing && conn.outbox.is_empty() {
            conn.life = Life::WriteShut;
            return true;
        }
        false
    }

    /// Processes the envelopes other shards (and this one) sent.
    pub fn handle_inbox(&mut self, inbox: &Inbox, now: Instant) {
        self.now = now;
        loop {
            // Envelopes to ourselves skip the queue but keep their order.
            // Swapped with a spare batch so neither Vec gives up its capacity each turn.
            let mut local = std::mem::take(&mut self.local_batch);
            std::mem::swap(&mut local, &mut self.outgoing[self.id]);
            let had_local = !local.is_empty();
            for envelope in local.drain(..) {
                self.handle_envelope(envelope);
            }
            mailbox::trim(&mut local);
            self.local_batch = local;
            let mut had_remote = false;
            while let Some(envelope) = inbox.poll() {
                had_remote = true;
                self.handle_envelope(envelope);
                if !self.outgoing[self.id].is_empty() {
                    break;
                }
            }
            if !had_local && !had_remote {
                self.reread_pipelined();
                return;
            }
        }
    }

    /// Closes the turn after the flush: records publish→flush latency for what this turn
    /// delivered, the time the turn worked, and publishes the counters for scrapes.
    pub fn end_turn(&mut self, busy: Duration, now: Instant) {
        for published_at in self.delivered_this_turn.drain(..) {
            self.counters
                .observe_publish_flush(now.saturating_duration_since(published_at));
        }
        self.counters.busy_ns_total += busy.as_nanos() as u64;
        self.counters.loop_turns_total += 1;
        self.counters.channels_homed = self.channels.len() as u64;
        self.ctx.registry.shard(self.id).store(&self.counters);
    }

    /// Envelopes for other shards, one batch per destination. This shard's own batch is
    /// left for the next [`Shard::handle_inbox`].
    pub fn take_outgoing(&mut self) -> &mut [Vec<Envelope>] {
        &mut self.outgoing
    }

    /// Envelopes to itself are waiting: the backend must not sleep.
    pub fn has_local_work(&self) -> bool {
        !self.outgoing[self.id].is_empty()
    }

    /// Stops taking connections and closes every client: WebSockets with 1001, event
    /// streams and idle keep-alive connections at once, parked polls with their answer.
    pub fn begin_drain(&mut self, now: Instant) {
        self.now = now;
        self.draining = true;
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            if !self.conns[key].is_finishing() {
                self.dispatch(key, |transport, scope| transport.on_drain(scope));
            }
        }
    }

    /// True once draining and every connection is gone.
    pub fn is_drained(&self) -> bool {
        self.draining && self.conns.is_empty()
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// How many connections this shard has room for before its table grows: a backend
    /// sizes its own per-connection table the same way.
    pub fn connection_capacity(&self) -> usize {
        self.conns.capacity()
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests start the clock the shards are driven by
mod tests;
