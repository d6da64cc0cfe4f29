//! WebSocket connections (`/ws` pub/sub, `/echo`): the upgrade, frames in through the
//! sans-IO [`Connection`](crate::proto::Connection), the inbound rate limit, the JSON
//! commands of the pub/sub protocol, and the server-side close.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use crate::config::{Config, MAX_FRAGMENTS};
use crate::http::ApiError;
use crate::limits::Tokens;
use crate::metrics::Stopwatch;
use crate::proto::decoder::DecoderLimits;
use crate::proto::deflate::{self, CompressorSettings};
use crate::proto::frame::{FrameHeader, OpCode};
use crate::proto::handshake::{self, Request};
use crate::proto::pubsub::{self, Command};
use crate::proto::{Connection, Event};

use super::conn::{Life, Phase};
use super::transport::{Action, Chunk, Confirmed, Gap, Scope, Transport};
use super::{Outbox, Shard};

/// Messages refused in a row before a connection that keeps sending over its rate is
/// closed with 1008.
const MAX_STRIKES: u16 = 50;

/// Publishes one connection may have waiting for their acks; past it the shard stops
/// reading from it, so a client pipelining publishes cannot queue without bound.
const MAX_INFLIGHT_PUBLISHES: u16 = 64;

/// The heartbeat: an unmasked, final ping with no payload, the same bytes for everyone
/// (no allocation per ping).
pub(super) const EMPTY_PING: &[u8] = &[0x89, 0x00];

/// Which WebSocket service a connection upgraded to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Endpoint {
    PubSub,
    Echo,
}

/// A WebSocket connection's state. The inbound message budget is kept flat, not in a
/// struct of its own: its padding would take the state from 112 bytes to 120 (the
/// allocator's 128-byte class).
pub(super) struct WebSocket {
    pub(super) ws: Connection,
    pub(super) endpoint: Endpoint,
    /// Inbound messages allowed, at the endpoint's rate ([`EndpointLimits::per_second`]).
    pub(super) tokens: Tokens,
    /// How often in a row the client ran past `tokens`.
    pub(super) strikes: u16,
    /// Publishes sent to their homes and not yet acknowledged (16 bits, beside `strikes`,
    /// keep the state in its 112-byte class).
    pub(super) inflight_publishes: u16,
    /// A question (presence, history) is on its way to a home: reading waits for the
    /// answer, so answers queue one at a time, each within half the outbound budget.
    pub(super) asking: bool,
}

impl Transport for WebSocket {
    /// Bounded by the decoder's frame and message limits instead.
    fn read_budget(&self, _config: &Config) -> usize {
        usize::MAX
    }

    fn reads_in_bulk(&self) -> bool {
        true
    }

    fn may_read(&self) -> bool {
        self.inflight_publishes < MAX_INFLIGHT_PUBLISHES && !self.asking
    }

    fn has_heartbeat(&self) -> bool {
        true
    }

    fn on_drain(&mut self, _scope: &mut Scope<'_>) -> Action {
        Action::Close {
            code: 1001,
            reason: "server shutting down",
        }
    }

    fn on_token_expired(&mut self) -> Action {
        Action::Close {
            code: 4001,
            reason: "token expired: reconnect with a fresh token",
        }
    }

    /// Pinged at a heartbeat that finds it silent for half an interval or more: a quiet
    /// one that answers is pinged once per interval, the first time within an interval
    /// of its upgrade (see [`Shard::arm_heartbeat`]); one that spoke last is pinged
    /// within 1.5 intervals of that. One that sends nothing back for the pong timeout
    /// after a heartbeat's ping is closed then; one silent for the idle timeout (only
    /// possible with a pong timeout longer than it) at its next heartbeat.
    fn on_heartbeat(&mut self, scope: &mut Scope<'_>) -> Action {
        let silent = scope.silent;
        if silent >= scope.config.idle_timeout {
            return Action::Close {
                code: 1001,
                reason: "idle timeout",
            };
        }
        if silent < scope.config.ping_interval / 2 {
            return Action::Stay;
        }
        Action::Ping
    }

    /// Nothing came back since a heartbeat's ping: the peer is gone (a laptop closed, a
    /// NAT that forgot the mapping) or too stalled to serve.
    fn on_pong_timeout(&mut self) -> Action {
        Action::Close {
            code: 1001,
            reason: "no pong within the pong timeout",
        }
    }

    fn on_subscribed(&mut self, scope: &mut Scope<'_>, confirmed: &Confirmed<'_>) -> Action {
        for (_, frame) in confirmed.replay {
            scope.outbox.push(frame.clone());
        }
        let Confirmed {
            channel,
            seq,
            epoch,
            id,
            ..
        } = *confirmed;
        Action::Reply(pubsub::encode_subscribed(channel, seq, epoch, id))
    }

    fn on_replay_chunk(&mut self, scope: &mut Scope<'_>, chunk: &Chunk<'_>) -> Action {
        for (_, frame) in chunk.replay {
            scope.outbox.push(frame.clone());
        }
        Action::Flush
    }

    fn on_gap(&mut self, _scope: &mut Scope<'_>, gap: &Gap<'_>) -> Action {
        let Gap {
            channel,
            seq,
            oldest,
            id,
            ..
        } = *gap;
        let message = format!(
            "history of {channel:?} does not reach back that far; oldest available is {oldest}"
        );
        Action::Reply(pubsub::encode_history_gap(
            channel, seq, oldest, &message, id,
        ))
    }

    fn on_busy(
        &mut self,
        _scope: &mut Scope<'_>,
        message: &'static str,
        id: Option<u64>,
    ) -> Action {
        Action::Reply(pubsub::encode_error("unavailable", message, id))
    }

    fn on_ack(&mut self, seq: u64, _subscribers: u32, id: Option<u64>) -> Action {
        self.inflight_publishes -= 1;
        Action::Reply(pubsub::encode_ack(id, seq))
    }

    fn on_refused(&mut self, message: &str, id: Option<u64>) -> Action {
        self.inflight_publishes -= 1;
        Action::Reply(pubsub::encode_error("unavailable", message, id))
    }

    fn on_conflict(&mut self, channel: &str, seq: u64, id: Option<u64>) -> Action {
        self.inflight_publishes -= 1;
        Action::Reply(pubsub::encode_conflict(channel, seq, id))
    }

    fn on_found(&mut self, json: &[u8], id: Option<u64>) -> Action {
        self.asking = false;
        Action::Reply(pubsub::encode_with_id(json, id))
    }

    fn on_unanswered(&mut self, message: &str, id: Option<u64>) -> Action {
        self.asking = false;
        Action::Reply(pubsub::encode_error("unavailable", message, id))
    }
}

/// What the WebSocket connections of one endpoint share, built once per shard: their
/// decoder limits and inbound message rate.
pub(super) struct EndpointLimits {
    pub(super) decoder: Arc<DecoderLimits>,
    pub(super) per_second: u64,
}

impl EndpointLimits {
    /// `/echo` has the limits of `/ws` unless the operator raised them (a conformance run).
    pub(super) fn new(config: &Config, endpoint: Endpoint) -> Self {
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
        Self {
            decoder: Arc::new(DecoderLimits {
                max_frame_bytes: max_message_bytes,
                max_message_bytes,
                max_fragments,
            }),
            per_second,
        }
    }

    /// Messages a connection may send at once: two seconds' worth.
    fn burst(&self) -> u64 {
        self.per_second * 2
    }
}

impl Shard {
    fn endpoint_limits(&self, endpoint: Endpoint) -> &EndpointLimits {
        match endpoint {
            Endpoint::PubSub => &self.pubsub_limits,
            Endpoint::Echo => &self.echo_limits,
        }
    }

    pub(super) fn upgrade(&mut self, key: usize, request: &Request, endpoint: Endpoint) {
        let accept = match request.websocket_accept() {
            Ok(accept) => accept,
            Err(e) => {
                self.refuse(key, &ApiError::Handshake(e), false);
                return;
            }
        };
        let shared = self.endpoint_limits(endpoint);
        let limits = shared.decoder.clone();
        let tokens = Tokens::full(shared.burst(), self.wheel.stamp(self.now).since_start());
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
            Phase::WebSocket(Box::new(WebSocket {
                ws,
                endpoint,
                tokens,
                strikes: 0,
                inflight_publishes: 0,
                asking: false,
            })),
        );
        let extensions = negotiated.map(|params| params.response());
        let response = Bytes::from(handshake::upgrade_response(
            &accept,
            None,
            extensions.as_deref(),
        ));
        self.conns[key].outbox.push(response);
        self.mark_dirty(key);
        self.arm_heartbeat(key);
    }

    /// Decodes frames until the buffer runs dry or the connection stops reading.
    pub(super) fn read_frames(&mut self, key: usize) {
        loop {
            let conn = &mut self.conns[key];
            let Phase::WebSocket(socket) = &mut conn.phase else {
                return;
            };
            let (ws, endpoint) = (&mut socket.ws, socket.endpoint);
            let inflating = ws
                .compresses()
                .then(|| (Stopwatch::start(), ws.inflated_messages()));
            let event = conn
                .read_buf
                .as_deref_mut()
                .and_then(|buf| ws.poll_event(buf));
            if let Some((stopwatch, inflated)) = inflating
                && ws.inflated_messages() > inflated
            {
                self.counters.inflate_ns_total += stopwatch.elapsed_ns();
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
                            if self.within_rate(key, &payload) {
                                self.echo(key, text, payload);
                            }
                        }
                        Endpoint::PubSub if text => {
                            if self.within_rate(key, &payload) {
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

    pub(super) fn echo(&mut self, key: usize, text: bool, payload: Bytes) {
        let opcode = if text { OpCode::Text } else { OpCode::Binary };
        let conn = &mut self.conns[key];
        if let Phase::WebSocket(socket) = &mut conn.phase
            && socket.ws.compresses()
        {
            let ws = &mut socket.ws;
            let stopwatch = Stopwatch::start();
            let frame = ws
                .encode_compressed(text, &payload)
                .expect("deflate was negotiated");
            let plain_len = frame_header(opcode, payload.len()).len() + payload.len();
            self.counters
                .count_compressed(plain_len, frame.len(), stopwatch.elapsed_ns());
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
    pub(super) fn close_with(&mut self, key: usize, code: u16, reason: &str) {
        let conn_ref = self.conn_ref(key);
        let conn = &mut self.conns[key];
        if conn.is_closing() {
            return;
        }
        conn.life = Life::Closing;
        if let Phase::WebSocket(socket) = &mut conn.phase {
            let ws = &mut socket.ws;
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

    /// Spends one of the connection's inbound tokens for `payload`. Over the rate the
    /// message is dropped (on /ws with a `rate_limited` error carrying the command's `id`,
    /// so a client waiting for its ack learns it will not come; /echo sends only echoes);
    /// a client that keeps sending anyway is closed with 1008.
    pub(super) fn within_rate(&mut self, key: usize, payload: &Bytes) -> bool {
        let now = self.wheel.stamp(self.now).since_start();
        let Phase::WebSocket(socket) = &mut self.conns[key].phase else {
            return true;
        };
        let WebSocket {
            tokens,
            strikes,
            endpoint,
            ..
        } = &mut **socket;
        let shared = match endpoint {
            Endpoint::PubSub => &self.pubsub_limits,
            Endpoint::Echo => &self.echo_limits,
        };
        if tokens.try_take(shared.per_second, shared.burst(), now) {
            *strikes = 0;
            return true;
        }
        *strikes = strikes.saturating_add(1);
        if *strikes > MAX_STRIKES {
            self.close_with(key, 1008, "message rate limit exceeded repeatedly");
        } else if *endpoint == Endpoint::PubSub {
            let message = format!(
                "more than {} messages a second; this one was dropped",
                self.ctx.config.max_messages_per_second
            );
            // Read as an accepted command would be: no dearer than accepting it, and at
            // most MAX_STRIKES times in a row.
            let id = match self.parser.parse(payload) {
                Ok(command) => command.id(),
                Err(e) => e.id,
            };
            self.reply(key, pubsub::encode_error("rate_limited", &message, id));
        }
        false
    }

    pub(super) fn handle_command(&mut self, key: usize, payload: &Bytes) {
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
            Command::Presence { channel, id, .. } | Command::PresenceStats { channel, id }
                if !self.may_subscribe(key, channel) =>
            {
                Some(format!("not allowed to see who is in {channel:?}")).zip(Some(*id))
            }
            Command::History { channel, id, .. } if !self.may_subscribe(key, channel) => {
                Some(format!("not allowed to read {channel:?}")).zip(Some(*id))
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
            Command::Publish {
                channel,
                data,
                expect_seq,
                id,
            } => {
                let conn = self.conn_ref(key);
                let publisher = self.conns[key]
                    .identity
                    .as_ref()
                    .and_then(|identity| identity.user.clone())
                    .filter(|_| self.ctx.config.namespaces.of(&channel).expose_publisher);
                if let Phase::WebSocket(socket) = &mut self.conns[key].phase {
                    socket.inflight_publishes += 1;
                }
                self.publish(channel.into(), data, (publisher, expect_seq), conn, id);
            }
            Command::Ping { id } => self.reply(key, pubsub::encode_pong(id)),
            Command::Presence {
                channel,
                cursor,
                limit,
                id,
            } => self.ask_presence(key, &channel, Some((cursor.as_deref(), limit)), id),
            Command::PresenceStats { channel, id } => self.ask_presence(key, &channel, None, id),
            Command::History {
                channel,
                since,
                limit,
                newest_first,
                id,
            } => self.ask_history(key, &channel, since, (limit, newest_first), id),
        }
    }
}

/// Queues a frame the protocol core produced: pings and pongs in the control lane (they
/// overtake queued data), a close behind the data queued before it.
pub(super) fn queue_transmit(outbox: &mut Outbox, frame: Bytes) {
    let opcode = frame.first().map_or(0, |b| b & 0x0f);
    if opcode == u8::from(OpCode::Ping) || opcode == u8::from(OpCode::Pong) {
        // A full control lane means a ping flood; dropping the pong is allowed.
        outbox.push_control(frame);
    } else {
        outbox.push(frame);
    }
}

/// The header of an unmasked, final frame of `len` payload bytes.
pub(super) fn frame_header(opcode: OpCode, len: usize) -> Bytes {
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

#[cfg(test)]
mod tests {
    use super::EMPTY_PING;
    use crate::proto::frame::{OpCode, encode_frame};

    #[test]
    fn the_static_ping_is_the_encoded_empty_ping() {
        assert_eq!(EMPTY_PING, &encode_frame(OpCode::Ping, b"")[..]);
    }
}
