//! `proto::handshake::parse_request` on arbitrary bytes, with the default limits.
//!
//! Invariants:
//! - never panics;
//! - `Ok(Some((_, n)))` has `n <= input.len()` and `n <= max_head_bytes`;
//! - a buffer longer than `max_head_bytes` never gets `Ok(None)` ("send more");
//! - the decision is stable under arrival order: the server parses the prefix it has, and
//!   only on `Ok(None)` parses again with more bytes. Any final answer on a prefix must be
//!   the answer for the whole input (a head-too-large prefix must not turn into a success);
//! - a request that `websocket_accept` accepts meets RFC 6455 §4.2.1, re-checked here on
//!   the parsed fields and on the raw head bytes.
#![no_main]

use herald::proto::handshake::{HandshakeLimits, Request, parse_request};
use herald::proto::HandshakeError;
use libfuzzer_sys::fuzz_target;

type Parsed = Result<Option<(Request, usize)>, HandshakeError>;

fuzz_target!(|data: &[u8]| {
    let limits = HandshakeLimits::default();
    // The split point comes from the first two bytes; the request is everything after them,
    // so seeds are an HTTP head behind two bytes.
    let (split, input) = match data {
        [a, b, rest @ ..] => (usize::from(u16::from_le_bytes([*a, *b])), rest),
        _ => return,
    };

    let whole = parse_request(input, &limits);
    check_one(input, &whole, &limits);

    let split = if input.is_empty() { 0 } else { split % (input.len() + 1) };
    let prefix = &input[..split];
    let first = parse_request(prefix, &limits);
    check_one(prefix, &first, &limits);
    match &first {
        Ok(None) => {}
        Err(HandshakeError::HeadTooLarge { .. }) => {
            // The server already rejected; with more bytes the head may turn out malformed
            // instead, but it must never be accepted.
            assert!(
                whole.is_err(),
                "prefix of {split} bytes was too large, whole input accepted: {whole:?}"
            );
        }
        final_answer => assert_eq!(
            final_answer, &whole,
            "answer on a {split}-byte prefix differs from the answer on all {} bytes",
            input.len()
        ),
    }
});

fn check_one(input: &[u8], parsed: &Parsed, limits: &HandshakeLimits) {
    match parsed {
        Ok(None) => assert!(
            input.len() <= limits.max_head_bytes,
            "asked for more bytes with {} buffered (limit {})",
            input.len(),
            limits.max_head_bytes
        ),
        Ok(Some((request, head_len))) => {
            assert!(*head_len <= input.len(), "head length {head_len} > input");
            assert!(
                *head_len <= limits.max_head_bytes,
                "accepted a head of {head_len} bytes (limit {})",
                limits.max_head_bytes
            );
            let head = &input[..*head_len];
            assert!(
                head.ends_with(b"\n\n") || head.ends_with(b"\n\r\n"),
                "head does not end with a blank line"
            );
            if request.websocket_accept().is_ok() {
                check_upgrade(request, head);
            }
        }
        Err(_) => {}
    }
}

/// RFC 6455 §4.2.1, from the parsed fields and, independently, from the raw head.
fn check_upgrade(request: &Request, head: &[u8]) {
    assert_eq!(request.method, "GET");
    assert!(request.version_minor >= 1, "upgrade over HTTP/1.0");
    // RFC 9112 §2.2: empty lines before the request line are ignored (httparse does).
    let request_line = head.trim_ascii_start();
    assert!(request_line.starts_with(b"GET "), "accepted upgrade does not start with GET");
    assert!(request.host.is_some(), "upgrade without Host");
    assert!(has_token(request.upgrade.as_deref(), "websocket"));
    assert!(has_token(request.connection.as_deref(), "upgrade"));
    assert_eq!(request.sec_websocket_version.as_deref(), Some("13"));
    let key = request.sec_websocket_key.as_deref().expect("upgrade without key");
    assert_eq!(decoded_len(key), Some(16), "key {key:?} is not base64 of 16 bytes");
    assert!(request.transfer_encoding.is_none());
    assert!(request.content_length.unwrap_or(0) == 0);
    for name in ["host", "upgrade", "connection", "sec-websocket-key", "sec-websocket-version"] {
        assert!(
            raw_header(head, name).is_some(),
            "accepted upgrade without a {name} line in the raw head"
        );
    }
}

fn has_token(list: Option<&str>, token: &str) -> bool {
    list.is_some_and(|list| list.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// Whether some header line of `head` has the field name `name` (ASCII case-insensitive).
fn raw_header<'a>(head: &'a [u8], name: &str) -> Option<&'a [u8]> {
    head.split(|&b| b == b'\n').skip(1).find_map(|line| {
        let colon = line.iter().position(|&b| b == b':')?;
        line[..colon]
            .eq_ignore_ascii_case(name.as_bytes())
            .then(|| &line[colon + 1..])
    })
}

/// Length of what strict, padded base64 `s` decodes to; `None` if it is not that.
/// Written out here so the oracle does not share the server's base64 code.
fn decoded_len(s: &str) -> Option<usize> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes = s.as_bytes();
    if bytes.len() % 4 != 0 {
        return None;
    }
    let pad = bytes.iter().rev().take_while(|&&b| b == b'=').count();
    if pad > 2 {
        return None;
    }
    let body = &bytes[..bytes.len() - pad];
    let mut last = 0;
    for &b in body {
        last = ALPHABET.iter().position(|&a| a == b)?;
    }
    // Canonical encoding: the bits the padding stands for are zero.
    let spare_bits = match pad {
        1 => 0b11,
        2 => 0b1111,
        _ => 0,
    };
    if last & spare_bits != 0 {
        return None;
    }
    Some(bytes.len() / 4 * 3 - pad)
}
