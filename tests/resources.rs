//! Resources a client can make the server hold or spend, against the real binary (issue
//! 13, items 5, 9 and 10): `/echo` held to the limits of `/ws` (message size, fragments,
//! inbound rate, inflated size), and a token carrying a permission pattern outside the
//! documented grammar refused with 401.

mod support;
mod support_deflate;

use std::io::Write;
use std::time::{Duration, Instant};

use herald::proto::deflate::{Compressor, CompressorSettings};
use herald::proto::frame::{FrameHeader, OpCode};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::json;
use support::*;

const MASK: Option<[u8; 4]> = Some([0x11, 0x22, 0x33, 0x44]);
const CLOSE_WAIT: Duration = Duration::from_secs(3);

/// Completes a raw handshake on `/echo`.
fn raw_echo(server: &Server) -> (std::net::TcpStream, Vec<u8>) {
    let (s, head) = request_head(server.addr(), upgrade_request("/echo").as_bytes());
    assert_eq!(head.status, 101, "upgrade failed: {head:?}");
    (s, head.rest)
}

fn fragment(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = encode_frame(opcode, payload, MASK);
    if !fin {
        f[0] &= 0x7F;
    }
    f
}

// ---------------------------------------------------------------------------------------
// /echo has the limits of /ws
// ---------------------------------------------------------------------------------------

#[test]
fn echo_refuses_a_message_over_64_kib_with_1009_by_default() {
    let mut server = Server::start(&[]);
    // 64 KiB exactly is echoed.
    let (mut s, mut buf) = raw_echo(&server);
    let fits = pseudo_random_bytes(1, 64 * 1024);
    s.write_all(&encode_frame(OP_BINARY, &fits, MASK)).unwrap();
    let echo = read_frame(&mut s, &mut buf, Duration::from_secs(5)).expect("echo");
    assert!(echo.payload == fits, "64 KiB echo differs");

    // One byte more, in one frame or in small fragments, closes with 1009.
    let over = pseudo_random_bytes(2, 64 * 1024 + 1);
    let _ = s.write_all(&encode_frame(OP_BINARY, &over, MASK));
    assert_eq!(raw_expect_close(&mut s, &mut buf, CLOSE_WAIT), 1009);
    let (mut s, mut buf) = raw_echo(&server);
    let mut frames = Vec::new();
    let chunks: Vec<&[u8]> = over.chunks(4096).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let opcode = if i == 0 { OP_BINARY } else { OP_CONT };
        frames.extend(fragment(i + 1 == chunks.len(), opcode, chunk));
    }
    let _ = s.write_all(&frames);
    assert_eq!(raw_expect_close(&mut s, &mut buf, CLOSE_WAIT), 1009);

    // More fragments than /ws allows (1024), each empty: 1009 too.
    let (mut s, mut buf) = raw_echo(&server);
    let mut flood = fragment(false, OP_BINARY, b"x");
    for _ in 0..2000 {
        flood.extend(fragment(false, OP_CONT, b""));
    }
    let _ = s.write_all(&flood);
    assert_eq!(raw_expect_close(&mut s, &mut buf, CLOSE_WAIT), 1009);
    server.assert_healthy();
}

#[test]
fn echo_limits_are_raised_only_by_their_flags() {
    let mut server = Server::start(&[
        "--echo-max-message-bytes",
        "1048576",
        "--echo-max-fragments",
        "4096",
    ]);
    let (mut s, mut buf) = raw_echo(&server);
    let big = pseudo_random_bytes(3, 1 << 20);
    let mut frames = Vec::new();
    let chunks: Vec<&[u8]> = big.chunks(512).collect();
    assert_eq!(chunks.len(), 2048);
    for (i, chunk) in chunks.iter().enumerate() {
        let opcode = if i == 0 { OP_BINARY } else { OP_CONT };
        frames.extend(fragment(i + 1 == chunks.len(), opcode, chunk));
    }
    s.write_all(&frames).unwrap();
    let echo = read_frame(&mut s, &mut buf, Duration::from_secs(10)).expect("echo");
    assert!(echo.payload == big, "1 MiB echo in 2048 fragments differs");
    // /ws keeps its own 64 KiB.
    let (mut ws, mut wbuf) = raw_ws(server.addr());
    let _ = ws.write_all(&encode_frame(OP_TEXT, &vec![b' '; 64 * 1024 + 1], MASK));
    assert_eq!(raw_expect_close(&mut ws, &mut wbuf, CLOSE_WAIT), 1009);
    server.assert_healthy();
}

/// A flood past the inbound rate: as on /ws, messages beyond the burst are dropped and a
/// client that keeps going is closed with 1008 (here: without a reply per dropped
/// message, since /echo sends only echoes).
#[test]
fn echo_flood_beyond_the_rate_is_closed_with_1008_like_ws() {
    let mut server = Server::start(&["--max-messages-per-second", "10"]);
    let (mut s, mut buf) = raw_echo(&server);
    let started = Instant::now();
    let flood: Vec<u8> = (0..200)
        .flat_map(|i| encode_frame(OP_TEXT, format!("m{i}").as_bytes(), MASK))
        .collect();
    let _ = s.write_all(&flood);
    let mut echoes = 0;
    let code = loop {
        match read_frame(&mut s, &mut buf, CLOSE_WAIT) {
            Some(f) if f.opcode == OP_CLOSE => break f.close_code().expect("close code"),
            Some(f) => {
                assert_eq!(f.opcode, OP_TEXT);
                assert_eq!(
                    f.payload,
                    format!("m{echoes}").as_bytes(),
                    "echoes in order"
                );
                echoes += 1;
            }
            None => panic!("ended without a close frame after {echoes} echoes"),
        }
    };
    assert_eq!(code, 1008, "persistent flood must end with 1008");
    // The burst is twice the rate; the bucket refills at 10 a second meanwhile.
    let refill = (started.elapsed().as_secs_f64() * 10.0).ceil() as usize;
    assert!(
        (20..=20 + refill).contains(&echoes),
        "{echoes} echoes from a flood at 10 messages a second"
    );
    server.assert_healthy();
}

/// A decompression bomb on a compressing /echo is cut off by the same 64 KiB (after
/// inflating), instead of being inflated to megabytes and compressed again.
#[test]
fn echo_inflated_bomb_closes_with_1009_by_default() {
    let mut server = Server::start(&["--compression", "shared"]);
    let frame = Compressor::new(CompressorSettings::SHARED, true)
        .encode_frame(OpCode::Binary, &vec![b' '; 8 << 20]);
    let (_, len) = FrameHeader::parse(&frame).unwrap().unwrap();
    let bomb = &frame[len..];
    assert!(bomb.len() < 64 * 1024, "{}", bomb.len());
    let mut client =
        support_deflate::Client::connect(server.addr(), "/echo", Some("permessage-deflate"));
    assert!(client.extensions().is_some(), "deflate not negotiated");
    client.send_compressed(OpCode::Binary, bomb);
    assert_eq!(client.expect_close(), 1009);
    server.assert_healthy();
}

// ---------------------------------------------------------------------------------------
// Permission patterns
// ---------------------------------------------------------------------------------------

#[test]
fn token_with_a_pattern_outside_the_grammar_gets_401_naming_it() {
    const SECRET: &str = "herald-test-secret-0123456789abcdef";
    let mut server = Server::start(&["--jwt-secret", SECRET]);
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let token = |channels: &[&str]| {
        encode(
            &Header::new(Algorithm::HS256),
            &json!({"sub":"u","exp":exp,"channels":channels}),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    };
    let poll = |token: &str| {
        let request = format!(
            "GET /poll?channel=user.10&timeout=0&token={token} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        );
        let (mut s, head) = request_head(server.addr(), request.as_bytes());
        let mut body = head.rest.clone();
        body.extend(assert_closed_within(&mut s, CLOSE_WAIT));
        (head.status, String::from_utf8_lossy(&body).into_owned())
    };
    // `user.1*` would have matched user.10 as a string prefix: it is no pattern at all.
    let (status, body) = poll(&token(&["news", "user.1*"]));
    assert_eq!(status, 401, "{body}");
    assert!(body.contains(r#"\"user.1*\""#), "{body}");
    // The documented forms still work.
    let (status, body) = poll(&token(&["user.*"]));
    assert_eq!(status, 200, "{body}");
    let (status, body) = poll(&token(&["user.1"]));
    assert_eq!(status, 403, "{body}");
    server.assert_healthy();
}
