//! The `/ws` JSON protocol: client commands in, server replies and message frames out.
//!
//! Commands are validated and read with `simd-json` (serde) from a reusable scratch copy,
//! because simd-json rewrites its input. The publisher's `data` is never re-serialised: a
//! small scanner finds its byte span in the original payload (already validated), and the
//! `data` handed on is a zero-copy slice of the received frame, so subscribers get the
//! publisher's JSON byte for byte.
//!
//! Every encoder here returns a complete, unmasked WebSocket text frame.

use std::borrow::Cow;

use bytes::{BufMut, Bytes, BytesMut};
use serde::Deserialize;
use serde::de::IgnoredAny;

use super::frame::{FrameHeader, OpCode};

/// What a client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Subscribe {
        channel: Box<str>,
        since: Option<u64>,
        epoch: Option<Box<str>>,
        id: Option<u64>,
    },
    Unsubscribe {
        channel: Box<str>,
        id: Option<u64>,
    },
    /// `data` is a slice of the received frame: the publisher's JSON, byte for byte.
    Publish {
        channel: Box<str>,
        data: Bytes,
        id: Option<u64>,
    },
    Ping {
        id: Option<u64>,
    },
}

/// Why a command was refused; becomes an `error` reply and the connection stays open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandError {
    /// Machine-readable code (`bad_request`, `unknown_type`, `bad_channel`).
    pub code: &'static str,
    pub message: Cow<'static, str>,
    /// The command's `id` when it could be read, so the client can match the error.
    pub id: Option<u64>,
}

impl CommandError {
    fn new(code: &'static str, message: impl Into<Cow<'static, str>>, id: Option<u64>) -> Self {
        Self {
            code,
            message: message.into(),
            id,
        }
    }
}

/// Channel names: 1..=`MAX_CHANNEL_BYTES` bytes, no control characters, no whitespace.
pub const MAX_CHANNEL_BYTES: usize = 200;

#[derive(Deserialize)]
struct WireCommand<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    channel: Option<Cow<'a, str>>,
    id: Option<u64>,
    since: Option<u64>,
    #[serde(borrow)]
    epoch: Option<Cow<'a, str>>,
    // Validated (simd-json walks it) but not built: its bytes are taken from the payload.
    #[allow(dead_code)]
    data: Option<IgnoredAny>,
}

/// Reusable state for parsing commands on one shard: the scratch copy and simd-json's
/// buffers, so parsing allocates nothing in the steady state beyond the channel name.
#[derive(Default)]
pub struct CommandParser {
    scratch: Vec<u8>,
}

impl CommandParser {
    /// Parses one text message. `payload` must be the message as received (valid UTF-8).
    pub fn parse(&mut self, payload: &Bytes) -> Result<Command, CommandError> {
        self.scratch.clear();
        self.scratch.extend_from_slice(payload);
        let wire: WireCommand<'_> = simd_json::serde::from_slice(&mut self.scratch)
            .map_err(|e| CommandError::new("bad_request", format!("invalid JSON: {e}"), None))?;
        let id = wire.id;
        let Some(kind) = wire.kind else {
            return Err(CommandError::new("bad_request", "missing \"type\"", id));
        };
        let channel = |c: Option<Cow<'_, str>>| -> Result<Box<str>, CommandError> {
            let c = c.ok_or_else(|| CommandError::new("bad_request", "missing \"channel\"", id))?;
            validate_channel(&c).map_err(|m| CommandError::new("bad_channel", m, id))?;
            Ok(c.into())
        };
        match kind.as_ref() {
            "subscribe" => Ok(Command::Subscribe {
                channel: channel(wire.channel)?,
                since: wire.since,
                epoch: wire.epoch.map(Into::into),
                id,
            }),
            "unsubscribe" => Ok(Command::Unsubscribe {
                channel: channel(wire.channel)?,
                id,
            }),
            "publish" => {
                let channel = channel(wire.channel)?;
                let span = member_span(payload, b"data")
                    .ok_or_else(|| CommandError::new("bad_request", "missing \"data\"", id))?;
                Ok(Command::Publish {
                    channel,
                    data: payload.slice(span),
                    id,
                })
            }
            "ping" => Ok(Command::Ping { id }),
            other => Err(CommandError::new(
                "unknown_type",
                format!("unknown message type {:?}", truncate(other, 40)),
                id,
            )),
        }
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Checks a channel name; the error is a message for a person.
pub fn validate_channel(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("channel name is empty");
    }
    if name.len() > MAX_CHANNEL_BYTES {
        return Err("channel name is longer than 200 bytes");
    }
    if name.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err("channel name contains whitespace or control characters");
    }
    Ok(())
}

/// The byte range of the value of top-level member `key` in a JSON object.
///
/// `json` must already be valid JSON (this scanner trusts that and only skips). Keys are
/// compared as raw bytes, so an escaped spelling of `key` does not match.
fn member_span(json: &[u8], key: &[u8]) -> Option<std::ops::Range<usize>> {
    let mut i = skip_ws(json, 0);
    if json.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    loop {
        i = skip_ws(json, i);
        if json.get(i) != Some(&b'"') {
            return None;
        }
        let key_end = skip_string(json, i)?;
        let this_key = &json[i + 1..key_end - 1];
        i = skip_ws(json, key_end);
        if json.get(i) != Some(&b':') {
            return None;
        }
        let value_start = skip_ws(json, i + 1);
        let value_end = skip_value(json, value_start)?;
        if this_key == key {
            return Some(value_start..value_end);
        }
        i = skip_ws(json, value_end);
        match json.get(i) {
            Some(b',') => i += 1,
            _ => return None,
        }
    }
}

fn skip_ws(json: &[u8], mut i: usize) -> usize {
    while matches!(json.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

/// `json[start]` is `"`; returns the index just past the closing quote.
fn skip_string(json: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 1;
    loop {
        match *json.get(i)? {
            b'"' => return Some(i + 1),
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
}

/// Returns the index just past the value starting at `start`.
fn skip_value(json: &[u8], start: usize) -> Option<usize> {
    match *json.get(start)? {
        b'"' => skip_string(json, start),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut i = start;
            loop {
                match *json.get(i)? {
                    b'"' => {
                        i = skip_string(json, i)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
        }
        _ => {
            let mut i = start;
            while let Some(&b) = json.get(i) {
                if matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r') {
                    break;
                }
                i += 1;
            }
            Some(i)
        }
    }
}

/// Builds a text frame whose payload is the concatenation of `parts`, in one allocation of
/// exactly the frame's size.
fn text_frame(parts: &[&[u8]]) -> Bytes {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let header = FrameHeader {
        fin: true,
        rsv: 0,
        opcode: OpCode::Text,
        mask: None,
        payload_len: len as u64,
    };
    let mut frame = BytesMut::with_capacity(len + 10);
    header.encode(&mut frame);
    for part in parts {
        frame.put_slice(part);
    }
    frame.freeze()
}

/// Appends `s` as a JSON string literal (with quotes).
fn push_json_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    for &b in s.as_bytes() {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0..=0x1f => {
                out.extend_from_slice(b"\\u00");
                out.push(HEX[(b >> 4) as usize]);
                out.push(HEX[(b & 0xf) as usize]);
            }
            _ => out.push(b),
        }
    }
    out.push(b'"');
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn push_id(out: &mut Vec<u8>, id: Option<u64>) {
    if let Some(id) = id {
        out.extend_from_slice(b",\"id\":");
        push_u64(out, id);
    }
}

fn push_u64(out: &mut Vec<u8>, n: u64) {
    use std::io::Write as _;
    write!(out, "{n}").expect("writing to a Vec cannot fail");
}

/// The broadcast frame `{"type":"message","channel":C,"seq":N,"data":D}`, built once per
/// publish and shared by every subscriber.
pub fn encode_message(channel: &str, seq: u64, data: &[u8]) -> Bytes {
    let mut head = Vec::with_capacity(64 + channel.len());
    head.extend_from_slice(b"{\"type\":\"message\",\"channel\":");
    push_json_str(&mut head, channel);
    head.extend_from_slice(b",\"seq\":");
    push_u64(&mut head, seq);
    head.extend_from_slice(b",\"data\":");
    text_frame(&[&head, data, b"}"])
}

/// `{"type":"subscribed","channel":C,"seq":N,"epoch":E,"id":I}`
pub fn encode_subscribed(channel: &str, seq: u64, epoch: &str, id: Option<u64>) -> Bytes {
    let mut json = Vec::with_capacity(96 + channel.len());
    json.extend_from_slice(b"{\"type\":\"subscribed\",\"channel\":");
    push_json_str(&mut json, channel);
    json.extend_from_slice(b",\"seq\":");
    push_u64(&mut json, seq);
    json.extend_from_slice(b",\"epoch\":");
    push_json_str(&mut json, epoch);
    push_id(&mut json, id);
    json.push(b'}');
    text_frame(&[&json])
}

/// `{"type":"unsubscribed","channel":C,"id":I}`
pub fn encode_unsubscribed(channel: &str, id: Option<u64>) -> Bytes {
    let mut json = Vec::with_capacity(64 + channel.len());
    json.extend_from_slice(b"{\"type\":\"unsubscribed\",\"channel\":");
    push_json_str(&mut json, channel);
    push_id(&mut json, id);
    json.push(b'}');
    text_frame(&[&json])
}

/// `{"type":"ack","id":I,"seq":N}` (the id is left out when the publish had none).
pub fn encode_ack(id: Option<u64>, seq: u64) -> Bytes {
    let mut json = Vec::with_capacity(48);
    json.extend_from_slice(b"{\"type\":\"ack\"");
    push_id(&mut json, id);
    json.extend_from_slice(b",\"seq\":");
    push_u64(&mut json, seq);
    json.push(b'}');
    text_frame(&[&json])
}

/// `{"type":"pong","id":I}`
pub fn encode_pong(id: Option<u64>) -> Bytes {
    let mut json = Vec::with_capacity(32);
    json.extend_from_slice(b"{\"type\":\"pong\"");
    push_id(&mut json, id);
    json.push(b'}');
    text_frame(&[&json])
}

/// `{"type":"error","code":C,"message":M,"id":I}`
pub fn encode_error(code: &str, message: &str, id: Option<u64>) -> Bytes {
    let mut json = Vec::with_capacity(48 + message.len());
    json.extend_from_slice(b"{\"type\":\"error\",\"code\":");
    push_json_str(&mut json, code);
    json.extend_from_slice(b",\"message\":");
    push_json_str(&mut json, message);
    push_id(&mut json, id);
    json.push(b'}');
    text_frame(&[&json])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Command, CommandError> {
        CommandParser::default().parse(&Bytes::copy_from_slice(s.as_bytes()))
    }

    /// The JSON payload of a server frame built here (short frames: 2-byte header; longer
    /// ones: 4-byte header).
    fn payload(frame: &Bytes) -> &str {
        let start = if frame[1] == 126 { 4 } else { 2 };
        std::str::from_utf8(&frame[start..]).unwrap()
    }

    #[test]
    fn parses_subscribe_with_all_fields() {
        let cmd =
            parse(r#"{"type":"subscribe","channel":"news","since":41,"epoch":"k3x9","id":1}"#);
        assert_eq!(
            cmd.unwrap(),
            Command::Subscribe {
                channel: "news".into(),
                since: Some(41),
                epoch: Some("k3x9".into()),
                id: Some(1)
            }
        );
    }

    #[test]
    fn publish_data_is_the_publishers_bytes() {
        let raw = r#"{ "type" : "publish", "data" : {"b": [1, 2.50, "\u00e9\n"] , "a":null} , "channel":"c","id":3}"#;
        match parse(raw).unwrap() {
            Command::Publish { data, id, channel } => {
                assert_eq!(&data[..], br#"{"b": [1, 2.50, "\u00e9\n"] , "a":null}"#);
                assert_eq!(id, Some(3));
                assert_eq!(&*channel, "c");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn publish_data_may_be_any_json_value() {
        for (data, expect) in [
            ("null", "null"),
            ("12.5e3", "12.5e3"),
            (r#""x\"}""#, r#""x\"}""#),
            ("[[],{}]", "[[],{}]"),
            ("true", "true"),
        ] {
            let raw = format!(r#"{{"type":"publish","channel":"c","data":{data}}}"#);
            match parse(&raw).unwrap() {
                Command::Publish { data, .. } => assert_eq!(&data[..], expect.as_bytes()),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn rejects_malformed_json() {
        let err = parse(r#"{"type":"publish","#).unwrap_err();
        assert_eq!(err.code, "bad_request");
        assert!(err.message.starts_with("invalid JSON"));
    }

    #[test]
    fn rejects_unknown_type_keeping_the_id() {
        let err = parse(r#"{"type":"dance","id":7}"#).unwrap_err();
        assert_eq!(err.code, "unknown_type");
        assert_eq!(err.id, Some(7));
    }

    #[test]
    fn rejects_missing_fields() {
        assert_eq!(parse(r#"{"channel":"a"}"#).unwrap_err().code, "bad_request");
        assert_eq!(
            parse(r#"{"type":"subscribe"}"#).unwrap_err().code,
            "bad_request"
        );
        assert_eq!(
            parse(r#"{"type":"publish","channel":"a"}"#)
                .unwrap_err()
                .code,
            "bad_request"
        );
        assert_eq!(parse(r#"[1,2]"#).unwrap_err().code, "bad_request");
        assert_eq!(
            parse(r#"{"type":"ping","id":"x"}"#).unwrap_err().code,
            "bad_request"
        );
    }

    #[test]
    fn rejects_bad_channel_names() {
        for name in ["", "a b", "tab\\t", &"x".repeat(201)] {
            let raw = format!(r#"{{"type":"subscribe","channel":"{name}"}}"#);
            assert_eq!(parse(&raw).unwrap_err().code, "bad_channel", "{name:?}");
        }
    }

    #[test]
    fn message_frame_embeds_data_verbatim() {
        let frame = encode_message("news", 58, br#"{"x": 1}"#);
        assert_eq!(frame[0], 0x81);
        assert_eq!(
            payload(&frame),
            r#"{"type":"message","channel":"news","seq":58,"data":{"x": 1}}"#
        );
        let big = encode_message("c", 1, &[b'1'; 300]);
        assert_eq!(big[1], 126);
        assert_eq!(u16::from_be_bytes([big[2], big[3]]) as usize, big.len() - 4);
    }

    #[test]
    fn replies_are_valid_json() {
        let frames = [
            encode_subscribed("a\"b", 0, "e1", Some(1)),
            encode_unsubscribed("a", None),
            encode_ack(Some(3), 58),
            encode_ack(None, 1),
            encode_pong(None),
            encode_error("bad_request", "line\nbreak \u{1}", Some(2)),
        ];
        for frame in &frames {
            let mut json = payload(frame).as_bytes().to_vec();
            let value: simd_json::OwnedValue = simd_json::to_owned_value(&mut json).unwrap();
            assert!(simd_json::prelude::ValueAsScalar::as_str(&value["type"]).is_some());
        }
        assert_eq!(payload(&frames[2]), r#"{"type":"ack","id":3,"seq":58}"#);
    }
}
