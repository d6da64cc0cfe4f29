//! `GET /poll`: a request parked on one channel until a message, its deadline or a drain
//! answers it.

use std::time::Instant;

use bytes::Bytes;

use crate::config::Config;
use crate::http::{ApiError, longpoll};
use crate::hub::{Broadcast, ChannelName};
use crate::proto::handshake::Request;

use super::Shard;
use super::conn::Phase;
use super::timer::Timed;
use super::transport::{Action, Confirmed, Gap, Scope, Transport};

/// A parked poll.
pub(super) struct Poll {
    /// When it is answered empty (as the wheel times it).
    pub(super) deadline: Instant,
    /// Where the client stands: its `since`, then the channel's latest once subscribed.
    seq: u64,
    keep_alive: bool,
    /// The deadline passed before the home answered: answer as soon as it does.
    expired: bool,
    /// The channel's epoch once a cluster answered (`None`: the node's own). Boxed, rare
    /// as it is, so this phase is no larger than the others.
    epoch: Option<Box<ChannelName>>,
}

impl Poll {
    /// Answers the poll with `response`, built for its keep-alive.
    fn respond(&self, response: Bytes) -> Action {
        Action::Respond {
            response,
            keep_alive: self.keep_alive,
        }
    }

    /// The answer with no messages: the client stands where it stood.
    fn answer_empty(&self, scope: &Scope<'_>, keep_alive: bool) -> Action {
        let epoch = self.epoch.as_deref().map_or(scope.node_epoch, |e| e);
        let response = longpoll::response(scope.channel, epoch, self.seq, &[], keep_alive);
        Action::Respond {
            response,
            keep_alive,
        }
    }

    /// The answer with a live message.
    pub(super) fn answer_broadcast(&self, broadcast: &Broadcast, node_epoch: &str) -> Action {
        let epoch = self.epoch.as_deref().map_or(node_epoch, |e| e);
        let message = [(broadcast.seq, broadcast.frame.clone())];
        let response = longpoll::response(
            &broadcast.channel,
            epoch,
            broadcast.seq,
            &message,
            self.keep_alive,
        );
        self.respond(response)
    }
}

impl Transport for Poll {
    /// Waiting for an answer: only the start of a pipelined next request.
    fn read_budget(&self, config: &Config) -> usize {
        config.max_head_bytes
    }

    /// Answered empty, and the connection ends.
    fn on_drain(&mut self, scope: &mut Scope<'_>) -> Action {
        self.answer_empty(scope, false)
    }

    fn on_token_expired(&mut self) -> Action {
        Action::Finish
    }

    /// Called for the poll's own wheel entry, and for a stale one of an earlier poll on
    /// the same connection: either way, once the deadline has passed, it has run out.
    fn on_deadline(&mut self, scope: &mut Scope<'_>, waiting_for_home: bool) -> Action {
        if self.deadline > scope.now {
            return Action::Stay;
        }
        if waiting_for_home {
            // History may hold the answer: let the home's reply decide.
            self.expired = true;
            return Action::Stay;
        }
        self.answer_empty(scope, self.keep_alive)
    }

    /// History had what the poll asked for, or its time ran out while the home was
    /// answering: answered now, with whatever history had. A replay cut to its first
    /// chunk answers up to its last message; the client asks again from there. Otherwise
    /// it waits for a message, standing at the channel's latest.
    fn on_subscribed(&mut self, _scope: &mut Scope<'_>, confirmed: &Confirmed<'_>) -> Action {
        let replay = confirmed.replay;
        if self.expired || !replay.is_empty() {
            let answered_to = replay.last().map_or(confirmed.seq, |&(last, _)| last);
            let response = longpoll::response(
                confirmed.channel,
                confirmed.epoch,
                answered_to,
                replay,
                self.keep_alive,
            );
            return self.respond(response);
        }
        self.seq = confirmed.seq;
        self.epoch = confirmed.cluster_epoch.cloned().map(Box::new);
        Action::Stay
    }

    fn on_gap(&mut self, _scope: &mut Scope<'_>, gap: &Gap<'_>) -> Action {
        let response =
            longpoll::gap_response(gap.channel, gap.epoch, gap.seq, gap.oldest, self.keep_alive);
        self.respond(response)
    }

    fn on_busy(
        &mut self,
        _scope: &mut Scope<'_>,
        message: &'static str,
        _id: Option<u64>,
    ) -> Action {
        Action::Refuse {
            error: ApiError::Unavailable(message.into()),
            keep_alive: false,
        }
    }
}

impl Shard {
    pub(super) fn poll(&mut self, key: usize, request: &Request, keep_alive: bool) {
        let poll = match longpoll::parse(request) {
            Ok(poll) => poll,
            Err(error) => {
                self.refuse(key, &error, keep_alive);
                return;
            }
        };
        if !self.may_subscribe(key, &poll.channel) {
            let channel = poll.channel;
            self.refuse(key, &ApiError::ReadForbidden { channel }, false);
            return;
        }
        // As the wheel will time it, so its entry is known for this poll's own.
        let deadline = self.wheel.rounded(self.now + poll.timeout);
        self.set_phase(
            key,
            Phase::Polling(Box::new(Poll {
                deadline,
                seq: poll.since.unwrap_or(0),
                keep_alive,
                expired: false,
                epoch: None,
            })),
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
}
