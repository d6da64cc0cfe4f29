//! `GET /sse?channel=C`: Server-Sent Events. Each message is one event whose `id:` is its
//! sequence number, so a reconnecting `EventSource` sends `Last-Event-ID` and gets what
//! it missed. The event is built once per broadcast per shard and shared by every
//! event-stream subscriber there.

use bytes::{Bytes, BytesMut};

use super::ApiError;
use crate::proto::frame::server_frame_payload;
use crate::proto::handshake::Request;
use crate::proto::pubsub::validate_channel;

/// The response head that opens the stream (the body runs until the connection closes).
pub fn head() -> Bytes {
    Bytes::from(super::head(
        200,
        "text/event-stream",
        &[("X-Accel-Buffering", "no")],
        false,
        None,
    ))
}

/// The `channel` query parameter, decoded and validated.
pub fn channel_param(request: &Request) -> Result<String, ApiError> {
    let bad = |message: &str| ApiError::BadRequest(message.into());
    let raw = request
        .query_param("channel")
        .ok_or_else(|| bad("the channel query parameter is missing"))?;
    let channel = super::percent_decode(raw)
        .ok_or_else(|| bad("the channel parameter is not valid UTF-8"))?;
    validate_channel(&channel).map_err(bad)?;
    Ok(channel)
}

/// Where to resume: `Last-Event-ID`, else a `since` query parameter. Each one given must
/// be a sequence number, the one that is not used too (a malformed request is refused
/// whole).
pub fn since(request: &Request) -> Result<Option<u64>, ApiError> {
    let read = |value: Option<&str>, name: &str| {
        value
            .map(|v| {
                v.trim()
                    .parse::<u64>()
                    .map_err(|_| ApiError::BadRequest(format!("{name} must be a sequence number")))
            })
            .transpose()
    };
    let header = read(request.last_event_id.as_deref(), "Last-Event-ID")?;
    let query = read(request.query_param("since"), "since")?;
    Ok(header.or(query))
}

/// The event for one broadcast frame: `id: N`, then the message JSON as `data:` lines
/// (a line break inside the publisher's JSON starts a new `data:` line, which the
/// browser joins back with `\n`).
pub fn event(seq: u64, frame: &Bytes) -> Bytes {
    let payload = server_frame_payload(frame);
    let mut out = BytesMut::with_capacity(payload.len() + 40);
    out.extend_from_slice(format!("id: {seq}\nevent: message\ndata: ").as_bytes());
    for &b in payload.iter() {
        match b {
            b'\n' => out.extend_from_slice(b"\ndata: "),
            b'\r' => {}
            _ => out.extend_from_slice(&[b]),
        }
    }
    out.extend_from_slice(b"\n\n");
    out.freeze()
}

/// A named event with a JSON payload that has no line breaks (`subscribed`, `gap`).
pub fn control_event(name: &str, json: &str) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {json}\n\n"))
}

/// A comment line: keeps proxies from timing the stream out.
pub const HEARTBEAT: &[u8] = b": ping\n\n";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::pubsub::encode_message;

    #[test]
    fn last_event_id_wins_and_both_must_be_sequence_numbers() {
        use crate::proto::handshake::{HandshakeLimits, parse_request};
        let since = |target: &str, header: &str| {
            let head = format!("GET {target} HTTP/1.1\r\nHost: x\r\n{header}\r\n");
            let (request, _) = parse_request(head.as_bytes(), &HandshakeLimits::default())
                .unwrap()
                .unwrap();
            since(&request).map_err(|e| e.to_string())
        };
        assert_eq!(since("/sse?channel=c&since=3", ""), Ok(Some(3)));
        assert_eq!(
            since("/sse?channel=c&since=3", "Last-Event-ID: 9\r\n"),
            Ok(Some(9))
        );
        assert_eq!(since("/sse?channel=c", ""), Ok(None));
        for (target, header) in [
            ("/sse?channel=c&since=x", ""),
            ("/sse?channel=c", "Last-Event-ID: -1\r\n"),
            // The unused `since` is still read: 2^64 is no sequence number.
            (
                "/sse?channel=c&since=18446744073709551616",
                "Last-Event-ID: 9\r\n",
            ),
        ] {
            assert!(since(target, header).is_err(), "{target} {header}");
        }
    }

    #[test]
    fn event_carries_id_and_splits_lines() {
        let frame = encode_message("c", 7, b"{\"a\":\n1}");
        assert_eq!(
            &event(7, &frame)[..],
            b"id: 7\nevent: message\ndata: {\"type\":\"message\",\"channel\":\"c\",\"seq\":7,\"data\":{\"a\":\ndata: 1}}\n\n"
        );
    }
}
