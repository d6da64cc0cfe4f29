//! `GET /poll`: a request parked on one channel until a message, its deadline or a drain
//! answers it.

use crate::http::{ApiError, longpoll};
use crate::proto::handshake::Request;

use super::Shard;
use super::conn::Phase;
use super::timer::Timed;

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

    /// Answers a parked poll with no messages (its time ran out, or the server drains).
    pub(super) fn end_poll_empty(&mut self, key: usize, keep_alive: bool) {
        let conn = &self.conns[key];
        let Phase::Polling { seq, ref epoch, .. } = conn.phase else {
            return;
        };
        let epoch = epoch
            .as_deref()
            .cloned()
            .unwrap_or_else(|| (*self.ctx.epoch).into());
        let channel = conn.subs.first().map(|s| s.channel.clone());
        self.leave_all(key);
        let channel = channel.as_deref().unwrap_or("");
        let response = longpoll::response(channel, &epoch, seq, &[], keep_alive);
        self.send_response(key, response, keep_alive);
    }
}
