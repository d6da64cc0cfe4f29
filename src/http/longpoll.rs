//! `GET /poll?channel=C&since=N&timeout=S`: the long-poll responses.
//!
//! A poll answers at once when history holds messages after `since`; otherwise the shard
//! parks it as a subscriber and it answers with the first message to arrive, or with an
//! empty list when `timeout` runs out. Each message is the same JSON object WebSocket
//! subscribers receive, taken from the shared broadcast frame without re-encoding.

use std::time::Duration;

use bytes::Bytes;

use super::{ApiError, push_json_str};
use crate::proto::frame::server_frame_payload;
use crate::proto::handshake::Request;

/// Longest a poll may wait, whatever it asks for.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(120);
/// What a poll without `timeout` waits.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// A parsed poll request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Poll {
    pub channel: String,
    pub since: Option<u64>,
    pub epoch: Option<String>,
    pub timeout: Duration,
}

/// Reads the query.
pub fn parse(request: &Request) -> Result<Poll, ApiError> {
    let channel = super::sse::channel_param(request)?;
    let number = |name: &str| -> Result<Option<u64>, ApiError> {
        request
            .query_param(name)
            .map(|v| {
                v.parse::<u64>().map_err(|_| {
                    ApiError::BadRequest(format!("{name} must be a non-negative integer"))
                })
            })
            .transpose()
    };
    let timeout = number("timeout")?
        .map_or(DEFAULT_TIMEOUT, Duration::from_secs)
        .min(MAX_TIMEOUT);
    Ok(Poll {
        channel,
        since: number("since")?,
        epoch: request.query_param("epoch").and_then(super::percent_decode),
        timeout,
    })
}

/// `{"channel":C,"epoch":E,"seq":S,"messages":[..]}` from (seq, frame) pairs; `seq` is the
/// latest sequence number the client has seen once it has these messages (its next `since`).
pub fn response(
    channel: &str,
    epoch: &str,
    seq: u64,
    messages: &[(u64, Bytes)],
    keep_alive: bool,
) -> Bytes {
    let mut body = Vec::with_capacity(64 + messages.iter().map(|(_, f)| f.len()).sum::<usize>());
    body.extend_from_slice(b"{\"channel\":");
    push_json_str(&mut body, channel);
    body.extend_from_slice(b",\"epoch\":");
    push_json_str(&mut body, epoch);
    body.extend_from_slice(format!(",\"seq\":{seq},\"messages\":[").as_bytes());
    for (i, (_, frame)) in messages.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(&server_frame_payload(frame));
    }
    body.extend_from_slice(b"]}");
    super::response(200, "application/json", &[], &body, keep_alive)
}

/// History no longer reaches back to `since`: 200 with an explicit `history_gap`, so a
/// client can never mistake it for "nothing new".
pub fn gap_response(channel: &str, epoch: &str, seq: u64, oldest: u64, keep_alive: bool) -> Bytes {
    let mut body = Vec::with_capacity(160);
    body.extend_from_slice(b"{\"channel\":");
    push_json_str(&mut body, channel);
    body.extend_from_slice(b",\"epoch\":");
    push_json_str(&mut body, epoch);
    body.extend_from_slice(
        format!(r#","seq":{seq},"messages":[],"history_gap":{{"oldest":{oldest}}}}}"#).as_bytes(),
    );
    super::response(200, "application/json", &[], &body, keep_alive)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::handshake::{HandshakeLimits, parse_request};
    use crate::proto::pubsub::encode_message;

    fn request(target: &str) -> Request {
        let head = format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n");
        parse_request(head.as_bytes(), &HandshakeLimits::default())
            .unwrap()
            .unwrap()
            .0
    }

    #[test]
    fn parses_and_caps_the_query() {
        let poll = parse(&request("/poll?channel=a%2Eb&since=4&timeout=999")).unwrap();
        assert_eq!(poll.channel, "a.b");
        assert_eq!(poll.since, Some(4));
        assert_eq!(poll.timeout, MAX_TIMEOUT);
        assert!(parse(&request("/poll?since=1")).is_err());
        assert!(parse(&request("/poll?channel=a&since=-1")).is_err());
    }

    #[test]
    fn response_lists_the_broadcast_json() {
        let messages = [
            (5, encode_message("c", 5, b"{\"x\":1}")),
            (6, encode_message("c", 6, b"2")),
        ];
        let r = response("c", "e", 6, &messages, true);
        let text = std::str::from_utf8(&r).unwrap();
        let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
        assert_eq!(
            body,
            r#"{"channel":"c","epoch":"e","seq":6,"messages":[{"type":"message","channel":"c","seq":5,"data":{"x":1}},{"type":"message","channel":"c","seq":6,"data":2}]}"#
        );
        assert!(text.contains("Connection: keep-alive\r\n"));
    }
}
