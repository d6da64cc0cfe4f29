//! `proto::client_handshake::ClientHandshake::parse_response` (the client's reading of the
//! answer to its upgrade request) on arbitrary bytes, with the RFC 6455 §1.3 sample key.
//!
//! Invariants:
//! - never panics;
//! - `Ok(Some((_, n)))` has `n <= input.len()`, `n <= MAX_RESPONSE_HEAD`, and the head ends
//!   with a blank line; a buffer longer than `MAX_RESPONSE_HEAD` never gets `Ok(None)`;
//! - the decision is stable under arrival order: any final answer on a prefix is the answer
//!   on the whole input (a refusal's body read so far being a prefix of the whole one), and
//!   a head-too-large prefix never turns into an accepted upgrade;
//! - an accepted upgrade is a 101 whose raw head carries the sample accept value, with no
//!   extension or subprotocol unless one was offered.
#![no_main]

use herald::proto::ClientHandshakeError;
use herald::proto::client_handshake::{Answer, ClientHandshake, MAX_RESPONSE_HEAD};
use libfuzzer_sys::fuzz_target;

type Parsed = Result<Option<(Answer, usize)>, ClientHandshakeError>;

const SAMPLE_NONCE: [u8; 16] = *b"the sample nonce";
const SAMPLE_ACCEPT: &[u8] = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

fuzz_target!(|data: &[u8]| {
    // Bytes 0-1: the split point (LE); byte 2: bit 0 offers permessage-deflate, bit 1 the
    // subprotocol "chat"; the response follows.
    let (split, offers, input) = match data {
        [a, b, offers, rest @ ..] => (usize::from(u16::from_le_bytes([*a, *b])), *offers, rest),
        _ => return,
    };
    let mut handshake = ClientHandshake::new("/ws", "h", SAMPLE_NONCE);
    if offers & 1 != 0 {
        handshake = handshake.extensions("permessage-deflate");
    }
    if offers & 2 != 0 {
        handshake = handshake.protocols("chat");
    }

    let whole = handshake.parse_response(input);
    check_one(input, &whole, offers);

    let split = if input.is_empty() {
        0
    } else {
        split % (input.len() + 1)
    };
    let prefix = &input[..split];
    let first = handshake.parse_response(prefix);
    check_one(prefix, &first, offers);
    match (&first, &whole) {
        (Ok(None), _) => {}
        (Err(ClientHandshakeError::HeadTooLarge { .. }), _) => assert!(
            !matches!(whole, Ok(Some((Answer::Accepted { .. }, _)))),
            "prefix of {split} bytes was too large, whole input accepted: {whole:?}"
        ),
        (
            Ok(Some((
                Answer::Refused {
                    status,
                    status_line,
                    headers,
                    body,
                },
                n,
            ))),
            Ok(Some((
                Answer::Refused {
                    status: s,
                    status_line: l,
                    headers: h,
                    body: b,
                },
                m,
            ))),
        ) => {
            assert_eq!(
                (status, status_line, headers, n),
                (s, l, h, m),
                "refusal differs"
            );
            assert!(
                b.starts_with(body),
                "body read so far is not a prefix of the whole"
            );
        }
        final_answer => assert_eq!(
            final_answer.0,
            &whole,
            "answer on a {split}-byte prefix differs from the answer on all {} bytes",
            input.len()
        ),
    }
});

fn check_one(input: &[u8], parsed: &Parsed, offers: u8) {
    match parsed {
        Ok(None) => assert!(
            input.len() <= MAX_RESPONSE_HEAD,
            "asked for more bytes with {} buffered (limit {MAX_RESPONSE_HEAD})",
            input.len()
        ),
        Ok(Some((answer, head_len))) => {
            assert!(*head_len <= input.len(), "head length {head_len} > input");
            assert!(
                *head_len <= MAX_RESPONSE_HEAD,
                "read a head of {head_len} bytes"
            );
            let head = &input[..*head_len];
            assert!(
                head.ends_with(b"\n\n") || head.ends_with(b"\n\r\n"),
                "head does not end with a blank line"
            );
            if let Answer::Accepted {
                protocol,
                extensions,
            } = answer
            {
                check_accepted(head, protocol.as_deref(), extensions.as_deref(), offers);
            }
        }
        Err(_) => {}
    }
}

/// RFC 6455 §4.1, re-checked on the raw head bytes.
fn check_accepted(head: &[u8], protocol: Option<&str>, extensions: Option<&str>, offers: u8) {
    let status_line = head.trim_ascii_start();
    assert!(
        status_line.starts_with(b"HTTP/1.1 101") || status_line.starts_with(b"HTTP/1.0 101"),
        "accepted a head that is not a 101"
    );
    assert!(
        raw_headers(head, "sec-websocket-accept").any(|v| v.trim_ascii() == SAMPLE_ACCEPT),
        "accepted without the sample accept value"
    );
    if offers & 1 == 0 {
        assert_eq!(
            extensions, None,
            "accepted an extension that was not offered"
        );
    }
    if offers & 2 == 0 {
        assert_eq!(
            protocol, None,
            "accepted a subprotocol that was not offered"
        );
    }
}

/// The values of the header lines of `head` named `name` (ASCII case-insensitive).
fn raw_headers<'a>(head: &'a [u8], name: &'a str) -> impl Iterator<Item = &'a [u8]> {
    head.split(|&b| b == b'\n').skip(1).filter_map(move |line| {
        let colon = line.iter().position(|&b| b == b':')?;
        line[..colon]
            .eq_ignore_ascii_case(name.as_bytes())
            .then(|| &line[colon + 1..])
    })
}
