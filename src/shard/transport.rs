//! What a transport answers. The core hands each connection's events (a subscription
//! confirmed, refused for a gap or a busy cluster, a replay chunk, an ack, a heartbeat,
//! a deadline, the drain) to its phase's [`Transport`], which updates its own state,
//! queues what it has to say on the outbox, and returns the [`Action`] the core must
//! carry out. Each transport's answers live in its file (`request`, `publish`,
//! `longpoll`, `event_stream`, `websocket`); the core dispatches once per event
//! ([`Shard::dispatch`]) and acts once ([`Shard::apply`]).
//!
//! Two paths stay outside: bytes in (the request stage and the WebSocket decoder call
//! into the shard to route, subscribe and publish) and the fan-out hot loop, which
//! matches on the phase inline for the price of one branch per subscriber.

use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::config::Config;
use crate::http::ApiError;
use crate::hub::ChannelName;

use super::conn::{Conn, Phase};
use super::outbox::Outbox;
use super::{Part, Shard};

/// What the core does for a connection after its transport answered an event.
pub(super) enum Action {
    /// Nothing (more) to do.
    Stay,
    /// Something was queued on the outbox: write it.
    Flush,
    /// Ping the peer, which must answer within the pong timeout.
    Ping,
    /// Queue this reply (an ack, an error) and write it.
    Reply(Bytes),
    /// The request is answered: its subscriptions end, the response goes out, then the
    /// connection reads its next request (`keep_alive`) or finishes.
    Respond { response: Bytes, keep_alive: bool },
    /// The request is refused with this error, then answered as [`Action::Respond`].
    Refuse { error: ApiError, keep_alive: bool },
    /// A WebSocket close handshake with this code and reason.
    Close { code: u16, reason: &'static str },
    /// Write what is queued, then end the connection.
    Finish,
    /// Subscribe to this channel again, live (an event stream after a gap).
    Resubscribe(ChannelName),
}

/// What a transport sees of its connection and the node while it answers an event.
pub(super) struct Scope<'a> {
    pub(super) outbox: &'a mut Outbox,
    /// The channel of the connection's first subscription ("" without one): the one
    /// channel of an event stream or a poll.
    pub(super) channel: &'a str,
    /// This node's epoch, for a channel whose epoch no cluster gave.
    pub(super) node_epoch: &'a str,
    pub(super) config: &'a Config,
    pub(super) now: Instant,
    /// How long the peer has sent nothing.
    pub(super) silent: Duration,
}

/// A home's confirmation of a subscription, or of its last replay chunk.
pub(super) struct Confirmed<'a> {
    pub(super) channel: &'a str,
    /// The channel's latest seq.
    pub(super) seq: u64,
    pub(super) epoch: &'a str,
    /// The channel's epoch as a cluster gave it (`None`: the node's own).
    pub(super) cluster_epoch: Option<&'a ChannelName>,
    pub(super) id: Option<u64>,
    /// History after `since`, oldest first.
    pub(super) replay: &'a [(u64, Bytes)],
    /// An earlier chunk of a paced replay announced the subscription already.
    pub(super) announced: bool,
}

/// A chunk of a paced `since` replay that does not reach the channel's latest seq yet.
pub(super) struct Chunk<'a> {
    pub(super) channel: &'a str,
    pub(super) seq: u64,
    pub(super) epoch: &'a str,
    pub(super) replay: &'a [(u64, Bytes)],
    /// The first answer of the home: the subscription is announced with it.
    pub(super) first: bool,
}

/// History no longer reaches back to a subscription's `since`.
pub(super) struct Gap<'a> {
    pub(super) channel: &'a ChannelName,
    pub(super) seq: u64,
    pub(super) oldest: u64,
    pub(super) epoch: &'a str,
    pub(super) id: Option<u64>,
}

/// Answers to the events of a connection in one phase. A transport answers only the
/// events it can receive; the others keep their default, [`Action::Stay`].
pub(super) trait Transport {
    /// How many unprocessed bytes the read buffer may hold in this phase.
    fn read_budget(&self, config: &Config) -> usize;

    /// Reads a stream of input (frames, ignored bytes) rather than one request at a
    /// time: a backend may keep a receive armed across reads.
    fn reads_in_bulk(&self) -> bool {
        false
    }

    /// Whether reading more is useful apart from the read budget and the outbox's.
    fn may_read(&self) -> bool {
        true
    }

    /// Pinged once per ping interval at its phase of it, for as long as it answers
    /// heartbeats.
    fn has_heartbeat(&self) -> bool {
        false
    }

    /// The server is draining.
    fn on_drain(&mut self, scope: &mut Scope<'_>) -> Action;

    /// The token that admitted the request holding the connection ran out.
    fn on_token_expired(&mut self) -> Action {
        Action::Stay
    }

    /// A heartbeat came due. While the connection is not closing and its transport
    /// [`Transport::has_heartbeat`], the core arms the next one.
    fn on_heartbeat(&mut self, _scope: &mut Scope<'_>) -> Action {
        Action::Stay
    }

    /// A heartbeat's ping went unanswered for the pong timeout.
    fn on_pong_timeout(&mut self) -> Action {
        Action::Stay
    }

    /// Its own deadline came due (a parked poll's). `waiting_for_home`: a subscription
    /// it made is not answered yet.
    fn on_deadline(&mut self, _scope: &mut Scope<'_>, _waiting_for_home: bool) -> Action {
        Action::Stay
    }

    /// A home confirmed a subscription, with the replay it asked for. Answering
    /// [`Action::Respond`] ends the subscription before it starts.
    fn on_subscribed(&mut self, _scope: &mut Scope<'_>, _confirmed: &Confirmed<'_>) -> Action {
        Action::Stay
    }

    /// A chunk of a paced replay, more to come.
    fn on_replay_chunk(&mut self, _scope: &mut Scope<'_>, _chunk: &Chunk<'_>) -> Action {
        Action::Stay
    }

    /// A subscription was refused: history does not reach back to its `since`.
    fn on_gap(&mut self, _scope: &mut Scope<'_>, _gap: &Gap<'_>) -> Action {
        Action::Stay
    }

    /// A subscription ended because the cluster's queue was full.
    fn on_busy(
        &mut self,
        _scope: &mut Scope<'_>,
        _message: &'static str,
        _id: Option<u64>,
    ) -> Action {
        Action::Stay
    }

    /// A publish of this connection was ordered as `seq`, reaching `subscribers`.
    fn on_ack(&mut self, _seq: u64, _subscribers: u32, _id: Option<u64>) -> Action {
        Action::Stay
    }

    /// A publish of this connection could not be stored.
    fn on_refused(&mut self, _message: &str, _id: Option<u64>) -> Action {
        Action::Stay
    }

    /// A publish of this connection with `expect_seq` found `channel` at `seq`.
    fn on_conflict(&mut self, _channel: &str, _seq: u64, _id: Option<u64>) -> Action {
        Action::Stay
    }

    /// A query's answer came back: `json` is one JSON object.
    fn on_found(&mut self, _json: &[u8], _id: Option<u64>) -> Action {
        Action::Stay
    }

    /// A query could not be answered (the cluster's Redis failed).
    fn on_unanswered(&mut self, _message: &str, _id: Option<u64>) -> Action {
        Action::Stay
    }

    /// One shard's part of the answer to a server API order.
    fn on_done(&mut self, _part: Part) -> Action {
        Action::Stay
    }
}

impl Phase {
    /// The transport that answers this phase's events.
    pub(super) fn transport(&mut self) -> &mut dyn Transport {
        match self {
            Self::Request(request) => &mut **request,
            Self::Publishing(publishing) => &mut **publishing,
            Self::Polling(poll) => &mut **poll,
            Self::EventStream(stream) => stream,
            Self::WebSocket(socket) => &mut **socket,
            Self::Api(call) => &mut **call,
            Self::Admitting(parked) => &mut **parked,
        }
    }

    pub(super) fn transport_ref(&self) -> &dyn Transport {
        match self {
            Self::Request(request) => &**request,
            Self::Publishing(publishing) => &**publishing,
            Self::Polling(poll) => &**poll,
            Self::EventStream(stream) => stream,
            Self::WebSocket(socket) => &**socket,
            Self::Api(call) => &**call,
            Self::Admitting(parked) => &**parked,
        }
    }
}

impl Shard {
    /// Hands one event to `key`'s transport and carries out what it answers.
    pub(super) fn dispatch(
        &mut self,
        key: usize,
        event: impl FnOnce(&mut dyn Transport, &mut Scope<'_>) -> Action,
    ) {
        let action = self.answer(key, event);
        self.apply(key, action);
    }

    /// Hands one event to `key`'s transport and returns its answer, not yet carried out.
    pub(super) fn answer(
        &mut self,
        key: usize,
        event: impl FnOnce(&mut dyn Transport, &mut Scope<'_>) -> Action,
    ) -> Action {
        let Conn {
            phase,
            outbox,
            subs,
            last_activity,
            ..
        } = &mut self.conns[key];
        let mut scope = Scope {
            outbox,
            channel: subs.first().map_or("", |s| &s.channel),
            node_epoch: &self.ctx.epoch,
            config: &self.ctx.config,
            now: self.now,
            silent: last_activity.until(self.wheel.stamp(self.now)),
        };
        event(phase.transport(), &mut scope)
    }

    /// Carries out what `key`'s transport answered.
    pub(super) fn apply(&mut self, key: usize, action: Action) {
        match action {
            Action::Stay => {}
            Action::Flush => self.mark_dirty(key),
            Action::Ping => self.ping(key),
            Action::Reply(frame) => self.reply(key, frame),
            Action::Respond {
                response,
                keep_alive,
            } => {
                self.leave_all(key);
                self.send_response(key, response, keep_alive);
            }
            Action::Refuse { error, keep_alive } => {
                self.leave_all(key);
                self.refuse(key, &error, keep_alive);
            }
            Action::Close { code, reason } => self.close_with(key, code, reason),
            Action::Finish => self.finish(key),
            Action::Resubscribe(channel) => {
                self.request_subscription(key, channel, None, None, None);
            }
        }
    }
}
