//! `POST /api/publish`: the request body, validated whole before anything is published.
//!
//! `{"channel":"news","data":{..}}` or `{"messages":[{"channel":..,"data":..},..]}`. As on
//! `/ws`, each `data` is handed on as the publisher's bytes (a slice of the body). A single
//! message may carry `"expect_seq":N` (stored only if the channel's last seq is still N,
//! else 409 `conflict`); a batch may not, since part of it would be stored.

use bytes::Bytes;
use serde::de::IgnoredAny;
use serde::{Deserialize, Deserializer};

use super::ApiError;
use crate::proto::pubsub::{array_element_spans, member_span, validate_channel};

/// One message to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub channel: Box<str>,
    pub data: Bytes,
    pub expect_seq: Option<u64>,
}

/// A parsed request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Body {
    pub messages: Vec<Message>,
    /// Sent as `{"messages":[..]}`: the receipt is a list too.
    pub batch: bool,
}

/// Most messages in one batch.
pub const MAX_BATCH: usize = 1000;

#[derive(Deserialize)]
struct WireMessage<'a> {
    #[serde(borrow)]
    channel: Option<std::borrow::Cow<'a, str>>,
    #[allow(dead_code)]
    data: Option<IgnoredAny>,
    /// Refused when present, even as `null`: see the module doc.
    #[serde(default, deserialize_with = "present")]
    expect_seq: bool,
}

#[derive(Deserialize)]
struct WireBody<'a> {
    #[serde(borrow)]
    channel: Option<std::borrow::Cow<'a, str>>,
    #[allow(dead_code)]
    data: Option<IgnoredAny>,
    /// A number when written: `null` is refused rather than read as "no condition".
    #[serde(default, deserialize_with = "super::given")]
    expect_seq: Option<u64>,
    #[serde(borrow)]
    messages: Option<Vec<WireMessage<'a>>>,
}

/// Whether the member is written at all, whatever it holds.
fn present<'de, D: Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    IgnoredAny::deserialize(deserializer).map(|_| true)
}

/// Parses and validates a publish body; every error is a 400.
pub fn parse(body: &Bytes) -> Result<Body, ApiError> {
    let bad = |message: &str| ApiError::BadRequest(message.into());
    let mut scratch = body.to_vec();
    let wire: WireBody<'_> = simd_json::serde::from_slice(&mut scratch)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON: {e}")))?;
    let check = |channel: Option<std::borrow::Cow<'_, str>>| -> Result<Box<str>, ApiError> {
        let channel = channel.ok_or_else(|| bad("missing \"channel\""))?;
        validate_channel(&channel).map_err(|m| ApiError::BadChannel(m.into()))?;
        Ok(channel.into())
    };
    let data_of = |object: std::ops::Range<usize>| -> Result<Bytes, ApiError> {
        let span =
            member_span(&body[object.clone()], b"data").ok_or_else(|| bad("missing \"data\""))?;
        Ok(body.slice(object.start + span.start..object.start + span.end))
    };
    match wire.messages {
        None => Ok(Body {
            messages: vec![Message {
                channel: check(wire.channel)?,
                data: data_of(0..body.len())?,
                expect_seq: wire.expect_seq,
            }],
            batch: false,
        }),
        Some(list) if wire.expect_seq.is_some() || list.iter().any(|m| m.expect_seq) => Err(bad(
            "\"expect_seq\" is for a single message, not a batch (part of it would be stored)",
        )),
        Some(list) => {
            if list.is_empty() || list.len() > MAX_BATCH {
                return Err(ApiError::BadRequest(format!(
                    "\"messages\" must hold 1 to {MAX_BATCH} messages"
                )));
            }
            let array = member_span(body, b"messages")
                .ok_or_else(|| bad("\"messages\" must be written plainly as a key"))?;
            let elements = array_element_spans(&body[array.clone()]);
            let mut messages = Vec::with_capacity(list.len());
            for (wire, element) in list.into_iter().zip(elements) {
                let element = array.start + element.start..array.start + element.end;
                messages.push(Message {
                    channel: check(wire.channel)?,
                    data: data_of(element)?,
                    expect_seq: None,
                });
            }
            Ok(Body {
                messages,
                batch: true,
            })
        }
    }
}

/// The receipt: `{"seq":N,"subscribers":M}`, or `{"results":[..]}` for a batch.
pub fn receipt(results: &[(u64, u32)], batch: bool) -> Vec<u8> {
    let one =
        |(seq, subscribers): &(u64, u32)| format!(r#"{{"seq":{seq},"subscribers":{subscribers}}}"#);
    if batch {
        let items: Vec<String> = results.iter().map(one).collect();
        format!(r#"{{"results":[{}]}}"#, items.join(",")).into_bytes()
    } else {
        one(&results[0]).into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(s: &str) -> Result<Body, ApiError> {
        parse(&Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn single_message_keeps_data_bytes() {
        let body = parse_str(r#"{"data": {"a" : [1, 2]}, "channel":"news"}"#).unwrap();
        assert!(!body.batch);
        assert_eq!(&*body.messages[0].channel, "news");
        assert_eq!(&body.messages[0].data[..], br#"{"a" : [1, 2]}"#);
    }

    #[test]
    fn batch_keeps_each_data() {
        let body = parse_str(
            r#"{"messages":[{"channel":"a","data":1},{"data":"x,]}","channel":"b"}, {"channel":"c","data":[{}]}]}"#,
        )
        .unwrap();
        assert!(body.batch);
        let got: Vec<(&str, &[u8])> = body
            .messages
            .iter()
            .map(|m| (&*m.channel, &m.data[..]))
            .collect();
        assert_eq!(
            got,
            [
                ("a", &b"1"[..]),
                ("b", &br#""x,]}""#[..]),
                ("c", &b"[{}]"[..])
            ]
        );
    }

    #[test]
    fn rejects_bad_bodies() {
        assert_eq!(parse_str("{").unwrap_err().code(), "bad_request");
        assert_eq!(
            parse_str(r#"{"channel":"a"}"#).unwrap_err().code(),
            "bad_request"
        );
        assert_eq!(
            parse_str(r#"{"data":1}"#).unwrap_err().code(),
            "bad_request"
        );
        assert_eq!(
            parse_str(r#"{"channel":"a b","data":1}"#)
                .unwrap_err()
                .code(),
            "bad_channel"
        );
        assert_eq!(
            parse_str(r#"{"messages":[]}"#).unwrap_err().code(),
            "bad_request"
        );
        assert_eq!(
            parse_str(r#"{"messages":[{"channel":"a","data":1},{"channel":"b"}]}"#)
                .unwrap_err()
                .code(),
            "bad_request"
        );
    }

    #[test]
    fn a_single_message_may_expect_a_seq_and_a_batch_may_not() {
        let body = parse_str(r#"{"channel":"c","data":1,"expect_seq":4}"#).unwrap();
        assert_eq!(body.messages[0].expect_seq, Some(4));
        for batch in [
            r#"{"messages":[{"channel":"c","data":1,"expect_seq":4}]}"#,
            r#"{"expect_seq":4,"messages":[{"channel":"c","data":1}]}"#,
        ] {
            let Err(ApiError::BadRequest(message)) = parse_str(batch) else {
                panic!("{batch} accepted");
            };
            assert!(message.contains("single message"), "{message}");
        }
        // Written as null, it is neither a condition nor absent: refused, in a batch too.
        for body in [
            r#"{"channel":"c","data":1,"expect_seq":-1}"#,
            r#"{"channel":"c","data":1,"expect_seq":null}"#,
            r#"{"messages":[{"channel":"c","data":null,"expect_seq":null}]}"#,
        ] {
            assert!(parse_str(body).is_err(), "{body} accepted");
        }
    }

    #[test]
    fn receipts() {
        assert_eq!(receipt(&[(3, 2)], false), br#"{"seq":3,"subscribers":2}"#);
        assert_eq!(
            receipt(&[(1, 0), (2, 5)], true),
            br#"{"results":[{"seq":1,"subscribers":0},{"seq":2,"subscribers":5}]}"#
        );
    }
}
