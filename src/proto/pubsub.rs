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

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::de::{IgnoredAny, Visitor};
use serde::{Deserialize, Deserializer};

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
    /// With `expect_seq`, stored only if the channel's last seq is still that.
    Publish {
        channel: Box<str>,
        data: Bytes,
        expect_seq: Option<u64>,
        id: Option<u64>,
    },
    Ping {
        id: Option<u64>,
    },
    /// A page of the channel's members: up to `limit` after `cursor`.
    Presence {
        channel: Box<str>,
        cursor: Option<Box<str>>,
        limit: Option<u64>,
        id: Option<u64>,
    },
    /// The channel's numbers of connections and distinct users.
    PresenceStats {
        channel: Box<str>,
        id: Option<u64>,
    },
    /// Stored messages after `since`: the first `limit`, or the last newest first.
    History {
        channel: Box<str>,
        since: Option<u64>,
        limit: Option<u64>,
        newest_first: bool,
        id: Option<u64>,
    },
}

impl Command {
    /// The `id` the client gave, which every reply to the command carries.
    pub fn id(&self) -> Option<u64> {
        match self {
            Self::Subscribe { id, .. }
            | Self::Unsubscribe { id, .. }
            | Self::Publish { id, .. }
            | Self::Ping { id }
            | Self::Presence { id, .. }
            | Self::PresenceStats { id, .. }
            | Self::History { id, .. } => *id,
        }
    }
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
    id: Option<Unsigned>,
    since: Option<Unsigned>,
    expect_seq: Option<Unsigned>,
    #[serde(borrow)]
    epoch: Option<Cow<'a, str>>,
    #[serde(borrow)]
    cursor: Option<Cow<'a, str>>,
    limit: Option<Unsigned>,
    newest_first: Option<bool>,
    // Validated (simd-json walks it) but not built: its bytes are taken from the payload.
    #[allow(dead_code)]
    data: Option<IgnoredAny>,
}

/// `id` and `since`: a JSON integer written without a sign. simd-json reads `-0` as the
/// signed integer 0, which serde's `u64` would take as 0 while other JSON readers see a
/// negative number (serde_json) or no integer at all; so, like `-1` or `1.0`, it is refused.
struct Unsigned(u64);

impl<'de> Deserialize<'de> for Unsigned {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Digits;
        impl Visitor<'_> for Digits {
            type Value = Unsigned;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an integer from 0 to 2^64-1 without a sign")
            }
            // Only unsigned integers: the default `visit_i64` and `visit_f64` refuse.
            fn visit_u64<E>(self, v: u64) -> Result<Unsigned, E> {
                Ok(Unsigned(v))
            }
        }
        // `deserialize_any`: simd-json's `deserialize_u64` converts a signed 0 to 0.
        d.deserialize_any(Digits)
    }
}

/// Reusable state for parsing commands on one shard: the scratch copy and simd-json's
/// buffers, so parsing allocates nothing in the steady state beyond the channel name.
#[derive(Default)]
pub struct CommandParser {
    scratch: Vec<u8>,
    buffers: simd_json::Buffers,
}

impl CommandParser {
    /// Parses one text message. `payload` must be the message as received (valid UTF-8).
    pub fn parse(&mut self, payload: &Bytes) -> Result<Command, CommandError> {
        self.scratch.clear();
        self.scratch.extend_from_slice(payload);
        let wire: WireCommand<'_> =
            simd_json::serde::from_slice_with_buffers(&mut self.scratch, &mut self.buffers)
                .map_err(|e| {
                    CommandError::new("bad_request", format!("invalid JSON: {e}"), None)
                })?;
        let id = wire.id.map(|Unsigned(id)| id);
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
                since: wire.since.map(|Unsigned(since)| since),
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
                    expect_seq: wire.expect_seq.map(|Unsigned(seq)| seq),
                    id,
                })
            }
            "ping" => Ok(Command::Ping { id }),
            "presence" => Ok(Command::Presence {
                channel: channel(wire.channel)?,
                cursor: wire.cursor.map(Into::into),
                limit: wire.limit.map(|Unsigned(limit)| limit),
                id,
            }),
            "presence_stats" => Ok(Command::PresenceStats {
                channel: channel(wire.channel)?,
                id,
            }),
            "history" => Ok(Command::History {
                channel: channel(wire.channel)?,
                since: wire.since.map(|Unsigned(since)| since),
                limit: wire.limit.map(|Unsigned(limit)| limit),
                newest_first: wire.newest_first.unwrap_or(false),
                id,
            }),
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
pub fn member_span(json: &[u8], key: &[u8]) -> Option<std::ops::Range<usize>> {
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

/// The byte ranges of the elements of the JSON array `json` (valid JSON, as above).
pub fn array_element_spans(json: &[u8]) -> Vec<std::ops::Range<usize>> {
    let mut spans = Vec::new();
    let mut i = skip_ws(json, 0);
    if json.get(i) != Some(&b'[') {
        return spans;
    }
    i = skip_ws(json, i + 1);
    if json.get(i) == Some(&b']') {
        return spans;
    }
    while let Some(end) = skip_value(json, i) {
        spans.push(i..end);
        i = skip_ws(json, end);
        if json.get(i) != Some(&b',') {
            break;
        }
        i = skip_ws(json, i + 1);
    }
    spans
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

/// A text frame whose JSON payload is written straight into the frame's one buffer: room
/// for the longest header is left in front and the header is filled in at the end, once
/// the payload's length is known.
struct TextFrame {
    buf: BytesMut,
}

/// The longest server frame header: 2 bytes plus a 64-bit length.
const MAX_HEADER: usize = 10;

impl TextFrame {
    fn with_capacity(payload: usize) -> Self {
        let mut buf = BytesMut::with_capacity(MAX_HEADER + payload);
        buf.put_bytes(0, MAX_HEADER);
        Self { buf }
    }

    fn put(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Appends `s` as a JSON string literal (with quotes).
    fn put_str(&mut self, s: &str) {
        push_json_str(&mut self.buf, s);
    }

    fn put_u64(&mut self, n: u64) {
        use std::fmt::Write as _;
        write!(self, "{n}").expect("writing to memory cannot fail");
    }

    /// `,"id":N` when there is an id.
    fn put_id(&mut self, id: Option<u64>) {
        if let Some(id) = id {
            self.put(b",\"id\":");
            self.put_u64(id);
        }
    }

    fn finish(mut self) -> Bytes {
        let len = self.buf.len() - MAX_HEADER;
        let header = FrameHeader {
            fin: true,
            rsv: 0,
            opcode: OpCode::Text,
            mask: None,
            payload_len: len as u64,
        };
        let start = MAX_HEADER - header.encoded_len();
        header.encode(&mut &mut self.buf[start..MAX_HEADER]);
        self.buf.advance(start);
        self.buf.freeze()
    }
}

impl std::fmt::Write for TextFrame {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.put(s.as_bytes());
        Ok(())
    }
}

/// Appends `s` as a JSON string literal (with quotes): the one escaper behind every
/// JSON string the server writes (WebSocket replies, HTTP bodies, SSE events).
pub fn push_json_str(out: &mut impl BufMut, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.put_u8(b'"');
    for &b in s.as_bytes() {
        match b {
            b'"' => out.put_slice(b"\\\""),
            b'\\' => out.put_slice(b"\\\\"),
            b'\n' => out.put_slice(b"\\n"),
            b'\r' => out.put_slice(b"\\r"),
            b'\t' => out.put_slice(b"\\t"),
            0..=0x1f => {
                out.put_slice(b"\\u00");
                out.put_u8(HEX[(b >> 4) as usize]);
                out.put_u8(HEX[(b & 0xf) as usize]);
            }
            _ => out.put_u8(b),
        }
    }
    out.put_u8(b'"');
}

/// The broadcast frame `{"type":"message","channel":C,"seq":N,"data":D}`, built once per
/// publish and shared by every subscriber.
pub fn encode_message(channel: &str, seq: u64, data: &[u8]) -> Bytes {
    encode_published(channel, seq, None, data)
}

/// [`encode_message`] with `"publisher":U` before `data` when the channel's namespace
/// exposes who published.
pub fn encode_published(channel: &str, seq: u64, publisher: Option<&str>, data: &[u8]) -> Bytes {
    let extra = publisher.map_or(0, |p| p.len() + 16);
    let mut frame = TextFrame::with_capacity(64 + channel.len() + extra + data.len());
    frame.put(b"{\"type\":\"message\",\"channel\":");
    frame.put_str(channel);
    frame.put(b",\"seq\":");
    frame.put_u64(seq);
    if let Some(publisher) = publisher {
        frame.put(b",\"publisher\":");
        frame.put_str(publisher);
    }
    frame.put(b",\"data\":");
    frame.put(data);
    frame.put(b"}");
    frame.finish()
}

/// `{"type":"subscribed","channel":C,"seq":N,"epoch":E,"id":I}`
pub fn encode_subscribed(channel: &str, seq: u64, epoch: &str, id: Option<u64>) -> Bytes {
    let mut frame = TextFrame::with_capacity(96 + channel.len());
    frame.put(b"{\"type\":\"subscribed\",\"channel\":");
    frame.put_str(channel);
    frame.put(b",\"seq\":");
    frame.put_u64(seq);
    frame.put(b",\"epoch\":");
    frame.put_str(epoch);
    frame.put_id(id);
    frame.put(b"}");
    frame.finish()
}

/// `{"type":"unsubscribed","channel":C,"id":I}`
pub fn encode_unsubscribed(channel: &str, id: Option<u64>) -> Bytes {
    let mut frame = TextFrame::with_capacity(64 + channel.len());
    frame.put(b"{\"type\":\"unsubscribed\",\"channel\":");
    frame.put_str(channel);
    frame.put_id(id);
    frame.put(b"}");
    frame.finish()
}

/// `{"type":"ack","id":I,"seq":N}` (the id is left out when the publish had none).
pub fn encode_ack(id: Option<u64>, seq: u64) -> Bytes {
    let mut frame = TextFrame::with_capacity(64);
    frame.put(b"{\"type\":\"ack\"");
    frame.put_id(id);
    frame.put(b",\"seq\":");
    frame.put_u64(seq);
    frame.put(b"}");
    frame.finish()
}

/// `{"type":"pong","id":I}`
pub fn encode_pong(id: Option<u64>) -> Bytes {
    let mut frame = TextFrame::with_capacity(48);
    frame.put(b"{\"type\":\"pong\"");
    frame.put_id(id);
    frame.put(b"}");
    frame.finish()
}

/// `{"type":"error","code":"history_gap","channel":C,"seq":S,"oldest":O,"message":M,"id":I}`:
/// history holds `oldest..=seq` only; the client resubscribes from `oldest - 1` or live.
pub fn encode_history_gap(
    channel: &str,
    seq: u64,
    oldest: u64,
    message: &str,
    id: Option<u64>,
) -> Bytes {
    let mut frame = TextFrame::with_capacity(128 + channel.len() + message.len());
    frame.put(b"{\"type\":\"error\",\"code\":\"history_gap\",\"channel\":");
    frame.put_str(channel);
    frame.put(b",\"seq\":");
    frame.put_u64(seq);
    frame.put(b",\"oldest\":");
    frame.put_u64(oldest);
    frame.put(b",\"message\":");
    frame.put_str(message);
    frame.put_id(id);
    frame.put(b"}");
    frame.finish()
}

/// `{"type":"error","code":"conflict","channel":C,"seq":S,"message":M,"id":I}`: a publish
/// with `expect_seq` found the channel at `seq`; nothing was stored.
pub fn encode_conflict(channel: &str, seq: u64, id: Option<u64>) -> Bytes {
    let message = format!("{channel:?} is at seq {seq}, not the expected one; not stored");
    let mut frame = TextFrame::with_capacity(128 + 2 * channel.len());
    frame.put(b"{\"type\":\"error\",\"code\":\"conflict\",\"channel\":");
    frame.put_str(channel);
    frame.put(b",\"seq\":");
    frame.put_u64(seq);
    frame.put(b",\"message\":");
    frame.put_str(&message);
    frame.put_id(id);
    frame.put(b"}");
    frame.finish()
}

/// `{"type":"gap","channel":C,"from":A,"to":B}`: messages A..=B of the channel were shed
/// from this slow connection; recover them with `since: A - 1`.
pub fn encode_gap(channel: &str, from: u64, to: u64) -> Bytes {
    let mut frame = TextFrame::with_capacity(64 + channel.len());
    frame.put(b"{\"type\":\"gap\",\"channel\":");
    frame.put_str(channel);
    frame.put(b",\"from\":");
    frame.put_u64(from);
    frame.put(b",\"to\":");
    frame.put_u64(to);
    frame.put(b"}");
    frame.finish()
}

/// `{"type":"join"|"leave","channel":C,"user":U,"conn":ID,"info":I}`: `user` is `null`
/// for an anonymous connection, and `info` is left out when the token had none.
pub fn encode_presence_event(
    kind: &str,
    channel: &str,
    conn: &str,
    user: Option<&str>,
    info: Option<&str>,
) -> Bytes {
    let mut frame = TextFrame::with_capacity(
        80 + channel.len() + user.map_or(0, str::len) + info.map_or(0, str::len),
    );
    frame.put(b"{\"type\":");
    frame.put_str(kind);
    frame.put(b",\"channel\":");
    frame.put_str(channel);
    frame.put(b",\"user\":");
    match user {
        Some(user) => frame.put_str(user),
        None => frame.put(b"null"),
    }
    frame.put(b",\"conn\":");
    frame.put_str(conn);
    if let Some(info) = info {
        frame.put(b",\"info\":");
        frame.put(info.as_bytes());
    }
    frame.put(b"}");
    frame.finish()
}

/// A reply object built elsewhere (`{..}`, a home's answer to a query) as a frame, with
/// `,"id":I` before its closing brace.
pub fn encode_with_id(object: &[u8], id: Option<u64>) -> Bytes {
    let body = object.strip_suffix(b"}").unwrap_or(object);
    let mut frame = TextFrame::with_capacity(body.len() + 32);
    frame.put(body);
    frame.put_id(id);
    frame.put(b"}");
    frame.finish()
}

/// `{"type":"error","code":C,"message":M,"id":I}`
pub fn encode_error(code: &str, message: &str, id: Option<u64>) -> Bytes {
    let mut frame = TextFrame::with_capacity(64 + code.len() + message.len());
    frame.put(b"{\"type\":\"error\",\"code\":");
    frame.put_str(code);
    frame.put(b",\"message\":");
    frame.put_str(message);
    frame.put_id(id);
    frame.put(b"}");
    frame.finish()
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
            Command::Publish {
                data,
                id,
                channel,
                expect_seq,
            } => {
                assert_eq!(&data[..], br#"{"b": [1, 2.50, "\u00e9\n"] , "a":null}"#);
                assert_eq!(id, Some(3));
                assert_eq!(&*channel, "c");
                assert_eq!(expect_seq, None);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn publish_may_expect_a_seq_and_the_conflict_names_the_current_one() {
        let raw = r#"{"type":"publish","channel":"c","data":1,"expect_seq":41,"id":2}"#;
        match parse(raw).unwrap() {
            Command::Publish { expect_seq, .. } => assert_eq!(expect_seq, Some(41)),
            other => panic!("{other:?}"),
        }
        let err = parse(r#"{"type":"publish","channel":"c","data":1,"expect_seq":-1}"#);
        assert_eq!(err.unwrap_err().code, "bad_request");
        let frame = encode_conflict("c", 42, Some(2));
        let json: serde_json::Value = serde_json::from_str(payload(&frame)).unwrap();
        assert_eq!(json["type"], "error");
        assert_eq!(json["code"], "conflict");
        assert_eq!(json["seq"], 42);
        assert_eq!(json["id"], 2);
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

    /// Integers of any length pass (simd-json's `big-int-as-float`); like serde_json,
    /// simd-json refuses a number whose magnitude overflows an f64 (`1e400`).
    #[test]
    fn numbers_of_any_size_pass_through() {
        let data = "[123456789012345678901234567890,-98765432109876543210,1.000000000000000000001,-0.0e-999]";
        let raw = format!(r#"{{"type":"publish","channel":"c","data":{data}}}"#);
        match parse(&raw).unwrap() {
            Command::Publish { data: got, .. } => assert_eq!(&got[..], data.as_bytes()),
            other => panic!("{other:?}"),
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

    /// `-0` is not read as id 0 (the fuzzer's oracle, serde_json, reads no integer there):
    /// it is refused as `-1` and `1.0` are (seeds/pubsub/ping-id-minus-zero).
    #[test]
    fn refuses_ids_and_since_that_are_not_unsigned_integers() {
        for value in ["-0", "-1", "1.0", "1e2", "-0.0", "18446744073709551616"] {
            for raw in [
                format!(r#"{{"type":"ping","id":{value}}}"#),
                format!(r#"{{"type":"subscribe","channel":"c","since":{value}}}"#),
            ] {
                let err = parse(&raw).unwrap_err();
                assert_eq!((err.code, err.id), ("bad_request", None), "{raw}");
            }
        }
        assert_eq!(
            parse(r#"{"type":"ping","id":0}"#),
            Ok(Command::Ping { id: Some(0) })
        );
        assert_eq!(
            parse(r#"{"type":"ping","id":18446744073709551615,"since":null}"#),
            Ok(Command::Ping { id: Some(u64::MAX) })
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
    fn parses_presence_queries() {
        assert_eq!(
            parse(r#"{"type":"presence","channel":"c","cursor":"0.1.2","limit":5,"id":4}"#),
            Ok(Command::Presence {
                channel: "c".into(),
                cursor: Some("0.1.2".into()),
                limit: Some(5),
                id: Some(4)
            })
        );
        assert_eq!(
            parse(r#"{"type":"presence_stats","channel":"c","id":5}"#),
            Ok(Command::PresenceStats {
                channel: "c".into(),
                id: Some(5)
            })
        );
        assert_eq!(
            parse(r#"{"type":"presence"}"#).unwrap_err().code,
            "bad_request"
        );
        assert_eq!(
            parse(r#"{"type":"history","channel":"c","limit":3,"newest_first":true}"#),
            Ok(Command::History {
                channel: "c".into(),
                since: None,
                limit: Some(3),
                newest_first: true,
                id: None
            })
        );
    }

    #[test]
    fn join_leave_and_answers_are_json() {
        let join = encode_presence_event("join", "c", "0.1.2", Some("ann"), Some(r#"{"a":1}"#));
        assert_eq!(
            payload(&join),
            r#"{"type":"join","channel":"c","user":"ann","conn":"0.1.2","info":{"a":1}}"#
        );
        let leave = encode_presence_event("leave", "c", "0.1.2", None, None);
        assert_eq!(
            payload(&leave),
            r#"{"type":"leave","channel":"c","user":null,"conn":"0.1.2"}"#
        );
        let answer = encode_with_id(br#"{"type":"presence_stats","users":1}"#, Some(9));
        assert_eq!(
            payload(&answer),
            r#"{"type":"presence_stats","users":1,"id":9}"#
        );
    }

    #[test]
    fn message_frame_embeds_data_verbatim() {
        let frame = encode_message("news", 58, br#"{"x": 1}"#);
        assert_eq!(frame[0], 0x81);
        assert_eq!(
            payload(&frame),
            r#"{"type":"message","channel":"news","seq":58,"data":{"x": 1}}"#
        );
        let from = encode_published("news", 59, Some("ann"), b"1");
        assert_eq!(
            payload(&from),
            r#"{"type":"message","channel":"news","seq":59,"publisher":"ann","data":1}"#
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
