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

use super::conn::{Endpoint, Life, Phase, WebSocket};
use super::{Outbox, Shard};

/// Messages refused in a row before a connection that keeps sending over its rate is
/// closed with 1008.
const MAX_STRIKES: u32 = 50;

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

    /// Spends one of the connection's inbound tokens. Over the rate the message is
    /// dropped (on /ws with a `rate_limited` error; /echo sends only echoes); a client that
    /// keeps sending anyway is closed with 1008.
    pub(super) fn within_rate(&mut self, key: usize) -> bool {
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
        *strikes += 1;
        if *strikes > MAX_STRIKES {
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
