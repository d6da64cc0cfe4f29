//! `GET /sse`: an open event stream on one channel (`text/event-stream`).

use bytes::Bytes;

use crate::http::{self, ApiError, sse};
use crate::proto::handshake::Request;

use super::Shard;
use super::conn::Phase;

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
        self.set_phase(key, Phase::EventStream);
        self.conns[key].outbox.push(sse::head());
        self.mark_dirty(key);
        self.arm_heartbeat(key);
        self.request_subscription(key, channel.into(), since, None, None);
    }
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
