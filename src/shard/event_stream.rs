//! `GET /sse`: an open event stream on one channel (`text/event-stream`).

use bytes::Bytes;

use crate::config::Config;
use crate::http::{self, ApiError, sse};
use crate::proto::handshake::Request;

use super::Shard;
use super::conn::Phase;
use super::transport::{Action, Chunk, Confirmed, Gap, Scope, Transport};

/// An open event stream. It holds no state of its own: its one subscription is the
/// connection's.
pub(super) struct EventStream;

impl Transport for EventStream {
    /// Input is discarded.
    fn read_budget(&self, _config: &Config) -> usize {
        usize::MAX
    }

    fn reads_in_bulk(&self) -> bool {
        true
    }

    /// A comment once per interval keeps proxies from timing the stream out.
    fn has_heartbeat(&self) -> bool {
        true
    }

    fn on_drain(&mut self, _scope: &mut Scope<'_>) -> Action {
        Action::Finish
    }

    fn on_token_expired(&mut self) -> Action {
        Action::Finish
    }

    fn on_heartbeat(&mut self, scope: &mut Scope<'_>) -> Action {
        scope.outbox.push(Bytes::from_static(sse::HEARTBEAT));
        Action::Flush
    }

    fn on_subscribed(&mut self, scope: &mut Scope<'_>, confirmed: &Confirmed<'_>) -> Action {
        let Confirmed {
            channel,
            seq,
            epoch,
            replay,
            announced,
            ..
        } = *confirmed;
        queue_replay(scope, !announced, (channel, seq, epoch), replay)
    }

    fn on_replay_chunk(&mut self, scope: &mut Scope<'_>, chunk: &Chunk<'_>) -> Action {
        let Chunk {
            channel,
            seq,
            epoch,
            replay,
            first,
        } = *chunk;
        queue_replay(scope, first, (channel, seq, epoch), replay)
    }

    /// Says what was missed, then carries on live.
    fn on_gap(&mut self, scope: &mut Scope<'_>, gap: &Gap<'_>) -> Action {
        let json = format!(
            r#"{{"channel":{},"seq":{},"oldest":{}}}"#,
            json_string(gap.channel),
            gap.seq,
            gap.oldest
        );
        scope.outbox.push(sse::control_event("gap", &json));
        Action::Resubscribe(gap.channel.clone())
    }

    /// The stream has begun: it says why it ends; EventSource reconnects by itself.
    fn on_busy(
        &mut self,
        scope: &mut Scope<'_>,
        message: &'static str,
        _id: Option<u64>,
    ) -> Action {
        let json = ApiError::Unavailable(message.into()).json();
        scope.outbox.push(sse::control_event("error", &json));
        Action::Finish
    }
}

impl Shard {
    pub(super) fn open_event_stream(&mut self, key: usize, request: &Request) {
        let parsed = sse::channel_param(request).and_then(|c| Ok((c, sse::since(request)?)));
        let (channel, since) = match parsed {
            Ok(parsed) => parsed,
            Err(error) => {
                self.refuse(key, &error, false);
                return;
            }
        };
        if !self.may_subscribe(key, &channel) {
            self.refuse(key, &ApiError::ReadForbidden { channel }, false);
            return;
        }
        self.set_phase(key, Phase::EventStream(EventStream));
        self.conns[key].outbox.push(sse::head());
        self.mark_dirty(key);
        self.arm_heartbeat(key);
        self.request_subscription(key, channel.into(), since, None, None);
    }
}

/// Queues what a home sent for the stream's subscription: the `subscribed` event first
/// when `announce`, then one event per replayed message.
fn queue_replay(
    scope: &mut Scope<'_>,
    announce: bool,
    (channel, seq, epoch): (&str, u64, &str),
    replay: &[(u64, Bytes)],
) -> Action {
    if announce {
        scope.outbox.push(sse_subscribed(channel, seq, epoch));
    }
    for (message_seq, frame) in replay {
        scope.outbox.push(sse::event(*message_seq, frame));
    }
    Action::Flush
}

/// The event that opens an event stream's subscription.
pub(super) fn sse_subscribed(channel: &str, seq: u64, epoch: &str) -> Bytes {
    let json = format!(
        r#"{{"channel":{},"seq":{seq},"epoch":{}}}"#,
        json_string(channel),
        json_string(epoch)
    );
    sse::control_event("subscribed", &json)
}

pub(super) fn json_string(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len() + 2);
    http::push_json_str(&mut out, s);
    String::from_utf8(out).expect("escaped UTF-8 stays UTF-8")
}
