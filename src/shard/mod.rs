//! One pinned thread's state: its connections, their outboxes and deadlines, its share of
//! the channels, and its mailbox traffic. No system calls: a backend (`crate::backend`)
//! owns the sockets and drives a [`Shard`] through the calls below.
//!
//! # Calling contract
//! Per loop turn, a backend:
//! 1. calls [`Shard::accept`] for each new socket (it gets the connection's key, and
//!    stores the socket under that key);
//! 2. for each readable socket, appends what it reads to [`Shard::read_buffer`] and calls
//!    [`Shard::handle_read`] (or [`Shard::handle_eof`] on end of stream or error),
//!    reading again only while [`Shard::wants_read`];
//! 3. calls [`Shard::handle_inbox`] and [`Shard::handle_timeout`];
//! 4. writes each key from [`Shard::poll_dirty`] out of [`Shard::outbox`], reports it
//!    with [`Shard::handle_written`], shuts down the socket's write side when
//!    [`Shard::poll_flushed`] says so, and reads again when [`Shard::resume_read`] does;
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
//! fan-out are one mechanism whatever the transport.

mod mailbox;
mod outbox;
mod timer;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::{Buf, Bytes, BytesMut};
use slab::Slab;

pub use mailbox::{Answer, Envelope, Inbox, Post, Wake};
pub use outbox::Outbox;
use timer::Deadlines;

use crate::auth::{AuthMode, Authenticator, Identity, api_key_matches, token_of};
use crate::cluster::{self, Bridge};
use crate::compression::CompressionPolicy;
use crate::config::{Config, MAX_FRAGMENTS};
use crate::http::{self, Route, longpoll, publish, sse};
use crate::hub::{self, Broadcast, ChannelName, Channels, SubscribeOutcome, Subscriptions};
use crate::limits::{ConnectionLimits, SlowConsumerPolicy, TokenBucket, client_ip, retry_after};
use crate::metrics::{Counters, Registry, Transport};
use crate::proto::decoder::DecoderLimits;
use crate::proto::deflate::{self, Compressor, CompressorSettings};
use crate::proto::frame::{FrameHeader, OpCode, encode_frame};
use crate::proto::handshake::{self, HandshakeLimits, Request};
use crate::proto::pubsub::{self, Command, CommandParser};
use crate::proto::{Connection, Event};

/// A connection as other shards name it: its slab key plus a generation, so a reply for
/// a connection that has gone never reaches a newer one in the same slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ConnRef {
    pub key: u32,
    pub generation: u32,
}

/// Which WebSocket service a connection upgraded to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    PubSub,
    Echo,
}

enum Phase {
    /// Reading an HTTP request; `pending` holds a parsed head whose body is still coming.
    /// `scanned` bytes of the buffer are known to hold no end of head, so a head that
    /// arrives a byte at a time is scanned once, not parsed again from its start per read.
    Request {
        pending: Option<Box<(Request, usize)>>,
        scanned: u32,
    },
    /// `POST /api/publish` waiting for the homes to order its messages.
    Publishing {
        results: Vec<Option<(u64, u32)>>,
        remaining: usize,
        batch: bool,
        keep_alive: bool,
    },
    /// `GET /poll` parked until a message or its deadline; `seq` is where the client
    /// stands (its `since`, then the channel's latest once subscribed).
    Polling {
        deadline: Instant,
        seq: u64,
        keep_alive: bool,
        /// The deadline passed before the home answered: answer as soon as it does.
        expired: bool,
        /// The channel's epoch once a cluster answered (`None`: the node's own).
        epoch: Option<ChannelName>,
    },
    /// `GET /sse`: an open event stream.
    EventStream,
    WebSocket {
        ws: Box<Connection>,
        endpoint: Endpoint,
        /// Inbound messages allowed.
        rate: Box<RateLimit>,
    },
}

/// A connection's inbound message budget and how often it ran past it in a row.
struct RateLimit {
    bucket: TokenBucket,
    strikes: u32,
}

/// Publishes one connection may have waiting for their acks; past it the shard stops
/// reading from it, so a client pipelining publishes cannot queue without bound.
const MAX_INFLIGHT_PUBLISHES: u32 = 64;

/// Messages refused in a row before a connection that keeps sending over its rate is
/// closed with 1008.
const MAX_STRIKES: u32 = 50;

impl Phase {
    fn transport(&self) -> Transport {
        match self {
            Self::Request { .. } | Self::Publishing { .. } => Transport::Http,
            Self::Polling { .. } => Transport::Poll,
            Self::EventStream => Transport::Sse,
            Self::WebSocket { .. } => Transport::WebSocket,
        }
    }
}

/// One subscription of a connection. A subscription is pending until its home answers;
/// the home counts it from the moment it sees the `Subscribe`, so exactly one
/// `Unsubscribe` goes back for each `Subscribe` sent, whatever happens in between.
struct Sub {
    channel: ChannelName,
    state: SubState,
}

enum SubState {
    /// Sent to the home as request `ticket`, not yet confirmed. `unsubscribe` holds the
    /// id of an unsubscribe that arrived meanwhile (outer `Some`), carried out once
    /// confirmed. A subscription with `since` stays pending while its replay goes out
    /// (`catch_up`); live messages reach it only once it has caught up.
    Pending {
        ticket: u32,
        unsubscribe: Option<Option<u64>>,
        catch_up: Option<Box<CatchUp>>,
    },
    /// Receiving messages; `slot` is its place in [`Subscriptions`], `tag` the channel's
    /// name in this shard's outboxes.
    Active { slot: usize, tag: u32 },
}

struct Conn {
    generation: u32,
    phase: Phase,
    read_buf: BytesMut,
    outbox: Outbox,
    subs: Vec<Sub>,
    last_activity: Instant,
    /// When the request being read must be complete (handshake and keep-alive idle).
    request_deadline: Instant,
    /// In the dirty list already.
    dirty: bool,
    /// Flush what is queued, shut down writing, then wait (bounded) for the peer's end of
    /// stream so our last bytes are not lost to a reset.
    finishing: bool,
    /// The write side is shut down; only the end of stream is awaited.
    write_shut: bool,
    dead: bool,
    /// A close frame (or a final response) is queued: nothing may follow it.
    closing: bool,
    /// Reading stopped while the outbox was over budget or too many publishes awaited
    /// their acks; resume once that clears.
    read_paused: bool,
    /// Publishes sent to their homes and not yet acknowledged.
    inflight_publishes: u32,
    /// The TCP peer's address.
    peer: IpAddr,
    /// The address counted against the per-address limit: the peer's from accept on, or,
    /// when the peer is a trusted proxy, its client's while a request holds the connection
    /// (WebSocket, event stream, long-poll).
    counted: Option<IpAddr>,
    /// What the request being served may do; set when it is admitted, and replaced by
    /// the next request's on a keep-alive connection.
    identity: Option<Arc<Identity>>,
}

/// A replay that goes out in chunks of at most half the outbound budget, the next asked
/// of the home only once the outbox has drained below half: what a `since` brings back
/// never holds more than the budget of the connection, however much history it covers.
/// Live messages published meanwhile come from history too, until the chunk that
/// reaches the channel's latest seq ends the catch-up.
struct CatchUp {
    /// The last seq sent (the `since` to ask the next chunk from).
    at: u64,
    /// The id the `subscribed` reply will carry.
    id: Option<u64>,
    /// A chunk is on its way (at most one per connection).
    requested: bool,
    /// The home has answered once (an event stream announces `subscribed` then).
    answered: bool,
    /// The channel's epoch as a cluster first answered (the next chunks must be of it).
    epoch: Option<ChannelName>,
}

/// Deadlines that differ per connection, kept in one ordered heap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timed {
    /// A parked long-poll runs out.
    Poll,
    /// The token that admitted the request holding the connection expires (its `exp`
    /// plus leeway, in Unix seconds): close with 4001. Stale once a later request on the
    /// same connection was admitted with another token.
    TokenExpiry { expires_at: u64 },
}

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
    heartbeat_deadlines: Deadlines,
    close_deadlines: Deadlines,
    /// Long-poll and token-expiry deadlines vary per connection: an ordered heap.
    timed: BinaryHeap<Reverse<(Instant, ConnRef, Timed)>>,
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
    /// Compresses the broadcasts of `shared` channels homed here, once per publish, each
    /// from an empty window so any compressing subscriber can take the frame.
    shared_compressor: Compressor,
}

/// What every shard shares, read-only apart from the atomics inside: built once at start.
pub struct Context {
    pub config: Config,
    /// This run's epoch: sequence numbers restart with it.
    pub epoch: Box<str>,
    pub registry: Registry,
    pub auth: Authenticator,
    pub limits: ConnectionLimits,
    /// The cluster link with `--redis`: channels are then ordered and stored in Redis
    /// instead of by their home shard.
    pub cluster: Option<Bridge>,
}

impl Context {
    /// Checks what needs checking (keys, files) once; errors are for the operator.
    pub fn new(config: Config, shards: usize) -> Result<Self, String> {
        Ok(Self {
            auth: Authenticator::new(&config.auth)?,
            limits: ConnectionLimits::new(config.max_connections, config.max_connections_per_ip),
            registry: Registry::new(shards),
            epoch: hub::new_epoch().into(),
            cluster: None,
            config,
        })
    }
}

impl Shard {
    pub fn new(id: usize, shards: usize, ctx: Arc<Context>) -> Self {
        let now = Instant::now();
        let config = &ctx.config;
        Self {
            id,
            shards,
            accept_bucket: TokenBucket::new(config.accept_rate, config.accept_rate, now),
            jitter: jitter_seed(id),
            next_ticket: 0,
            reread: Vec::new(),
            handshake_limits: HandshakeLimits {
                max_head_bytes: config.max_head_bytes,
                max_headers: config.max_headers,
            },
            request_deadlines: Deadlines::new(config.handshake_timeout),
            heartbeat_deadlines: Deadlines::new(config.ping_interval),
            close_deadlines: Deadlines::new(config.close_timeout),
            timed: BinaryHeap::new(),
            channels: Channels::new(shards, config.history),
            conns: Slab::new(),
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
            phase: Phase::Request {
                pending: None,
                scanned: 0,
            },
            read_buf: BytesMut::new(),
            outbox: Outbox::default(),
            subs: Vec::new(),
            last_activity: now,
            request_deadline: now + self.ctx.config.handshake_timeout,
            dirty: false,
            finishing: false,
            write_shut: false,
            dead: false,
            closing: false,
            read_paused: false,
            inflight_publishes: 0,
            peer,
            counted: None,
            identity: None,
        });
        self.arm_request_deadline(key);
        self.counters.accepted_total += 1;
        self.counters.connections[Transport::Http as usize] += 1;
        if !self.accept_bucket.try_take(now) {
            self.refuse_busy(key, 503, "too many new connections; retry later");
        } else if !self.is_trusted_proxy(peer) {
            // Every socket counts from accept on, plain HTTP keep-alive ones too: one
            // address cannot hold more than its share, whatever it sends.
            match self.ctx.limits.count(peer) {
                Ok(()) => self.conns[key].counted = Some(peer),
                Err(refusal) => self.refuse_busy(key, refusal.status(), refusal.reason()),
            }
        }
        Some(key)
    }

    /// Refuses with `status` and a `Retry-After` spread over a few seconds.
    fn refuse_busy(&mut self, key: usize, status: u16, reason: &str) {
        let seconds = retry_after(
            Duration::from_secs(1),
            Duration::from_secs(5),
            &mut self.jitter,
        );
        let seconds = seconds.to_string();
        self.refuse_json(
            key,
            status,
            "retry_later",
            reason,
            &[("Retry-After", &seconds)],
        );
    }

    fn is_trusted_proxy(&self, peer: IpAddr) -> bool {
        self.ctx.config.trusted_proxies.contains(&peer)
    }

    /// Admits a request to hold its connection (WebSocket, stream, poll). Every such
    /// request is checked on its own, whatever an earlier request on the same keep-alive
    /// connection presented: the `Origin` must be allowed (403), the token valid (401),
    /// and the connection limits not reached (503 in all, 429 per address). On refusal the
    /// response is queued and false returned.
    fn admit(&mut self, key: usize, request: &Request) -> bool {
        self.conns[key].identity = None;
        let auth = &self.ctx.auth;
        if let Err(reason) = auth.check_origin(request.origin.as_deref()) {
            self.refuse_json(key, 403, "forbidden_origin", &reason, &[]);
            return false;
        }
        let token = token_of(
            request.authorization.as_deref(),
            request.query_param("token"),
        );
        let identity = match auth.authenticate(token) {
            Ok(identity) => identity,
            Err(e) => {
                // The reason only: the token itself is a credential and never logged.
                tracing::debug!(peer = %self.conns[key].peer, reason = %e, "authentication failed");
                self.refuse_json(
                    key,
                    401,
                    "unauthorized",
                    &e.to_string(),
                    &[("WWW-Authenticate", "Bearer")],
                );
                return false;
            }
        };
        if let Err(refusal) = self.ctx.limits.check_total() {
            self.refuse_busy(key, refusal.status(), refusal.reason());
            return false;
        }
        let peer = self.conns[key].peer;
        if self.conns[key].counted.is_none() {
            // Behind a trusted proxy: the client it forwards for counts while this
            // request holds the connection.
            let ip = client_ip(
                peer,
                request.x_forwarded_for.as_deref(),
                &self.ctx.config.trusted_proxies,
            );
            if let Err(refusal) = self.ctx.limits.count(ip) {
                self.refuse_busy(key, refusal.status(), refusal.reason());
                return false;
            }
            self.conns[key].counted = Some(ip);
        }
        let expiry = identity
            .expires_at
            .zip(identity.remaining(SystemTime::now()))
            .filter(|_| auth.mode() != AuthMode::Off);
        self.conns[key].identity = Some(identity);
        if let Some((expires_at, remaining)) = expiry {
            // Both clocks read together: `self.now` is from the start of the turn, and a
            // deadline from it would fall that much before `exp` (a backend that wakes to
            // the nanosecond, like io_uring, then sends 4001 while the handshake would
            // still accept the token).
            self.arm_timed(
                key,
                Instant::now() + remaining,
                Timed::TokenExpiry { expires_at },
            );
        }
        true
    }

    /// Arms a per-connection deadline. An entry whose request has ended stays in the
    /// heap until its time, so a connection sending request after request would grow it
    /// without bound: past twice the connections it holds, the stale entries go.
    fn arm_timed(&mut self, key: usize, at: Instant, what: Timed) {
        let conn_ref = self.conn_ref(key);
        self.timed.push(Reverse((at, conn_ref, what)));
        if self.timed.len() > 2 * self.conns.len() + 64 {
            let conns = &self.conns;
            self.timed
                .retain(|Reverse((at, conn, what))| timed_is_live(conns, *at, *conn, *what));
        }
    }

    /// Arms `key`'s request deadline (`request_deadline`, set by the caller), dropping
    /// stale entries of earlier requests as [`Shard::arm_timed`] does.
    fn arm_request_deadline(&mut self, key: usize) {
        let conn_ref = self.conn_ref(key);
        self.request_deadlines.arm(self.now, conn_ref);
        if self.request_deadlines.len() > 2 * self.conns.len() + 64 {
            let conns = &self.conns;
            self.request_deadlines.retain(|at, conn| {
                conns.get(conn.key as usize).is_some_and(|c| {
                    c.generation == conn.generation
                        && !c.dead
                        && matches!(c.phase, Phase::Request { .. })
                        && c.request_deadline == at
                })
            });
        }
    }

    /// Whether the request holding `key` may subscribe to `channel`: never without an
    /// admitted identity.
    fn may_subscribe(&self, key: usize, channel: &str) -> bool {
        self.conns[key]
            .identity
            .as_ref()
            .is_some_and(|id| id.subscribe.allows(channel))
    }

    fn may_publish(&self, key: usize, channel: &str) -> bool {
        self.conns[key]
            .identity
            .as_ref()
            .is_some_and(|id| id.publish.allows(channel))
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
            Some(c) if c.generation == conn.generation && !c.dead => Some(key),
            _ => None,
        }
    }

    fn set_phase(&mut self, key: usize, phase: Phase) {
        let conn = &mut self.conns[key];
        self.counters.connections[conn.phase.transport() as usize] -= 1;
        self.counters.connections[phase.transport() as usize] += 1;
        conn.phase = phase;
    }

    /// Where the backend appends bytes read from `key`'s socket.
    pub fn read_buffer(&mut self, key: usize) -> &mut BytesMut {
        &mut self.conns[key].read_buf
    }

    /// Whether reading more from `key` is useful now: not when it is gone, not while its
    /// outbox is over budget (a client that sends without reading waits for us), not while
    /// too many of its publishes await their acks, and not while its read buffer holds
    /// what its phase may buffer ([`Shard::read_budget`]). When this says no, reading is
    /// paused until [`Shard::resume_read`] says yes: the bytes wait in the kernel, where
    /// TCP flow control stops the client.
    pub fn wants_read(&mut self, key: usize) -> bool {
        let budget = self.read_budget(key);
        let conn = &mut self.conns[key];
        if conn.dead {
            return false;
        }
        let wants = conn.outbox.len_bytes() < self.ctx.config.outbound_queue_bytes
            && conn.inflight_publishes < MAX_INFLIGHT_PUBLISHES
            && conn.read_buf.len() < budget;
        if !wants {
            conn.read_paused = true;
        }
        wants
    }

    /// How many unprocessed bytes `key`'s read buffer may hold in its phase. A request
    /// being read may hold its head and body; a connection waiting for an answer (parked
    /// poll, publish awaiting acks) only the start of its next request; a WebSocket is
    /// bounded by its decoder's frame and message limits, an event stream discards input.
    fn read_budget(&self, key: usize) -> usize {
        let config = &self.ctx.config;
        match self.conns[key].phase {
            Phase::Request { .. } => config.max_head_bytes + config.max_body_bytes,
            Phase::Publishing { .. } | Phase::Polling { .. } => config.max_head_bytes,
            Phase::EventStream | Phase::WebSocket { .. } => usize::MAX,
        }
    }

    /// Whether `key` reads a stream of input (WebSocket frames, an event stream's
    /// ignored bytes) rather than one request at a time: a backend may then keep a
    /// receive armed across reads.
    pub fn reads_in_bulk(&self, key: usize) -> bool {
        matches!(
            self.conns[key].phase,
            Phase::WebSocket { .. } | Phase::EventStream
        )
    }

    /// Processes what the backend appended to `key`'s read buffer.
    pub fn handle_read(&mut self, key: usize, now: Instant) {
        self.now = now;
        let conn = &mut self.conns[key];
        if conn.dead {
            return;
        }
        conn.last_activity = now;
        if conn.finishing {
            // Only the peer's end of stream matters now.
            conn.read_buf.clear();
            return;
        }
        loop {
            match self.conns[key].phase {
                Phase::Request { .. } => {
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
                Phase::WebSocket { .. } => {
                    self.read_frames(key);
                    break;
                }
                // Waiting for an answer: a pipelined request stays buffered until then.
                Phase::Publishing { .. } | Phase::Polling { .. } => break,
                Phase::EventStream => {
                    self.conns[key].read_buf.clear();
                    break;
                }
            }
        }
        let conn = &mut self.conns[key];
        if conn.read_buf.is_empty() && conn.read_buf.capacity() > 0 {
            // Idle connections keep no read buffer.
            conn.read_buf = BytesMut::new();
        }
    }

    /// Reads one HTTP request if it is complete and acts on it. Returns whether the
    /// connection moved on (so the caller looks at the buffer again).
    fn read_request(&mut self, key: usize) -> bool {
        let max_head = self.handshake_limits.max_head_bytes;
        let conn = &mut self.conns[key];
        let Phase::Request { pending, scanned } = &mut conn.phase else {
            return false;
        };
        let (request, body_len) = match pending.take() {
            Some(parsed) => *parsed,
            None => {
                let buf = &conn.read_buf[..];
                // The first bytes are parsed at once, so garbage is refused early; after
                // that only a completed head (or one past its limit) is worth parsing.
                let worth_parsing = *scanned == 0
                    || buf.len() > max_head
                    || handshake::head_end(buf, *scanned as usize).is_some();
                if !worth_parsing {
                    *scanned = buf.len() as u32;
                    return false;
                }
                let parsed = handshake::parse_request(buf, &self.handshake_limits);
                let (request, consumed) = match parsed {
                    Ok(None) => {
                        *scanned = buf.len().max(1) as u32;
                        return false;
                    }
                    Ok(Some(parsed)) => parsed,
                    Err(e) => {
                        self.refuse(key, e.status(), &e.to_string(), e.extra_headers());
                        return false;
                    }
                };
                *scanned = 0;
                conn.read_buf.advance(consumed);
                let body_len = request.content_length.unwrap_or(0);
                if body_len > self.ctx.config.max_body_bytes as u64 {
                    let reason = format!(
                        "request body is larger than {} bytes",
                        self.ctx.config.max_body_bytes
                    );
                    self.refuse_json(key, 413, "too_large", &reason, &[]);
                    return false;
                }
                if request.transfer_encoding.is_some() {
                    let reason = "chunked request bodies are not supported; send Content-Length";
                    self.refuse_json(key, 411, "length_required", reason, &[]);
                    return false;
                }
                (request, body_len as usize)
            }
        };
        let conn = &mut self.conns[key];
        if conn.read_buf.len() < body_len {
            conn.phase = Phase::Request {
                pending: Some(Box::new((request, body_len))),
                scanned: 0,
            };
            return false;
        }
        let body = conn.read_buf.split_to(body_len).freeze();
        self.handle_request(key, &request, body);
        !self.conns[key].finishing
    }

    fn handle_request(&mut self, key: usize, request: &Request, body: Bytes) {
        let keep_alive = http::keep_alive(request) && !self.draining;
        let head_only = request.method == "HEAD";
        match http::route(request) {
            Route::PubSub | Route::Echo | Route::Poll | Route::Sse if !self.admit(key, request) => {
            }
            Route::PubSub => self.upgrade(key, request, Endpoint::PubSub),
            Route::Echo => self.upgrade(key, request, Endpoint::Echo),
            Route::Publish => self.publish_http(key, request, &body, keep_alive),
            Route::Poll => self.poll(key, request, keep_alive),
            Route::Sse => self.open_event_stream(key, request),
            Route::Metrics => {
                let mut text = http::metrics::prometheus(
                    &self.ctx.registry.snapshot(self.now),
                    self.ctx.config.io,
                );
                if let Some(cluster) = &self.ctx.cluster {
                    text.push_str(&cluster.link.prometheus());
                }
                let ctype = "text/plain; version=0.0.4; charset=utf-8";
                self.respond(key, 200, ctype, text.as_bytes(), head_only, keep_alive);
            }
            Route::Stats => {
                let json = http::metrics::stats_json(&self.ctx.registry.snapshot(self.now));
                self.respond(
                    key,
                    200,
                    "application/json",
                    json.as_bytes(),
                    head_only,
                    keep_alive,
                );
            }
            Route::Health => {
                let redis_up = self.ctx.cluster.as_ref().map(|c| c.link.is_up());
                let (status, body): (u16, &[u8]) = match (self.draining, redis_up) {
                    (true, _) => (503, br#"{"status":"draining"}"#),
                    // Without Redis this node can neither store nor receive publishes.
                    (false, Some(false)) => (503, br#"{"status":"degraded","redis":"down"}"#),
                    (false, Some(true)) => (200, br#"{"status":"ok","redis":"up"}"#),
                    (false, None) => (200, br#"{"status":"ok"}"#),
                };
                self.respond(key, status, "application/json", body, head_only, keep_alive);
            }
            Route::Asset { body, content_type } => {
                self.respond(key, 200, content_type, body, head_only, keep_alive);
            }
            Route::MethodNotAllowed { allow } => {
                let message = format!("use {allow}");
                self.refuse_json(
                    key,
                    405,
                    "method_not_allowed",
                    &message,
                    &[("Allow", allow)],
                );
            }
            Route::NotFound => {
                let message = if request.is_upgrade() {
                    "WebSocket endpoints are /ws and /echo"
                } else {
                    "no such path"
                };
                self.refuse_json(key, 404, "not_found", message, &[]);
            }
        }
    }

    /// Queues a complete response; then reads the next request or finishes.
    fn respond(
        &mut self,
        key: usize,
        status: u16,
        content_type: &str,
        body: &[u8],
        head_only: bool,
        keep_alive: bool,
    ) {
        let response = if head_only {
            Bytes::from(http::head(
                status,
                content_type,
                &[],
                keep_alive,
                Some(body.len()),
            ))
        } else {
            http::response(status, content_type, &[], body, keep_alive)
        };
        self.send_response(key, response, keep_alive);
    }

    fn send_response(&mut self, key: usize, response: Bytes, keep_alive: bool) {
        self.conns[key].outbox.push(response);
        self.mark_dirty(key);
        if keep_alive {
            self.await_request(key);
        } else {
            self.finish(key);
        }
    }

    /// Back to reading a request, with a fresh deadline for it. The next request is
    /// admitted on its own: nothing of the last one's identity carries over.
    fn await_request(&mut self, key: usize) {
        let peer = self.conns[key].peer;
        let conn = &mut self.conns[key];
        conn.identity = None;
        if self.ctx.config.trusted_proxies.contains(&peer)
            && let Some(ip) = conn.counted.take()
        {
            self.ctx.limits.release(ip);
        }
        self.set_phase(
            key,
            Phase::Request {
                pending: None,
                scanned: 0,
            },
        );
        self.conns[key].request_deadline = self.now + self.ctx.config.handshake_timeout;
        self.arm_request_deadline(key);
        if !self.conns[key].read_buf.is_empty() {
            self.reread.push(key);
        }
    }

    /// Reads the requests that waited behind an answer given outside `handle_read`.
    fn reread_pipelined(&mut self) {
        while let Some(key) = self.reread.pop() {
            if self.conns.get(key).is_some_and(|c| !c.dead) {
                let now = self.now;
                self.handle_read(key, now);
            }
        }
    }

    /// A plain-text refusal before an upgrade; the connection ends.
    fn refuse(&mut self, key: usize, status: u16, reason: &str, headers: &[(&str, &str)]) {
        tracing::debug!(peer = %self.conns[key].peer, status, reason, "refused request");
        self.counters.count_rejected(status);
        let response = http::error_response(status, reason, headers);
        self.send_response(key, response, false);
    }

    /// A JSON refusal on the HTTP API; the connection ends (the request may not have
    /// been read to its end).
    fn refuse_json(
        &mut self,
        key: usize,
        status: u16,
        code: &str,
        message: &str,
        headers: &[(&str, &str)],
    ) {
        tracing::debug!(peer = %self.conns[key].peer, status, code, reason = message, "refused request");
        self.counters.count_rejected(status);
        let response = http::json_error(status, code, message, headers, false);
        self.send_response(key, response, false);
    }

    fn upgrade(&mut self, key: usize, request: &Request, endpoint: Endpoint) {
        let accept = match request.websocket_accept() {
            Ok(accept) => accept,
            Err(e) => {
                self.refuse(key, e.status(), &e.to_string(), e.extra_headers());
                return;
            }
        };
        // /echo has the limits of /ws unless the operator raised them (a conformance run).
        let config = &self.ctx.config;
        let (max_message_bytes, max_fragments, per_second) = match endpoint {
            Endpoint::PubSub => (
                config.max_message_bytes,
                MAX_FRAGMENTS,
                config.max_messages_per_second,
            ),
            Endpoint::Echo => (
                config.echo_max_message_bytes,
                config.echo_max_fragments,
                config.echo_max_messages_per_second,
            ),
        };
        let limits = DecoderLimits {
            max_frame_bytes: max_message_bytes,
            max_message_bytes,
            max_fragments,
        };
        let rate = Box::new(RateLimit {
            bucket: TokenBucket::new(per_second, per_second * 2, self.now),
            strikes: 0,
        });
        let policies = &self.ctx.config.compression;
        let negotiated = request
            .sec_websocket_extensions
            .as_deref()
            .filter(|_| policies.negotiates())
            .and_then(deflate::negotiate);
        let ws = match negotiated {
            // The echo endpoint's replies are its own: it keeps its window (conformance
            // checks the negotiated takeover parameters).
            Some(params) => Connection::with_deflate(
                limits,
                params,
                CompressorSettings::PER_CONNECTION,
                endpoint == Endpoint::Echo || policies.takes_over_context(),
            ),
            None => Connection::new(limits),
        };
        self.set_phase(
            key,
            Phase::WebSocket {
                ws: Box::new(ws),
                endpoint,
                rate,
            },
        );
        let extensions = negotiated.map(|params| params.response());
        let response = Bytes::from(handshake::upgrade_response(
            &accept,
            None,
            extensions.as_deref(),
        ));
        self.conns[key].outbox.push(response);
        self.mark_dirty(key);
        let conn_ref = self.conn_ref(key);
        self.heartbeat_deadlines.arm(self.now, conn_ref);
    }

    fn publish_http(&mut self, key: usize, request: &Request, body: &Bytes, keep_alive: bool) {
        let Some(api_key) = self.ctx.config.api_key.as_deref() else {
            let message = "HTTP publishing is off: start the server with --api-key";
            self.refuse_json(key, 403, "publish_disabled", message, &[]);
            return;
        };
        let presented = request
            .authorization
            .as_deref()
            .and_then(|a| a.strip_prefix("Bearer "))
            .unwrap_or("");
        if !api_key_matches(presented.trim(), api_key) {
            let message = "a valid API key is needed as Authorization: Bearer KEY";
            self.refuse_json(
                key,
                401,
                "unauthorized",
                message,
                &[("WWW-Authenticate", "Bearer")],
            );
            return;
        }
        let parsed = match publish::parse(body) {
            Ok(parsed) => parsed,
            Err((code, message)) => {
                self.counters.count_rejected(400);
                let response = http::json_error(400, code, &message, &[], keep_alive);
                self.send_response(key, response, keep_alive);
                return;
            }
        };
        let conn = self.conn_ref(key);
        let count = parsed.messages.len();
        self.set_phase(
            key,
            Phase::Publishing {
                results: vec![None; count],
                remaining: count,
                batch: parsed.batch,
                keep_alive,
            },
        );
        for (index, message) in parsed.messages.into_iter().enumerate() {
            self.publish(
                message.channel.into(),
                message.data,
                conn,
                Some(index as u64),
            );
        }
    }

    fn poll(&mut self, key: usize, request: &Request, keep_alive: bool) {
        let poll = match longpoll::parse(request) {
            Ok(poll) => poll,
            Err(message) => {
                self.counters.count_rejected(400);
                let response = http::json_error(400, "bad_request", &message, &[], keep_alive);
                self.send_response(key, response, keep_alive);
                return;
            }
        };
        if !self.may_subscribe(key, &poll.channel) {
            let message = format!("not allowed to read {:?}", poll.channel);
            self.refuse_json(key, 403, "forbidden", &message, &[]);
            return;
        }
        let deadline = self.now + poll.timeout;
        let seq = poll.since.unwrap_or(0);
        self.set_phase(
            key,
            Phase::Polling {
                deadline,
                seq,
                keep_alive,
                expired: false,
                epoch: None,
            },
        );
        self.arm_timed(key, deadline, Timed::Poll);
        self.request_subscription(
            key,
            poll.channel.into(),
            poll.since,
            poll.epoch.as_deref(),
            None,
        );
    }

    fn open_event_stream(&mut self, key: usize, request: &Request) {
        let parsed = sse::channel_param(request).and_then(|c| Ok((c, sse::since(request)?)));
        let (channel, since) = match parsed {
            Ok(parsed) => parsed,
            Err(message) => {
                self.refuse_json(key, 400, "bad_request", &message, &[]);
                return;
            }
        };
        if !self.may_subscribe(key, &channel) {
            let message = format!("not allowed to read {channel:?}");
            self.refuse_json(key, 403, "forbidden", &message, &[]);
            return;
        }
        self.set_phase(key, Phase::EventStream);
        self.conns[key].outbox.push(sse::head());
        self.mark_dirty(key);
        let conn_ref = self.conn_ref(key);
        self.heartbeat_deadlines.arm(self.now, conn_ref);
        self.request_subscription(key, channel.into(), since, None, None);
    }

    /// Decodes frames until the buffer runs dry or the connection stops reading.
    fn read_frames(&mut self, key: usize) {
        loop {
            let conn = &mut self.conns[key];
            let Phase::WebSocket { ws, endpoint, .. } = &mut conn.phase else {
                return;
            };
            let endpoint = *endpoint;
            let inflating = ws
                .compresses()
                .then(|| (Instant::now(), ws.inflated_messages()));
            let event = ws.poll_event(&mut conn.read_buf);
            if let Some((start, inflated)) = inflating
                && ws.inflated_messages() > inflated
            {
                self.counters.inflate_ns_total += elapsed_ns(start);
            }
            while let Some(frame) = ws.poll_transmit() {
                queue_transmit(&mut conn.outbox, frame);
            }
            let closed = ws.is_closed();
            match event {
                None => {
                    if closed {
                        self.finish(key);
                    } else {
                        self.mark_dirty(key);
                    }
                    return;
                }
                Some(Event::Message { text, payload }) => {
                    self.counters.messages_in_total += 1;
                    match endpoint {
                        Endpoint::Echo => {
                            if self.within_rate(key) {
                                self.echo(key, text, payload);
                            }
                        }
                        Endpoint::PubSub if text => {
                            if self.within_rate(key) {
                                self.handle_command(key, &payload);
                            }
                        }
                        Endpoint::PubSub => {
                            self.close_with(key, 1003, "binary messages are not accepted here")
                        }
                    }
                }
                Some(Event::Closed { code }) => {
                    tracing::debug!(peer = %self.conns[key].peer, ?code, "client closed WebSocket");
                    self.finish(key);
                    return;
                }
                Some(Event::Failed(error)) => {
                    let code = error.close_code();
                    tracing::debug!(peer = %self.conns[key].peer, code, %error, "closing WebSocket on a protocol error");
                    self.finish(key);
                    return;
                }
            }
            if !self.wants_read(key) {
                self.conns[key].read_paused = true;
                self.mark_dirty(key);
                return;
            }
        }
    }

    fn echo(&mut self, key: usize, text: bool, payload: Bytes) {
        let opcode = if text { OpCode::Text } else { OpCode::Binary };
        let conn = &mut self.conns[key];
        if let Phase::WebSocket { ws, .. } = &mut conn.phase
            && ws.compresses()
        {
            let start = Instant::now();
            let frame = ws
                .encode_compressed(text, &payload)
                .expect("deflate was negotiated");
            let plain_len = frame_header(opcode, payload.len()).len() + payload.len();
            self.counters
                .count_compressed(plain_len, frame.len(), elapsed_ns(start));
            conn.outbox.push(frame);
            self.counters.messages_out_total += 1;
            self.mark_dirty(key);
            return;
        }
        // Header and payload go out as two slices of one vectored write: the payload is
        // the received buffer itself, never copied.
        conn.outbox.push(frame_header(opcode, payload.len()));
        conn.outbox.push(payload);
        self.counters.messages_out_total += 1;
        self.mark_dirty(key);
    }

    /// Starts a server-side close handshake with `code`; the peer has the close timeout
    /// to answer. Subscriptions end now: nothing may follow the close frame.
    fn close_with(&mut self, key: usize, code: u16, reason: &str) {
        let conn_ref = self.conn_ref(key);
        let conn = &mut self.conns[key];
        if conn.closing {
            return;
        }
        conn.closing = true;
        if let Phase::WebSocket { ws, .. } = &mut conn.phase {
            tracing::debug!(peer = %conn.peer, code, reason, "closing WebSocket");
            ws.send_close(code, reason);
            while let Some(frame) = ws.poll_transmit() {
                queue_transmit(&mut conn.outbox, frame);
            }
        }
        self.leave_all(key);
        self.mark_dirty(key);
        self.close_deadlines.arm(self.now, conn_ref);
    }

    /// Spends one of the connection's inbound tokens. Over the rate the message is
    /// dropped (on /ws with a `rate_limited` error; /echo sends only echoes); a client that
    /// keeps sending anyway is closed with 1008.
    fn within_rate(&mut self, key: usize) -> bool {
        let now = self.now;
        let Phase::WebSocket { rate, endpoint, .. } = &mut self.conns[key].phase else {
            return true;
        };
        if rate.bucket.try_take(now) {
            rate.strikes = 0;
            return true;
        }
        rate.strikes += 1;
        if rate.strikes > MAX_STRIKES {
            self.close_with(key, 1008, "message rate limit exceeded repeatedly");
        } else if *endpoint == Endpoint::PubSub {
            let message = format!(
                "more than {} messages a second; this one was dropped",
                self.ctx.config.max_messages_per_second
            );
            self.reply(key, pubsub::encode_error("rate_limited", &message, None));
        }
        false
    }

    fn handle_command(&mut self, key: usize, payload: &Bytes) {
        let command = match self.parser.parse(payload) {
            Ok(command) => command,
            Err(e) => {
                self.reply(key, pubsub::encode_error(e.code, &e.message, e.id));
                return;
            }
        };
        let denied = match &command {
            Command::Subscribe { channel, id, .. } if !self.may_subscribe(key, channel) => {
                Some(format!("not allowed to subscribe to {channel:?}")).zip(Some(*id))
            }
            Command::Publish { channel, id, .. } if !self.may_publish(key, channel) => {
                Some(format!("not allowed to publish to {channel:?}")).zip(Some(*id))
            }
            _ => None,
        };
        if let Some((message, id)) = denied {
            self.reply(key, pubsub::encode_error("forbidden", &message, id));
            return;
        }
        match command {
            Command::Subscribe {
                channel,
                since,
                epoch,
                id,
            } => self.subscribe(key, &channel, since, epoch.as_deref(), id),
            Command::Unsubscribe { channel, id } => self.unsubscribe(key, &channel, id),
            Command::Publish { channel, data, id } => {
                let conn = self.conn_ref(key);
                self.conns[key].inflight_publishes += 1;
                self.publish(channel.into(), data, conn, id);
            }
            Command::Ping { id } => self.reply(key, pubsub::encode_pong(id)),
        }
    }

    /// Sends a publish to whoever orders the channel: its home shard, or the cluster.
    fn publish(&mut self, channel: ChannelName, data: Bytes, conn: ConnRef, id: Option<u64>) {
        if let Some(bridge) = &self.ctx.cluster {
            let request = cluster::Request::Publish {
                channel,
                data,
                shard: self.id,
                conn,
                id,
            };
            if bridge.send(request).is_err() {
                // Answered as a refusal from the cluster is, by the same path.
                let message = cluster::BUSY.into();
                self.send(self.id, Envelope::Refused { conn, id, message });
            }
            return;
        }
        let home = hub::home_of(&channel, self.shards);
        self.send(
            home,
            Envelope::Publish {
                channel,
                data,
                from: self.id,
                conn,
                id,
            },
        );
    }

    fn subscribe(
        &mut self,
        key: usize,
        channel: &str,
        since: Option<u64>,
        epoch: Option<&str>,
        id: Option<u64>,
    ) {
        let conn = &self.conns[key];
        if conn.subs.iter().any(|s| &*s.channel == channel) {
            let message = format!("already subscribed to {channel:?}");
            self.reply(
                key,
                pubsub::encode_error("already_subscribed", &message, id),
            );
            return;
        }
        if conn.subs.len() >= self.ctx.config.max_subscriptions {
            let message = format!(
                "a connection may hold at most {} subscriptions",
                self.ctx.config.max_subscriptions
            );
            self.reply(
                key,
                pubsub::encode_error("too_many_subscriptions", &message, id),
            );
            return;
        }
        self.request_subscription(key, channel.into(), since, epoch, id);
    }

    /// Records a pending subscription and asks the channel's home for it.
    fn request_subscription(
        &mut self,
        key: usize,
        channel: ChannelName,
        since: Option<u64>,
        epoch: Option<&str>,
        id: Option<u64>,
    ) {
        let conn_ref = self.conn_ref(key);
        self.next_ticket = self.next_ticket.wrapping_add(1);
        let ticket = self.next_ticket;
        let chunk = self.replay_chunk_bytes();
        let polling = matches!(self.conns[key].phase, Phase::Polling { .. });
        // A poll is answered once, with the first chunk: the client asks again from its
        // last seq. A stream or WebSocket takes one chunk at a time, as its outbox drains.
        let max_replay_bytes = if polling || self.may_request_chunk(key) {
            chunk
        } else {
            0
        };
        let catch_up = since.filter(|_| !polling).map(|at| {
            Box::new(CatchUp {
                at,
                id,
                requested: max_replay_bytes > 0,
                answered: false,
                epoch: None,
            })
        });
        let subs = &mut self.conns[key].subs;
        // Most connections hold one or two channels: grow one at a time.
        subs.reserve_exact(1);
        subs.push(Sub {
            channel: channel.clone(),
            state: SubState::Pending {
                ticket,
                unsubscribe: None,
                catch_up,
            },
        });
        if let Some(bridge) = &self.ctx.cluster {
            let request = cluster::Request::Subscribe {
                channel,
                shard: self.id,
                conn: conn_ref,
                ticket,
                since,
                epoch: epoch.map(Into::into),
                id,
                max_replay_bytes,
            };
            if bridge.send(request).is_err() {
                let index = self.conns[key].subs.len() - 1;
                self.refuse_busy_subscription(key, index, false, id);
            }
            return;
        }
        let epoch_matches = epoch.is_none_or(|e| e == &*self.ctx.epoch);
        let home = hub::home_of(&channel, self.shards);
        self.send(
            home,
            Envelope::Subscribe {
                channel,
                from: self.id,
                conn: conn_ref,
                ticket,
                since,
                epoch_matches,
                id,
                max_replay_bytes,
            },
        );
    }

    /// The most a replay chunk may bring: half the outbound budget.
    fn replay_chunk_bytes(&self) -> usize {
        (self.ctx.config.outbound_queue_bytes / 2).max(1)
    }

    /// Whether `key` may ask for a replay chunk now: its outbox is below half its budget
    /// and no other chunk is on its way to it.
    fn may_request_chunk(&self, key: usize) -> bool {
        let conn = &self.conns[key];
        !conn.closing
            && conn.outbox.len_bytes() < self.replay_chunk_bytes()
            && !conn.subs.iter().any(
                |s| matches!(&s.state, SubState::Pending { catch_up: Some(c), .. } if c.requested),
            )
    }

    /// Asks the home for the next chunk of a replay that is catching up, if `key` has one
    /// and room for it.
    fn continue_replay(&mut self, key: usize) {
        if !self.may_request_chunk(key) {
            return;
        }
        let conn_ref = self.conn_ref(key);
        let max_bytes = self.replay_chunk_bytes();
        let conn = &mut self.conns[key];
        let Some((channel, ticket, catch_up)) =
            conn.subs.iter_mut().find_map(|s| match &mut s.state {
                SubState::Pending {
                    ticket,
                    catch_up: Some(c),
                    ..
                } if c.answered => Some((s.channel.clone(), *ticket, c)),
                _ => None,
            })
        else {
            return;
        };
        catch_up.requested = true;
        let (since, id) = (catch_up.at, catch_up.id);
        if let Some(bridge) = &self.ctx.cluster {
            let request = cluster::Request::Replay {
                channel: channel.clone(),
                shard: self.id,
                conn: conn_ref,
                ticket,
                since,
                epoch: catch_up.epoch.as_deref().unwrap_or_default().into(),
                id,
                max_bytes,
            };
            if bridge.send(request).is_err()
                && let Some(index) = self.pending_index(key, ticket)
            {
                self.refuse_busy_subscription(key, index, true, id);
            }
            return;
        }
        let home = hub::home_of(&channel, self.shards);
        self.send(
            home,
            Envelope::Replay {
                channel,
                from: self.id,
                conn: conn_ref,
                ticket,
                since,
                id,
                max_bytes,
            },
        );
    }

    /// The cluster's queue refused a request for pending subscription `index` of `key`:
    /// the subscription ends and the client is told to retry. `counted`: the cluster
    /// counted it already (a replay chunk was refused), so releasing it sends the
    /// `Unsubscribe` that balances it; otherwise it is only forgotten.
    fn refuse_busy_subscription(
        &mut self,
        key: usize,
        index: usize,
        counted: bool,
        id: Option<u64>,
    ) {
        if counted {
            self.release(key, index);
        } else {
            self.conns[key].subs.swap_remove(index);
        }
        match self.conns[key].phase {
            Phase::WebSocket { .. } => {
                self.reply(key, pubsub::encode_error("unavailable", cluster::BUSY, id));
            }
            Phase::Polling { .. } => {
                self.refuse_json(
                    key,
                    503,
                    "unavailable",
                    cluster::BUSY,
                    &[("Retry-After", "1")],
                );
            }
            Phase::EventStream => {
                // The stream has begun: say why it ends; EventSource reconnects by itself.
                let json = format!(
                    r#"{{"code":"unavailable","message":{}}}"#,
                    json_string(cluster::BUSY)
                );
                self.conns[key]
                    .outbox
                    .push(sse::control_event("error", &json));
                self.finish(key);
            }
            _ => {}
        }
    }

    fn unsubscribe(&mut self, key: usize, channel: &str, id: Option<u64>) {
        let conn = &mut self.conns[key];
        let Some(index) = conn.subs.iter().position(|s| &*s.channel == channel) else {
            let message = format!("not subscribed to {channel:?}");
            self.reply(key, pubsub::encode_error("not_subscribed", &message, id));
            return;
        };
        match &mut conn.subs[index].state {
            SubState::Pending { unsubscribe, .. } => {
                *unsubscribe = Some(id);
            }
            SubState::Active { .. } => {
                self.release(key, index);
                self.reply(key, pubsub::encode_unsubscribed(channel, id));
            }
        }
    }

    /// Ends subscription `index` of `key`: leaves the local table and tells the home.
    fn release(&mut self, key: usize, index: usize) {
        let sub = self.conns[key].subs.swap_remove(index);
        if let SubState::Active { slot, .. } = sub.state {
            self.subscriptions.remove(&sub.channel, slot);
            self.counters.subscriptions -= 1;
        }
        if let Some(bridge) = &self.ctx.cluster {
            bridge.unsubscribe(sub.channel, self.id);
            return;
        }
        let home = hub::home_of(&sub.channel, self.shards);
        self.send(
            home,
            Envelope::Unsubscribe {
                channel: sub.channel,
                from: self.id,
            },
        );
    }

    fn reply(&mut self, key: usize, frame: Bytes) {
        let conn = &mut self.conns[key];
        if conn.closing {
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
        if !conn.dirty && !conn.dead {
            conn.dirty = true;
            self.dirty.push(key);
        }
    }

    /// After the queued bytes are written: shut down writing, then wait for the peer.
    fn finish(&mut self, key: usize) {
        let conn_ref = self.conn_ref(key);
        let conn = &mut self.conns[key];
        if !conn.finishing {
            conn.finishing = true;
            conn.closing = true;
            conn.read_buf = BytesMut::new();
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
        if self.conns[key].dead {
            return;
        }
        self.leave_all(key);
        let conn = &mut self.conns[key];
        conn.dead = true;
        conn.outbox = Outbox::default();
        conn.read_buf = BytesMut::new();
        self.counters.connections[conn.phase.transport() as usize] -= 1;
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
        debug_assert!(self.conns[key].dead);
        self.conns.remove(key);
    }

    /// Connections with bytes to write or a state change to act on.
    pub fn poll_dirty(&mut self) -> Option<usize> {
        while let Some(key) = self.dirty.pop() {
            if let Some(conn) = self.conns.get_mut(key) {
                conn.dirty = false;
                if !conn.dead {
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
        if conn.finishing && !conn.write_shut && conn.outbox.is_empty() {
            conn.write_shut = true;
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

    fn handle_envelope(&mut self, envelope: Envelope) {
        match envelope {
            Envelope::Subscribe {
                channel,
                from,
                conn,
                ticket,
                since,
                epoch_matches,
                id,
                max_replay_bytes,
            } => {
                let outcome = self.channels.subscribe(
                    &channel,
                    from,
                    since,
                    epoch_matches,
                    max_replay_bytes,
                    self.now,
                );
                let reply = home_answer(outcome, channel, conn, ticket, id);
                self.send(from, reply);
            }
            Envelope::Replay {
                channel,
                from,
                conn,
                ticket,
                since,
                id,
                max_bytes,
            } => {
                let outcome = self.channels.replay(&channel, since, max_bytes, self.now);
                let reply = home_answer(outcome, channel, conn, ticket, id);
                self.send(from, reply);
            }
            Envelope::Unsubscribe { channel, from } => self.channels.unsubscribe(&channel, from),
            Envelope::Publish {
                channel,
                data,
                from,
                conn,
                id,
            } => {
                let published = self.channels.publish(&channel, &data, self.now);
                let (mut broadcast, subscribers) = (published.broadcast, published.subscribers);
                let targets: Vec<usize> = (0..published.shards.len())
                    .filter(|&s| published.shards[s] > 0)
                    .collect();
                self.counters.publishes_total += 1;
                if self.ctx.config.compression.policy_for(&channel) == CompressionPolicy::Shared {
                    let start = Instant::now();
                    let payload = longpoll::frame_payload(&broadcast.frame);
                    let deflated = self.shared_compressor.encode_frame(OpCode::Text, &payload);
                    self.counters.deflate_ns_total += elapsed_ns(start);
                    // Kept only if it saves bytes; tiny messages go plain to everyone.
                    broadcast.deflated =
                        (deflated.len() < broadcast.frame.len()).then_some(deflated);
                }
                let seq = broadcast.seq;
                for shard in targets {
                    self.send(shard, Envelope::Broadcast(broadcast.clone()));
                }
                self.send(
                    from,
                    Envelope::Ack {
                        conn,
                        seq,
                        subscribers,
                        id,
                    },
                );
            }
            Envelope::Subscribed { answer, replay } => self.confirm_subscription(answer, replay),
            Envelope::HistoryGap { answer, oldest } => self.refuse_subscription(answer, oldest),
            Envelope::Refused { conn, id, message } => self.refuse_publish(conn, id, &message),
            Envelope::Ack {
                conn,
                seq,
                subscribers,
                id,
            } => self.acknowledge(conn, seq, subscribers, id),
            Envelope::Broadcast(broadcast) => self.deliver(&broadcast),
        }
    }

    fn acknowledge(&mut self, conn: ConnRef, seq: u64, subscribers: u32, id: Option<u64>) {
        let Some(key) = self.resolve(conn) else {
            return;
        };
        let conn = &mut self.conns[key];
        match &mut conn.phase {
            Phase::WebSocket { .. } => {
                conn.inflight_publishes -= 1;
                self.reply(key, pubsub::encode_ack(id, seq));
            }
            Phase::Publishing {
                results,
                remaining,
                batch,
                keep_alive,
            } => {
                let index = id.expect("HTTP publishes carry their index") as usize;
                results[index] = Some((seq, subscribers));
                *remaining -= 1;
                if *remaining == 0 {
                    let (batch, keep_alive) = (*batch, *keep_alive);
                    let results: Vec<(u64, u32)> =
                        results.iter().map(|r| r.expect("all acked")).collect();
                    let body = publish::receipt(&results, batch);
                    self.respond(key, 200, "application/json", &body, false, keep_alive);
                }
            }
            _ => {}
        }
    }

    /// A publish the cluster could not store: refused, never acknowledged.
    fn refuse_publish(&mut self, conn: ConnRef, id: Option<u64>, message: &str) {
        let Some(key) = self.resolve(conn) else {
            return;
        };
        let conn = &mut self.conns[key];
        match conn.phase {
            Phase::WebSocket { .. } => {
                conn.inflight_publishes -= 1;
                self.reply(key, pubsub::encode_error("unavailable", message, id));
            }
            Phase::Publishing { .. } => {
                // Acks of the other messages of the batch may still come: this connection
                // ends after the answer so none of them can meet a later request.
                self.counters.count_rejected(503);
                let response =
                    http::json_error(503, "unavailable", message, &[("Retry-After", "1")], false);
                self.send_response(key, response, false);
            }
            _ => {}
        }
    }

    /// The pending subscription that request `ticket` made, if it is still waiting.
    fn pending_index(&self, key: usize, ticket: u32) -> Option<usize> {
        self.conns[key]
            .subs
            .iter()
            .position(|s| matches!(s.state, SubState::Pending { ticket: t, .. } if t == ticket))
    }

    fn confirm_subscription(&mut self, answer: Answer, replay: Vec<Bytes>) {
        let Answer {
            channel,
            conn,
            ticket,
            seq,
            id,
            epoch: answer_epoch,
        } = answer;
        let channel = &channel;
        let ctx = self.ctx.clone();
        let epoch = answer_epoch.as_deref().unwrap_or(&ctx.epoch);
        let Some(key) = self.resolve(conn) else {
            return;
        };
        let Some(index) = self.pending_index(key, ticket) else {
            return;
        };
        if let Phase::Polling {
            keep_alive,
            expired,
            ..
        } = self.conns[key].phase
            && (expired || !replay.is_empty())
        {
            // History had what the poll asked for, or its time ran out while the home
            // was answering: answer now, with whatever history had. A replay cut to its
            // first chunk answers up to its last message; the client asks again from there.
            self.release(key, index);
            let answered_to = replay.last().map_or(seq, frame_seq);
            let response = longpoll::response(channel, epoch, answered_to, &replay, keep_alive);
            self.send_response(key, response, keep_alive);
            return;
        }
        if self.catch_up(
            key,
            index,
            channel,
            (epoch, answer_epoch.as_ref()),
            seq,
            &replay,
        ) {
            return;
        }
        let policies = &self.ctx.config.slow_consumers;
        let (slot, tag) = self
            .subscriptions
            .insert(channel, key, || policies.policy_for(channel));
        self.counters.subscriptions += 1;
        let conn = &mut self.conns[key];
        if let Phase::Polling {
            seq: at,
            epoch: poll_epoch,
            ..
        } = &mut conn.phase
        {
            *at = seq;
            poll_epoch.clone_from(&answer_epoch);
        }
        let SubState::Pending {
            unsubscribe,
            catch_up,
            ..
        } = std::mem::replace(&mut conn.subs[index].state, SubState::Active { slot, tag })
        else {
            unreachable!("pending_index returned a pending subscription");
        };
        let id = catch_up.as_ref().map_or(id, |c| c.id);
        let announced = catch_up.is_some_and(|c| c.answered);
        match conn.phase {
            Phase::WebSocket { .. } => {
                for frame in replay {
                    conn.outbox.push(frame);
                }
                self.reply(key, pubsub::encode_subscribed(channel, seq, epoch, id));
                if let Some(unsubscribe_id) = unsubscribe {
                    self.release(key, index);
                    self.reply(key, pubsub::encode_unsubscribed(channel, unsubscribe_id));
                }
            }
            Phase::EventStream => {
                if !announced {
                    conn.outbox.push(sse_subscribed(channel, seq, epoch));
                }
                for frame in &replay {
                    conn.outbox.push(sse::event(frame_seq(frame), frame));
                }
                self.mark_dirty(key);
            }
            _ => {}
        }
        // Another subscription of this connection may be waiting for its next chunk.
        self.continue_replay(key);
    }

    /// Queues a replay chunk for pending subscription `index` of `key` when it does not
    /// reach the channel's latest `seq` yet, and asks for the next one if there is room.
    /// Returns false when the subscription has caught up (the caller activates it).
    fn catch_up(
        &mut self,
        key: usize,
        index: usize,
        channel: &str,
        (epoch, cluster_epoch): (&str, Option<&ChannelName>),
        seq: u64,
        replay: &[Bytes],
    ) -> bool {
        let conn = &mut self.conns[key];
        let SubState::Pending {
            catch_up: Some(catch_up),
            ..
        } = &mut conn.subs[index].state
        else {
            return false;
        };
        let reached = replay.last().map_or(catch_up.at, frame_seq);
        if reached >= seq {
            return false;
        }
        let first_answer = !catch_up.answered;
        catch_up.at = reached;
        catch_up.requested = false;
        catch_up.answered = true;
        catch_up.epoch = cluster_epoch.cloned();
        match conn.phase {
            Phase::WebSocket { .. } => {
                for frame in replay {
                    conn.outbox.push(frame.clone());
                }
            }
            Phase::EventStream => {
                if first_answer {
                    conn.outbox.push(sse_subscribed(channel, seq, epoch));
                }
                for frame in replay {
                    conn.outbox.push(sse::event(frame_seq(frame), frame));
                }
            }
            _ => {}
        }
        self.counters.messages_out_total += replay.len() as u64;
        self.mark_dirty(key);
        self.continue_replay(key);
        true
    }

    fn refuse_subscription(&mut self, answer: Answer, oldest: u64) {
        let Answer {
            channel,
            conn,
            ticket,
            seq,
            id,
            epoch,
        } = answer;
        let channel = &channel;
        let ctx = self.ctx.clone();
        let epoch = epoch.as_deref().unwrap_or(&ctx.epoch);
        let Some(key) = self.resolve(conn) else {
            return;
        };
        let Some(index) = self.pending_index(key, ticket) else {
            return;
        };
        self.release(key, index);
        match self.conns[key].phase {
            Phase::WebSocket { .. } => {
                let message = format!(
                    "history of {channel:?} does not reach back that far; oldest available is {oldest}"
                );
                self.reply(
                    key,
                    pubsub::encode_history_gap(channel, seq, oldest, &message, id),
                );
            }
            Phase::Polling { keep_alive, .. } => {
                let response = longpoll::gap_response(channel, epoch, seq, oldest, keep_alive);
                self.send_response(key, response, keep_alive);
            }
            Phase::EventStream => {
                // Say what was missed, then carry on live.
                let json = format!(
                    r#"{{"channel":{},"seq":{seq},"oldest":{oldest}}}"#,
                    json_string(channel)
                );
                self.conns[key]
                    .outbox
                    .push(sse::control_event("gap", &json));
                self.mark_dirty(key);
                self.request_subscription(key, channel.clone(), None, None, None);
            }
            _ => {}
        }
    }

    /// Queues the broadcast on every local subscriber: the shared frame for WebSockets,
    /// one event built here once for all event streams, an answer for parked polls.
    /// Subscribers whose outbox is over budget are slow consumers: they are closed with
    /// 4008 and recover with `since`.
    fn deliver(&mut self, broadcast: &Broadcast) {
        let budget = self.ctx.config.outbound_queue_bytes;
        let Some(subscribers) = self.subscriptions.get(&broadcast.channel) else {
            return;
        };
        let (tag, policy, seq) = (subscribers.tag, subscribers.policy, broadcast.seq);
        let compression = self.ctx.config.compression.policy_for(&broadcast.channel);
        let mut plain_payload: Option<Bytes> = None;
        let mut slow = Vec::new();
        let mut polls = Vec::new();
        let mut event: Option<Bytes> = None;
        for key in subscribers.conns() {
            let conn = &mut self.conns[key];
            match &mut conn.phase {
                Phase::WebSocket { ws, .. } => {
                    let shared = broadcast.deflated.as_ref().filter(|_| {
                        ws.accepts_frames_compressed_with(CompressorSettings::SHARED.window_bits)
                    });
                    let frame = if let Some(deflated) = shared {
                        self.counters
                            .count_compressed(broadcast.frame.len(), deflated.len(), 0);
                        deflated.clone()
                    } else if compression == CompressionPolicy::PerConnection && ws.compresses()
                        || compression == CompressionPolicy::Shared && ws.takes_over_context()
                    {
                        // A compressor that keeps its window must see every compressed
                        // message this connection gets, shared channels' included.
                        let start = Instant::now();
                        let payload = plain_payload
                            .get_or_insert_with(|| longpoll::frame_payload(&broadcast.frame));
                        let frame = ws
                            .encode_compressed(true, payload)
                            .expect("deflate was negotiated");
                        self.counters.count_compressed(
                            broadcast.frame.len(),
                            frame.len(),
                            elapsed_ns(start),
                        );
                        frame
                    } else {
                        broadcast.frame.clone()
                    };
                    conn.outbox.push_message(frame, tag, seq);
                }
                Phase::EventStream => {
                    let event = event.get_or_insert_with(|| sse::event(seq, &broadcast.frame));
                    conn.outbox.push_message(event.clone(), tag, seq);
                }
                Phase::Polling { .. } => {
                    polls.push(key);
                    continue;
                }
                _ => continue,
            }
            self.counters.deliveries_total += 1;
            self.counters.messages_out_total += 1;
            if !conn.dirty {
                conn.dirty = true;
                self.dirty.push(key);
            }
            let queued = conn.outbox.len_bytes();
            if queued as u64 > self.counters.outbound_queue_peak_bytes {
                self.counters.outbound_queue_peak_bytes = queued as u64;
            }
            if queued > budget {
                slow.push(key);
            }
        }
        self.delivered_this_turn.push(broadcast.published_at);
        for key in polls {
            let Phase::Polling {
                keep_alive,
                ref epoch,
                ..
            } = self.conns[key].phase
            else {
                continue;
            };
            let epoch = epoch.clone().unwrap_or_else(|| (*self.ctx.epoch).into());
            self.counters.deliveries_total += 1;
            self.leave_all(key);
            let response = longpoll::response(
                &broadcast.channel,
                &epoch,
                broadcast.seq,
                std::slice::from_ref(&broadcast.frame),
                keep_alive,
            );
            self.send_response(key, response, keep_alive);
        }
        for key in slow {
            self.shed(key, tag, policy);
        }
    }

    /// Brings a slow subscriber's queue back within budget as its channel's policy says,
    /// announcing what was shed; disconnects it when shedding is not enough.
    fn shed(&mut self, key: usize, tag: u32, policy: SlowConsumerPolicy) {
        let budget = self.ctx.config.outbound_queue_bytes;
        let conn = &mut self.conns[key];
        // Frames from a compressor that keeps its window cannot be dropped or replaced:
        // the client's window would no longer match. Such a subscriber is disconnected
        // and recovers with `since`.
        let policy = match &conn.phase {
            Phase::WebSocket { ws, .. } if ws.takes_over_context() => {
                SlowConsumerPolicy::Disconnect
            }
            _ => policy,
        };
        let outbox = &mut conn.outbox;
        let shed = match policy {
            SlowConsumerPolicy::Disconnect => Vec::new(),
            // Down to half the budget, so the next messages do not shed again at once.
            SlowConsumerPolicy::DropOldest => outbox.drop_oldest(budget / 2),
            SlowConsumerPolicy::Conflate => outbox.conflate(tag).into_iter().collect(),
        };
        for range in shed {
            self.counters.messages_shed_total += range.to - range.from + 1;
            let conn = &mut self.conns[key];
            let Some(channel) = conn.subs.iter().find_map(|s| match s.state {
                SubState::Active { tag, .. } if tag == range.tag => Some(s.channel.clone()),
                _ => None,
            }) else {
                // It left that channel meanwhile: nothing to announce.
                continue;
            };
            let stream = matches!(conn.phase, Phase::EventStream);
            conn.outbox.announce(range, |from, to| {
                if stream {
                    let json = format!(
                        r#"{{"channel":{},"from":{from},"to":{to}}}"#,
                        json_string(&channel)
                    );
                    sse::control_event("gap", &json)
                } else {
                    pubsub::encode_gap(&channel, from, to)
                }
            });
        }
        if self.conns[key].outbox.len_bytes() > budget {
            self.counters.slow_consumer_closes_total += 1;
            self.conns[key].outbox.discard_unstarted();
            self.close_with(key, 4008, "slow consumer: reconnect and recover with since");
            self.finish(key);
        }
    }

    /// Acts on every deadline that has passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        while let Some(conn) = self.request_deadlines.poll_expired(now) {
            if let Some(key) = self.resolve(conn) {
                let conn = &self.conns[key];
                // Stale unless this is still the request the deadline was armed for.
                if matches!(conn.phase, Phase::Request { .. })
                    && !conn.finishing
                    && conn.request_deadline <= now
                {
                    self.refuse(key, 408, "request not completed in time", &[]);
                }
            }
        }
        while let Some(Reverse((deadline, conn, what))) = self.timed.peek().copied() {
            if deadline > now {
                break;
            }
            self.timed.pop();
            let Some(key) = self.resolve(conn) else {
                continue;
            };
            match (what, &self.conns[key].phase) {
                (
                    Timed::Poll,
                    &Phase::Polling {
                        deadline: current,
                        keep_alive,
                        ..
                    },
                ) if current == deadline => {
                    let waiting_for_home = self.conns[key]
                        .subs
                        .iter()
                        .any(|s| matches!(s.state, SubState::Pending { .. }));
                    if waiting_for_home {
                        // History may hold the answer: let the home's reply decide.
                        if let Phase::Polling { expired, .. } = &mut self.conns[key].phase {
                            *expired = true;
                        }
                    } else {
                        self.end_poll_empty(key, keep_alive);
                    }
                }
                (Timed::Poll, _) => {}
                (Timed::TokenExpiry { expires_at }, phase) => {
                    let current = self.conns[key]
                        .identity
                        .as_ref()
                        .and_then(|identity| identity.expires_at);
                    if current != Some(expires_at) {
                        continue;
                    }
                    match phase {
                        Phase::WebSocket { .. } => self.close_with(
                            key,
                            4001,
                            "token expired: reconnect with a fresh token",
                        ),
                        Phase::EventStream | Phase::Polling { .. } => self.finish(key),
                        Phase::Request { .. } | Phase::Publishing { .. } => {}
                    }
                }
            }
        }
        while let Some(conn) = self.close_deadlines.poll_expired(now) {
            if let Some(key) = self.resolve(conn) {
                self.kill(key);
            }
        }
        while let Some(conn) = self.heartbeat_deadlines.poll_expired(now) {
            if let Some(key) = self.resolve(conn) {
                self.heartbeat(key, now);
            }
        }
        self.channels.sweep(now);
        self.reread_pipelined();
    }

    /// Answers a parked poll with no messages (its time ran out, or the server drains).
    fn end_poll_empty(&mut self, key: usize, keep_alive: bool) {
        let conn = &self.conns[key];
        let Phase::Polling { seq, ref epoch, .. } = conn.phase else {
            return;
        };
        let epoch = epoch.clone().unwrap_or_else(|| (*self.ctx.epoch).into());
        let channel = conn.subs.first().map(|s| s.channel.clone());
        self.leave_all(key);
        let channel = channel.as_deref().unwrap_or("");
        let response = longpoll::response(channel, &epoch, seq, &[], keep_alive);
        self.send_response(key, response, keep_alive);
    }

    /// Pings a quiet WebSocket and closes one silent past the idle timeout; keeps an event
    /// stream's proxies awake with a comment.
    fn heartbeat(&mut self, key: usize, now: Instant) {
        let conn = &mut self.conns[key];
        if conn.closing {
            return;
        }
        // Once per interval is often enough to give an idle connection's memory back,
        // and costs the busy ones nothing per message.
        conn.outbox.release_memory();
        conn.subs.shrink_to_fit();
        match conn.phase {
            Phase::WebSocket { .. } => {
                let silent = now.saturating_duration_since(conn.last_activity);
                if silent >= self.ctx.config.idle_timeout {
                    self.close_with(key, 1001, "idle timeout");
                    return;
                }
                if silent >= self.ctx.config.ping_interval / 2 {
                    conn.outbox.push_control(encode_frame(OpCode::Ping, b""));
                    self.mark_dirty(key);
                }
            }
            Phase::EventStream => {
                conn.outbox.push(Bytes::from_static(sse::HEARTBEAT));
                self.mark_dirty(key);
            }
            _ => return,
        }
        let conn_ref = self.conn_ref(key);
        self.heartbeat_deadlines.arm(now, conn_ref);
    }

    /// The earliest deadline the backend must wake up for.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        [
            self.request_deadlines.next(),
            self.heartbeat_deadlines.next(),
            self.close_deadlines.next(),
            self.timed.peek().map(|Reverse((t, _, _))| *t),
            self.channels.next_sweep(),
        ]
        .into_iter()
        .flatten()
        .min()
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
            let conn = &self.conns[key];
            if conn.dead || conn.finishing {
                continue;
            }
            match conn.phase {
                Phase::WebSocket { .. } => self.close_with(key, 1001, "server shutting down"),
                Phase::Polling { .. } => self.end_poll_empty(key, false),
                // A publish in flight gets its receipt first (it is not cut off).
                Phase::Publishing { .. } => {}
                Phase::Request { .. } | Phase::EventStream => self.finish(key),
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
}

/// The envelope a home answers a subscription (or one of its replay chunks) with.
fn home_answer(
    outcome: SubscribeOutcome,
    channel: ChannelName,
    conn: ConnRef,
    ticket: u32,
    id: Option<u64>,
) -> Envelope {
    let answer = |seq| Answer {
        channel,
        conn,
        ticket,
        seq,
        id,
        epoch: None,
    };
    match outcome {
        SubscribeOutcome::Subscribed { seq, replay } => Envelope::Subscribed {
            answer: answer(seq),
            replay,
        },
        SubscribeOutcome::HistoryGap { seq, oldest } => Envelope::HistoryGap {
            answer: answer(seq),
            oldest,
        },
    }
}

/// Whether a per-connection deadline still applies: its connection lives and is still in
/// the request that armed it (the same poll deadline, the same token).
fn timed_is_live(conns: &Slab<Conn>, at: Instant, conn: ConnRef, what: Timed) -> bool {
    let Some(c) = conns.get(conn.key as usize) else {
        return false;
    };
    if c.generation != conn.generation || c.dead {
        return false;
    }
    match what {
        Timed::Poll => matches!(c.phase, Phase::Polling { deadline, .. } if deadline == at),
        Timed::TokenExpiry { expires_at } => c
            .identity
            .as_ref()
            .is_some_and(|i| i.expires_at == Some(expires_at)),
    }
}

/// A seed for `Retry-After` jitter that differs per shard and per run, so nodes
/// restarted together do not hand out the same sequence.
fn jitter_seed(shard: usize) -> u64 {
    let nanos = SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    (nanos
        ^ u64::from(std::process::id()) << 32
        ^ (shard as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15))
        | 1
}

/// Queues a frame the protocol core produced: pings and pongs in the control lane (they
/// overtake queued data), a close behind the data queued before it.
fn queue_transmit(outbox: &mut Outbox, frame: Bytes) {
    let opcode = frame.first().map_or(0, |b| b & 0x0f);
    if opcode == u8::from(OpCode::Ping) || opcode == u8::from(OpCode::Pong) {
        // A full control lane means a ping flood; dropping the pong is allowed.
        outbox.push_control(frame);
    } else {
        outbox.push(frame);
    }
}

/// Nanoseconds since `start`, for the compression CPU counters.
fn elapsed_ns(start: Instant) -> u64 {
    start.elapsed().as_nanos() as u64
}

/// The header of an unmasked, final frame of `len` payload bytes.
fn frame_header(opcode: OpCode, len: usize) -> Bytes {
    let mut header = BytesMut::with_capacity(10);
    FrameHeader {
        fin: true,
        rsv: 0,
        opcode,
        mask: None,
        payload_len: len as u64,
    }
    .encode(&mut header);
    header.freeze()
}

/// The sequence number inside a broadcast frame (replays carry only frames).
fn frame_seq(frame: &Bytes) -> u64 {
    let payload = longpoll::frame_payload(frame);
    let text = std::str::from_utf8(&payload).unwrap_or("");
    text.split_once("\"seq\":")
        .and_then(|(_, rest)| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The event that opens an event stream's subscription.
fn sse_subscribed(channel: &str, seq: u64, epoch: &str) -> Bytes {
    let json = format!(
        r#"{{"channel":{},"seq":{seq},"epoch":{}}}"#,
        json_string(channel),
        json_string(epoch)
    );
    sse::control_event("subscribed", &json)
}

fn json_string(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len() + 2);
    http::push_json_str(&mut out, s);
    String::from_utf8(out).expect("escaped UTF-8 stays UTF-8")
}
/// Shards driven in memory, as a backend would, with clients that are byte buffers.
#[cfg(test)]
mod tests;
